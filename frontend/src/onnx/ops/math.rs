//! Element-wise math, matrix products, softmax/argmax, casts, Where.

use super::{one, Registry};
use crate::error::Result;
use crate::onnx::attr::NodeView;
use crate::onnx::tensor::elem_of;
use crate::onnx::{Ctx, Sym, SymTensor, Value};
use ndarray::{ArrayD, IxDyn};
use veil_ir::op::UnaryFn;
use veil_ir::types::broadcast;
use veil_ir::{BinaryFn, Dim, Elem, Op, Shape, Tensor};

pub(super) fn register(r: &mut Registry) {
    r.insert(("", "Add"), |c, n| binary(c, n, BinaryFn::Add));
    r.insert(("", "Sub"), |c, n| binary(c, n, BinaryFn::Sub));
    r.insert(("", "Mul"), |c, n| binary(c, n, BinaryFn::Mul));
    r.insert(("", "Div"), |c, n| binary(c, n, BinaryFn::Div));
    r.insert(("", "Max"), |c, n| variadic(c, n, BinaryFn::Max));
    r.insert(("", "Min"), |c, n| variadic(c, n, BinaryFn::Min));
    r.insert(("", "Sum"), |c, n| variadic(c, n, BinaryFn::Add));
    r.insert(("", "PRelu"), |c, n| binary(c, n, BinaryFn::PRelu));
    r.insert(("", "Pow"), pow);
    r.insert(("", "Neg"), |c, n| unary(c, n, UnaryFn::Neg));
    r.insert(("", "Abs"), |c, n| unary(c, n, UnaryFn::Abs));
    r.insert(("", "Exp"), |c, n| unary(c, n, UnaryFn::Exp));
    r.insert(("", "Log"), |c, n| unary(c, n, UnaryFn::Log));
    r.insert(("", "Sqrt"), |c, n| unary(c, n, UnaryFn::Sqrt));
    r.insert(("", "Reciprocal"), |c, n| unary(c, n, UnaryFn::Reciprocal));
    r.insert(("", "Relu"), |c, n| unary(c, n, UnaryFn::Relu));
    r.insert(("", "Sigmoid"), |c, n| unary(c, n, UnaryFn::Sigmoid));
    r.insert(("", "Tanh"), |c, n| unary(c, n, UnaryFn::Tanh));
    r.insert(("", "Erf"), |c, n| unary(c, n, UnaryFn::Erf));
    r.insert(("", "Softplus"), |c, n| unary(c, n, UnaryFn::Softplus));
    r.insert(("", "Softsign"), |c, n| unary(c, n, UnaryFn::Softsign));
    r.insert(("", "HardSwish"), |c, n| unary(c, n, UnaryFn::HardSwish));
    r.insert(("", "LeakyRelu"), |c, n| {
        let alpha = n.float("alpha", 0.01)?;
        unary(c, n, UnaryFn::LeakyRelu { alpha })
    });
    r.insert(("", "Elu"), |c, n| {
        let alpha = n.float("alpha", 1.0)?;
        unary(c, n, UnaryFn::Elu { alpha })
    });
    r.insert(("", "Selu"), |c, n| {
        let alpha = n.float("alpha", 1.673_263_2)?;
        let gamma = n.float("gamma", 1.050_701)?;
        unary(c, n, UnaryFn::Selu { alpha, gamma })
    });
    r.insert(("", "HardSigmoid"), |c, n| {
        let alpha = n.float("alpha", 0.2)?;
        let beta = n.float("beta", 0.5)?;
        unary(c, n, UnaryFn::HardSigmoid { alpha, beta })
    });
    r.insert(("", "Gelu"), |c, n| {
        let tanh = match n.string("approximate", "none")?.as_str() {
            "none" => false,
            "tanh" => true,
            other => return Err(n.err(format!("unknown approximate mode '{other}'"))),
        };
        unary(c, n, UnaryFn::Gelu { tanh })
    });
    r.insert(("", "Clip"), clip);
    r.insert(("", "Identity"), identity);
    r.insert(("", "Dropout"), identity);
    r.insert(("", "Gemm"), gemm);
    r.insert(("", "MatMul"), |c, n| one(c.apply_inputs(n, Op::MatMul, 2)?));
    r.insert(("", "Softmax"), softmax);
    r.insert(("", "ArgMax"), argmax);
    r.insert(("", "Cast"), cast);
    r.insert(("", "Where"), where_op);
}

