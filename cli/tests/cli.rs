//! The `veil` binary end to end: real processes, real files.

mod common;

use common::{fails, models, ok, s, scratch, veil};
use std::path::{Path, PathBuf};

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
    // an empty batch is named as such, not as a shape mismatch
    let empty = dir.join("empty.npy");
    ndarray_npy::write_npy(&empty, &ndarray::Array2::<f32>::zeros((0, 30))).unwrap();
    let out = veil(&["predict", s(&model), "--input", s(&empty), "--output", s(&y)]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("no samples"), "{err}");
    assert!(!y.exists());
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

#[test]
fn bad_calibration_data_is_a_clear_error() {
    let dir = scratch("calib");
    let model = models().join("mlp_digits/model.onnx");
    let out = dir.join("m.veil");
    let write = |name: &str, a: ndarray::Array2<f32>| {
        let p = dir.join(name);
        ndarray_npy::write_npy(&p, &a).unwrap();
        p
    };
    let mut nan = ndarray::Array2::<f32>::zeros((20, 64));
    nan[[7, 3]] = f32::NAN;
    let cases = [
        (write("nan.npy", nan), "sample 7, element 3 is NaN"),
        (write("empty.npy", ndarray::Array2::zeros((0, 64))), "no samples"),
        (write("shape.npy", ndarray::Array2::zeros((20, 60))), "expects shape [N,64], got [20, 60]"),
    ];
    for (calib, want) in cases {
        let err = fails(&["compile", s(&model), "--calib", s(&calib), "--output", s(&out)]);
        assert!(err.contains(want) && err.contains(s(&calib)), "{err}");
        assert!(!out.exists(), "no artifact is written on failure");
    }
}

/// Compile a model from models/ into `dir/name.veil`.
fn compile(dir: &Path, model: &str, extra: &[&str]) -> PathBuf {
    let m = models().join(model);
    let out = dir.join(format!("{}.veil", model.replace('/', "_")));
    let (onnx, calib) = (m.join("model.onnx"), m.join("calib.npy"));
    let mut args = vec!["compile", s(&onnx), "--calib", s(&calib), "-o", s(&out)];
    args.extend_from_slice(extra);
    ok(&args);
    out
}

