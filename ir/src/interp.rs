//! The interpreter: evaluates a graph on concrete tensors, a whole batch at once.
//!
//! Float ops run in f32 as onnxruntime does; integer ops (added by the quantizer) run on
//! i64 with exactly the semantics the FHE circuit has.

use crate::error::{IrError, Result};
use crate::graph::{Graph, NodeId};
use crate::op::{Aggregate, BranchMode, Conv2d, Norm, Op, Pool2d, ReduceKind, TreeEnsemble, TreeNode};
use crate::tensor::Tensor;
use crate::types::{Dim, Elem, Shape};
use ndarray::{concatenate, s, Array2, ArrayD, ArrayView2, ArrayViewD, Axis, IxDyn, LinalgScalar, Zip};
use std::collections::HashMap;

type OpResult<T> = std::result::Result<T, String>;

/// Evaluate the graph's outputs on `inputs` (one tensor per graph input, in order).
pub fn run(g: &Graph, inputs: &[Tensor]) -> Result<Vec<Tensor>> {
    run_observed(g, inputs, &mut |_, _, _| {})
}

/// As [`run`], calling `observe` with every node's value (and its operands' values) as it
/// is computed: calibration records each tensor's range this way.
pub fn run_observed(
    g: &Graph,
    inputs: &[Tensor],
    observe: &mut dyn FnMut(NodeId, &Tensor, &[&Tensor]),
) -> Result<Vec<Tensor>> {
    check_inputs(g, inputs)?;
    let order =
        g.topo_order().ok_or_else(|| IrError::Eval { node: g.name.clone(), msg: "the graph has a cycle".into() })?;
    // Values are dropped once their last user has run, so peak memory stays small.
    let mut remaining: HashMap<NodeId, usize> = order.iter().map(|&n| (n, g.users(n).len())).collect();
    for o in g.outputs() {
        *remaining.get_mut(&o.node).expect("output node exists") += 1;
    }
    let mut values: HashMap<NodeId, Tensor> = HashMap::new();
    for &id in &order {
        let node = g.node(id);
        let operands = g.operands(id);
        let args: Vec<&Tensor> = operands.iter().map(|o| &values[o]).collect();
        let value = match &node.op {
            Op::Input { index } => inputs[*index].clone(),
            op => eval_op(op, &args)
                .map_err(|msg| IrError::Eval { node: format!("{} '{}'", op.mnemonic(), node.name), msg })?,
        };
        observe(id, &value, &args);
        for o in operands {
            let r = remaining.get_mut(&o).expect("operand is a node");
            *r -= 1;
            if *r == 0 {
                values.remove(&o);
            }
        }
        values.insert(id, value);
    }
    Ok(g.outputs().iter().map(|o| values[&o.node].clone()).collect())
}

/// Evaluate as the encrypted circuit behaves: a lookup that drops low bits reads its input
/// with Gaussian noise of `slot_std` slots (bucket widths), so values near a bucket
/// boundary sometimes round the other way. With the noise a bootstrap tolerates at
/// failure probability p, `slot_std` = 1 / (2·z(p)) ≈ 0.07 for p = 2^-40. Deterministic
/// for a given `seed`.
pub fn run_noisy(g: &Graph, inputs: &[Tensor], slot_std: f64, seed: u64) -> Result<Vec<Tensor>> {
    use rand::SeedableRng;
    use rand_distr::{Distribution, StandardNormal};
    check_inputs(g, inputs)?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let order =
        g.topo_order().ok_or_else(|| IrError::Eval { node: g.name.clone(), msg: "the graph has a cycle".into() })?;
    let mut values: HashMap<NodeId, Tensor> = HashMap::new();
    for &id in &order {
        let node = g.node(id);
        let args: Vec<&Tensor> = g.operands(id).iter().map(|o| &values[o]).collect();
        let fail = |msg: String| IrError::Eval { node: format!("{} '{}'", node.op.mnemonic(), node.name), msg };
        let mut noise = |step: i64| -> i64 {
            let z: f64 = StandardNormal.sample(&mut rng);
            (z * slot_std * step as f64).round() as i64
        };
        let value = match &node.op {
            Op::Input { index } => inputs[*index].clone(),
            Op::Tlu(t) if t.rounding > 0 => {
                let step = 1i64 << t.rounding;
                let x = int(&args, 0).map_err(fail)?.mapv(|v| (v + noise(step)).clamp(t.input.lo, t.input.hi));
                Tensor::I64(lookup(t, &x).map_err(fail)?)
            }
            Op::SatEnc { lo, hi, rounding } if *rounding > 0 => {
                let step = 1i64 << rounding;
                let x = int(&args, 0).map_err(fail)?;
                Tensor::I64(x.mapv(|v| crate::enc::saturate_read(v, v + noise(step), *lo, *hi, *rounding)))
            }
            Op::AbsEnc { rounding, shift } if *rounding > 0 => {
                let step = 1i64 << rounding;
                let x = int(&args, 0).map_err(fail)?;
                Tensor::I64(x.mapv(|v| crate::enc::abs_read(v + noise(step), *rounding, *shift)))
            }
            Op::MaxEnc { rounding, diff } if *rounding > 0 => {
                let step = 1i64 << rounding;
                let (a, b) = (int(&args, 0).map_err(fail)?, int(&args, 1).map_err(fail)?);
                let d = zip_broadcast(a, b, |x, y| x - y).map_err(fail)?;
                let d = d.mapv(|v| {
                    let v = diff.map_or(v, |r| v.clamp(r.lo, r.hi)) + noise(step);
                    diff.map_or(v, |r| v.clamp(r.lo, r.hi))
                });
                let bb = b.broadcast(d.raw_dim()).ok_or_else(|| fail("operands do not broadcast".into()))?;
                Tensor::I64(
                    ndarray::Zip::from(&d).and(&bb).map_collect(|&dv, &bv| max_enc(bv + dv, bv, *rounding, None)),
                )
            }
            op => eval_op(op, &args).map_err(fail)?,
        };
        values.insert(id, value);
    }
    Ok(g.outputs().iter().map(|o| values[&o.node].clone()).collect())
}

