//! The lowered circuit, simulated without noise, computes exactly what the integer
//! interpreter computes: products (both ways), saturation, state pairs, derived inputs.

use super::*;
use crate::circuit::Instruction;
use ndarray::ArrayD;
use rand::{Rng, SeedableRng};
use veil_ir::linear::{Linear, LinearKind};
use veil_ir::tlu::{Expr, Tlu};
use veil_ir::{Elem, Op, Shape, TensorType, UnaryFn};

fn enc(lo: i64, hi: i64, dims: &[usize]) -> TensorType {
    TensorType::new(Elem::Enc(Range::new(lo, hi)), Shape::batched(dims))
}

fn random_inputs(g: &Graph, samples: usize, seed: u64) -> Vec<ArrayD<i64>> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    g.inputs()
        .iter()
        .map(|&id| {
            let r = g.enc_range(id);
            let mut dims = vec![samples];
            dims.extend(emit::sample_dims(g, id));
            ArrayD::from_shape_simple_fn(dims, || rng.random_range(r.lo..=r.hi))
        })
        .collect()
}

/// Simulate the lowered circuit on `ints` and compare every output with the interpreter.
fn check_exact(g: &Graph, p: u32, state: &[(usize, usize)], ints: &[ArrayD<i64>]) -> LoweredGraph {
    check_lowered(g, lower_graph(g, p, state).unwrap(), ints)
}

fn check_lowered(g: &Graph, low: LoweredGraph, ints: &[ArrayD<i64>]) -> LoweredGraph {
    let plain = low.encode_integers(ints).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let out = low.circuit.simulate(&plain, None, &mut rng);
    let tensors: Vec<Tensor> = ints.iter().cloned().map(Tensor::I64).collect();
    let want = veil_ir::interp::run(g, &tensors).unwrap();
    for (k, (o, w)) in out.iter().zip(&want).enumerate() {
        let shape = emit::sample_dims(g, g.outputs()[k].node);
        let got = decode_rows(o, low.outputs[k].delta_log2, low.outputs[k].base, &shape);
        assert_eq!(&got, w.as_i64().unwrap(), "output {k}");
    }
    low
}

fn lookups(c: &Circuit) -> usize {
    c.lookups_per_sample()
}

/// The identity read through a lookup dropping `rounding` bits.
fn lookup_of(g: &mut Graph, v: NodeId, r: Range, rounding: u32) -> NodeId {
    let t = Tlu { expr: Expr::Input, input: r, params: vec![], rounding, label: "id".into() };
    g.add(Op::Tlu(Box::new(t)), &[v], "lookup").unwrap()
}

fn identity(g: &mut Graph, v: NodeId, r: Range) -> NodeId {
    lookup_of(g, v, r, 0)
}

#[test]
fn external_products_compute_both_layouts_exactly() {
    // client input on the left (rows: 2 outputs rows ≤ 5 terms) and on the right
    // (columns: 4 output columns > 3 terms), the encrypted operands computed by lookups
    let mut g = Graph::new("p");
    let x = g.add_input("x", enc(-3, 3, &[2, 5]));
    let w = g.add_input("w", enc(-9, 9, &[5, 2]));
    let z = g.add_input("z", enc(-3, 3, &[3, 4]));
    let v = g.add_input("v", enc(-5, 5, &[2, 3]));
    let wl = identity(&mut g, w, Range::new(-9, 9));
    let vl = identity(&mut g, v, Range::new(-5, 5));
    let y1 = g.add(Op::MatMulEnc, &[x, wl], "y1").unwrap();
    let y2 = g.add(Op::MatMulEnc, &[vl, z], "y2").unwrap();
    g.set_output("y1", y1);
    g.set_output("y2", y2);
    let ints = random_inputs(&g, 4, 11);
    let low = check_lowered(&g, lower_graph_external(&g, 5, &[]).unwrap(), &ints);
    // no square lookups: only the two identity lookups' elements
    assert_eq!(lookups(&low.circuit), 10 + 6);
    assert_eq!(low.ggsw.len(), 2);
    assert_eq!(low.ggsw[0].polys.len(), 2, "rows of x");
    assert_eq!(low.ggsw[1].polys.len(), 3, "rows of z, one per term");
    let req = low.circuit.product_requirements();
    assert_eq!((req.packings, req.externals), (2 * 5 + 2 * 3, 2 * 2 + 2 * 3));
}