#[test]
fn encrypted_workflow_and_its_failure_modes() {
    let dir = scratch("workflow");
    let lr = compile(&dir, "logreg_breast_cancer", &[]);
    let x = models().join("logreg_breast_cancer/test_x.npy");
    let keys = dir.join("keys");
    ok(&["keygen", s(&lr), "--out-dir", s(&keys)]);
    let (ck, sk) = (keys.join("client.key"), keys.join("server.key"));
    let (ct, yct, y) = (dir.join("x.ct"), dir.join("y.ct"), dir.join("y.npy"));
    ok(&["encrypt", s(&lr), "--client-key", s(&ck), "-i", s(&x), "-o", s(&ct)]);
    ok(&["run", s(&lr), "--server-key", s(&sk), "-i", s(&ct), "-o", s(&yct)]);
    ok(&["decrypt", s(&lr), "--client-key", s(&ck), "-i", s(&yct), "-o", s(&y)]);
    // The decrypted probabilities match clear mode's (no lookups: outputs decrypt exactly).
    let yc = dir.join("yc.npy");
    ok(&["predict", s(&lr), "-i", s(&x), "-o", s(&yc), "--mode", "clear"]);
    use ndarray_npy::ReadNpyExt;
    let read = |p: &Path| ndarray::Array2::<f32>::read_npy(std::fs::File::open(p).unwrap()).unwrap();
    let (fhe, clear) = (read(&y), read(&yc));
    let argmax =
        |a: &ndarray::Array2<f32>| a.rows().into_iter().map(|r| if r[1] > r[0] { 1 } else { 0 }).collect::<Vec<_>>();
    assert_eq!(argmax(&fhe), argmax(&clear));
    let worst = fhe.iter().zip(clear.iter()).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
    assert!(worst < 1e-6, "probabilities differ by {worst}");

    // Keys and ciphertexts of one compile do not fit another model...
    let other = compile(&dir, "linreg_diabetes", &[]);
    let err = fails(&[
        "encrypt",
        s(&other),
        "--client-key",
        s(&ck),
        "-i",
        s(&models().join("linreg_diabetes/test_x.npy")),
        "-o",
        s(&dir.join("o.ct")),
    ]);
    assert!(err.contains("made for a different compiled model"), "{err}");
    let err = fails(&["run", s(&other), "--server-key", s(&sk), "-i", s(&ct), "-o", s(&dir.join("o.ct"))]);
    assert!(err.contains("made for a different compiled model"), "{err}");
    // ...nor does a recompile of the same model with other settings.
    let narrower = dir.join("narrow.veil");
    let m = models().join("logreg_breast_cancer");
    ok(&["compile", s(&m.join("model.onnx")), "--calib", s(&m.join("calib.npy")), "-o", s(&narrower), "--n-bits", "4"]);
    let err = fails(&["decrypt", s(&narrower), "--client-key", s(&ck), "-i", s(&yct), "-o", s(&dir.join("z.npy"))]);
    assert!(err.contains("different compiled model"), "{err}");

    // A key of the wrong kind is named as such.
    let err = fails(&["decrypt", s(&lr), "--client-key", s(&sk), "-i", s(&yct), "-o", s(&dir.join("z.npy"))]);
    assert!(err.contains("veil::ClientKey"), "{err}");

    // Tampered and truncated ciphertexts are errors, and nothing is written.
    let mut bytes = std::fs::read(&ct).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    let tampered = dir.join("tampered.ct");
    std::fs::write(&tampered, &bytes).unwrap();
    let out = dir.join("never.ct");
    let err = fails(&["run", s(&lr), "--server-key", s(&sk), "-i", s(&tampered), "-o", s(&out)]);
    assert!(err.contains("truncated or was modified"), "{err}");
    let truncated = dir.join("truncated.ct");
    std::fs::write(&truncated, &bytes[..bytes.len() / 3]).unwrap();
    let err = fails(&["run", s(&lr), "--server-key", s(&sk), "-i", s(&truncated), "-o", s(&out)]);
    assert!(err.contains("truncated or was modified"), "{err}");
    assert!(!out.exists());
    let err = fails(&["run", s(&lr), "--server-key", s(&sk), "-i", s(&x), "-o", s(&out)]);
    assert!(err.contains("not a veil file"), "{err}");

    // An output path that cannot be written is refused before any work.
    let nowhere = dir.join("no-such-dir/y.ct");
    let err = fails(&["run", s(&lr), "--server-key", s(&sk), "-i", s(&ct), "-o", s(&nowhere)]);
    assert!(err.contains("does not exist") && err.contains("encrypted outputs"), "{err}");
    // The client key is a secret: readable by its owner only.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&ck).unwrap().permissions().mode() & 0o777, 0o600);
    }

    // A model file that is not one.
    let err = fails(&["keygen", s(&x.with_extension("veil")), "--out-dir", s(&keys)]);
    assert!(err.contains("cannot read"), "{err}");
    let bad = dir.join("bad.veil");
    std::fs::write(&bad, b"\x0a\x05hello").unwrap();
    let err = fails(&["keygen", s(&bad), "--out-dir", s(&keys)]);
    assert!(err.contains("bad.veil"), "{err}");
}

