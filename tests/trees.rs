//! Tree ensembles compiled for encrypted evaluation, against the float trees (whose
//! float mode tests/float_models.rs checks against onnxruntime).

use veil_ir::Tensor;
use veil_tests::{meta, models_dir, read_npy};

fn argmax_rows(t: &Tensor) -> Vec<usize> {
    t.to_f32()
        .rows()
        .into_iter()
        .map(|r| r.iter().enumerate().fold((0, f32::MIN), |b, (i, &v)| if v > b.1 { (i, v) } else { b }).0)
        .collect()
}

fn r2(pred: &[f64], y: &[f64]) -> f64 {
    let mean = y.iter().sum::<f64>() / y.len() as f64;
    let res: f64 = pred.iter().zip(y).map(|(p, y)| (p - y).powi(2)).sum();
    let tot: f64 = y.iter().map(|y| (y - mean).powi(2)).sum();
    1.0 - res / tot
}

fn tree_dirs() -> Vec<std::path::PathBuf> {
    let mut dirs: Vec<_> = std::fs::read_dir(models_dir().join("trees")).unwrap().flatten().map(|e| e.path()).collect();
    dirs.sort();
    assert!(dirs.len() >= 9);
    dirs
}

#[test]
fn every_tree_model_runs_in_clear_as_the_float_trees() {
    check_all(false);
}

#[test]
fn with_the_tests_on_the_client_every_tree_model_takes_the_float_branches() {
    check_all(true);
}

fn check_all(client_tests: bool) {
    for dir in tree_dirs() {
        let name = dir.file_name().unwrap().to_string_lossy().to_string();
        let g = veil_frontend::onnx::import_file(dir.join("model.onnx")).unwrap();
        let calib = read_npy(&dir.join("calib.npy"));
        let mut opts = veil_backend::pipeline::CompileOptions::default();
        opts.search.client_tree_tests = client_tests;
        let (a, c) = veil_backend::pipeline::compile(&g, &[calib], &opts).unwrap_or_else(|e| panic!("{name}: {e}"));
        // every table is read, with its parameter set's slot count (an unread table of
        // another set's size once made the evaluator refuse a two-set forest)
        let parts = a.circuit.table_partitions();
        for (t, q) in a.circuit.tables.iter().zip(parts) {
            assert_eq!(t.len(), 1 << a.circuit.precision_of(q), "{name}: a table's size");
        }
        // the rank or unary encoding survives the model file
        let a = veil_backend::artifact::Artifact::from_bytes(&a.to_bytes(), &name).unwrap();
        let x = read_npy(&dir.join("test_x.npy"));
        let y = read_npy(&dir.join("test_y.npy")).values_f64();
        let float = veil_ir::interp::run(&g, std::slice::from_ref(&x)).unwrap();
        let clear = a.quantized_model().unwrap().run_clear(std::slice::from_ref(&x)).unwrap();
        let first = float.iter().position(|t| matches!(t, Tensor::F32(_))).unwrap();
        let (f, q) = (&float[first], &clear[first]);
        // every cut kept: the integer trees take the float trees' branches
        let lossless = client_tests || veil_passes::tree_search::lossless_bits(&g).unwrap() <= c.config.input_bits;
        let classification = meta(&dir)["task"] == "classification";
        eprintln!(
            "{name:24} lookups {:4} widest {} bits, ranks {} bits ({})",
            a.report.lookups_per_sample,
            a.report.max_precision,
            c.config.input_bits,
            if client_tests {
                "client tests"
            } else if lossless {
                "lossless"
            } else {
                "thinned"
            }
        );
        if classification {
            let (pf, pq) = (argmax_rows(f), argmax_rows(q));
            if lossless {
                assert_eq!(pf, pq, "{name}: predicted classes");
            } else {
                let acc =
                    |p: &[usize]| p.iter().zip(&y).filter(|(a, b)| **a as f64 == **b).count() as f64 / y.len() as f64;
                assert!(acc(&pq) >= acc(&pf) - 0.01, "{name}: accuracy {} vs float {}", acc(&pq), acc(&pf));
            }
        } else {
            let (vf, vq) = (f.values_f64(), q.values_f64());
            if lossless {
                let span = vf.iter().cloned().fold(f64::MIN, f64::max) - vf.iter().cloned().fold(f64::MAX, f64::min);
                let worst = vf.iter().zip(&vq).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
                // leaf values are summed at 2^-14 of the scores' span and read to 12 bits
                assert!(worst <= span / 512.0, "{name}: off by {worst} (span {span})");
            } else {
                assert!(r2(&vq, &y) >= r2(&vf, &y) - 0.01, "{name}: R² {} vs float {}", r2(&vq, &y), r2(&vf, &y));
            }
        }
    }
}

#[test]
fn scores_sent_as_partial_sums_read_as_the_whole_scores() {
    // The client adds the decrypted partial sums over groups of trees and reads the total
    // at the score's own step: the same outputs as the whole scores, to the bit.
    for dir in tree_dirs() {
        let name = dir.file_name().unwrap().to_string_lossy().to_string();
        let g = veil_frontend::onnx::import_file(dir.join("model.onnx")).unwrap();
        let calib = read_npy(&dir.join("calib.npy"));
        let c = veil_passes::compile(&g, std::slice::from_ref(&calib), &Default::default()).unwrap();
        let trees = veil_passes::trees::sums::trees_in_scores(&c.model).expect("a tree score output");
        let x = read_npy(&dir.join("test_x.npy"));
        let whole = c.model.run_clear(std::slice::from_ref(&x)).unwrap();
        for groups in [2, 3, trees] {
            let q = veil_passes::trees::sums::split_scores(&c.model, groups).unwrap().expect("split");
            let parts = groups.min(trees);
            assert_eq!(q.graph.outputs().len(), parts * c.model.graph.outputs().len(), "{name}");
            let split = q.run_clear(std::slice::from_ref(&x)).unwrap();
            assert_eq!(split, whole, "{name}, {groups} groups");
            // each partial sum's compiled range holds what it takes (its sound bound)
            let (_, overflows) = q.run_clear_checked(std::slice::from_ref(&x)).unwrap();
            assert!(overflows.is_empty(), "{name}: {} values beyond the compiled ranges", overflows.len());
        }
    }
}
