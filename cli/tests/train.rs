//! Encrypted training through the `veil` binary: the client/server workflow on files, as a
//! real deployment runs it, and its failure modes.

mod common;

use common::{fails, models, ok, s, scratch};
use ndarray::{Array1, Array2};
use ndarray_npy::WriteNpyExt;
use std::path::{Path, PathBuf};

fn write_npy<T: ndarray_npy::WritableElement, D: ndarray::Dimension>(path: &Path, a: &ndarray::Array<T, D>) {
    a.write_npy(std::fs::File::create(path).unwrap()).unwrap();
}

/// Eight samples of two features and their binary labels.
fn tiny_data(dir: &Path) -> (PathBuf, PathBuf) {
    let x = Array2::from_shape_fn((8, 2), |(i, f)| (((i * 5 + f * 3) % 7) as f32 / 3.0 - 1.0).clamp(-1.0, 1.0));
    let y = Array1::from_shape_fn(8, |i| (x[[i, 0]] - 0.5 * x[[i, 1]] > 0.0) as i64);
    let (xp, yp) = (dir.join("x.npy"), dir.join("y.npy"));
    write_npy(&xp, &x);
    write_npy(&yp, &y);
    (xp, yp)
}

/// Batch 2 and a weight range that make every read exact (no rounding, no dither): with a
/// tight p_error, encrypted training gives exactly the clear weights.
const EXACT: [&str; 6] = ["--batch-size", "2", "--weight-range", "0.125", "--p-error", "1e-6"];

#[test]
fn client_and_server_train_through_files_and_match_clear_training() {
    let dir = scratch("train-files");
    let (x, y) = tiny_data(&dir);
    let model = dir.join("train.veil");
    let mut args = vec!["train-compile", "--data", s(&x), "--labels", s(&y), "-o", s(&model)];
    args.extend(EXACT);
    ok(&args);
    let keys = dir.join("keys");
    ok(&["keygen", s(&model), "--out-dir", s(&keys)]);
    let (ck, sk) = (keys.join("client.key"), keys.join("server.key"));
    let (batches, w0, w1, w2, w2b) =
        (dir.join("b.ct"), dir.join("w0.ct"), dir.join("w1.ct"), dir.join("w2.ct"), dir.join("w2b.ct"));
    let enc = ok(&[
        "train-encrypt",
        s(&model),
        "--client-key",
        s(&ck),
        "--data",
        s(&x),
        "--labels",
        s(&y),
        "-o",
        s(&batches),
        "--initial-weights",
        s(&w0),
        "--seed",
        "7",
    ]);
    assert!(enc.contains("4 batches of 2"), "{enc}");
    // the server: two epochs in one run, and the same as two runs of one (resuming)
    let run = ok(&[
        "train-run",
        s(&model),
        "--server-key",
        s(&sk),
        "--batches",
        s(&batches),
        "--weights",
        s(&w0),
        "-o",
        s(&w2),
        "--epochs",
        "2",
    ]);
    assert!(run.contains("8 encrypted steps"), "{run}");
    ok(&["train-run", s(&model), "--server-key", s(&sk), "--batches", s(&batches), "--weights", s(&w0), "-o", s(&w1)]);
    ok(&["train-run", s(&model), "--server-key", s(&sk), "--batches", s(&batches), "--weights", s(&w1), "-o", s(&w2b)]);
    let decrypt = |w: &Path, name: &str| {
        let out = dir.join(name);
        let onnx = dir.join(format!("{name}.onnx"));
        let msg = ok(&[
            "train-decrypt",
            s(&model),
            "--client-key",
            s(&ck),
            "--weights",
            s(w),
            "-o",
            s(&onnx),
            "--weights-dir",
            s(&out),
        ]);
        assert!(msg.contains("after 8 steps"), "{msg}");
        assert!(onnx.exists());
        std::fs::read(out.join("weights.npy")).unwrap()
    };
    let (once, twice) = (decrypt(&w2, "once"), decrypt(&w2b, "twice"));
    assert_eq!(once, twice, "resuming from saved weights gives the same model");
    // the same training in the clear, with the same dither seed
    let clear = dir.join("clear");
    let mut args =
        vec!["train", "--data", s(&x), "--labels", s(&y), "--mode", "clear", "--epochs", "2", "--seed", "7", "-o"];
    let clear_onnx = dir.join("clear.onnx");
    args.push(s(&clear_onnx));
    args.extend(["--weights-dir", s(&clear)]);
    args.extend(EXACT);
    ok(&args);
    assert_eq!(once, std::fs::read(clear.join("weights.npy")).unwrap(), "encrypted and clear weights differ");
    // the server takes no client key: handing it one is an error, not a silent success
    let err = fails(&[
        "train-run",
        s(&model),
        "--server-key",
        s(&ck),
        "--batches",
        s(&batches),
        "--weights",
        s(&w0),
        "-o",
        s(&dir.join("never.ct")),
    ]);
    assert!(err.contains("client.key") || err.contains("ServerKey"), "{err}");
    assert!(!dir.join("never.ct").exists());
}

