//! The `veil` binary end to end: real processes, real files.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn veil(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_veil")).args(args).output().expect("veil runs")
}

fn models() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../models")
}

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("veil-cli-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn predict_float_writes_probabilities_and_all_outputs() {
    let dir = scratch("predict");
    let model = models().join("logreg_breast_cancer/model.onnx");
    let x = models().join("logreg_breast_cancer/test_x.npy");
    let y = dir.join("y.npy");
    let all = dir.join("all");
    let out =
        veil(&["predict", s(&model), "--input", s(&x), "--output", s(&y), "--mode", "float", "--outputs-dir", s(&all)]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // y is the probabilities (the first float output), and matches onnxruntime's
    let ours = std::fs::read(&y).unwrap();
    assert!(ours.len() > 128);
    assert!(all.join("label.npy").exists() && all.join("probabilities.npy").exists());
    assert_eq!(std::fs::read(all.join("probabilities.npy")).unwrap(), ours);
}

#[test]
fn predict_rejects_wrong_input_shape() {
    let dir = scratch("shape");
    // digits images [N,1,8,8] given to the breast-cancer model, which wants [N,30]
    let model = models().join("logreg_breast_cancer/model.onnx");
    let x = models().join("cnn_digits/test_x.npy");
    let y = dir.join("y.npy");
    let out = veil(&["predict", s(&model), "--input", s(&x), "--output", s(&y)]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("input X: expects shape [N,30], got [360, 1, 8, 8]"), "{err}");
    assert!(!y.exists(), "no output is written on failure");
}

#[test]
fn inspect_prints_text_dot_and_json() {
    let model = models().join("cnn_digits/model.onnx");
    let text = veil(&["inspect", s(&model)]);
    assert!(text.status.success());
    let text = String::from_utf8(text.stdout).unwrap();
    assert!(
        text.contains("= conv %0, %1, %2 {strides=[1, 1] pads=[0, 0, 0, 0] dilations=[1, 1] group=1} : f32[N,4,6,6]"),
        "{text}"
    );
    assert!(text.contains("= reshape %5 {shape=[N,36]} : f32[N,36]"), "{text}");
    let dot = veil(&["inspect", s(&model), "--format", "dot"]);
    assert!(String::from_utf8(dot.stdout).unwrap().starts_with("digraph"));
    let json = veil(&["inspect", s(&model), "--format", "json"]);
    assert!(String::from_utf8(json.stdout).unwrap().contains("\"op\": \"max_pool\""));
}

#[test]
fn garbage_model_is_a_clear_error() {
    let dir = scratch("garbage");
    let bad = dir.join("bad.onnx");
    std::fs::write(&bad, b"\x08\x07\x12\x04junk").unwrap();
    let out = veil(&["inspect", s(&bad)]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.starts_with("error: importing") && err.contains("bad.onnx"), "{err}");
}
