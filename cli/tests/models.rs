//! The CLI on models shaped like the ones users bring (tests/cases): several inputs, bad
//! input values, models below the accuracy tolerance, activations reading the input.

mod common;

use common::{fails, ok, s, scratch};
use ndarray::ArrayD;
use ndarray_npy::{NpzWriter, ReadNpyExt, WriteNpyExt};
use std::path::{Path, PathBuf};

fn cases() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/cases")
}

fn read(p: &Path) -> ArrayD<f32> {
    ArrayD::<f32>::read_npy(std::fs::File::open(p).unwrap()).unwrap()
}

#[test]
fn a_model_with_two_inputs_takes_an_npz() {
    let dir = scratch("two-inputs");
    let c = cases().join("two-inputs");
    let npz = |name: &str, a: &str, b: &str| {
        let p = dir.join(name);
        let mut w = NpzWriter::new(std::fs::File::create(&p).unwrap());
        w.add_array("a", &read(&c.join(a))).unwrap();
        w.add_array("b", &read(&c.join(b))).unwrap();
        w.finish().unwrap();
        p
    };
    let (calib, test) = (npz("calib.npz", "calib_a.npy", "calib_b.npy"), npz("test.npz", "test_a.npy", "test_b.npy"));
    let (model, m) = (c.join("model.onnx"), dir.join("m.veil"));
    // one .npy for two inputs says what to give
    let e = fails(&["compile", s(&model), "--calib", s(&c.join("calib_a.npy")), "-o", s(&m)]);
    assert!(e.contains("takes 2 inputs (a, b)") && e.contains(".npz"), "{e}");
    ok(&["compile", s(&model), "--calib", s(&calib), "-o", s(&m)]);
    let (yf, yc) = (dir.join("yf.npy"), dir.join("yc.npy"));
    ok(&["predict", s(&model), "-i", s(&test), "-o", s(&yf)]);
    ok(&["predict", s(&m), "-i", s(&test), "-o", s(&yc), "--mode", "clear"]);
    let (want, float, clear) = (read(&c.join("expected.npy")), read(&yf), read(&yc));
    let worst = |a: &ArrayD<f32>| a.iter().zip(want.iter()).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
    assert!(worst(&float) < 1e-4, "float mode off onnxruntime by {}", worst(&float));
    let spread = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    assert!(worst(&clear) < 0.1 * spread, "clear mode off by {}", worst(&clear));
    // a missing array is named
    let bad = dir.join("bad.npz");
    let mut w = NpzWriter::new(std::fs::File::create(&bad).unwrap());
    w.add_array("a", &read(&c.join("test_a.npy"))).unwrap();
    w.finish().unwrap();
    let e = fails(&["predict", s(&m), "-i", s(&bad), "-o", s(&dir.join("never.npy"))]);
    assert!(e.contains("no array named 'b'"), "{e}");
}

#[test]
fn non_finite_inputs_are_refused_naming_sample_and_element() {
    let dir = scratch("nan-inputs");
    let c = cases().join("one-input-feature");
    let m = dir.join("m.veil");
    ok(&["compile", s(&c.join("model.onnx")), "--calib", s(&c.join("calib.npy")), "-o", s(&m)]);
    let mut x = read(&c.join("test_x.npy"));
    x[[4, 0]] = f32::INFINITY;
    let bad = dir.join("bad.npy");
    x.write_npy(std::fs::File::create(&bad).unwrap()).unwrap();
    let out = dir.join("y.npy");
    for mode in ["float", "clear"] {
        let target = if mode == "float" { c.join("model.onnx") } else { m.clone() };
        let e = fails(&["predict", s(&target), "-i", s(&bad), "-o", s(&out), "--mode", mode]);
        assert!(e.contains("sample 4, element 0 is inf"), "{mode}: {e}");
    }
    assert!(!out.exists());
}

