//! The lowered circuit, simulated on plaintexts without noise, computes exactly what the
//! integer interpreter computes (clear mode), for every model.

use rand::SeedableRng;
use veil_passes::compile;
use veil_passes::digits::split_outputs;
use veil_passes::ranges::DEFAULT_MARGIN;
use veil_tests::{model_dirs, read_npy};

#[test]
fn noiseless_simulation_equals_clear_execution() {
    let mut failures = Vec::new();
    for dir in model_dirs() {
        let name = dir.file_name().unwrap().to_string_lossy().to_string();
        let g = veil_frontend::onnx::import_file(dir.join("model.onnx")).unwrap();
        let calib = read_npy(&dir.join("calib.npy"));
        let mut c =
            compile(&g, std::slice::from_ref(&calib), &veil_backend::pipeline::CompileOptions::default().search)
                .unwrap();
        let x = read_npy(&dir.join("test_x.npy"));
        // Outputs sent as digits lower to the same integers too; and read back, they give
        // the outputs the whole read would (up to values at a step edge).
        if let Some(split) = split_outputs(&c.model, 2, std::slice::from_ref(&calib), DEFAULT_MARGIN).unwrap() {
            let whole = c.model.run_clear(std::slice::from_ref(&x)).unwrap();
            let parts = split.run_clear(std::slice::from_ref(&x)).unwrap();
            let (w, p) = (whole[0].to_f32(), parts[0].to_f32());
            // digits' read errors add up to at most 1/16 of a step: the values that close
            // to a step edge (a few percent) read one step apart
            let same = w.iter().zip(p.iter()).filter(|(a, b)| (*a - *b).abs() <= 1e-4 * (1.0 + a.abs())).count();
            assert!(same as f64 >= 0.9 * w.len() as f64, "{name}: {same} of {} outputs agree", w.len());
            if w.ndim() == 2 {
                let top = |a: ndarray::ArrayViewD<f32>| {
                    a.iter().enumerate().fold((0, f32::MIN), |m, (i, &v)| if v > m.1 { (i, v) } else { m }).0
                };
                let agree = w.outer_iter().zip(p.outer_iter()).filter(|(a, b)| top(a.view()) == top(b.view())).count();
                assert!(agree as f64 >= 0.99 * w.shape()[0] as f64, "{name}: argmax agrees on {agree}");
            }
            c.model = split;
        }
        let lowered = veil_backend::lower::lower(&c.model, c.precision).unwrap_or_else(|e| panic!("{name}: {e}"));
        let enc = c.model.encode_inputs(std::slice::from_ref(&x)).unwrap();
        let (clear, overflows) = veil_ir::interp::run_checked(&c.model.graph, &enc).unwrap();
        // Samples beyond the compiled ranges saturate in the interpreter but wrap in the
        // circuit (that is what `assume` warns about): compare all the others.
        let flagged: std::collections::BTreeSet<usize> = overflows.iter().flat_map(|o| o.samples.clone()).collect();
        let plain = lowered.client.encode(std::slice::from_ref(&x)).unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let out = lowered.circuit.simulate(&plain, None, &mut rng);
        let ints = lowered.client.decode_integers(&out).unwrap();
        for (a, b) in ints.iter().zip(&clear) {
            let (a, b) = (a.as_i64().unwrap(), b.as_i64().unwrap());
            for (s, (ra, rb)) in a.outer_iter().zip(b.outer_iter()).enumerate() {
                if ra != rb && !flagged.contains(&s) {
                    failures.push(format!("{name} sample {s}: {ra} vs {rb}"));
                }
            }
        }
        let t = std::time::Instant::now();
        let params = veil_backend::params::optimize(&lowered.requirements).unwrap_or_else(|e| panic!("{name}: {e}"));
        eprintln!(
            "{name:36} n={} k={} N={} pbs={}x{} ks={}x{} lookup≈{:.0}ms p_err=2^{:.1} bsk={}MB ksk={}MB ({:?})",
            params.lwe_dimension,
            params.glwe_dimension,
            params.polynomial_size,
            params.pbs_base_log,
            params.pbs_level,
            params.ks_base_log,
            params.ks_level,
            params.pbs_cost_ms,
            params.p_error.log2(),
            params.bootstrap_key_bytes >> 20,
            params.keyswitch_key_bytes >> 20,
            t.elapsed()
        );
        eprintln!(
            "{name:36} p={} lookups/sample {:4} MACs/sample {:6} tables {:4}  noise terms {}",
            c.precision,
            lowered.circuit.lookups_per_sample(),
            lowered.circuit.macs_per_sample(),
            lowered.circuit.tables.len(),
            lowered.requirements.lookup_noise.len()
        );
    }
    assert!(failures.is_empty(), "{failures:?}");
}

