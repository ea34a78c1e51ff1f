//! Real TFHE end to end: compile, keygen, encrypt, evaluate with the server key only,
//! decrypt, and compare with clear execution.

use ndarray::{Array1, Array2, ArrayD, Axis, Slice};
use rand::SeedableRng;
use veil_backend::params::optimize;
use veil_frontend::dsl::GraphBuilder;
use veil_ir::Tensor;
use veil_passes::{calibrate, fuse, quantize, QuantConfig};
use veil_runtime::{keygen, Evaluator};
use veil_tests::{models_dir, read_npy, uniform};

/// Keygen, encrypt `x`, evaluate with the server key only, decrypt: the decoded integers.
fn encrypted_integers(
    circuit: &veil_backend::circuit::Circuit,
    client: &veil_backend::lower::ClientSpec,
    params: &veil_backend::params::Params,
    fingerprint: &[u8],
    x: &Tensor,
) -> Vec<Tensor> {
    let (ck, sk) = keygen(params, fingerprint).unwrap();
    let cts = ck.encrypt_for(circuit, &client.encode(std::slice::from_ref(x)).unwrap());
    let ev = Evaluator::new(circuit, params, sk, fingerprint).unwrap();
    let out = ev.run(&cts, &|_| {}).unwrap();
    client.decode_integers(&ck.decrypt(&out).unwrap()).unwrap()
}

#[test]
fn exact_lookups_decrypt_to_the_clear_integers() {
    // y = W·sigmoid(4x − 2) + b on 4 features: the lookup reads 4-bit inputs directly, so
    // no low bits are dropped and encrypted results must equal clear ones exactly (up to
    // failures at p_error 2^-40).
    let mut b = GraphBuilder::new("exact");
    let x = b.input("x", &[4]);
    let x4 = b.constant(ArrayD::from_elem(vec![], 4.0));
    let two = b.constant(ArrayD::from_elem(vec![], 2.0));
    let h = b.mul(x, x4).unwrap();
    let h = b.sub(h, two).unwrap();
    let h = b.sigmoid(h).unwrap();
    let w =
        Array2::from_shape_vec((3, 4), vec![1.0, -2.0, 0.5, 3.0, -1.0, 1.0, 2.0, -0.5, 0.25, 0.75, -1.5, 1.0]).unwrap();
    let y = b.linear(h, w, Some(Array1::from_vec(vec![0.1, -0.2, 0.3]))).unwrap();
    b.output("y", y);
    let g = b.finish().unwrap();

    let calib = Tensor::F32(ArrayD::from_shape_vec(vec![64, 4], uniform(256, 7)).unwrap());
    let c = calibrate(&g, std::slice::from_ref(&calib)).unwrap();
    let mut q = quantize(&g, &c, &QuantConfig { input_bits: 4, weight_bits: 6, act_bits: 6 }).unwrap();
    q.graph = fuse(&q.graph).unwrap().0;
    q.graph = veil_passes::bitwidth::set_precision(&q.graph, 4).unwrap();
    let lowered = veil_backend::lower::lower(&q, 4).unwrap();
    assert_eq!(lowered.circuit.lookups_per_sample(), 4);
    assert!(lowered.circuit.tables.len() == 1, "one table for the four sigmoids");
    let params = optimize(&lowered.requirements).unwrap();

    let x = Tensor::F32(ArrayD::from_shape_vec(vec![12, 4], uniform(48, 99)).unwrap());
    let fhe = encrypted_integers(&lowered.circuit, &lowered.client, &params, b"exact-test", &x);
    let clear = veil_ir::interp::run(&q.graph, &q.encode_inputs(&[x]).unwrap()).unwrap();
    assert_eq!(fhe, clear);
}