/// What left the range the circuit was compiled for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OverflowKind {
    /// An accumulator (or a max's difference) beyond its compiled range: the encrypted
    /// result would be garbage there.
    Accumulator,
    /// A lookup's result beyond its output range: it saturates at the range's edge.
    Activation,
}

/// Values that fell outside a compiled range.
#[derive(Clone, Debug, PartialEq)]
pub struct Overflow {
    pub node: NodeId,
    pub kind: OverflowKind,
    /// How many values were out of range, and how far they reached.
    pub count: usize,
    pub min: i64,
    pub max: i64,
    /// Which samples (batch rows) had an out-of-range value.
    pub samples: Vec<usize>,
}

/// As [`run`], also reporting every value outside a compiled range: an `assume`d
/// accumulator range (the interpreter saturates those; the encrypted circuit would
/// compute garbage for those samples) and a lookup whose result saturates at its output
/// range.
pub fn run_checked(g: &Graph, inputs: &[Tensor]) -> Result<(Vec<Tensor>, Vec<Overflow>)> {
    let mut found: HashMap<NodeId, Overflow> = HashMap::new();
    let outs = run_observed(g, inputs, &mut |id, _, args| {
        let (kind, range, vals): (OverflowKind, crate::types::Range, Vec<i64>) = match (&g.node(id).op, args) {
            (Op::Assume { range }, [x]) => match x.as_i64() {
                Some(a) => (OverflowKind::Accumulator, *range, a.iter().copied().collect()),
                None => return,
            },
            (Op::MaxEnc { diff: Some(r), .. }, [a, b]) => match (a.as_i64(), b.as_i64()) {
                (Some(a), Some(b)) => match zip_broadcast(a, b, |x, y| x - y) {
                    Ok(d) => (OverflowKind::Accumulator, *r, d.iter().copied().collect()),
                    Err(_) => return,
                },
                _ => return,
            },
            (Op::Tlu(t), [x]) => match (x.as_i64(), unclamped(t, x)) {
                (Some(_), Some((range, vals))) => (OverflowKind::Activation, range, vals),
                _ => return,
            },
            _ => return,
        };
        let rows = args.first().and_then(|a| a.shape().first().copied()).unwrap_or(1).max(1);
        let per_row = (vals.len() / rows).max(1);
        for (i, &v) in vals.iter().enumerate() {
            if !range.contains(v) {
                let o = found.entry(id).or_insert(Overflow {
                    node: id,
                    kind,
                    count: 0,
                    min: v,
                    max: v,
                    samples: Vec::new(),
                });
                o.count += 1;
                o.min = o.min.min(v);
                o.max = o.max.max(v);
                if o.samples.last() != Some(&(i / per_row)) {
                    o.samples.push(i / per_row);
                }
            }
        }
    })?;
    let mut list: Vec<Overflow> = found.into_values().collect();
    list.sort_by_key(|o| o.node);
    Ok((outs, list))
}

/// A lookup whose function ends by clamping to its output range (a requantization):
/// that range, and each element's value before the clamp.
fn unclamped(t: &crate::tlu::Tlu, x: &Tensor) -> Option<(crate::types::Range, Vec<i64>)> {
    let crate::tlu::Expr::Clamp(inner, lo, hi) = &t.expr else { return None };
    let a = x.as_i64()?;
    let sample: Vec<usize> = a.shape().iter().skip(1).copied().collect();
    let per = sample.iter().product::<usize>().max(1);
    let params = t.element_params(&sample).ok()?;
    let vals = a
        .iter()
        .enumerate()
        .map(|(i, &v)| {
            let r = inner.eval(t.representative(v.clamp(t.input.lo, t.input.hi)) as f64, &params[i % per]);
            if r.is_finite() {
                r.round() as i64
            } else if r > 0.0 {
                i64::MAX
            } else {
                i64::MIN
            }
        })
        .collect();
    Some((crate::types::Range::new(lo.ceil() as i64, hi.floor() as i64), vals))
}