#[test]
fn wide_outputs_cost_the_cnn_no_extra_bootstrap_level() {
    // The CNN's 16-bit logits are computed from 4-bit pooled activations its maxima read.
    // With one scale per linear cluster the maxima read a 2^10-scaled copy and needed
    // 3-level bootstraps; with a scale per value (and digits when they are cheaper) the
    // bootstraps stay at 2 levels. (With ReLU tables: the default |x| form keeps the pooled
    // accumulators on the logits' linear path, whose width costs a third level; see
    // ARCHITECTURE.md, "One-kink activations anywhere else".)
    let dir = veil_tests::models_dir().join("cnn_digits");
    let g = veil_frontend::onnx::import_file(dir.join("model.onnx")).unwrap();
    let calib = read_npy(&dir.join("calib.npy"));
    let mut opts = veil_backend::pipeline::CompileOptions::default();
    opts.search.kink_tables = true;
    let (a, c) = veil_backend::pipeline::compile(&g, std::slice::from_ref(&calib), &opts).unwrap();
    let whole = compile(&g, std::slice::from_ref(&calib), &opts.search).unwrap();
    let mut req = veil_backend::lower::lower(&whole.model, c.precision).unwrap().requirements;
    req.p_error = a.params.p_error.max(2f64.powi(-40));
    let whole_params = veil_backend::params::optimize(&req).unwrap();
    assert!(whole_params.pbs_level <= 2, "whole: {whole_params:?}");
    assert!(
        a.params.pbs_level <= 2 && a.params.pbs_cost_ms <= whole_params.pbs_cost_ms,
        "chosen ({} digits): {:?}\nwhole: {:?}",
        a.report.output_digits,
        a.params,
        whole_params
    );
}

#[test]
fn global_p_error_bounds_the_failure_probability_per_sample() {
    use veil_backend::pipeline::{compile, CompileOptions};
    let dir = veil_tests::models_dir().join("extra/mlp_wine_skl_opset15");
    let g = veil_frontend::onnx::import_file(dir.join("model.onnx")).unwrap();
    let calib = [read_npy(&dir.join("calib.npy"))];
    let global = 2f64.powi(-20);
    // Alone, the per-sample bound sets each lookup's: lookups × p ≤ global, and no
    // stricter than that needs (the per-lookup default 2^-40 no longer applies).
    let only = CompileOptions { p_error: 1.0, global_p_error: Some(global), ..Default::default() };
    let (a, _) = compile(&g, &calib, &only).unwrap();
    let lookups = a.circuit.lookups_per_sample() as f64;
    assert!(lookups > 0.0);
    assert!(a.params.global_p_error <= global, "per sample 2^{:.1}", a.params.global_p_error.log2());
    assert!(a.params.p_error * lookups <= global * 1.0001, "per lookup 2^{:.1}", a.params.p_error.log2());
    assert!(a.params.p_error > 2f64.powi(-40), "per lookup 2^{:.1}: the bound was not used", a.params.p_error.log2());
    // With a per-lookup bound too, the stricter one holds.
    let both = CompileOptions { p_error: 2f64.powi(-40), global_p_error: Some(global), ..Default::default() };
    let (b, _) = compile(&g, &calib, &both).unwrap();
    assert!(b.params.p_error <= 2f64.powi(-40), "per lookup 2^{:.1}", b.params.p_error.log2());
    assert!(b.params.pbs_cost_ms >= a.params.pbs_cost_ms, "a stricter bound cannot be cheaper");
}