#[test]
fn compiled_mlp_predicts_encrypted_as_in_the_clear() {
    // A scikit-learn MLP (13 → 16 → 3): 16 lookups per sample through the full pipeline.
    let dir = models_dir().join("extra/mlp_wine_skl_opset15");
    let g = veil_frontend::onnx::import_file(dir.join("model.onnx")).unwrap();
    let (a, _) = veil_backend::pipeline::compile(&g, &[read_npy(&dir.join("calib.npy"))], &Default::default()).unwrap();
    let x = read_npy(&dir.join("test_x.npy"));
    let x = Tensor::F32(x.as_f32().unwrap().slice_axis(Axis(0), Slice::from(0..8)).to_owned());

    let ints = encrypted_integers(&a.circuit, &a.client, &a.params, &a.fingerprint, &x);
    let fhe = a.client.finish(&ints, std::slice::from_ref(&x)).unwrap();
    let clear = a.quantized_model().unwrap().run_clear(std::slice::from_ref(&x)).unwrap();
    // outputs: label, probabilities
    assert_eq!(fhe[0], clear[0], "predicted labels");
    let (pf, pc) = (fhe[1].as_f32().unwrap(), clear[1].as_f32().unwrap());
    // approximate rounding may read a hidden unit one step differently: probabilities stay close
    let worst = pf.iter().zip(pc.iter()).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
    assert!(worst < 0.1, "probabilities differ by {worst}");
}

#[test]
fn outputs_sent_as_digits_decrypt_as_in_the_clear() {
    // The wine MLP with its logits split into 3 digits: the client recombines decrypted
    // digits into what clear execution of the same split model gives.
    let dir = models_dir().join("extra/mlp_wine_skl_opset15");
    let g = veil_frontend::onnx::import_file(dir.join("model.onnx")).unwrap();
    let calib = read_npy(&dir.join("calib.npy"));
    let c = veil_passes::compile(&g, std::slice::from_ref(&calib), &Default::default()).unwrap();
    let q = veil_passes::digits::split_outputs(&c.model, 3, std::slice::from_ref(&calib), 0.25).unwrap().unwrap();
    assert_eq!(q.graph.outputs().len(), 3 * c.model.graph.outputs().len());
    let lowered = veil_backend::lower::lower(&q, c.precision).unwrap();
    let params = optimize(&lowered.requirements).unwrap();
    let x = read_npy(&dir.join("test_x.npy"));
    let x = Tensor::F32(x.as_f32().unwrap().slice_axis(Axis(0), Slice::from(0..6)).to_owned());

    let ints = encrypted_integers(&lowered.circuit, &lowered.client, &params, b"digits-test", &x);
    let fhe = lowered.client.finish(&ints, std::slice::from_ref(&x)).unwrap();
    let clear = q.run_clear(std::slice::from_ref(&x)).unwrap();
    assert_eq!(fhe[0], clear[0], "predicted labels");
    let (pf, pc) = (fhe[1].as_f32().unwrap(), clear[1].as_f32().unwrap());
    let worst = pf.iter().zip(pc.iter()).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
    assert!(worst < 0.1, "probabilities differ by {worst}");
}

#[test]
fn two_lookups_on_one_input_share_a_bootstrap() {
    // W1·tanh(4x − 2) and W2·sigmoid(4x − 2): both functions read the same 4-bit values,
    // which fill only half the slots of a 5-bit bootstrap, so one bootstrap serves both.
    // (Two outputs rather than their sum: a sum would rescale one branch with a rounded
    // lookup, and this test compares encrypted and clear results exactly.)
    let mut b = GraphBuilder::new("shared");
    let x = b.input("x", &[6]);
    let x4 = b.constant(ArrayD::from_elem(vec![], 4.0));
    let two = b.constant(ArrayD::from_elem(vec![], 2.0));
    let h = b.mul(x, x4).unwrap();
    let h = b.sub(h, two).unwrap();
    // (tanh, not ReLU: a ReLU is read as |x| on the whole torus, which shares nothing)
    let r = b.tanh(h).unwrap();
    let s = b.sigmoid(h).unwrap();
    let w =
        |seed: u64| Array2::from_shape_vec((3, 6), uniform(18, seed).iter().map(|v| v * 2.0 - 1.0).collect()).unwrap();
    let yr = b.linear(r, w(3), None).unwrap();
    let ys = b.linear(s, w(5), Some(Array1::from_vec(vec![0.1, -0.2, 0.3]))).unwrap();
    b.output("yr", yr);
    b.output("ys", ys);
    let g = b.finish().unwrap();

    let calib = Tensor::F32(ArrayD::from_shape_vec(vec![64, 6], uniform(384, 11)).unwrap());
    let c = calibrate(&g, std::slice::from_ref(&calib)).unwrap();
    let mut q = quantize(&g, &c, &QuantConfig { input_bits: 4, weight_bits: 6, act_bits: 6 }).unwrap();
    q.graph = fuse(&q.graph).unwrap().0;
    q.graph = veil_passes::bitwidth::set_precision(&q.graph, 5).unwrap();
    let lowered = veil_backend::lower::lower(&q, 5).unwrap();
    // tanh and sigmoid share their 6 bootstraps
    let shared: Vec<_> = lowered
        .circuit
        .instructions
        .iter()
        .filter_map(|i| match i {
            veil_backend::circuit::Instruction::Lookup(l) if l.second.is_some() => Some(l.table.len()),
            _ => None,
        })
        .collect();
    assert_eq!(shared, [6]);
    assert_eq!((lowered.circuit.lookups_per_sample(), lowered.circuit.reads_per_sample()), (6, 12));

    let x = Tensor::F32(ArrayD::from_shape_vec(vec![10, 6], uniform(60, 42)).unwrap());
    let clear = veil_ir::interp::run(&q.graph, &q.encode_inputs(std::slice::from_ref(&x)).unwrap()).unwrap();
    let plain = lowered.client.encode(std::slice::from_ref(&x)).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let simulated = lowered.client.decode_integers(&lowered.circuit.simulate(&plain, None, &mut rng)).unwrap();
    assert_eq!(simulated, clear, "simulation");

    let params = optimize(&lowered.requirements).unwrap();
    let fhe = encrypted_integers(&lowered.circuit, &lowered.client, &params, b"shared-test", &x);
    assert_eq!(fhe, clear, "encrypted");
}