/// Check count, element type and shape of each input; all must share one batch size.
/// Returns that batch size.
pub fn check_inputs(g: &Graph, inputs: &[Tensor]) -> Result<usize> {
    if inputs.len() != g.inputs().len() {
        let names: Vec<&str> = g.inputs().iter().map(|&i| g.node(i).name.as_str()).collect();
        return Err(IrError::Input {
            name: names.join(", "),
            msg: format!("the model takes {} input(s), got {}", names.len(), inputs.len()),
        });
    }
    let mut batch: Option<usize> = None;
    for (&id, t) in g.inputs().iter().zip(inputs) {
        let node = g.node(id);
        let err = |msg: String| IrError::Input { name: node.name.clone(), msg };
        let want_elem = match node.ty.elem {
            Elem::Enc(_) => Elem::I64,
            e => e,
        };
        if t.elem() != want_elem {
            return Err(err(format!("expects {} elements, got {}", want_elem, t.elem())));
        }
        let b = node
            .ty
            .shape
            .accepts(t.shape())
            .ok_or_else(|| err(format!("expects shape {}, got {:?}", node.ty.shape, t.shape())))?;
        if node.ty.shape.has_batch() {
            if let Some(prev) = batch.filter(|&p| p != b) {
                return Err(err(format!("batch size {b} differs from the other inputs' {prev}")));
            }
            batch = Some(b);
        }
    }
    Ok(batch.unwrap_or(1))
}

/// Evaluate one op on concrete operands.
pub fn eval_op(op: &Op, args: &[&Tensor]) -> OpResult<Tensor> {
    let f = |i: usize| -> OpResult<&ArrayD<f32>> {
        args[i].as_f32().ok_or_else(|| format!("operand {i} must be a float tensor"))
    };
    Ok(match op {
        Op::Input { .. } => return Err("inputs are not evaluated".into()),
        Op::Const(t) => t.clone(),
        Op::Gemm { alpha, beta, trans_a, trans_b } => {
            Tensor::F32(gemm(f(0)?, f(1)?, args.get(2).map(|_| f(2)).transpose()?, *alpha, *beta, *trans_a, *trans_b)?)
        }
        Op::MatMul => Tensor::F32(matmul(f(0)?, f(1)?)?),
        Op::Conv(c) => Tensor::F32(conv2d(c, f(0)?, f(1)?, args.get(2).map(|_| f(2)).transpose()?)?),
        Op::Unary(u) => Tensor::F32(f(0)?.mapv(|x| u.apply(x as f64) as f32)),
        Op::Binary(b) => Tensor::F32(zip_broadcast(f(0)?, f(1)?, |x, y| b.apply(x as f64, y as f64) as f32)?),
        Op::BatchNorm { epsilon } => Tensor::F32(batch_norm(f(0)?, [f(1)?, f(2)?, f(3)?, f(4)?], *epsilon)?),
        Op::AvgPool(p) => Tensor::F32(pool2d(p, f(0)?, PoolKind::Avg)?),
        Op::MaxPool(p) => Tensor::F32(pool2d(p, f(0)?, PoolKind::Max)?),
        Op::GlobalAvgPool => {
            let x = f(0)?;
            let (n, c) = (x.shape()[0], x.shape()[1]);
            let m = x.to_shape((n, c, x.len() / (n * c).max(1))).map_err(|e| e.to_string())?.mean_axis(Axis(2));
            let m = m.ok_or("global average pool over an empty window")?;
            Tensor::F32(m.into_shape_with_order(IxDyn(&[n, c, 1, 1])).map_err(|e| e.to_string())?)
        }
        Op::Reduce { kind, axes, keepdims } => Tensor::F32(reduce(f(0)?, *kind, axes, *keepdims)),
        Op::Reshape { .. } | Op::Transpose { .. } | Op::Concat { .. } | Op::Gather { .. } | Op::Pad { .. } => {
            if let Some(fs) = args.iter().map(|t| t.as_f32()).collect::<Option<Vec<_>>>() {
                let pad = if let Op::Pad { value, .. } = op { *value } else { 0.0 };
                Tensor::F32(layout(op, &fs, pad)?)
            } else if let Some(is) = args.iter().map(|t| t.as_i64()).collect::<Option<Vec<_>>>() {
                let pad = if let Op::Pad { value, .. } = op { *value as i64 } else { 0 };
                Tensor::I64(layout(op, &is, pad)?)
            } else {
                return Err("layout op on a mix of float and integer tensors".into());
            }
        }
        Op::Cast { to } => match (args[0], to) {
            (Tensor::F32(a), Elem::I64) => Tensor::I64(a.mapv(|v| v as i64)),
            (Tensor::I64(a), Elem::F32) => Tensor::F32(a.mapv(|v| v as f32)),
            (t, _) => t.clone(),
        },
        Op::Softmax { axis } => Tensor::F32(softmax(f(0)?, *axis)),
        Op::ArgMax { axis, keepdims, select_last } => {
            Tensor::I64(argmax(&args[0].to_f32(), *axis, *keepdims, *select_last))
        }
        Op::ClassLabel { labels } => {
            let ix = args[0].as_i64().ok_or("class_label takes class indices")?;
            let mut bad = None;
            let out = ix.mapv(|i| match labels.get(i as usize) {
                Some(&l) if i >= 0 => l,
                _ => {
                    bad = Some(i);
                    0
                }
            });
            if let Some(i) = bad {
                return Err(format!("class index {i} out of range for {} labels", labels.len()));
            }
            Tensor::I64(out)
        }
        Op::Normalize { norm } => Tensor::F32(normalize(f(0)?, *norm)),
        Op::TreeEnsemble(e) => Tensor::F32(tree_ensemble(e, f(0)?)?),
        Op::Linear(l) => Tensor::I64(l.apply(int(args, 0)?)?),
        Op::AddEnc => Tensor::I64(zip_broadcast(int(args, 0)?, int(args, 1)?, |a, b| a + b)?),
        Op::SubEnc => Tensor::I64(zip_broadcast(int(args, 0)?, int(args, 1)?, |a, b| a - b)?),
        Op::MaxEnc { rounding, diff } => {
            Tensor::I64(zip_broadcast(int(args, 0)?, int(args, 1)?, |a, b| max_enc(a, b, *rounding, *diff))?)
        }
        Op::Tlu(t) => Tensor::I64(lookup(t, int(args, 0)?)?),
        Op::MatMulEnc => Tensor::I64(crate::enc::matmul(int(args, 0)?, int(args, 1)?)?),
        Op::SatEnc { lo, hi, rounding } => {
            Tensor::I64(int(args, 0)?.mapv(|v| crate::enc::saturate(v, *lo, *hi, *rounding)))
        }
        Op::AbsEnc { rounding, shift } => {
            Tensor::I64(int(args, 0)?.mapv(|v| crate::enc::abs_read(v, *rounding, *shift)))
        }
        Op::Assume { range } => Tensor::I64(int(args, 0)?.mapv(|v| v.clamp(range.lo, range.hi))),
    })
}

