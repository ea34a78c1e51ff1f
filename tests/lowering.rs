//! The lowered circuit, simulated on plaintexts without noise, computes exactly what the
//! integer interpreter computes (clear mode), for every model.

use rand::SeedableRng;
use veil_passes::{compile, SearchOptions};
use veil_tests::{model_dirs, read_npy};

#[test]
fn noiseless_simulation_equals_clear_execution() {
    let mut failures = Vec::new();
    for dir in model_dirs() {
        let name = dir.file_name().unwrap().to_string_lossy().to_string();
        if name.contains("forest") || name.contains("gboost") {
            continue;
        }
        let g = veil_frontend::onnx::import_file(dir.join("model.onnx")).unwrap();
        let c = compile(&g, &[read_npy(&dir.join("calib.npy"))], &SearchOptions::default()).unwrap();
        let lowered = veil_backend::lower::lower(&c.model, c.precision).unwrap_or_else(|e| panic!("{name}: {e}"));
        let x = read_npy(&dir.join("test_x.npy"));
        let enc = c.model.encode_inputs(std::slice::from_ref(&x)).unwrap();
        let (clear, overflows) = veil_ir::interp::run_checked(&c.model.graph, &enc).unwrap();
        // Samples beyond the compiled ranges saturate in the interpreter but wrap in the
        // circuit (that is what `assume` warns about): compare all the others.
        let flagged: std::collections::BTreeSet<usize> = overflows.iter().flat_map(|o| o.samples.clone()).collect();
        let plain = lowered.client.encode(std::slice::from_ref(&x)).unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let out = lowered.circuit.simulate(&plain, None, &mut rng);
        let ints = lowered.client.decode_integers(&out);
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