#[test]
fn tiled_split_selected_and_reduced_values_run_encrypted() {
    // Tile, Split, Where with a constant mask (gathers), ReduceMax/ReduceMin (trees of
    // maxima), a MatMul: tests/cases/export-ops/layout.onnx under real TFHE.
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("cases/export-ops");
    let g = veil_frontend::onnx::import_file(dir.join("layout.onnx")).unwrap();
    let mut opts = veil_backend::pipeline::CompileOptions::default();
    opts.search.task = Some(veil_ir::Task::Regression);
    // 3-bit values keep the keys small (N = 2048); accuracy at the defaults is tested
    // against onnxruntime in tests/cases.rs.
    opts.search.n_bits = Some(3);
    let (a, _) = veil_backend::pipeline::compile(&g, &[read_npy(&dir.join("calib.npy"))], &opts).unwrap();
    let x = read_npy(&dir.join("test_x.npy"));
    let x = Tensor::F32(x.as_f32().unwrap().slice_axis(Axis(0), Slice::from(0..4)).to_owned());

    let ints = encrypted_integers(&a.circuit, &a.client, &a.params, &a.fingerprint, &x);
    let clear_ints = a.quantized_model().unwrap().run_clear(std::slice::from_ref(&x)).unwrap();
    let fhe = a.client.finish(&ints, std::slice::from_ref(&x)).unwrap();
    let (f, c) = (fhe[0].as_f32().unwrap(), clear_ints[0].as_f32().unwrap());
    // Approximate rounding may read a difference one step the other way: the maximum is
    // then the other candidate, at most one step away; most values are equal.
    let differ = f.iter().zip(c.iter()).filter(|(a, b)| a != b).count();
    let worst = f.iter().zip(c.iter()).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
    assert!(differ <= 2 && worst < 0.35, "{differ} values differ, by up to {worst}");
}

#[test]
fn a_small_forest_runs_encrypted_as_in_the_clear() {
    // 3 trees of depth 3 on wine (3 classes): rank-encoded features, comparison lookups
    // shared across trees, one leaf lookup per class per leaf parent. Every lookup reads
    // exactly, so the encrypted scores equal the clear ones.
    // Both placements of the threshold tests: ranks compared on the server, and bits
    // sent by the client.
    let dir = models_dir().join("trees/rf_wine_3x3");
    let g = veil_frontend::onnx::import_file(dir.join("model.onnx")).unwrap();
    let x = read_npy(&dir.join("test_x.npy"));
    let x = Tensor::F32(x.as_f32().unwrap().slice_axis(Axis(0), Slice::from(0..3)).to_owned());
    let float = veil_ir::interp::run(&g, std::slice::from_ref(&x)).unwrap();
    for client_tests in [false, true] {
        let mut opts = veil_backend::pipeline::CompileOptions::default();
        opts.search.client_tree_tests = client_tests;
        let (a, _) = veil_backend::pipeline::compile(&g, &[read_npy(&dir.join("calib.npy"))], &opts).unwrap();
        if client_tests {
            // a forest's class probabilities sum to one per tree: the third class is read
            // as that constant minus the other two, so only two classes' leaves are looked
            // up (13 lookups before)
            assert_eq!(a.circuit.lookups_per_sample(), 10);
        }
        // whole scores, read rounded, on the whole torus (a value at the bottom of the
        // range must not wrap to the top)
        assert!(a.client.outputs.iter().all(|o| o.whole_torus && o.decode.rounding > 0));
        let ints = encrypted_integers(&a.circuit, &a.client, &a.params, &a.fingerprint, &x);
        let fhe = a.client.finish(&ints, std::slice::from_ref(&x)).unwrap();
        let clear = a.quantized_model().unwrap().run_clear(std::slice::from_ref(&x)).unwrap();
        assert_eq!(fhe, clear, "client tests: {client_tests}");
        assert_eq!(fhe[0], float[0], "labels");
    }
}

