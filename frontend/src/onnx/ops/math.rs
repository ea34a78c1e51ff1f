//! Element-wise math, matrix products, softmax/argmax, casts.

use super::{one, Registry};
use crate::error::Result;
use crate::onnx::attr::NodeView;
use crate::onnx::tensor::elem_of;
use crate::onnx::{Ctx, Sym, SymTensor, Value};
use veil_ir::op::UnaryFn;
use veil_ir::{BinaryFn, Elem, Op, Tensor};

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
    // Before opset 13 softmax flattens the axes from `axis` on; that equals the last-axis
    // softmax only when `axis` is the last axis.
    if n.opset < 13 && axis != rank - 1 {
        return Err(
            n.err(format!("opset {} softmax over axes {axis}.. of a rank-{rank} tensor is not supported", n.opset))
        );
    }
    let name = n.required_input(0)?.to_string();
    one(c.apply(n, Op::Softmax { axis }, &[(x, name)], &n.output_name(0))?)
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