/// `b + relu(a − b)` with the difference read to a multiple of 2^rounding (round half up),
/// exactly as the circuit computes it (saturated to its compiled range, if any).
pub fn max_enc(a: i64, b: i64, rounding: u32, diff: Option<crate::types::Range>) -> i64 {
    let d = a - b;
    let d = diff.map_or(d, |r| d.clamp(r.lo, r.hi));
    let d = if rounding == 0 {
        d
    } else {
        let step = 1i64 << rounding;
        (d + step / 2).div_euclid(step) * step
    };
    b + d.max(0)
}

fn int<'a>(args: &[&'a Tensor], i: usize) -> OpResult<&'a ArrayD<i64>> {
    args[i].as_i64().ok_or_else(|| format!("operand {i} must be an integer tensor"))
}

/// A table lookup on every element, with that element's parameters (which broadcast over
/// the sample, never across the batch). Elements sharing parameters share a table, built
/// once over the lookup's buckets, as the circuit's tables are.
fn lookup(t: &crate::tlu::Tlu, x: &ArrayD<i64>) -> OpResult<ArrayD<i64>> {
    // Parameters vary over the sample, never over the batch (axis 0).
    let sample: Vec<usize> = x.shape().iter().skip(1).copied().collect();
    let per = sample.iter().product::<usize>().max(1);
    let params = t.element_params(&sample)?;
    let first = t.bucket(t.input.lo);
    let step = 1i64 << t.rounding;
    let tabulate = t.entries() <= 1 << 16;
    // One table per distinct parameter tuple.
    let mut group_of: HashMap<Vec<u64>, usize> = HashMap::new();
    let mut tables: Vec<Vec<i64>> = Vec::new();
    let mut group = Vec::with_capacity(per);
    for p in &params {
        let key: Vec<u64> = p.iter().map(|f| f.to_bits()).collect();
        let next = group_of.len();
        let g = *group_of.entry(key).or_insert(next);
        if g == next && tabulate {
            tables.push(
                (0..t.entries() as i64)
                    .map(|j| t.apply(((first + j) * step).clamp(t.input.lo, t.input.hi), p))
                    .collect(),
            );
        }
        group.push(g);
    }
    let mut out = Vec::with_capacity(x.len());
    for (i, &v) in x.iter().enumerate() {
        if v < t.input.lo || v > t.input.hi {
            return Err(format!("value {v} is outside the lookup's range {}", t.input));
        }
        let e = i % per;
        out.push(if tabulate { tables[group[e]][(t.bucket(v) - first) as usize] } else { t.apply(v, &params[e]) });
    }
    ArrayD::from_shape_vec(x.raw_dim(), out).map_err(|e| e.to_string())
}

fn as2(a: &ArrayD<f32>) -> OpResult<ArrayView2<'_, f32>> {
    a.view().into_dimensionality().map_err(|_| format!("expected a matrix, got shape {:?}", a.shape()))
}

fn gemm(
    a: &ArrayD<f32>,
    b: &ArrayD<f32>,
    c: Option<&ArrayD<f32>>,
    alpha: f32,
    beta: f32,
    trans_a: bool,
    trans_b: bool,
) -> OpResult<ArrayD<f32>> {
    let a = as2(a)?;
    let b = as2(b)?;
    let a = if trans_a { a.t() } else { a };
    let b = if trans_b { b.t() } else { b };
    if a.ncols() != b.nrows() {
        return Err(format!("gemm inner dimensions {} and {} differ", a.ncols(), b.nrows()));
    }
    let mut y = a.dot(&b);
    if alpha != 1.0 {
        y *= alpha;
    }
    let mut y = y.into_dyn();
    if let Some(c) = c {
        let cb = c.broadcast(y.raw_dim()).ok_or("gemm C does not broadcast to the product")?;
        Zip::from(&mut y).and(&cb).for_each(|v, &cv| *v += beta * cv);
    }
    Ok(y)
}