#[test]
fn tree_scores_sent_as_partial_sums_decrypt_as_in_the_clear() {
    // The small forest's scores as one partial sum per tree: each is exact, so it may use
    // the whole torus (no padding bit) and is decoded unsigned; the client's total equals
    // clear execution of the whole scores.
    let dir = models_dir().join("trees/rf_wine_3x3");
    let g = veil_frontend::onnx::import_file(dir.join("model.onnx")).unwrap();
    let calib = read_npy(&dir.join("calib.npy"));
    let c = veil_passes::compile(&g, std::slice::from_ref(&calib), &Default::default()).unwrap();
    let q = veil_passes::trees::sums::split_scores(&c.model, 3).unwrap().unwrap();
    let lowered = veil_backend::lower::lower(&q, c.precision).unwrap();
    assert!(lowered.client.outputs.iter().all(|o| o.whole_torus), "an exact output uses the whole torus");
    let params = optimize(&lowered.requirements).unwrap();
    let x = read_npy(&dir.join("test_x.npy"));
    let x = Tensor::F32(x.as_f32().unwrap().slice_axis(Axis(0), Slice::from(0..4)).to_owned());
    let ints = encrypted_integers(&lowered.circuit, &lowered.client, &params, b"sums-test", &x);
    let clear_ints = veil_ir::interp::run(&q.graph, &q.encode_inputs(std::slice::from_ref(&x)).unwrap()).unwrap();
    assert_eq!(ints, clear_ints, "partial sums");
    let fhe = lowered.client.finish(&ints, std::slice::from_ref(&x)).unwrap();
    assert_eq!(fhe, c.model.run_clear(std::slice::from_ref(&x)).unwrap());
}

#[test]
fn two_precision_classes_run_with_two_parameter_sets() {
    // 16 squares of 3-bit inputs (narrow lookups) summed in pairs, then the square of each
    // 7-bit sum (a wide lookup): one set at 7 bits for all 24 lookups models about 3.4×
    // the cost of two sets (3-bit lookups with their own keys, a keyswitch between).
    let (g, wide) = two_class_graph();
    let part_of = |id| usize::from(id == wide);
    let low = veil_backend::lower::lower_graph_partitioned(&g, &part_of, &[3, 7], &[]).unwrap();
    assert_eq!(low.circuit.lookups_per_partition(), vec![16, 8]);
    let single =
        optimize(&veil_backend::params::Requirements { partitions: Vec::new(), ..low.requirements.clone() }).unwrap();
    let (params, cost) = veil_backend::partitions::optimize(&low.requirements, &single)
        .expect("two sets are cheaper than one at 7 bits");
    assert_eq!(params.set_count(), 2);
    assert_eq!((params.precision, params.partitions[0].precision), (3, 7));
    assert!(params.polynomial_size < params.partitions[0].polynomial_size, "{params:?}");
    eprintln!(
        "two sets: {cost:.0} ms per sample modelled (N = {} and {}), one set: {:.0} ms (N = {})",
        params.polynomial_size,
        params.partitions[0].polynomial_size,
        24.0 * single.pbs_cost_ms,
        single.polynomial_size
    );
    assert!(cost < 0.5 * 24.0 * single.pbs_cost_ms, "two sets {cost} ms, one set {} ms", 24.0 * single.pbs_cost_ms);
    params.check_partitions(&low.circuit).unwrap();

    let xs = ArrayD::from_shape_vec(vec![2, 16], (0..32).map(|i| (i * 5 + 3) % 8).collect()).unwrap();
    let fingerprint = b"two-classes-test".to_vec();
    let (ck, sk) = keygen(&params, &fingerprint).unwrap();
    let cts = ck.encrypt_for(&low.circuit, &low.encode_integers(std::slice::from_ref(&xs)).unwrap());
    let ev = Evaluator::new(&low.circuit, &params, sk, &fingerprint).unwrap();
    let out = ev.run(&cts, &|_| {}).unwrap();
    let plain = ck.decrypt(&out).unwrap();
    let got = veil_backend::lower::decode_rows(&plain[0], low.outputs[0].delta_log2, low.outputs[0].base, &[8]);
    let want = veil_ir::interp::run(&g, &[Tensor::I64(xs)]).unwrap();
    assert_eq!(&got, want[0].as_i64().unwrap());
}