#[test]
fn dev_training_writes_history_plot_and_an_onnx_model_that_compiles() {
    let dir = scratch("train-dev");
    let m = models().join("train_wine");
    let (onnx, hist, plot) = (dir.join("wine.onnx"), dir.join("history.json"), dir.join("curve.svg"));
    let msg = ok(&[
        "train",
        "--data",
        s(&m.join("train_x.npy")),
        "--labels",
        s(&m.join("train_y.npy")),
        "--test-data",
        s(&m.join("test_x.npy")),
        "--test-labels",
        s(&m.join("test_y.npy")),
        "--mode",
        "simulate",
        "--epochs",
        "2",
        "-o",
        s(&onnx),
        "--history",
        s(&hist),
        "--plot",
        s(&plot),
    ]);
    assert!(msg.contains("test accuracy after each epoch"), "{msg}");
    let h: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&hist).unwrap()).unwrap();
    let steps = h["steps"].as_array().unwrap();
    assert_eq!(steps.len(), 2 * h["batches_per_epoch"].as_u64().unwrap() as usize);
    let last = steps.last().unwrap();
    // three classes, one-vs-rest: within 2 points of float SGD on the same batches
    let (acc, float) = (last["accuracy"].as_f64().unwrap(), last["float_accuracy"].as_f64().unwrap());
    assert!(acc >= float - 0.0223, "accuracy {acc} vs float SGD {float}");
    assert!(std::fs::read_to_string(&plot).unwrap().contains("<svg"));
    // train encrypted, then serve encrypted: the ONNX model compiles and predicts
    let veil_model = dir.join("wine.veil");
    ok(&["compile", s(&onnx), "--calib", s(&m.join("train_x.npy")), "-o", s(&veil_model)]);
    let pred = dir.join("p.npy");
    ok(&["predict", s(&veil_model), "-i", s(&m.join("test_x.npy")), "-o", s(&pred), "--mode", "clear"]);
    assert!(pred.exists());
}