#[test]
fn external_products_reuse_the_client_polynomials() {
    // the training step's pattern: z = x·w, then g = xᵀ·e: one GGSW input serves both
    let mut g = Graph::new("p");
    let x = g.add_input("x", enc(-3, 3, &[4, 6]));
    let w = g.add_input("w", enc(-7, 7, &[6, 1]));
    let wl = identity(&mut g, w, Range::new(-7, 7));
    let z = g.add(Op::MatMulEnc, &[x, wl], "z").unwrap();
    let zr = g.enc_range(z);
    let e = lookup_of(&mut g, z, zr, 4);
    let xt = g.add(Op::Transpose { perm: vec![0, 2, 1] }, &[x], "xt").unwrap();
    let gr = g.add(Op::MatMulEnc, &[xt, e], "g").unwrap();
    g.set_output("g", gr);
    let ints = random_inputs(&g, 3, 5);
    let low = check_lowered(&g, lower_graph_external(&g, 6, &[]).unwrap(), &ints);
    assert_eq!(low.ggsw.len(), 1, "one GGSW input for both products");
}

#[test]
fn product_of_an_input_and_a_computed_value_uses_squares_and_derived_sums() {
    // x [2, 3] (client input) × relu-ish lookup of w [3, 2]
    let mut g = Graph::new("p");
    let x = g.add_input("x", enc(-3, 3, &[2, 3]));
    let w = g.add_input("w", enc(-9, 9, &[3, 2]));
    let t = Tlu { expr: Expr::Input, input: Range::new(-9, 9), params: vec![], rounding: 0, label: "id".into() };
    let wl = g.add(Op::Tlu(Box::new(t)), &[w], "w_lookup").unwrap();
    let y = g.add(Op::MatMulEnc, &[x, wl], "y").unwrap();
    g.set_output("y", y);
    let ints = random_inputs(&g, 5, 7);
    let low = check_exact(&g, 5, &[], &ints);
    // squares: 12 terms + 6 squares of the computed operand + its 6 identity lookups; x's
    // square sums come from the client
    assert_eq!(lookups(&low.circuit), 12 + 6 + 6);
    assert_eq!(low.derived.len(), 1);
    assert_eq!(low.derived[0].groups, vec![vec![0, 1, 2], vec![3, 4, 5]]);
}

#[test]
fn product_through_a_transpose_derives_column_sums() {
    let mut g = Graph::new("p");
    let x = g.add_input("x", enc(-3, 3, &[4, 2]));
    let e = g.add_input("e", enc(-4, 4, &[4, 1]));
    let e2 = g
        .add(
            Op::Tlu(Box::new(Tlu {
                expr: Expr::Input,
                input: Range::new(-4, 4),
                params: vec![],
                rounding: 0,
                label: "id".into(),
            })),
            &[e],
            "e2",
        )
        .unwrap();
    let xt = g.add(Op::Transpose { perm: vec![0, 2, 1] }, &[x], "xt").unwrap();
    let gr = g.add(Op::MatMulEnc, &[xt, e2], "g").unwrap();
    g.set_output("g", gr);
    let ints = random_inputs(&g, 4, 3);
    let low = check_exact(&g, 5, &[], &ints);
    assert_eq!(low.derived[0].groups, vec![vec![0, 2, 4, 6], vec![1, 3, 5, 7]]);
}

#[test]
fn vector_products_use_quarter_squares() {
    // a·b for [1,1]×[1,1]: squares would need 1 + 1 + 1 lookups, quarter squares 2
    let mut g = Graph::new("p");
    let a = g.add_input("a", enc(-5, 5, &[1, 1]));
    let b = g.add_input("b", enc(-6, 6, &[1, 1]));
    let id = |r: Range| {
        Op::Tlu(Box::new(Tlu { expr: Expr::Input, input: r, params: vec![], rounding: 0, label: "id".into() }))
    };
    let la = g.add(id(Range::new(-5, 5)), &[a], "la").unwrap();
    let lb = g.add(id(Range::new(-6, 6)), &[b], "lb").unwrap();
    let y = g.add(Op::MatMulEnc, &[la, lb], "y").unwrap();
    g.set_output("y", y);
    let ints = random_inputs(&g, 20, 5);
    let low = check_exact(&g, 5, &[], &ints);
    assert_eq!(lookups(&low.circuit), 2 + 2);
    assert!(low.derived.is_empty());
}