fn matmul(a: &ArrayD<f32>, b: &ArrayD<f32>) -> OpResult<ArrayD<f32>> {
    let (a_vec, b_vec) = (a.ndim() == 1, b.ndim() == 1);
    let a = if a_vec { a.view().insert_axis(Axis(0)) } else { a.view() };
    let b = if b_vec { b.view().insert_axis(Axis(1)) } else { b.view() };
    let (ra, rb) = (a.ndim(), b.ndim());
    let (m, k) = (a.shape()[ra - 2], a.shape()[ra - 1]);
    let (k2, n) = (b.shape()[rb - 2], b.shape()[rb - 1]);
    if k != k2 {
        return Err(format!("matmul inner dimensions {k} and {k2} differ"));
    }
    let lead = broadcast_dims(&a.shape()[..ra - 2], &b.shape()[..rb - 2])?;
    let mut a_shape = lead.clone();
    a_shape.extend([m, k]);
    let mut b_shape = lead.clone();
    b_shape.extend([k, n]);
    let ab = a.broadcast(a_shape).ok_or("matmul operands do not broadcast")?;
    let bb = b.broadcast(b_shape).ok_or("matmul operands do not broadcast")?;
    let count: usize = lead.iter().product();
    let a3 = ab.as_standard_layout().into_owned().into_shape_with_order((count, m, k)).map_err(|e| e.to_string())?;
    let b3 = bb.as_standard_layout().into_owned().into_shape_with_order((count, k, n)).map_err(|e| e.to_string())?;
    let mut out = ndarray::Array3::<f32>::zeros((count, m, n));
    for i in 0..count {
        out.slice_mut(s![i, .., ..]).assign(&a3.slice(s![i, .., ..]).dot(&b3.slice(s![i, .., ..])));
    }
    let mut shape = lead;
    if !a_vec {
        shape.push(m);
    }
    if !b_vec {
        shape.push(n);
    }
    out.into_shape_with_order(IxDyn(&shape)).map_err(|e| e.to_string())
}

fn broadcast_dims(a: &[usize], b: &[usize]) -> OpResult<Vec<usize>> {
    let sa = Shape::fixed(a);
    let sb = Shape::fixed(b);
    crate::types::broadcast(&sa, &sb)
        .and_then(|s| s.static_dims())
        .ok_or_else(|| format!("shapes {a:?} and {b:?} do not broadcast"))
}

/// Element-wise function of two arrays with numpy broadcasting.
pub fn zip_broadcast<A: Copy, B: Copy, C>(a: &ArrayD<A>, b: &ArrayD<B>, f: impl Fn(A, B) -> C) -> OpResult<ArrayD<C>> {
    let shape = broadcast_dims(a.shape(), b.shape())?;
    let av = a.broadcast(shape.clone()).ok_or("operands do not broadcast")?;
    let bv = b.broadcast(shape).ok_or("operands do not broadcast")?;
    Ok(Zip::from(&av).and(&bv).map_collect(|&x, &y| f(x, y)))
}

/// Convolution by im2col: each output pixel's receptive field becomes a column, and one
/// matrix product per (sample, group) does the rest.
fn conv2d(c: &Conv2d, x: &ArrayD<f32>, w: &ArrayD<f32>, bias: Option<&ArrayD<f32>>) -> OpResult<ArrayD<f32>> {
    conv2d_generic(c, x, w, bias)
}

/// Convolution for any element type (f32 for the float graph, i64 for encrypted integers).
pub(crate) fn conv2d_generic<T: LinalgScalar>(
    c: &Conv2d,
    x: &ArrayD<T>,
    w: &ArrayD<T>,
    bias: Option<&ArrayD<T>>,
) -> OpResult<ArrayD<T>> {
    let [n, ch, h, wd] = dims4(x)?;
    let [m, cg, kh, kw] = dims4(w)?;
    let window = Pool2d {
        kernel: [kh, kw],
        strides: c.strides,
        pads: c.pads,
        dilations: c.dilations,
        ceil_mode: false,
        count_include_pad: true,
    };
    let [oh, ow] = window.out_size(h, wd).ok_or("conv kernel does not fit the input")?;
    let groups = c.group;
    if cg * groups != ch || m % groups != 0 {
        return Err(format!("conv weights [{m}, {cg}, {kh}, {kw}] do not fit {ch} channels in {groups} group(s)"));
    }
    let mg = m / groups;
    let mut out = ndarray::Array4::<T>::zeros((n, m, oh, ow));
    let w2 = w.to_shape((m, cg * kh * kw)).map_err(|e| e.to_string())?;
    let mut cols = Array2::<T>::zeros((cg * kh * kw, oh * ow));
    for b in 0..n {
        for g in 0..groups {
            cols.fill(T::zero());
            for ci in 0..cg {
                let chan = g * cg + ci;
                for ki in 0..kh {
                    for kj in 0..kw {
                        let row = (ci * kh + ki) * kw + kj;
                        for oi in 0..oh {
                            let yi = (oi * c.strides[0] + ki * c.dilations[0]) as isize - c.pads[0] as isize;
                            if yi < 0 || yi >= h as isize {
                                continue;
                            }
                            for oj in 0..ow {
                                let xj = (oj * c.strides[1] + kj * c.dilations[1]) as isize - c.pads[1] as isize;
                                if xj >= 0 && xj < wd as isize {
                                    cols[[row, oi * ow + oj]] = x[[b, chan, yi as usize, xj as usize]];
                                }
                            }
                        }
                    }
                }
            }
            let wg = w2.slice(s![g * mg..(g + 1) * mg, ..]);
            let y = wg.dot(&cols);
            for mi in 0..mg {
                let bv = bias.map_or(T::zero(), |bb| bb[[g * mg + mi]]);
                for p in 0..oh * ow {
                    out[[b, g * mg + mi, p / ow, p % ow]] = y[[mi, p]] + bv;
                }
            }
        }
    }
    Ok(out.into_dyn())
}