fn unary(c: &mut Ctx, n: &NodeView, f: UnaryFn) -> Result<Vec<Value>> {
    one(c.apply_inputs(n, Op::Unary(f), 1)?)
}

fn identity(c: &mut Ctx, n: &NodeView) -> Result<Vec<Value>> {
    one(c.input(n, 0)?)
}

fn binary(c: &mut Ctx, n: &NodeView, f: BinaryFn) -> Result<Vec<Value>> {
    let (a, b) = (c.input(n, 0)?, c.input(n, 1)?);
    if let Some(v) = fold_integers(n, f, &a, &b)? {
        return one(v);
    }
    let inputs = [(a, n.required_input(0)?.to_string()), (b, n.required_input(1)?.to_string())];
    one(c.apply(n, Op::Binary(f), &inputs, &n.output_name(0))?)
}

/// Max/Min/Sum take one or more inputs: a left fold of the binary op.
fn variadic(c: &mut Ctx, n: &NodeView, f: BinaryFn) -> Result<Vec<Value>> {
    let count = n.proto.input.len();
    let mut acc = c.input(n, 0)?;
    let mut acc_name = n.required_input(0)?.to_string();
    for i in 1..count {
        let name = n.required_input(i)?;
        let out = if i + 1 == count { n.output_name(0) } else { format!("{}_{i}", n.output_name(0)) };
        acc = c.apply(n, Op::Binary(f), &[(acc, acc_name), (c.get(n, name)?, name.to_string())], &out)?;
        acc_name = out;
    }
    one(acc)
}

/// Integer arithmetic on folded shape values (e.g. `Div(Shape[1], 2)`), and the identities
/// on the batch size that exporters write (`N * 1`).
fn fold_integers(n: &NodeView, f: BinaryFn, a: &Value, b: &Value) -> Result<Option<Value>> {
    let sym = |v: &Value| match v {
        Value::Sym(s) => Some(s.clone()),
        Value::Const(t) => SymTensor::from_const(t),
        Value::Node(_) => None,
    };
    let (Some(sa), Some(sb)) = (sym(a), sym(b)) else { return Ok(None) };
    let len = sa.vals.len().max(sb.vals.len());
    if (sa.vals.len() != len && sa.vals.len() != 1) || (sb.vals.len() != len && sb.vals.len() != 1) {
        return Err(n.err("integer operands of different lengths"));
    }
    let pick = |s: &SymTensor, i: usize| if s.vals.len() == 1 { s.vals[0] } else { s.vals[i] };
    let mut vals = Vec::with_capacity(len);
    for i in 0..len {
        vals.push(match (pick(&sa, i), pick(&sb, i)) {
            (Sym::Int(x), Sym::Int(y)) => Sym::Int(match f {
                BinaryFn::Add => x + y,
                BinaryFn::Sub => x - y,
                BinaryFn::Mul => x * y,
                BinaryFn::Div if y != 0 => x / y,
                BinaryFn::Max => x.max(y),
                BinaryFn::Min => x.min(y),
                _ => return Err(n.err(format!("integer {} is not supported", f.name()))),
            }),
            (Sym::Batch, Sym::Int(1)) if matches!(f, BinaryFn::Mul | BinaryFn::Div) => Sym::Batch,
            (Sym::Int(1), Sym::Batch) if f == BinaryFn::Mul => Sym::Batch,
            (Sym::Batch, Sym::Int(0)) | (Sym::Int(0), Sym::Batch) if f == BinaryFn::Add => Sym::Batch,
            _ => return Err(n.err(format!("shape arithmetic ({}) on the batch size is not supported", f.name()))),
        });
    }
    let dims = if sa.vals.len() >= sb.vals.len() { sa.dims } else { sb.dims };
    Ok(Some(SymTensor { dims, vals }.into_value()))
}

