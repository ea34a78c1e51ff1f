//! Models shaped like the ones users report, each once giving a wrong value, a refusal or
//! an internal error (tests/cases/*/CASE.md says which). Each test checks the right value:
//! onnxruntime's output (`expected*.npy`), or the float model's.

use ndarray::Axis;
use veil_backend::pipeline::{compile, CompileOptions};
use veil_ir::Tensor;
use veil_tests::read_npy;

fn case(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("cases").join(name)
}

fn import(path: std::path::PathBuf) -> veil_ir::Graph {
    veil_frontend::onnx::import_file(path).unwrap()
}

/// R² of `ours` against `want`, per output column, the worst one.
fn worst_r2(ours: &Tensor, want: &Tensor) -> f64 {
    veil_passes::bitwidth::score(veil_passes::bitwidth::Metric::R2, ours, want)
}

fn max_abs(ours: &Tensor, want: &Tensor) -> f64 {
    ours.values_f64().iter().zip(want.values_f64()).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max)
}

fn argmax_rows(t: &Tensor) -> Vec<usize> {
    t.to_f32()
        .map_axis(Axis(1), |r| {
            r.iter().enumerate().fold((0, f32::MIN), |m, (i, &v)| if v > m.1 { (i, v) } else { m }).0
        })
        .into_iter()
        .collect()
}

/// Compile with the default options and run the integer circuit in the clear.
fn compile_and_run(
    model: &str,
    calib: &[&str],
    test: &[&str],
    case_name: &str,
) -> (veil_backend::artifact::Artifact, Vec<Tensor>) {
    compile_and_run_with(model, calib, test, case_name, &CompileOptions::default())
}

/// Compile as a regression (outputs are values, scored by R²: `--task regression`).
fn compile_regression(model: &str, case_name: &str) -> Vec<Tensor> {
    let mut opts = CompileOptions::default();
    opts.search.task = Some(veil_ir::Task::Regression);
    compile_and_run_with(model, &["calib.npy"], &["test_x.npy"], case_name, &opts).1
}

fn compile_and_run_with(
    model: &str,
    calib: &[&str],
    test: &[&str],
    case_name: &str,
    opts: &CompileOptions,
) -> (veil_backend::artifact::Artifact, Vec<Tensor>) {
    let d = case(case_name);
    let g = import(d.join(model));
    let calib: Vec<Tensor> = calib.iter().map(|f| read_npy(&d.join(f))).collect();
    let test: Vec<Tensor> = test.iter().map(|f| read_npy(&d.join(f))).collect();
    let (a, _) = compile(&g, &calib, opts).unwrap_or_else(|e| panic!("{case_name}: {e}"));
    let out = a.quantized_model().unwrap().run_clear(&test).unwrap();
    (a, out)
}

#[test]
fn two_features_of_different_ranges_get_a_scale_each() {
    let (_, out) = compile_and_run("model.onnx", &["calib.npy"], &["test_x.npy"], "two-feature-input-scales");
    let want = read_npy(&case("two-feature-input-scales").join("expected.npy"));
    let probs = out.iter().find(|t| t.shape() == want.shape()).expect("probabilities");
    assert!(max_abs(probs, &want) < 0.05, "probabilities off by {}", max_abs(probs, &want));
    assert_eq!(argmax_rows(probs), argmax_rows(&want));
}

#[test]
fn values_beyond_the_calibrated_ranges_are_reported_per_sample() {
    // Test rows (t, t): the hidden unit x0 + x1 reaches 2t, past its calibrated maximum 1
    // from t = 0.5 on. Every sample is either right or reported.
    let (a, out) = compile_and_run("model.onnx", &["calib.npy"], &["test_x.npy"], "activation-beyond-calibration");
    let d = case("activation-beyond-calibration");
    let want = read_npy(&d.join("expected.npy"));
    let x = read_npy(&d.join("test_x.npy"));
    let q = a.quantized_model().unwrap();
    let (_, overflows) = q.run_clear_checked(std::slice::from_ref(&x)).unwrap();
    let mut flagged: Vec<usize> = overflows.iter().flat_map(|o| o.samples.clone()).collect();
    flagged.sort_unstable();
    flagged.dedup();
    let t: Vec<f64> = x.values_f64().chunks(2).map(|r| r[0]).collect();
    let (o, w) = (out[0].values_f64(), want.values_f64());
    for (i, &ti) in t.iter().enumerate() {
        if flagged.contains(&i) {
            continue;
        }
        assert!((o[i] - w[i]).abs() < 0.06, "sample {i} (t = {ti}) is not reported but off: {} vs {}", o[i], w[i]);
    }
    // The ReLU between the two dense layers is read as |x| with its linear half composed
    // into the second layer (no table, so no output range to saturate): the hidden unit
    // past its calibrated maximum is computed right within the accumulator's margin. A
    // value that saturated would have to be reported (above); these are right instead.
    for (i, &ti) in t.iter().enumerate() {
        if ti > 0.52 {
            assert!(
                flagged.contains(&i) || (o[i] - w[i]).abs() < 0.06,
                "sample {i} (t = {ti}) is off ({} vs {}) and not reported: {flagged:?}",
                o[i],
                w[i]
            );
        }
    }
}

