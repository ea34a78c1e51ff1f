//! Encrypted training end to end, in real TFHE: the client encrypts batches and the
//! starting weights, the server runs steps with the evaluation keys only, the client
//! decrypts; compared with clear training (exactly) and with simulation (statistically).

use ndarray::{Array2, ArrayD};
use rand::SeedableRng;
use veil_backend::training::{compile_training, TrainingClient};
use veil_passes::training::{batches, TrainSpec};
use veil_runtime::{keygen, EncryptedState, Evaluator};

/// Two features, batch 2, a learning rate and weight range that make the update exact
/// (no dither) and every read fit 6 bits exactly: no rounding anywhere, so encrypted and
/// clear weights are equal unless a lookup fails.
fn exact_spec() -> TrainSpec {
    let mut s = TrainSpec::new(2, vec![0, 1]);
    s.batch = 2;
    s.weight_range = 0.125;
    // 3 feature and 4 error levels: with these, the update needs no dither
    s.x_levels = 3;
    s.error_levels = 4;
    s
}

fn data(n: usize) -> (Array2<f32>, Vec<i64>) {
    let x = Array2::from_shape_fn((n, 2), |(i, f)| (((i * 5 + f * 3) % 7) as f32 / 3.0 - 1.0).clamp(-1.0, 1.0));
    let labels = (0..n).map(|i| (x[[i, 0]] - 0.5 * x[[i, 1]] > 0.0) as i64).collect();
    (x, labels)
}

#[test]
fn encrypted_steps_give_exactly_the_clear_weights() {
    let (a, model) = compile_training(exact_spec(), 2f64.powi(-20)).unwrap();
    let plan = a.training.clone().unwrap();
    assert_eq!(plan.dither_bits, 0, "{plan:?}");
    for id in model.graph.node_ids() {
        let rounds = match &model.graph.node(id).op {
            veil_ir::Op::Tlu(t) => t.rounding,
            veil_ir::Op::SatEnc { rounding, .. } => *rounding,
            _ => 0,
        };
        assert_eq!(rounds, 0, "every read is exact in this configuration");
    }
    let tc = TrainingClient::new(&a).unwrap();
    let (x, labels) = data(8);
    let xq = plan.quantize_features(&x, "x").unwrap();
    let t = plan.targets(&labels, "y").unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let steps: Vec<[ArrayD<i64>; 4]> =
        batches(8, 2).iter().map(|rows| plan.step_inputs(&xq, &t, rows, &mut rng)).collect();

    // client: keys, batches, starting weights
    let (ck, sk) = keygen(&a.params, &a.fingerprint).unwrap();
    let plain: Vec<Vec<Vec<u64>>> = steps.iter().map(|s| tc.step_plaintexts(s).unwrap()).collect();
    let enc_batches = ck.encrypt_batches(&a.circuit, &a.params, &plain).unwrap();
    let start = ck.encrypt_state(&a.circuit, &tc.state_plaintexts(&plan.initial_state())).unwrap();

    // server: two epochs with the server key only
    let ev = Evaluator::new(&a.circuit, &a.params, sk, &a.fingerprint).unwrap();
    let mut seen = 0;
    let end: EncryptedState = ev
        .train(&[&enc_batches], start, 2, &|_| {}, &mut |_, _| {
            seen += 1;
            Ok(())
        })
        .unwrap();
    assert_eq!((seen, end.steps), (8, 8));

    // clear: the same steps
    let mut state = plan.initial_state();
    for _ in 0..2 {
        for s in &steps {
            state = model.step_clear(s, &state).unwrap();
        }
    }
    let got = tc.decode_state(&ck.decrypt_state(&end).unwrap());
    assert_eq!(got, state, "encrypted weights differ from clear ones");
    assert!(state[0].iter().any(|&v| v != 0), "training moved the weights");
}