/// Pow with a constant scalar exponent is an element-wise function of the base.
fn pow(c: &mut Ctx, n: &NodeView) -> Result<Vec<Value>> {
    match c.input(n, 1)? {
        Value::Const(t) if t.len() == 1 => {
            let exponent = t.values_f64()[0] as f32;
            let base = c.input(n, 0)?;
            let name = n.required_input(0)?.to_string();
            one(c.apply(n, Op::Unary(UnaryFn::Pow { exponent }), &[(base, name)], &n.output_name(0))?)
        }
        _ => Err(n.err("the exponent must be a constant scalar")),
    }
}

fn clip(c: &mut Ctx, n: &NodeView) -> Result<Vec<Value>> {
    let (min, max) = if n.opset < 11 {
        (n.float("min", f32::MIN)?, n.float("max", f32::MAX)?)
    } else {
        let bound = |i: usize, default: f32| -> Result<f32> {
            match c.opt_const_input(n, i, if i == 1 { "min" } else { "max" })? {
                None => Ok(default),
                Some(t) if t.len() == 1 => Ok(t.values_f64()[0] as f32),
                Some(_) => Err(n.err("min and max must be scalars")),
            }
        };
        (bound(1, f32::MIN)?, bound(2, f32::MAX)?)
    };
    let x = c.input(n, 0)?;
    let name = n.required_input(0)?.to_string();
    one(c.apply(n, Op::Unary(UnaryFn::Clip { min, max }), &[(x, name)], &n.output_name(0))?)
}

fn gemm(c: &mut Ctx, n: &NodeView) -> Result<Vec<Value>> {
    let op = Op::Gemm {
        alpha: n.float("alpha", 1.0)?,
        beta: n.float("beta", 1.0)?,
        trans_a: n.int("transA", 0)? != 0,
        trans_b: n.int("transB", 0)? != 0,
    };
    one(c.apply_inputs(n, op, 3)?)
}

fn softmax(c: &mut Ctx, n: &NodeView) -> Result<Vec<Value>> {
    let x = c.input(n, 0)?;
    let ty = c.type_of(&x);
    let rank = ty.shape.rank();
    let default = if n.opset >= 13 { -1 } else { 1 };
    let axis =
        ty.shape.axis(n.int("axis", default)?).ok_or_else(|| n.err(format!("axis out of range for {}", ty.shape)))?;
    let name = n.required_input(0)?.to_string();
    if n.opset >= 13 || axis == rank - 1 {
        return one(c.apply(n, Op::Softmax { axis }, &[(x, name)], &n.output_name(0))?);
    }
    // Before opset 13 softmax normalises over all axes from `axis` on, as one flattened
    // axis: reshape to [d0 .. d(axis-1), rest], softmax over the last axis, reshape back.
    let dims = ty.shape.dims();
    if dims[axis..].contains(&Dim::Batch) {
        return Err(n.err(format!("opset {} softmax from axis {axis} of {} mixes samples", n.opset, ty.shape)));
    }
    let rest: usize = dims[axis..].iter().filter_map(|d| d.fixed()).product();
    let mut flat = dims[..axis].to_vec();
    flat.push(Dim::Fixed(rest));
    let out = n.output_name(0);
    let (flat_name, soft_name) = (format!("{out}_flat"), format!("{out}_softmax"));
    let v = c.apply(n, Op::Reshape { shape: Shape(flat) }, &[(x, name)], &flat_name)?;
    let v = c.apply(n, Op::Softmax { axis }, &[(v, flat_name)], &soft_name)?;
    one(c.apply(n, Op::Reshape { shape: ty.shape.clone() }, &[(v, soft_name)], &out)?)
}

fn argmax(c: &mut Ctx, n: &NodeView) -> Result<Vec<Value>> {
    let x = c.input(n, 0)?;
    let ty = c.type_of(&x);
    let axis = ty.shape.axis(n.int("axis", 0)?).ok_or_else(|| n.err(format!("axis out of range for {}", ty.shape)))?;
    let op =
        Op::ArgMax { axis, keepdims: n.int("keepdims", 1)? != 0, select_last: n.int("select_last_index", 0)? != 0 };
    let name = n.required_input(0)?.to_string();
    one(c.apply(n, op, &[(x, name)], &n.output_name(0))?)
}