#[test]
fn a_leading_size_one_axis_costs_no_accuracy() {
    let d = case("rank3-matmul");
    for (model, calib) in [("model.onnx", "calib.npy"), ("rank2_control.onnx", "rank2_calib.npy")] {
        let g = import(d.join(model));
        let x = read_npy(&d.join(calib));
        let (a, c) = compile(&g, std::slice::from_ref(&x), &CompileOptions::default()).unwrap();
        assert!(a.report.accuracy_warning.is_empty(), "{model}: {}", a.report.accuracy_warning);
        assert!(c.score >= 0.99, "{model}: agreement {}", c.score);
    }
}

#[test]
fn several_regression_targets_are_scored_by_r2_per_target() {
    let (a, out) = compile_and_run("model.onnx", &["calib.npy"], &["test_x.npy"], "multi-target-regression");
    assert!(a.report.metric.starts_with("R²"), "{}", a.report.metric);
    let want = read_npy(&case("multi-target-regression").join("expected.npy"));
    assert!(worst_r2(&out[0], &want) > 0.99, "worst R² {}", worst_r2(&out[0], &want));
}

#[test]
fn a_dense_layer_with_one_input_feature_compiles() {
    let (_, out) = compile_and_run("model.onnx", &["calib.npy"], &["test_x.npy"], "one-input-feature");
    let want = read_npy(&case("one-input-feature").join("expected.npy"));
    assert!(worst_r2(&out[0], &want) > 0.99, "R² {}", worst_r2(&out[0], &want));
    let (_, out) = compile_and_run("model_1d_input.onnx", &["calib_1d.npy"], &["test_x_1d.npy"], "one-input-feature");
    let want = read_npy(&case("one-input-feature").join("expected_1d.npy"));
    assert!(worst_r2(&out[0], &want) > 0.99, "1-D input: R² {}", worst_r2(&out[0], &want));
}

#[test]
fn a_model_with_two_inputs_compiles_and_runs() {
    let (_, out) =
        compile_and_run("model.onnx", &["calib_a.npy", "calib_b.npy"], &["test_a.npy", "test_b.npy"], "two-inputs");
    let want = read_npy(&case("two-inputs").join("expected.npy"));
    // compiled to R² ≥ 0.99 on the calibration data; the test data follow closely
    assert!(worst_r2(&out[0], &want) > 0.98, "R² {}", worst_r2(&out[0], &want));
}

#[test]
fn an_activation_of_the_input_runs_on_the_server() {
    // relu, GELU and sigmoid applied straight to the encrypted input: lookups on the server
    // (the client finishing them would compute everything in the clear)
    for f in [veil_ir::UnaryFn::Relu, veil_ir::UnaryFn::Gelu { tanh: false }, veil_ir::UnaryFn::Sigmoid] {
        let mut b = veil_frontend::dsl::GraphBuilder::new("act");
        let x = b.input("x", &[6]);
        let y = b.unary(x, f).unwrap();
        b.output("y", y);
        let g = b.finish().unwrap();
        let calib: Vec<f32> = (0..600).map(|i| ((i * 37) % 101) as f32 / 25.0 - 2.0).collect();
        let calib = Tensor::F32(ndarray::ArrayD::from_shape_vec(vec![100, 6], calib).unwrap());
        let (a, _) = compile(&g, std::slice::from_ref(&calib), &CompileOptions::default()).unwrap();
        assert!(a.report.lookups_per_sample >= 6, "{f:?}: {} lookups", a.report.lookups_per_sample);
        let out = a.quantized_model().unwrap().run_clear(std::slice::from_ref(&calib)).unwrap();
        let want = veil_ir::interp::run(&g, std::slice::from_ref(&calib)).unwrap();
        assert!(worst_r2(&out[0], &want[0]) > 0.99, "{f:?}: R² {}", worst_r2(&out[0], &want[0]));
        assert!(a.report.metric.starts_with("R²"), "element-wise: {}", a.report.metric);
    }
}

#[test]
fn circuits_without_lookups_match_the_float_model() {
    // logistic and linear regression: outputs decrypt exactly, so bits cost little
    for (m, metric) in [("logreg_breast_cancer", "acc"), ("linreg_diabetes", "r2")] {
        let d = veil_tests::models_dir().join(m);
        let g = import(d.join("model.onnx"));
        let calib = read_npy(&d.join("calib.npy"));
        let x = read_npy(&d.join("test_x.npy"));
        let (a, _) = compile(&g, std::slice::from_ref(&calib), &CompileOptions::default()).unwrap();
        assert_eq!(a.report.lookups_per_sample, 0);
        let ours = a.quantized_model().unwrap().run_clear(std::slice::from_ref(&x)).unwrap();
        let float = veil_ir::interp::run(&g, std::slice::from_ref(&x)).unwrap();
        match metric {
            "acc" => assert_eq!(ours[0], float[0], "{m}: labels"),
            _ => assert!(worst_r2(&ours[0], &float[0]) > 0.9999, "{m}: R² vs float {}", worst_r2(&ours[0], &float[0])),
        }
    }
}