#[test]
fn a_model_short_of_the_tolerance_compiles_with_a_warning_unless_strict() {
    let dir = scratch("tolerance");
    let c = cases().join("rank3-matmul");
    let (model, calib, m) = (c.join("model.onnx"), c.join("calib.npy"), dir.join("m.veil"));
    // lookups of at most 3 bits cannot keep 99.9% agreement
    let args = [
        "compile",
        s(&model),
        "--calib",
        s(&calib),
        "-o",
        s(&m),
        "--max-precision",
        "3",
        "--accuracy-tolerance",
        "0.001",
    ];
    let warned = ok(&args);
    assert!(warned.contains("warning: no quantization") && warned.contains("--max-precision (now 3"), "{warned}");
    assert!(m.exists());
    std::fs::remove_file(&m).unwrap();
    let mut strict = args.to_vec();
    strict.push("--strict-tolerance");
    let e = fails(&strict);
    assert!(e.contains("no quantization"), "{e}");
    assert!(!m.exists());
}

#[test]
fn activations_can_stay_on_the_server() {
    // The model ends with a sigmoid: by default the client applies it after decryption
    // (seeing the logit); with --server-activations the server computes it as a lookup.
    let dir = scratch("server-activations");
    let m = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/gelu_tanh_sigmoid_breast_cancer");
    let (model, calib, x) = (m.join("model.onnx"), m.join("calib.npy"), m.join("test_x.npy"));
    let (a, b) = (dir.join("a.veil"), dir.join("b.veil"));
    ok(&["compile", s(&model), "--calib", s(&calib), "-o", s(&a)]);
    ok(&["compile", s(&model), "--calib", s(&calib), "-o", s(&b), "--server-activations"]);
    let lookups = |m: &Path| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_veil"))
            .args(["inspect", s(m), "--stage", "report", "--format", "json"])
            .output()
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v["lookups_per_sample"].as_u64().unwrap()
    };
    assert!(lookups(&b) > lookups(&a), "the sigmoid becomes lookups: {} vs {}", lookups(&b), lookups(&a));
    let (ya, yb) = (dir.join("ya.npy"), dir.join("yb.npy"));
    ok(&["predict", s(&a), "-i", s(&x), "-o", s(&ya), "--mode", "clear"]);
    ok(&["predict", s(&b), "-i", s(&x), "-o", s(&yb), "--mode", "clear"]);
    // the same classes; the server's sigmoid is read through a lookup of the rounded logit
    let (pa, pb) = (read(&ya), read(&yb));
    let top = |p: &ArrayD<f32>| p.outer_iter().map(|r| (r[1] > r[0]) as u8).collect::<Vec<_>>();
    assert_eq!(top(&pa), top(&pb));
    let mean = pa.iter().zip(pb.iter()).map(|(x, y)| (x - y).abs()).sum::<f32>() / pa.len() as f32;
    assert!(mean < 0.02, "probabilities differ by {mean} on average");
}

#[test]
fn forest_scores_travel_as_partial_sums_unless_capped() {
    // 50 trees: one partial sum per tree lets the leaf lookups drop a bootstrap level;
    // --max-score-parts 1 keeps whole scores; 0 is refused and writes nothing.
    let dir = scratch("score-parts");
    let f = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/trees/rf_breast_cancer_50x5");
    let (model, calib, m) = (f.join("model.onnx"), f.join("calib.npy"), dir.join("m.veil"));
    let compile =
        |parts: &'static str| vec!["compile", s(&model), "--calib", s(&calib), "-o", s(&m), "--max-score-parts", parts];
    let split = ok(&compile("64"));
    assert!(split.contains("tree scores sent as 50 partial sums") && split.contains("×1 KS"), "{split}");
    let whole = ok(&compile("1"));
    assert!(!whole.contains("partial sums") && whole.contains("×2 KS"), "{whole}");
    std::fs::remove_file(&m).unwrap();
    let e = fails(&compile("0"));
    assert!(e.contains("--max-score-parts"), "{e}");
    assert!(!m.exists());
    // on a model without trees the option changes nothing, and says so
    let lr = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/logreg_breast_cancer");
    let (lm, lc) = (lr.join("model.onnx"), lr.join("calib.npy"));
    let said = ok(&["compile", s(&lm), "--calib", s(&lc), "-o", s(&m), "--max-score-parts", "1"]);
    assert!(said.contains("apply to tree ensembles"), "{said}");
}