fn cast(c: &mut Ctx, n: &NodeView) -> Result<Vec<Value>> {
    let to = elem_of(n.int("to", 0)? as i32).map_err(|e| n.err(e))?;
    let x = c.input(n, 0)?;
    match (&x, to) {
        // Shape values stay integers; a cast to float of a folded shape folds too.
        (Value::Sym(_), Elem::I64) => one(x),
        (Value::Sym(_), _) => Err(n.err("casting a batch-dependent shape to float is not supported")),
        (Value::Const(Tensor::I64(_)), Elem::I64) | (Value::Const(Tensor::F32(_)), Elem::F32) => one(x),
        _ => {
            if c.type_of(&x).elem == to {
                return one(x);
            }
            let name = n.required_input(0)?.to_string();
            one(c.apply(n, Op::Cast { to }, &[(x, name)], &n.output_name(0))?)
        }
    }
}

/// Where with a constant condition: `a·m + b·(1 − m)` with the 0/1 mask m, which is linear
/// in each branch (so it runs on ciphertexts). Constant branches are folded to
/// `where(m, a, 0)` first, so that masked-out infinities (attention masks) stay out.
fn where_op(c: &mut Ctx, n: &NodeView) -> Result<Vec<Value>> {
    let cond = match c.input(n, 0)? {
        Value::Const(t) => t,
        _ => return Err(n.err(
            "the condition must be a constant (a condition computed from the input would need an encrypted comparison)",
        )),
    };
    let (a, b) = (c.input(n, 1)?, c.input(n, 2)?);
    let shapes = [Shape::fixed(cond.shape()), c.type_of(&a).shape, c.type_of(&b).shape];
    let out_shape = broadcast(&shapes[0], &shapes[1])
        .and_then(|s| broadcast(&s, &shapes[2]))
        .ok_or_else(|| n.err(format!("condition {}, {} and {} do not broadcast", shapes[0], shapes[1], shapes[2])))?;
    let mask = cond.values_f64();
    let mask = ArrayD::from_shape_vec(cond.shape(), mask.iter().map(|&v| (v != 0.0) as u8 as f64).collect::<Vec<_>>())
        .expect("shape of the condition");
    if let (Value::Const(ta @ Tensor::I64(_)), Value::Const(tb @ Tensor::I64(_))) = (&a, &b) {
        return one(Value::Const(fold_where_i64(n, &mask, ta, tb)?));
    }
    let out = n.output_name(0);
    if let (Value::Node(_), Value::Node(_)) = (&a, &b) {
        return one(select(c, n, &mask, [(a, 1), (b, 2)], &out_shape)?);
    }
    let mut parts = Vec::new();
    for (i, keep) in [(1usize, mask.clone()), (2, mask.mapv(|m| 1.0 - m))] {
        let v = if i == 1 { a.clone() } else { b.clone() };
        let part = format!("{out}_{}", if i == 1 { "then" } else { "else" });
        let value = match v {
            Value::Const(t) => Value::Const(masked_const(n, &t, &keep)?),
            Value::Sym(_) => return Err(n.err("Where on a batch-dependent shape is not supported")),
            node => {
                // Broadcast first: a clear mask may not widen an encrypted value.
                let wide = format!("{part}_wide");
                let node = super::array::broadcast_to(c, n, node, n.required_input(i)?, out_shape.dims(), &wide)?;
                let m = Value::Const(Tensor::F32(keep.mapv(|v| v as f32)));
                c.apply(n, Op::Binary(BinaryFn::Mul), &[(node, wide), (m, format!("{part}_mask"))], &part)?
            }
        };
        parts.push((value, part));
    }
    let v = c.apply(n, Op::Binary(BinaryFn::Add), &parts, &out)?;
    if c.type_of(&v).shape != out_shape {
        return Err(n.err(format!("Where gives {} where {} was expected", c.type_of(&v).shape, out_shape)));
    }
    one(v)
}