#[test]
fn saturation_and_a_sigmoid_after_it() {
    let mut g = Graph::new("s");
    let x = g.add_input("x", enc(-300, 300, &[6]));
    let s = g.add(Op::SatEnc { lo: -40, hi: 40, rounding: 4 }, &[x], "sat").unwrap();
    let r = g.enc_range(s);
    let sig = Expr::Round(Box::new(Expr::binary(
        veil_ir::BinaryFn::Mul,
        Expr::Const(4.0),
        Expr::unary(UnaryFn::Sigmoid, Expr::binary(veil_ir::BinaryFn::Mul, Expr::Input, Expr::Const(0.1))),
    )));
    let t = Tlu { expr: sig, input: r, params: vec![], rounding: 2, label: "sigmoid".into() };
    let y = g.add(Op::Tlu(Box::new(t)), &[s], "y").unwrap();
    g.set_output("y", y);
    g.set_output("s", s);
    let ints = random_inputs(&g, 30, 9);
    check_exact(&g, 6, &[], &ints);
}

#[test]
fn a_state_output_is_encoded_as_its_input() {
    // w' = clamp((4·w − d) / 4) read with 2 bits dropped: an update step, fed back
    let mut g = Graph::new("step");
    let w = g.add_input("w", enc(-20, 20, &[3]));
    let d = g.add_input("d", enc(-6, 6, &[3]));
    let scaled = g
        .add(
            Op::Linear(Box::new(Linear::new(
                LinearKind::Scale { factor: ArrayD::from_elem(vec![], 4) },
                ArrayD::zeros(vec![]),
                "x4",
            ))),
            &[w],
            "w4",
        )
        .unwrap();
    let v = g.add(Op::SubEnc, &[scaled, d], "v").unwrap();
    let r = g.enc_range(v);
    let upd = Expr::Clamp(
        Box::new(Expr::Round(Box::new(Expr::binary(veil_ir::BinaryFn::Div, Expr::Input, Expr::Const(4.0))))),
        -20.0,
        20.0,
    );
    let t = Tlu { expr: upd, input: r, params: vec![], rounding: 2, label: "update".into() };
    let w2 = g.add(Op::Tlu(Box::new(t)), &[v], "w_next").unwrap();
    g.set_output("w_next", w2);
    let ints = random_inputs(&g, 3, 2);
    let low = check_exact(&g, 6, &[(0, 0)], &ints);
    assert_eq!(low.inputs[0], low.outputs[0], "the state output's encoding is its input's");
    // w enters v with weight 4: it keeps a scale twice coarser than v's, no copy needed
    let wv = low.circuit.inputs[0];
    let reads_w = low
        .circuit
        .instructions
        .iter()
        .filter(|i| matches!(i, Instruction::Linear(l) if l.inputs.contains(&wv)))
        .count();
    assert_eq!(reads_w, 1);
    // chaining: the state output's plaintexts are the next run's input plaintexts as they are
    let mut w_ints = ints[0].clone();
    for step in 0..3 {
        let inputs = vec![w_ints.clone(), ints[1].clone()];
        let plain = low.encode_integers(&inputs).unwrap();
        let out = low.circuit.simulate(&plain, None, &mut rand::rngs::StdRng::seed_from_u64(step));
        let want = veil_ir::interp::run(&g, &inputs.iter().cloned().map(Tensor::I64).collect::<Vec<_>>()).unwrap();
        w_ints = decode_rows(&out[0], low.outputs[0].delta_log2, low.outputs[0].base, &[3]);
        assert_eq!(&w_ints, want[0].as_i64().unwrap());
        let again = low.encode_integers(&[w_ints.clone(), ints[1].clone()]).unwrap();
        assert_eq!(again[0], out[0]);
    }
}