#[test]
fn string_class_labels_of_a_pipeline_become_class_indices() {
    let d = case("string-labels-pipeline");
    let g = import(d.join("model.onnx"));
    let x = read_npy(&d.join("test_x.npy"));
    let want = read_npy(&d.join("expected.npy"));
    let float = veil_ir::interp::run(&g, std::slice::from_ref(&x)).unwrap();
    let probs = float.iter().find(|t| t.shape() == want.shape()).expect("probabilities");
    assert!(max_abs(probs, &want) < 1e-5, "float probabilities off by {}", max_abs(probs, &want));
    let labels = float.iter().find(|t| matches!(t, Tensor::I64(_))).expect("labels");
    let idx: Vec<i64> = argmax_rows(&want).iter().map(|&i| i as i64).collect();
    assert_eq!(labels.values_f64().iter().map(|&v| v as i64).collect::<Vec<_>>(), idx);
    let (_, out) = compile_and_run("model.onnx", &["calib.npy"], &["test_x.npy"], "string-labels-pipeline");
    let probs = out.iter().find(|t| t.shape() == want.shape()).expect("probabilities");
    let agree = argmax_rows(probs).iter().zip(argmax_rows(&want)).filter(|(a, b)| **a == *b).count();
    assert!(agree >= 57, "{agree} of 60 labels agree with onnxruntime");
}

/// The float model and onnxruntime agree to `tol` on the case's test inputs.
fn float_matches(case_name: &str, model: &str, expected: &str, tol: f64) {
    let d = case(case_name);
    let g = import(d.join(model));
    let x = read_npy(&d.join("test_x.npy"));
    let want = read_npy(&d.join(expected));
    let out = veil_ir::interp::run(&g, std::slice::from_ref(&x)).unwrap();
    assert_eq!(out[0].shape(), want.shape(), "{model}");
    assert!(max_abs(&out[0], &want) < tol, "{model}: float off by {}", max_abs(&out[0], &want));
}

#[test]
fn expand_runs_encrypted_and_reduce_l2_in_float() {
    float_matches("expand-and-reduce-l2", "model.onnx", "expected.npy", 1e-5);
    float_matches("expand-and-reduce-l2", "model_l2.onnx", "expected_l2.npy", 1e-5);
    // Expand only moves ciphertexts: the model compiles and its integer circuit is close.
    let (_, out) = compile_and_run("model.onnx", &["calib.npy"], &["test_x.npy"], "expand-and-reduce-l2");
    let want = read_npy(&case("expand-and-reduce-l2").join("expected.npy"));
    assert!(worst_r2(&out[0], &want) > 0.99, "R² {}", worst_r2(&out[0], &want));
    // x / ‖x‖ is the model's last op: the client divides after decrypting s and ‖x‖ (its
    // own data); kept on the server it would divide two ciphertexts, a clear error.
    let out = compile_regression("model_l2.onnx", "expand-and-reduce-l2");
    let want = read_npy(&case("expand-and-reduce-l2").join("expected_l2.npy"));
    let y = out.iter().find(|t| t.shape() == want.shape()).expect("y");
    assert!(worst_r2(y, &want) > 0.99, "R² {}", worst_r2(y, &want));
    let d = case("expand-and-reduce-l2");
    let g = import(d.join("model_l2.onnx"));
    let calib = read_npy(&d.join("calib.npy"));
    let mut opts = CompileOptions::default();
    opts.search.server_tail = true;
    let err = compile(&g, &[calib], &opts).err().expect("division of two ciphertexts").to_string();
    assert!(err.contains("div") && err.contains("'y'"), "{err}");
}

#[test]
fn tile_split_where_and_reductions_follow_onnxruntime() {
    for (model, tol) in [("layout.onnx", 1e-5), ("norms.onnx", 1e-5), ("softmax11.onnx", 1e-6)] {
        let stem = model.trim_end_matches(".onnx");
        float_matches("export-ops", model, &format!("expected_{stem}.npy"), tol);
    }
    // Tile, Split, Where with a constant condition, ReduceMax/Min and the norms compile.
    for model in ["layout", "norms"] {
        let out = compile_regression(&format!("{model}.onnx"), "export-ops");
        let want = read_npy(&case("export-ops").join(format!("expected_{model}.npy")));
        assert!(worst_r2(&out[0], &want) > 0.98, "{model}: R² {}", worst_r2(&out[0], &want));
    }
}