/// Where between two computed values, as layout: both broadcast to the result's shape,
/// flattened per sample and concatenated, and the selected elements gathered back.
fn select(c: &mut Ctx, n: &NodeView, mask: &ArrayD<f64>, branches: [(Value, usize); 2], out: &Shape) -> Result<Value> {
    let name = n.output_name(0);
    let batched = out.has_batch();
    let sample: usize = out.fixed_volume();
    let flat = Shape(if batched { vec![Dim::Batch, Dim::Fixed(sample)] } else { vec![Dim::Fixed(sample)] });
    let mut parts = Vec::new();
    for (v, i) in branches {
        let input = n.required_input(i)?.to_string();
        if batched && !c.type_of(&v).shape.has_batch() {
            return Err(n.err(format!("Where between a batched value and '{input}', which has no batch dimension")));
        }
        let wide = format!("{name}_branch{i}");
        let v = super::array::broadcast_to(c, n, v, &input, out.dims(), &wide)?;
        let flat_name = format!("{wide}_flat");
        parts.push((c.apply(n, Op::Reshape { shape: flat.clone() }, &[(v, wide)], &flat_name)?, flat_name));
    }
    let axis = flat.rank() - 1;
    let both = format!("{name}_both");
    let joined = c.apply(n, Op::Concat { axis }, &parts, &both)?;
    // The mask broadcast over the sample (its leading axes may stand for the batch).
    let sample_dims = out.concrete(1);
    let keep = mask
        .broadcast(IxDyn(&sample_dims))
        .ok_or_else(|| n.err("the condition does not broadcast to one sample"))?
        .iter()
        .copied()
        .collect::<Vec<_>>();
    let ix: Vec<i64> = keep.iter().enumerate().map(|(j, &m)| if m != 0.0 { j } else { sample + j } as i64).collect();
    let picked = format!("{name}_picked");
    let v =
        super::array::take(c, n, joined, &both, axis, ArrayD::from_shape_vec(vec![sample], ix).expect("1-D"), &picked)?;
    c.apply(n, Op::Reshape { shape: out.clone() }, &[(v, picked)], &name)
}

/// `where(keep, t, 0)` broadcast over both shapes, as float.
fn masked_const(n: &NodeView, t: &Tensor, keep: &ArrayD<f64>) -> Result<Tensor> {
    let shape = broadcast(&Shape::fixed(t.shape()), &Shape::fixed(keep.shape()))
        .map(|s| s.concrete(1))
        .ok_or_else(|| n.err("the condition and a branch do not broadcast"))?;
    let vals = ArrayD::from_shape_vec(t.shape(), t.values_f64()).expect("values fit the shape");
    let (v, k) = (vals.broadcast(IxDyn(&shape)), keep.broadcast(IxDyn(&shape)));
    let (v, k) =
        (v.ok_or_else(|| n.err("branch does not broadcast"))?, k.ok_or_else(|| n.err("mask does not broadcast"))?);
    let mut outv = ArrayD::<f32>::zeros(IxDyn(&shape));
    ndarray::Zip::from(&mut outv).and(&v).and(&k).for_each(|o, &x, &m| *o = if m != 0.0 { x as f32 } else { 0.0 });
    Ok(Tensor::F32(outv))
}

/// Where on integer constants (index and shape computations), folded.
fn fold_where_i64(n: &NodeView, keep: &ArrayD<f64>, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let shape = [Shape::fixed(keep.shape()), Shape::fixed(a.shape()), Shape::fixed(b.shape())];
    let s = broadcast(&shape[0], &shape[1])
        .and_then(|s| broadcast(&s, &shape[2]))
        .map(|s| s.concrete(1))
        .ok_or_else(|| n.err("the condition and the branches do not broadcast"))?;
    let (ia, ib) = (a.as_i64().expect("integer"), b.as_i64().expect("integer"));
    let (k, ia, ib) = (keep.broadcast(IxDyn(&s)), ia.broadcast(IxDyn(&s)), ib.broadcast(IxDyn(&s)));
    let (k, ia, ib) = (k.expect("broadcasts"), ia.expect("broadcasts"), ib.expect("broadcasts"));
    let mut out = ArrayD::<i64>::zeros(IxDyn(&s));
    ndarray::Zip::from(&mut out).and(&k).and(&ia).and(&ib).for_each(|o, &m, &x, &y| *o = if m != 0.0 { x } else { y });
    Ok(Tensor::I64(out))
}