fn dims4<T>(a: &ArrayD<T>) -> OpResult<[usize; 4]> {
    match a.shape() {
        &[a0, a1, a2, a3] => Ok([a0, a1, a2, a3]),
        s => Err(format!("expected a 4-D tensor, got shape {s:?}")),
    }
}

fn batch_norm(x: &ArrayD<f32>, p: [&ArrayD<f32>; 4], eps: f32) -> OpResult<ArrayD<f32>> {
    let [scale, bias, mean, var] = p;
    let c = x.shape()[1];
    let mut y = x.clone();
    for ch in 0..c {
        let k = scale[[ch]] / (var[[ch]] + eps).sqrt();
        let b = bias[[ch]] - mean[[ch]] * k;
        y.index_axis_mut(Axis(1), ch).mapv_inplace(|v| v * k + b);
    }
    Ok(y)
}

#[derive(Clone, Copy)]
enum PoolKind {
    Avg,
    Max,
}

fn pool2d(p: &Pool2d, x: &ArrayD<f32>, kind: PoolKind) -> OpResult<ArrayD<f32>> {
    let [n, c, h, w] = dims4(x)?;
    let [oh, ow] = p.out_size(h, w).ok_or("pool window does not fit the input")?;
    let mut out = ndarray::Array4::<f32>::zeros((n, c, oh, ow));
    let (pt, pl) = (p.pads[0] as isize, p.pads[1] as isize);
    let (hend_pad, wend_pad) = (h as isize + p.pads[2] as isize, w as isize + p.pads[3] as isize);
    for b in 0..n {
        for ch in 0..c {
            for oi in 0..oh {
                for oj in 0..ow {
                    let mut acc = match kind {
                        PoolKind::Avg => 0.0f32,
                        PoolKind::Max => f32::NEG_INFINITY,
                    };
                    let (mut inside, mut padded) = (0usize, 0usize);
                    for ki in 0..p.kernel[0] {
                        let yi = (oi * p.strides[0] + ki * p.dilations[0]) as isize - pt;
                        for kj in 0..p.kernel[1] {
                            let xj = (oj * p.strides[1] + kj * p.dilations[1]) as isize - pl;
                            if yi < hend_pad && xj < wend_pad {
                                padded += 1;
                            }
                            if yi < 0 || xj < 0 || yi >= h as isize || xj >= w as isize {
                                continue;
                            }
                            inside += 1;
                            let v = x[[b, ch, yi as usize, xj as usize]];
                            match kind {
                                PoolKind::Avg => acc += v,
                                PoolKind::Max => acc = acc.max(v),
                            }
                        }
                    }
                    out[[b, ch, oi, oj]] = match kind {
                        PoolKind::Max => acc,
                        PoolKind::Avg => {
                            let d = if p.count_include_pad { padded } else { inside };
                            acc / d.max(1) as f32
                        }
                    };
                }
            }
        }
    }
    Ok(out.into_dyn())
}

/// Window sums over an NCHW integer tensor (padding contributes 0).
pub(crate) fn sum_pool(p: &Pool2d, x: &ArrayD<i64>) -> OpResult<ArrayD<i64>> {
    let [n, c, h, w] = dims4(x)?;
    let [oh, ow] = p.out_size(h, w).ok_or("pool window does not fit the input")?;
    let mut out = ndarray::Array4::<i64>::zeros((n, c, oh, ow));
    for ((b, ch, oi, oj), v) in out.indexed_iter_mut() {
        let mut acc = 0i64;
        for ki in 0..p.kernel[0] {
            let yi = (oi * p.strides[0] + ki * p.dilations[0]) as isize - p.pads[0] as isize;
            for kj in 0..p.kernel[1] {
                let xj = (oj * p.strides[1] + kj * p.dilations[1]) as isize - p.pads[1] as isize;
                if yi >= 0 && xj >= 0 && (yi as usize) < h && (xj as usize) < w {
                    acc += x[[b, ch, yi as usize, xj as usize]];
                }
            }
        }
        *v = acc;
    }
    Ok(out.into_dyn())
}

fn reduce(x: &ArrayD<f32>, kind: ReduceKind, axes: &[usize], keepdims: bool) -> ArrayD<f32> {
    let mut y = x.clone();
    let mut sorted = axes.to_vec();
    sorted.sort_unstable_by(|a, b| b.cmp(a));
    let mut count = 1usize;
    for &a in &sorted {
        count *= y.shape()[a];
        y = match kind {
            ReduceKind::Sum | ReduceKind::Mean => y.sum_axis(Axis(a)),
            ReduceKind::Max => y.fold_axis(Axis(a), f32::NEG_INFINITY, |m, &v| m.max(v)),
            ReduceKind::Min => y.fold_axis(Axis(a), f32::INFINITY, |m, &v| m.min(v)),
        };
        if keepdims {
            y.insert_axis_inplace(Axis(a));
        }
    }
    if kind == ReduceKind::Mean {
        y.mapv_inplace(|v| v / count as f32);
    }
    y
}