#[test]
fn inspect_shows_every_stage_of_a_compiled_model() {
    let dir = scratch("stages");
    let cnn = compile(&dir, "cnn_digits", &[]);
    for stage in ["float", "quantized", "fused"] {
        let out = veil(&["inspect", s(&cnn), "--stage", stage]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let text = String::from_utf8(out.stdout).unwrap();
        assert!(text.starts_with("graph \"cnn_digits\""), "{text}");
        if stage != "float" {
            assert!(text.contains("enc<"), "{stage}: {text}");
        }
    }
    let fused = String::from_utf8(veil(&["inspect", s(&cnn), "--stage", "fused"]).stdout).unwrap();
    // the ReLU after max pooling is read as |x| on the whole torus
    assert!(fused.contains("= abs_enc "), "{fused}");
    let report =
        String::from_utf8(veil(&["inspect", s(&cnn), "--stage", "report", "--format", "json"]).stdout).unwrap();
    let v: serde_json::Value = serde_json::from_str(&report).unwrap();
    assert!(v["lookups_per_sample"].as_u64().unwrap() > 0);
    assert!(v["max_precision"].as_u64().unwrap() <= 8);
    // the search's trials: the accepted one among them, at the compiled precision
    let trials = v["trials"].as_array().unwrap();
    assert!(trials.iter().any(|t| t["accepted"] == true && t["precision"] == v["max_precision"]), "{trials:?}");
    let text = String::from_utf8(veil(&["inspect", s(&cnn), "--stage", "report"]).stdout).unwrap();
    assert!(text.contains("bit-width search (") && text.contains("lookup→max"), "{text}");
    let err = fails(&["inspect", s(&models().join("cnn_digits/model.onnx")), "--stage", "fused"]);
    assert!(err.contains("compile it"), "{err}");
}

#[test]
fn file_workflow_on_a_model_with_lookups_decrypts_the_clear_predictions() {
    // keygen → encrypt → run (server key only) → decrypt through files, on the digits MLP
    // (48 lookups per sample): the decrypted labels are the clear run's
    let dir = scratch("lookups-workflow");
    let m = compile(&dir, "mlp_digits", &[]);
    use ndarray_npy::{ReadNpyExt, WriteNpyExt};
    let all =
        ndarray::Array2::<f32>::read_npy(std::fs::File::open(models().join("mlp_digits/test_x.npy")).unwrap()).unwrap();
    let x = dir.join("x.npy");
    // rows 1..5: test row 0 is a near-tie (classes 2 and 3) that approximate rounding flips
    // in ~3% of encrypted runs (`veil demo` tells such flips from faults by simulation)
    all.slice(ndarray::s![1..5, ..]).to_owned().write_npy(std::fs::File::create(&x).unwrap()).unwrap();
    let keys = dir.join("keys");
    ok(&["keygen", s(&m), "--out-dir", s(&keys)]);
    let (ct, yct, y, yc) = (dir.join("x.ct"), dir.join("y.ct"), dir.join("y.npy"), dir.join("yc.npy"));
    ok(&["encrypt", s(&m), "--client-key", s(&keys.join("client.key")), "-i", s(&x), "-o", s(&ct)]);
    ok(&["run", s(&m), "--server-key", s(&keys.join("server.key")), "-i", s(&ct), "-o", s(&yct)]);
    ok(&["decrypt", s(&m), "--client-key", s(&keys.join("client.key")), "-i", s(&yct), "-o", s(&y)]);
    ok(&["predict", s(&m), "-i", s(&x), "-o", s(&yc), "--mode", "clear"]);
    let read = |p: &Path| ndarray::Array2::<f32>::read_npy(std::fs::File::open(p).unwrap()).unwrap();
    let top = |a: &ndarray::Array2<f32>| {
        a.rows()
            .into_iter()
            .map(|r| r.iter().enumerate().fold((0, f32::MIN), |m, (i, &v)| if v > m.1 { (i, v) } else { m }).0)
            .collect::<Vec<_>>()
    };
    assert_eq!(top(&read(&y)), top(&read(&yc)));
}

#[test]
fn demo_runs_end_to_end() {
    let out = veil(&["demo", "--model", "mlp_digits", "--samples", "2"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}{}", text, String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("encrypted predictions match the clear ones"), "{text}");
}

#[test]
fn the_report_gives_agreement_near_the_decision_boundaries() {
    let dir = scratch("near_boundary");
    let m = models().join("mlp_digits");
    let (onnx, calib, out) = (m.join("model.onnx"), m.join("calib.npy"), dir.join("m.veil"));
    let run = veil(&["compile", s(&onnx), "--calib", s(&calib), "-o", s(&out)]);
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{err}");
    assert!(err.contains("near decision boundaries: 0.9"), "{err}");
    // a regressor is not scored near boundaries: the flag says it changes nothing
    let r = models().join("linreg_diabetes");
    let (onnx, calib, out) = (r.join("model.onnx"), r.join("calib.npy"), dir.join("r.veil"));
    let run = veil(&["compile", s(&onnx), "--calib", s(&calib), "-o", s(&out), "--score-near-boundary"]);
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success() && err.contains("--score-near-boundary applies to classifiers"), "{err}");
    assert!(!err.contains("near decision boundaries"), "{err}");
}