#[test]
fn a_state_output_must_be_refreshed_by_a_lookup() {
    // w' = w + d: each run would add a fresh encryption's noise to the weights
    let mut g = Graph::new("bad");
    let w = g.add_input("w", enc(-20, 20, &[3]));
    let d = g.add_input("d", enc(0, 0, &[3]));
    let n = g.add(Op::AddEnc, &[w, d], "w_next").unwrap();
    g.set_output("w_next", n);
    let e = lower_graph(&g, 4, &[(0, 0)]).err().expect("a growing state is refused").to_string();
    assert!(e.contains("lookup"), "{e}");
}

#[test]
fn derived_inputs_check_their_indices() {
    let d = DerivedInput { from: 0, groups: vec![vec![0, 5]], delta_log2: 3, base: 0 };
    let x = ArrayD::from_shape_vec(vec![1, 2], vec![1i64, 2]).unwrap();
    assert!(d.compute(&x).is_err());
    let ok = DerivedInput { from: 0, groups: vec![vec![0, 1], vec![1]], delta_log2: 3, base: 0 };
    assert_eq!(ok.compute(&x).unwrap(), vec![vec![5, 4]]);
}

#[test]
fn whole_torus_outputs_decode_every_value_with_noise_under_half_a_read_step() {
    // An exact output read to multiples of 2^r, at the finest scale the guard band allows:
    // every value of its range, with noise just under half a read step either way, decodes
    // within half a read step (never wrapping to the other end of the range).
    for (lo, hi, r) in [(0i64, 328i64, 0u32), (-7, 16400, 2), (0, 16383, 2), (5, 1023, 3)] {
        let d = deltas::output_scale_bound(hi - lo, true, r) as u32;
        let out = OutputEncoding {
            name: "scores".into(),
            decode: OutputDecode {
                scale: ArrayD::from_elem(vec![], 1.0),
                offset: ArrayD::from_elem(vec![], 0.0),
                rounding: r,
            },
            shape: vec![1],
            delta_log2: d,
            base: lo,
            range: Range::new(lo, hi),
            whole_torus: true,
        };
        let noise = (1i64 << (d + r - 1)) - 1;
        for v in lo..=hi {
            for e in [-noise, 0, noise] {
                let m = encode((v - lo) as i128, d).wrapping_add(e as u64);
                let got = out.decode_rows(&[vec![m]])[[0, 0]];
                assert!((got - v).abs() <= 1 << r >> 1, "{v} with noise {e} (d = {d}, r = {r}) decoded as {got}");
            }
        }
        // the same output below the padding bit has a coarser scale
        assert!(d as i64 >= deltas::output_scale_bound(hi - lo, false, r), "{lo}..{hi}");
    }
}

#[test]
fn absolute_values_read_on_the_whole_torus() {
    // relu(x) = (x + |x|)/2 kept doubled: x + |x|, with |x| from one whole-torus lookup
    for (lo, hi, rounding, shift, p) in
        [(-118, 117, 3, 1, 4), (-118, 117, 3, 3, 5), (-15, 15, 0, 0, 4), (-7, 40, 2, 0, 4)]
    {
        let mut g = Graph::new("abs");
        let x = g.add_input("x", enc(lo, hi, &[5]));
        let a = g.add(Op::AbsEnc { rounding, shift }, &[x], "abs").unwrap();
        let up = Linear::new(
            LinearKind::Scale { factor: ArrayD::from_elem(vec![], 1 << shift) },
            ArrayD::zeros(vec![]),
            "up",
        );
        let a_up = g.add(Op::Linear(Box::new(up)), &[a], "abs_up").unwrap();
        let relu2 = g.add(Op::AddEnc, &[x, a_up], "relu2").unwrap();
        g.set_output("abs", a);
        g.set_output("relu2", relu2);
        assert!(veil_ir::enc::abs_precision(g.enc_range(x), rounding) <= p);
        // every value of the range, and the extremes
        let n = (hi - lo + 1) as usize;
        let ints = vec![ArrayD::from_shape_fn(vec![n, 5], |ix| lo + ix[0] as i64)];
        let low = check_exact(&g, p, &[], &ints);
        assert_eq!(lookups(&low.circuit), 5);
    }
}