/// A layout op (reshape, transpose, concat, gather, pad) on arrays of any element type:
/// these ops only move values, so the same code moves ciphertext values, floats, or the
/// compiler's per-element scales.
pub fn layout<T: Clone>(op: &Op, args: &[&ArrayD<T>], pad_value: T) -> OpResult<ArrayD<T>> {
    let x = args.first().ok_or("layout op without operands")?;
    match op {
        Op::Reshape { shape } => {
            let fixed = shape.fixed_volume().max(1);
            let batch = if shape.has_batch() { x.len() / fixed } else { 1 };
            let dims = shape.concrete(batch);
            if dims.iter().product::<usize>() != x.len() {
                return Err(format!("cannot reshape {:?} to {}", x.shape(), shape));
            }
            x.to_shape(dims).map(|v| v.into_owned()).map_err(|e| e.to_string())
        }
        Op::Transpose { perm } => Ok(x.view().permuted_axes(perm.clone()).as_standard_layout().into_owned()),
        Op::Concat { axis } => {
            let views: Vec<ArrayViewD<T>> = args.iter().map(|a| a.view()).collect();
            concatenate(Axis(*axis), &views).map_err(|e| e.to_string())
        }
        Op::Gather { axis, indices } => gather(x, *axis, indices),
        Op::Pad { pads, .. } => Ok(pad(x, pads, pad_value)),
        other => Err(format!("{} is not a layout op", other.mnemonic())),
    }
}

/// Take `indices` (any shape) along `axis`.
pub fn gather<T: Clone>(a: &ArrayD<T>, axis: usize, indices: &ArrayD<i64>) -> OpResult<ArrayD<T>> {
    let n = a.shape()[axis];
    let flat: Vec<usize> =
        indices
            .iter()
            .map(|&i| {
                if i >= 0 && (i as usize) < n {
                    Ok(i as usize)
                } else {
                    Err(format!("index {i} out of range 0..{n}"))
                }
            })
            .collect::<OpResult<_>>()?;
    let picked = a.select(Axis(axis), &flat);
    let mut shape = a.shape()[..axis].to_vec();
    shape.extend_from_slice(indices.shape());
    shape.extend_from_slice(&a.shape()[axis + 1..]);
    picked.to_shape(shape).map(|v| v.into_owned()).map_err(|e| e.to_string())
}

fn pad<T: Clone>(x: &ArrayD<T>, pads: &[(usize, usize)], value: T) -> ArrayD<T> {
    let shape: Vec<usize> = x.shape().iter().zip(pads).map(|(&d, &(b, e))| d + b + e).collect();
    let mut out = ArrayD::from_elem(shape, value);
    let mut view = out.view_mut();
    for (ax, &(b, _)) in pads.iter().enumerate() {
        let len = x.shape()[ax];
        view.slice_axis_inplace(Axis(ax), ndarray::Slice::from(b..b + len));
    }
    view.assign(x);
    out
}

fn softmax(x: &ArrayD<f32>, axis: usize) -> ArrayD<f32> {
    let mut y = x.clone();
    for mut lane in y.lanes_mut(Axis(axis)) {
        let max = lane.fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        lane.mapv_inplace(|v| (v - max).exp());
        let sum = lane.sum();
        lane.mapv_inplace(|v| v / sum);
    }
    y
}

fn argmax(x: &ArrayD<f32>, axis: usize, keepdims: bool, select_last: bool) -> ArrayD<i64> {
    let mut y = x.map_axis(Axis(axis), |lane| {
        let mut best = 0usize;
        for (i, &v) in lane.iter().enumerate() {
            if v > lane[best] || (select_last && v == lane[best]) {
                best = i;
            }
        }
        best as i64
    });
    if keepdims {
        y.insert_axis_inplace(Axis(axis));
    }
    y
}

fn normalize(x: &ArrayD<f32>, norm: Norm) -> ArrayD<f32> {
    let mut y = x.clone();
    for mut row in y.lanes_mut(Axis(1)) {
        let d = match norm {
            Norm::Max => row.fold(f32::NEG_INFINITY, |m, &v| m.max(v)),
            Norm::L1 => row.fold(0.0, |s, &v| s + v.abs()),
            Norm::L2 => row.fold(0.0, |s, &v| s + v * v).sqrt(),
        };
        if d != 0.0 {
            row.mapv_inplace(|v| v / d);
        }
    }
    y
}

fn tree_ensemble(e: &TreeEnsemble, x: &ArrayD<f32>) -> OpResult<ArrayD<f32>> {
    let x = as2(x)?;
    let mut out = Array2::<f32>::zeros((x.nrows(), e.n_targets));
    for (r, row) in x.outer_iter().enumerate() {
        let mut acc: Vec<Option<f32>> = vec![None; e.n_targets];
        for tree in &e.trees {
            for &(t, w) in leaf_weights(tree, row.as_slice().ok_or("features are not contiguous")?)? {
                let a = &mut acc[t];
                *a = Some(match (e.aggregate, *a) {
                    (_, None) => w,
                    (Aggregate::Sum | Aggregate::Average, Some(v)) => v + w,
                    (Aggregate::Min, Some(v)) => v.min(w),
                    (Aggregate::Max, Some(v)) => v.max(w),
                });
            }
        }
        for (t, a) in acc.into_iter().enumerate() {
            let mut v = a.unwrap_or(0.0);
            if e.aggregate == Aggregate::Average {
                v /= e.trees.len() as f32;
            }
            out[[r, t]] = v + e.base_values.get(t).copied().unwrap_or(0.0);
        }
    }
    Ok(out.into_dyn())
}