#[test]
fn bad_training_input_is_a_clear_error_and_writes_nothing() {
    let dir = scratch("train-bad");
    let (x, y) = tiny_data(&dir);
    let out = dir.join("never.veil");
    let compile = |x: &Path, y: &Path| fails(&["train-compile", "--data", s(x), "--labels", s(y), "-o", s(&out)]);
    // labels not matching rows
    let short = dir.join("short.npy");
    write_npy(&short, &Array1::from_vec(vec![0i64, 1, 0]));
    let e = compile(&x, &short);
    assert!(e.contains("8 samples") && e.contains("3 labels") && e.contains("short.npy"), "{e}");
    // one class only
    let same = dir.join("same.npy");
    write_npy(&same, &Array1::from_elem(8, 2i64));
    let e = compile(&x, &same);
    assert!(e.contains("same.npy holds only class 2") && e.contains("at least two classes"), "{e}");
    // a label that is not an integer
    let frac = dir.join("frac.npy");
    write_npy(&frac, &Array1::from_vec(vec![0.0f32, 1.0, 0.5, 1.0, 0.0, 1.0, 0.0, 1.0]));
    assert!(compile(&x, &frac).contains("sample 2 has label 0.5"));
    assert!(!out.exists());

    // features: NaN, and outside the declared range
    let onnx = dir.join("never.onnx");
    let train = |x: &Path| {
        fails(&["train", "--data", s(x), "--labels", s(&y), "--mode", "clear", "-o", s(&onnx), "--batch-size", "2"])
    };
    let mut bad = Array2::from_elem((8, 2), 0.5f32);
    bad[[5, 1]] = f32::NAN;
    let nan = dir.join("nan.npy");
    write_npy(&nan, &bad);
    assert!(train(&nan).contains("sample 5, feature 1 is NaN"));
    bad[[5, 1]] = 3.5;
    let wide = dir.join("wide.npy");
    write_npy(&wide, &bad);
    let e = train(&wide);
    assert!(e.contains("sample 5, feature 1 is 3.5, outside the declared feature range [-1, 1]"), "{e}");
    assert!(!onnx.exists());

    // files of another training compile, and a truncated batch file
    let model_a = dir.join("a.veil");
    let model_b = dir.join("b.veil");
    ok(&["train-compile", "--data", s(&x), "--labels", s(&y), "-o", s(&model_a), "--batch-size", "2"]);
    ok(&["train-compile", "--data", s(&x), "--labels", s(&y), "-o", s(&model_b), "--batch-size", "4"]);
    let (ka, kb) = (dir.join("ka"), dir.join("kb"));
    ok(&["keygen", s(&model_a), "--out-dir", s(&ka)]);
    ok(&["keygen", s(&model_b), "--out-dir", s(&kb)]);
    let (ba, wa, bb) = (dir.join("ba.ct"), dir.join("wa.ct"), dir.join("bb.ct"));
    let client_a = ka.join("client.key");
    ok(&[
        "train-encrypt",
        s(&model_a),
        "--client-key",
        s(&client_a),
        "--data",
        s(&x),
        "--labels",
        s(&y),
        "-o",
        s(&ba),
        "--initial-weights",
        s(&wa),
    ]);
    let client_b = kb.join("client.key");
    ok(&["train-encrypt", s(&model_b), "--client-key", s(&client_b), "--data", s(&x), "--labels", s(&y), "-o", s(&bb)]);
    let result = dir.join("result.ct");
    let server_b = kb.join("server.key");
    let e = fails(&[
        "train-run",
        s(&model_b),
        "--server-key",
        s(&server_b),
        "--batches",
        s(&bb),
        "--weights",
        s(&wa),
        "-o",
        s(&result),
    ]);
    assert!(e.contains("weights") && e.contains("different compiled model"), "{e}");
    let bytes = std::fs::read(&ba).unwrap();
    let cut = dir.join("cut.ct");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let server_a = ka.join("server.key");
    let e = fails(&[
        "train-run",
        s(&model_a),
        "--server-key",
        s(&server_a),
        "--batches",
        s(&cut),
        "--weights",
        s(&wa),
        "-o",
        s(&result),
    ]);
    assert!(e.contains("cut.ct") && e.contains("truncated"), "{e}");
    assert!(!result.exists(), "nothing is written when training fails");

    // batches encrypted under another key pair of the same model: refused, not garbage
    let kc = dir.join("kc");
    ok(&["keygen", s(&model_a), "--out-dir", s(&kc)]);
    let bc = dir.join("bc.ct");
    ok(&[
        "train-encrypt",
        s(&model_a),
        "--client-key",
        s(&kc.join("client.key")),
        "--data",
        s(&x),
        "--labels",
        s(&y),
        "-o",
        s(&bc),
    ]);
    let e = fails(&[
        "train-run",
        s(&model_a),
        "--server-key",
        s(&server_a),
        "--batches",
        s(&bc),
        "--weights",
        s(&wa),
        "-o",
        s(&result),
    ]);
    assert!(e.contains("another key pair"), "{e}");
    // test data checked like training data: NaN in train-decrypt's --test-data is an error
    // naming the file and sample, and no model is written
    let decrypted = dir.join("decrypted.onnx");
    let e = fails(&[
        "train-decrypt",
        s(&model_a),
        "--client-key",
        s(&client_a),
        "--weights",
        s(&wa),
        "-o",
        s(&decrypted),
        "--test-data",
        s(&nan),
        "--test-labels",
        s(&y),
    ]);
    assert!(e.contains("nan.npy") && e.contains("sample 5, feature 1 is NaN"), "{e}");
    assert!(!decrypted.exists());
    // and so are train-compile's data values, not only their shape
    let e = fails(&["train-compile", "--data", s(&nan), "--labels", s(&y), "-o", s(&out)]);
    assert!(e.contains("sample 5, feature 1 is NaN"), "{e}");
    assert!(!out.exists());
    // an output directory that does not exist is refused before any work
    let e = fails(&[
        "train-run",
        s(&model_a),
        "--server-key",
        s(&server_a),
        "--batches",
        s(&ba),
        "--weights",
        s(&wa),
        "-o",
        s(&dir.join("missing/w.ct")),
    ]);
    assert!(e.contains("does not exist"), "{e}");
    // a batch larger than the data
    let e = fails(&["train-compile", "--data", s(&x), "--labels", s(&y), "-o", s(&out), "--batch-size", "20"]);
    assert!(e.contains("--batch-size 20 is larger than the 8 samples"), "{e}");

    // inference and training artifacts are not interchangeable
    let e = fails(&["predict", s(&model_a), "-i", s(&x), "-o", s(&dir.join("p.npy"))]);
    assert!(e.contains("training model"), "{e}");
    let logreg = models().join("logreg_breast_cancer");
    let inference = dir.join("logreg.veil");
    ok(&["compile", s(&logreg.join("model.onnx")), "--calib", s(&logreg.join("calib.npy")), "-o", s(&inference)]);
    let e = fails(&[
        "train-encrypt",
        s(&inference),
        "--client-key",
        s(&client_a),
        "--data",
        s(&x),
        "--labels",
        s(&y),
        "-o",
        s(&result),
    ]);
    assert!(e.contains("inference model"), "{e}");
}
