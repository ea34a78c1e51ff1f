//! The float interpreter reproduces onnxruntime on every model in models/, exported by
//! PyTorch and skl2onnx at several opsets with a symbolic batch dimension.

use veil_ir::Tensor;
use veil_tests::{meta, model_dirs, read_npy, relative_error};

#[test]
fn float_interpreter_matches_onnxruntime_on_every_model() {
    let dirs = model_dirs();
    assert!(dirs.len() >= 6, "expected the committed models, found {}", dirs.len());
    let mut failures = Vec::new();
    for dir in &dirs {
        let graph = veil_frontend::onnx::import_file(dir.join("model.onnx"))
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        let x = read_npy(&dir.join("test_x.npy"));
        let outs = veil_ir::interp::run(&graph, &[x]).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        let m = meta(dir);
        for (o, ours) in graph.outputs().iter().zip(&outs) {
            let file = m["output_files"][&o.name]
                .as_str()
                .unwrap_or_else(|| panic!("{}: no reference for {}", dir.display(), o.name));
            let reference = read_npy(&dir.join(file));
            match (ours, &reference) {
                (Tensor::I64(a), Tensor::I64(b)) => {
                    let differ = a.iter().zip(b.iter()).filter(|(x, y)| x != y).count();
                    assert_eq!(a.shape(), b.shape(), "{}: {}", dir.display(), o.name);
                    eprintln!("{:60} {:14} {} labels, {differ} differ", dir.display(), o.name, a.len());
                    if differ > 0 {
                        failures.push(format!("{} {}: {differ} labels differ", dir.display(), o.name));
                    }
                }
                _ => {
                    let err = relative_error(ours, &reference);
                    eprintln!("{:60} {:14} {:?} relative error {err:.2e}", dir.display(), o.name, ours.shape());
                    if err > 1e-4 {
                        failures.push(format!("{} {}: relative error {err:.2e}", dir.display(), o.name));
                    }
                }
            }
        }
    }
    assert!(failures.is_empty(), "mismatches against onnxruntime:\n{}", failures.join("\n"));
}