#[test]
fn simulation_predicts_how_often_encrypted_steps_go_wrong() {
    // At a loose p_error, noise often moves a lookup's read to a neighbouring slot (a
    // rounded read near a bucket edge, or an exact read failing). The simulator adds the
    // noise the parameters imply, so a step must go wrong about as often simulated as
    // encrypted: compare the share of weights that differ from the clear step.
    let mut spec = TrainSpec::new(2, vec![0, 1, 2]);
    spec.batch = 2;
    let (a, model) = compile_training(spec, 0.1).unwrap();
    let plan = a.training.clone().unwrap();
    let tc = TrainingClient::new(&a).unwrap();
    let (x, _) = data(8);
    let labels: Vec<i64> = (0..8).map(|i| (i % 3) as i64).collect();
    let xq = plan.quantize_features(&x, "x").unwrap();
    let t = plan.targets(&labels, "y").unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(2);
    let step = plan.step_inputs(&xq, &t, &batches(8, 2)[1], &mut rng);
    // a state away from zero, so that the products are not trivial
    let start = [
        ArrayD::from_shape_vec(vec![1, 2, 3], vec![2i64, -3, 5, 7, -1, 0]).unwrap(),
        ArrayD::from_shape_vec(vec![1, 1, 3], vec![1i64, -2, 3]).unwrap(),
    ];
    let clear = model.step_clear(&step, &start).unwrap();
    let wrong = |s: &[ArrayD<i64>; 2]| {
        s.iter().zip(&clear).map(|(a, b)| a.iter().zip(b).filter(|(x, y)| x != y).count()).sum::<usize>()
    };
    let elements = 9;
    let step_plain = tc.step_plaintexts(&step).unwrap();
    let state_plain = tc.state_plaintexts(&start);
    let sim_runs = 4000;
    let sim_wrong: usize = (0..sim_runs)
        .map(|_| wrong(&tc.decode_state(&tc.simulate_step(&step_plain, &state_plain, Some(&a.params), &mut rng))))
        .sum();

    let (ck, sk) = keygen(&a.params, &a.fingerprint).unwrap();
    let ev = Evaluator::new(&a.circuit, &a.params, sk, &a.fingerprint).unwrap();
    let runs = 30;
    let mut exec_wrong = 0;
    for _ in 0..runs {
        // every run starts from fresh encryptions of the same state and batch
        let state = ck.encrypt_state(&a.circuit, &state_plain).unwrap();
        let one = ck.encrypt_batches(&a.circuit, &a.params, std::slice::from_ref(&step_plain)).unwrap();
        let out = ev.train(&[&one], state, 1, &|_| {}, &mut |_, _| Ok(())).unwrap();
        exec_wrong += wrong(&tc.decode_state(&ck.decrypt_state(&out).unwrap()));
    }
    let p_sim = sim_wrong as f64 / (sim_runs * elements) as f64;
    let p_exec = exec_wrong as f64 / (runs * elements) as f64;
    let sd = (p_sim * (1.0 - p_sim) / (runs * elements) as f64).sqrt();
    eprintln!("share of weights off the clear step: simulated {p_sim:.3}, encrypted {p_exec:.3} (sd {sd:.3})");
    assert!(p_sim > 0.1, "the loose p_error should make steps go wrong often (simulated {p_sim:.3})");
    assert!((p_exec - p_sim).abs() <= 4.0 * sd, "encrypted {p_exec:.3} vs simulated {p_sim:.3} (sd {sd:.3})");
}

#[test]
fn exported_models_are_read_as_onnxruntime_reads_them() {
    // models/<set>/export_check: a model veil trained and exported, with onnxruntime's
    // outputs on the test set (models/generate_training.py). The exporter must write the
    // same bytes from the same weights, and veil must read them as onnxruntime does.
    for set in ["train_breast_cancer", "train_wine"] {
        let dir = veil_tests::models_dir().join(set);
        let d = dir.join("export_check");
        let w = veil_tests::read_npy(&d.join("weights.npy")).to_f32().into_dimensionality::<ndarray::Ix2>().unwrap();
        let b = veil_tests::read_npy(&d.join("bias.npy")).to_f32().into_dimensionality::<ndarray::Ix1>().unwrap();
        let classes: Vec<i64> =
            veil_tests::meta(&dir)["classes"].as_array().unwrap().iter().map(|c| c.as_i64().unwrap()).collect();
        let bytes =
            veil_frontend::onnx::export::linear_classifier(&w, &b, &classes, "veil_logistic_regression").unwrap();
        assert_eq!(bytes, std::fs::read(d.join("veil_export.onnx")).unwrap(), "{set}: the export changed");
        let g = veil_frontend::onnx::import_file(d.join("veil_export.onnx")).unwrap();
        let x = veil_tests::read_npy(&dir.join("test_x.npy"));
        let out = veil_ir::interp::run(&g, &[x]).unwrap();
        assert_eq!(out[0], veil_tests::read_npy(&d.join("ort_label.npy")), "{set}: labels");
        let err = veil_tests::relative_error(&out[1], &veil_tests::read_npy(&d.join("ort_probabilities.npy")));
        assert!(err < 1e-5, "{set}: probabilities differ from onnxruntime's by {err}");
    }
}