/// Walk one tree for one sample; returns the leaf's weights.
fn leaf_weights<'t>(tree: &'t [TreeNode], x: &[f32]) -> OpResult<&'t [(usize, f32)]> {
    let mut at = 0usize;
    // A well-formed tree reaches a leaf in at most len steps; more means a cycle.
    for _ in 0..=tree.len() {
        match tree.get(at).ok_or_else(|| format!("tree node {at} does not exist"))? {
            TreeNode::Leaf { weights } => return Ok(weights),
            TreeNode::Branch { feature, threshold, mode, if_true, if_false, nan_true } => {
                let v = *x.get(*feature).ok_or_else(|| format!("tree reads feature {feature}"))?;
                let t = *threshold;
                let go = if v.is_nan() {
                    *nan_true
                } else {
                    match mode {
                        BranchMode::Leq => v <= t,
                        BranchMode::Lt => v < t,
                        BranchMode::Gte => v >= t,
                        BranchMode::Gt => v > t,
                        BranchMode::Eq => v == t,
                        BranchMode::Neq => v != t,
                    }
                };
                at = if go { *if_true } else { *if_false };
            }
        }
    }
    Err("tree has a cycle".into())
}

/// The concrete batch size a symbolic shape takes for a tensor of `len` elements.
pub fn batch_of(shape: &Shape, len: usize) -> usize {
    if shape.0.contains(&Dim::Batch) {
        len / shape.fixed_volume().max(1)
    } else {
        1
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::op::UnaryFn;
    use crate::types::TensorType;
    use ndarray::{array, ArrayD};

    fn t(v: ArrayD<f32>) -> Tensor {
        Tensor::F32(v)
    }

    #[test]
    fn gemm_with_bias_and_transpose() {
        let a = array![[1.0f32, 2.0], [3.0, 4.0]].into_dyn();
        let b = array![[1.0f32, 0.0], [0.0, 2.0]].into_dyn();
        let c = array![10.0f32, 20.0].into_dyn();
        let op = Op::Gemm { alpha: 1.0, beta: 0.5, trans_a: false, trans_b: true };
        let y = eval_op(&op, &[&t(a), &t(b), &t(c)]).unwrap();
        assert_eq!(y, t(array![[6.0f32, 14.0], [8.0, 18.0]].into_dyn()));
    }

    #[test]
    fn conv_matches_hand_computation() {
        // 1 sample, 1 channel, 3x3 input, 2x2 kernel of ones, stride 1, no padding.
        let x = ArrayD::from_shape_vec(vec![1, 1, 3, 3], (1..=9).map(|v| v as f32).collect()).unwrap();
        let w = ArrayD::from_elem(vec![1, 1, 2, 2], 1.0f32);
        let c = Conv2d { strides: [1, 1], pads: [0; 4], dilations: [1, 1], group: 1 };
        let y = conv2d(&c, &x, &w, None).unwrap();
        assert_eq!(y.into_raw_vec_and_offset().0, vec![12.0, 16.0, 24.0, 28.0]);
    }

    #[test]
    fn avg_pool_excludes_padding_unless_asked() {
        let x = ArrayD::from_elem(vec![1, 1, 2, 2], 4.0f32);
        let mut p = Pool2d {
            kernel: [2, 2],
            strides: [1, 1],
            pads: [1, 1, 0, 0],
            dilations: [1, 1],
            ceil_mode: false,
            count_include_pad: false,
        };
        let y = pool2d(&p, &x, PoolKind::Avg).unwrap();
        assert_eq!(y[[0, 0, 0, 0]], 4.0);
        p.count_include_pad = true;
        let y = pool2d(&p, &x, PoolKind::Avg).unwrap();
        assert_eq!(y[[0, 0, 0, 0]], 1.0);
    }

    #[test]
    fn run_checks_input_shapes() {
        let mut g = Graph::new("t");
        let x = g.add_input("x", TensorType::f32(Shape::batched(&[3])));
        let y = g.add(Op::Unary(UnaryFn::Relu), &[x], "y").unwrap();
        g.set_output("y", y);
        let ok = run(&g, &[t(array![[-1.0f32, 0.5, 2.0]].into_dyn())]).unwrap();
        assert_eq!(ok[0], t(array![[0.0f32, 0.5, 2.0]].into_dyn()));
        let err = run(&g, &[t(array![[1.0f32, 2.0]].into_dyn())]).unwrap_err().to_string();
        assert_eq!(err, "input x: expects shape [N,3], got [1, 2]");
    }

    #[test]
    fn gather_with_matrix_indices() {
        let a = array![[1.0f32, 2.0, 3.0]].into_dyn();
        let ix = array![[2i64, 0], [1, 1]].into_dyn();
        let y = gather(&a, 1, &ix).unwrap();
        assert_eq!(y.shape(), &[1, 2, 2]);
        assert_eq!(y.into_raw_vec_and_offset().0, vec![3.0, 1.0, 2.0, 2.0]);
    }
}