/// 16 squares of 3-bit inputs, summed in pairs, then the square of each 7-bit sum: the
/// graph and its wide lookup node.
fn two_class_graph() -> (veil_ir::Graph, veil_ir::NodeId) {
    use veil_ir::linear::{Linear, LinearKind};
    use veil_ir::tlu::{Expr, Tlu};
    use veil_ir::{BinaryFn, Elem, Graph, Op, Range, Shape, TensorType};
    let enc = |lo, hi, n| TensorType::new(Elem::Enc(Range::new(lo, hi)), Shape::batched(&[n]));
    let square = |lo, hi| Tlu {
        expr: Expr::Binary(BinaryFn::Mul, Box::new(Expr::Input), Box::new(Expr::Input)),
        input: Range::new(lo, hi),
        params: vec![],
        rounding: 0,
        label: "square".into(),
    };
    let mut g = Graph::new("two-classes");
    let x = g.add_input("x", enc(0, 7, 16));
    let narrow = g.add(Op::Tlu(Box::new(square(0, 7))), &[x], "narrow").unwrap();
    let pairs = Array2::from_shape_fn((8, 16), |(j, k)| i64::from(k / 2 == j));
    let sum = Linear::new(LinearKind::Dense { weights: pairs }, ArrayD::zeros(vec![]), "pairs");
    let sums = g.add(Op::Linear(Box::new(sum)), &[narrow], "sums").unwrap();
    let wide = g.add(Op::Tlu(Box::new(square(0, 98))), &[sums], "wide").unwrap();
    g.set_output("y", wide);

    (g, wide)
}

#[test]
#[ignore = "measures one parameter set against two in real FHE; run with --ignored --nocapture"]
fn two_parameter_sets_against_one_measured() {
    let (g, wide) = two_class_graph();
    let xs = ArrayD::from_shape_vec(vec![4, 16], (0..64).map(|i| (i * 5 + 3) % 8).collect()).unwrap();
    let want = veil_ir::interp::run(&g, &[Tensor::I64(xs.clone())]).unwrap();
    let one = veil_backend::lower::lower_graph(&g, 7, &[]).unwrap();
    let part_of = |id| usize::from(id == wide);
    let two = veil_backend::lower::lower_graph_partitioned(&g, &part_of, &[3, 7], &[]).unwrap();
    let single = optimize(&one.requirements).unwrap();
    let (multi, _) = veil_backend::partitions::optimize(&two.requirements, &single).unwrap();
    for (name, low, params) in [("one set", &one, &single), ("two sets", &two, &multi)] {
        let fp = name.as_bytes().to_vec();
        let t = std::time::Instant::now();
        let (ck, sk) = keygen(params, &fp).unwrap();
        let keygen_s = t.elapsed().as_secs_f64();
        let cts = ck.encrypt_for(&low.circuit, &low.encode_integers(std::slice::from_ref(&xs)).unwrap());
        let ev = Evaluator::new(&low.circuit, params, sk, &fp).unwrap();
        let t = std::time::Instant::now();
        let out = ev.run(&cts, &|_| {}).unwrap();
        let per_sample = t.elapsed().as_secs_f64() / 4.0;
        let plain = ck.decrypt(&out).unwrap();
        let got = veil_backend::lower::decode_rows(&plain[0], low.outputs[0].delta_log2, low.outputs[0].base, &[8]);
        assert_eq!(&got, want[0].as_i64().unwrap());
        let (bsk, ksk) = params.total_key_bytes();
        eprintln!(
            "{name}: {per_sample:.2} s per sample, keygen {keygen_s:.1} s, keys {:.0} MB in memory",
            (bsk + ksk) as f64 / 1e6
        );
    }
}
