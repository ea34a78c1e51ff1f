//! Constants, shapes and layout: Constant, Shape, Reshape, Flatten, Squeeze, Unsqueeze,
//! Transpose, Concat, Slice, Gather, Pad, ConstantOfShape, Expand, Tile, Split.
//!
//! Expand, Tile and Split become gathers with constant indices: they only move values,
//! so they run on ciphertexts.
//!
//! Shape computations are folded at import: `Shape` yields the input's dimensions, with
//! the batch size as a symbol, and the integer ops that follow work on those symbols.

use super::{one, Registry};
use crate::error::Result;
use crate::onnx::attr::NodeView;
use crate::onnx::tensor::to_tensor;
use crate::onnx::{Ctx, Sym, SymTensor, Value};
use ndarray::{ArrayD, IxDyn};
use veil_ir::{Dim, Op, Shape, Tensor};

pub(super) fn register(r: &mut Registry) {
    r.insert(("", "Constant"), constant);
    r.insert(("", "Shape"), shape);
    r.insert(("", "Reshape"), reshape);
    r.insert(("", "Flatten"), flatten);
    r.insert(("", "Squeeze"), squeeze);
    r.insert(("", "Unsqueeze"), unsqueeze);
    r.insert(("", "Transpose"), transpose);
    r.insert(("", "Concat"), concat);
    r.insert(("", "Slice"), slice);
    r.insert(("", "Gather"), gather);
    r.insert(("", "Pad"), pad);
    r.insert(("", "ConstantOfShape"), constant_of_shape);
    r.insert(("", "Expand"), expand);
    r.insert(("", "Tile"), tile);
    r.insert(("", "Split"), split);
}

fn constant(_: &mut Ctx, n: &NodeView) -> Result<Vec<Value>> {
    let t = if let Some(t) = n.tensor("value")? {
        to_tensor(t).map_err(|e| n.err(e))?
    } else if n.has("value_float") {
        Tensor::scalar_f32(n.float("value_float", 0.0)?)
    } else if let Some(v) = n.floats("value_floats")? {
        Tensor::F32(ArrayD::from_shape_vec(vec![v.len()], v).expect("1-D"))
    } else if let Some(i) = n.opt_int("value_int")? {
        Tensor::I64(ArrayD::from_elem(vec![], i))
    } else if let Some(v) = n.ints("value_ints")? {
        Tensor::I64(ArrayD::from_shape_vec(vec![v.len()], v).expect("1-D"))
    } else {
        return Err(n.err("needs a numeric 'value' attribute (sparse and string constants are not supported)"));
    };
    one(Value::Const(t))
}

fn shape(c: &mut Ctx, n: &NodeView) -> Result<Vec<Value>> {
    let x = c.input(n, 0)?;
    let dims = c.type_of(&x).shape.0;
    let rank = dims.len() as i64;
    let clampi = |v: i64| (if v < 0 { v + rank } else { v }).clamp(0, rank) as usize;
    let start = clampi(n.int("start", 0)?);
    let end = clampi(n.int("end", rank)?);
    let vals: Vec<Sym> = dims[start..end.max(start)]
        .iter()
        .map(|d| match d {
            Dim::Batch => Sym::Batch,
            Dim::Fixed(k) => Sym::Int(*k as i64),
        })
        .collect();
    one(SymTensor { dims: vec![vals.len()], vals }.into_value())
}

/// An integer input (constant or folded shape) as symbols.
fn sym_input(c: &Ctx, n: &NodeView, i: usize, what: &str) -> Result<SymTensor> {
    match c.input(n, i)? {
        Value::Sym(s) => Ok(s),
        Value::Const(t) => SymTensor::from_const(&t).ok_or_else(|| n.err(format!("{what} must be integers"))),
        Value::Node(_) => Err(n.err(format!("{what} (input {i}) must be computable without the model's input"))),
    }
}

fn ints_input(c: &Ctx, n: &NodeView, i: usize, what: &str) -> Result<Vec<i64>> {
    sym_input(c, n, i, what)?
        .vals
        .iter()
        .map(|s| match s {
            Sym::Int(v) => Ok(*v),
            Sym::Batch => Err(n.err(format!("{what} depend on the batch size"))),
        })
        .collect()
}

/// Give a value a new shape: folded for constants and shape values, a Reshape otherwise.
fn to_shape(c: &mut Ctx, n: &NodeView, x: Value, dims: Vec<Dim>) -> Result<Value> {
    match x {
        Value::Sym(mut s) => {
            let d: Option<Vec<usize>> = dims.iter().map(|d| d.fixed()).collect();
            let d = d.ok_or_else(|| n.err("a shape value cannot take a batch dimension"))?;
            if d.iter().product::<usize>() != s.vals.len() {
                return Err(n.err(format!("cannot reshape {} values to {:?}", s.vals.len(), d)));
            }
            s.dims = d;
            Ok(Value::Sym(s))
        }
        x => {
            let name = n.required_input(0)?.to_string();
            c.apply(n, Op::Reshape { shape: Shape(dims) }, &[(x, name)], &n.output_name(0))
        }
    }
}

fn reshape(c: &mut Ctx, n: &NodeView) -> Result<Vec<Value>> {
    let x = c.input(n, 0)?;
    let input = c.type_of(&x).shape;
    let target = sym_input(c, n, 1, "the target shape")?;
    let allow_zero = n.int("allowzero", 0)? != 0;
    let dims = resolve_reshape(&input, &target.vals, allow_zero).map_err(|e| n.err(e))?;
    one(to_shape(c, n, x, dims)?)
}

/// Resolve an ONNX target shape (with 0 = copy, -1 = infer, and the symbolic batch size)
/// against the input shape. The batch axis must stay the leading axis: a reshape that
/// merges samples is an error.
pub(crate) fn resolve_reshape(
    input: &Shape,
    target: &[Sym],
    allow_zero: bool,
) -> std::result::Result<Vec<Dim>, String> {
    let mut out: Vec<Option<Dim>> = Vec::with_capacity(target.len());
    for (i, t) in target.iter().enumerate() {
        out.push(match *t {
            Sym::Batch => Some(Dim::Batch),
            Sym::Int(0) if !allow_zero => Some(
                *input.dims().get(i).ok_or_else(|| format!("target dimension {i} copies a missing input dimension"))?,
            ),
            Sym::Int(-1) => None,
            Sym::Int(k) if k >= 0 => Some(Dim::Fixed(k as usize)),
            Sym::Int(k) => return Err(format!("invalid target dimension {k}")),
        });
    }
    if out.iter().filter(|d| d.is_none()).count() > 1 {
        return Err("more than one target dimension is -1".into());
    }
    let known: usize = out.iter().flatten().filter_map(|d| d.fixed()).product();
    let out_batch = out.iter().flatten().any(|d| *d == Dim::Batch);
    let in_fixed = input.fixed_volume();
    if let Some(hole) = out.iter().position(|d| d.is_none()) {
        out[hole] = Some(if input.has_batch() && !out_batch {
            if known != in_fixed {
                return Err(format!("reshape of {input} to {target:?} would merge samples of the batch"));
            }
            Dim::Batch
        } else {
            if known == 0 || !in_fixed.is_multiple_of(known) {
                return Err(format!("cannot reshape {input} to {target:?}"));
            }
            Dim::Fixed(in_fixed / known)
        });
    }
    let dims: Vec<Dim> = out.into_iter().map(|d| d.expect("filled")).collect();
    let s = Shape(dims.clone());
    if s.has_batch() != input.has_batch() || s.fixed_volume() != in_fixed {
        return Err(format!("cannot reshape {input} to {s}"));
    }
    if s.has_batch() && (dims[0] != Dim::Batch || input.dims()[0] != Dim::Batch) {
        return Err(format!("reshape of {input} to {s} moves the batch dimension"));
    }
    Ok(dims)
}

fn flatten(c: &mut Ctx, n: &NodeView) -> Result<Vec<Value>> {
    let x = c.input(n, 0)?;
    let s = c.type_of(&x).shape;
    let rank = s.rank() as i64;
    let a = n.int("axis", 1)?;
    let axis = if a < 0 { a + rank } else { a };
    if !(0..=rank).contains(&axis) {
        return Err(n.err(format!("axis {a} out of range for {s}")));
    }
    let (head, tail) = s.dims().split_at(axis as usize);
    let vol = |d: &[Dim]| -> Sym {
        if d.contains(&Dim::Batch) {
            if d.iter().filter_map(|x| x.fixed()).product::<usize>() == 1 {
                Sym::Batch
            } else {
                Sym::Int(-2) // merges samples: rejected below
            }
        } else {
            Sym::Int(d.iter().filter_map(|x| x.fixed()).product::<usize>() as i64)
        }
    };
    let target = [vol(head), vol(tail)];
    if target.contains(&Sym::Int(-2)) || target[1] == Sym::Batch {
        return Err(n.err(format!("flatten of {s} at axis {axis} would merge samples of the batch")));
    }
    let dims = resolve_reshape(&s, &target, true).map_err(|e| n.err(e))?;
    one(to_shape(c, n, x, dims)?)
}

/// Axes from the attribute (older opsets) or input 1 (opset 13+).
fn axes_of(c: &Ctx, n: &NodeView) -> Result<Option<Vec<i64>>> {
    if n.opset >= 13 {
        match n.input(1) {
            Some(_) => ints_input(c, n, 1, "axes").map(Some),
            None => Ok(None),
        }
    } else {
        n.ints("axes")
    }
}

fn norm_axis(n: &NodeView, a: i64, rank: usize) -> Result<usize> {
    veil_ir::types::normalize_axis(a, rank).ok_or_else(|| n.err(format!("axis {a} out of range for rank {rank}")))
}

fn squeeze(c: &mut Ctx, n: &NodeView) -> Result<Vec<Value>> {
    let x = c.input(n, 0)?;
    let s = c.type_of(&x).shape;
    let axes: Vec<usize> = match axes_of(c, n)? {
        Some(a) => a.iter().map(|&a| norm_axis(n, a, s.rank())).collect::<Result<_>>()?,
        None => (0..s.rank()).filter(|&i| s.dims()[i] == Dim::Fixed(1)).collect(),
    };
    for &a in &axes {
        if s.dims()[a] != Dim::Fixed(1) {
            return Err(n.err(format!("cannot squeeze axis {a} of {s}: its size is not 1")));
        }
    }
    let dims = s.dims().iter().enumerate().filter(|(i, _)| !axes.contains(i)).map(|(_, d)| *d).collect();
    one(to_shape(c, n, x, dims)?)
}

fn unsqueeze(c: &mut Ctx, n: &NodeView) -> Result<Vec<Value>> {
    let x = c.input(n, 0)?;
    let s = c.type_of(&x).shape;
    let axes = axes_of(c, n)?.ok_or_else(|| n.err("axes are required"))?;
    let rank = s.rank() + axes.len();
    let mut axes: Vec<usize> = axes.iter().map(|&a| norm_axis(n, a, rank)).collect::<Result<_>>()?;
    axes.sort_unstable();
    let mut dims = s.0.clone();
    for a in axes {
        dims.insert(a, Dim::Fixed(1));
    }
    if dims.contains(&Dim::Batch) && dims[0] != Dim::Batch {
        return Err(n.err(format!("unsqueeze of {s} would move the batch dimension")));
    }
    one(to_shape(c, n, x, dims)?)
}

fn transpose(c: &mut Ctx, n: &NodeView) -> Result<Vec<Value>> {
    let x = c.input(n, 0)?;
    let rank = c.type_of(&x).shape.rank();
    let perm: Vec<usize> = match n.ints("perm")? {
        Some(p) => p.iter().map(|&a| norm_axis(n, a, rank)).collect::<Result<_>>()?,
        None => (0..rank).rev().collect(),
    };
    let name = n.required_input(0)?.to_string();
    one(c.apply(n, Op::Transpose { perm }, &[(x, name)], &n.output_name(0))?)
}

fn concat(c: &mut Ctx, n: &NodeView) -> Result<Vec<Value>> {
    let mut inputs = Vec::new();
    for name in n.proto.input.iter().filter(|s| !s.is_empty()) {
        inputs.push((c.get(n, name)?, name.clone()));
    }
    let first = inputs.first().ok_or_else(|| n.err("needs at least one input"))?;
    let rank = c.type_of(&first.0).shape.rank();
    let axis = norm_axis(n, n.int("axis", 0)?, rank)?;
    // Shape vectors (some entries the batch size) concatenate symbolically.
    if inputs.iter().any(|(v, _)| matches!(v, Value::Sym(_))) {
        let mut vals = Vec::new();
        for (v, _) in &inputs {
            let s = match v {
                Value::Sym(s) => s.clone(),
                Value::Const(t) => {
                    SymTensor::from_const(t).ok_or_else(|| n.err("cannot mix a shape with float values"))?
                }
                Value::Node(_) => return Err(n.err("cannot mix a shape with computed values")),
            };
            vals.extend(s.vals);
        }
        return one(SymTensor { dims: vec![vals.len()], vals }.into_value());
    }
    one(c.apply(n, Op::Concat { axis }, &inputs, &n.output_name(0))?)
}

/// Indices a slice selects along an axis of size `dim`, by ONNX's clamping rules.
fn slice_indices(start: i64, end: i64, step: i64, dim: i64) -> Vec<i64> {
    let fix = |v: i64| if v < 0 { v + dim } else { v };
    let (s, e) = (fix(start), fix(end));
    let mut out = Vec::new();
    if step > 0 {
        let (mut i, e) = (s.clamp(0, dim), e.clamp(0, dim));
        while i < e {
            out.push(i);
            i += step;
        }
    } else {
        let (mut i, e) = (s.clamp(0, dim - 1), e.clamp(-1, dim - 1));
        while i > e {
            out.push(i);
            i += step;
        }
    }
    out
}

fn slice(c: &mut Ctx, n: &NodeView) -> Result<Vec<Value>> {
    let x = c.input(n, 0)?;
    let s = c.type_of(&x).shape;
    let (starts, ends, axes, steps) = if n.opset < 10 {
        (n.required_ints("starts")?, n.required_ints("ends")?, n.ints("axes")?, None)
    } else {
        let opt = |i: usize, what: &str| -> Result<Option<Vec<i64>>> {
            if n.input(i).is_some() {
                ints_input(c, n, i, what).map(Some)
            } else {
                Ok(None)
            }
        };
        (ints_input(c, n, 1, "starts")?, ints_input(c, n, 2, "ends")?, opt(3, "axes")?, opt(4, "steps")?)
    };
    let axes = axes.unwrap_or_else(|| (0..starts.len() as i64).collect());
    let steps = steps.unwrap_or_else(|| vec![1; starts.len()]);
    if ends.len() != starts.len() || axes.len() != starts.len() || steps.len() != starts.len() || steps.contains(&0) {
        return Err(n.err("starts, ends, axes and steps must have equal lengths, steps non-zero"));
    }
    let mut value = x;
    let mut value_name = n.required_input(0)?.to_string();
    for k in 0..starts.len() {
        let axis = norm_axis(n, axes[k], s.rank())?;
        let dim = match s.dims()[axis] {
            Dim::Fixed(d) => d as i64,
            Dim::Batch => {
                if starts[k] == 0 && ends[k] >= i32::MAX as i64 && steps[k] == 1 {
                    continue; // a full slice of the batch axis
                }
                return Err(n.err("slicing the batch dimension is not supported"));
            }
        };
        let ix = slice_indices(starts[k], ends[k], steps[k], dim);
        if ix.len() as i64 == dim && ix.iter().enumerate().all(|(i, &v)| i as i64 == v) {
            continue; // the whole axis
        }
        let out = if k + 1 == starts.len() { n.output_name(0) } else { format!("{}_axis{axis}", n.output_name(0)) };
        value = take(c, n, value, &value_name, axis, ArrayD::from_shape_vec(vec![ix.len()], ix).expect("1-D"), &out)?;
        value_name = out;
    }
    one(value)
}

/// Gather constant indices along an axis: folded on shape values and constants.
pub(super) fn take(
    c: &mut Ctx,
    n: &NodeView,
    x: Value,
    x_name: &str,
    axis: usize,
    indices: ArrayD<i64>,
    out: &str,
) -> Result<Value> {
    if let Value::Sym(s) = &x {
        if axis != 0 || s.dims.len() != 1 {
            return Err(n.err("only 1-D shape values can be indexed"));
        }
        let len = s.vals.len() as i64;
        let mut vals = Vec::new();
        for &i in indices.iter() {
            let j = if i < 0 { i + len } else { i };
            vals.push(
                *s.vals
                    .get(j as usize)
                    .filter(|_| (0..len).contains(&j))
                    .ok_or_else(|| n.err(format!("index {i} out of range")))?,
            );
        }
        return Ok(SymTensor { dims: indices.shape().to_vec(), vals }.into_value());
    }
    c.apply(n, Op::Gather { axis, indices }, &[(x, x_name.to_string())], out)
}

fn gather(c: &mut Ctx, n: &NodeView) -> Result<Vec<Value>> {
    let x = c.input(n, 0)?;
    let s = c.type_of(&x).shape;
    let axis = norm_axis(n, n.int("axis", 0)?, s.rank())?;
    let indices = match c.input(n, 1)? {
        Value::Const(Tensor::I64(a)) => a,
        Value::Const(_) => return Err(n.err("indices must be integers")),
        _ => return Err(n.err("indices must be constant (data-dependent gathers cannot run on encrypted data)")),
    };
    // Negative indices count from the end.
    let indices = match s.dims()[axis] {
        Dim::Fixed(d) => indices.mapv(|i| if i < 0 { i + d as i64 } else { i }),
        Dim::Batch => return Err(n.err("gathering along the batch dimension is not supported")),
    };
    let name = n.required_input(0)?.to_string();
    one(take(c, n, x, &name, axis, indices, &n.output_name(0))?)
}

fn pad(c: &mut Ctx, n: &NodeView) -> Result<Vec<Value>> {
    let mode = n.string("mode", "constant")?;
    if mode != "constant" {
        return Err(n.err(format!("pad mode '{mode}' is not supported (only 'constant')")));
    }
    let x = c.input(n, 0)?;
    let rank = c.type_of(&x).shape.rank();
    let (pads, value, axes) = if n.opset < 11 {
        (n.required_ints("pads")?, n.float("value", 0.0)?, None)
    } else {
        let pads = ints_input(c, n, 1, "pads")?;
        let value = match c.opt_const_input(n, 2, "constant_value")? {
            Some(t) if t.len() == 1 => t.values_f64()[0] as f32,
            Some(_) => return Err(n.err("constant_value must be a scalar")),
            None => 0.0,
        };
        let axes = if n.input(3).is_some() { Some(ints_input(c, n, 3, "axes")?) } else { None };
        (pads, value, axes)
    };
    let axes: Vec<usize> = match axes {
        Some(a) => a.iter().map(|&a| norm_axis(n, a, rank)).collect::<Result<_>>()?,
        None => (0..rank).collect(),
    };
    if pads.len() != 2 * axes.len() || pads.iter().any(|&p| p < 0) {
        return Err(n.err(format!("pads {pads:?} do not fit {} axes (negative pads are not supported)", axes.len())));
    }
    let mut per_axis = vec![(0usize, 0usize); rank];
    for (k, &a) in axes.iter().enumerate() {
        per_axis[a] = (pads[k] as usize, pads[k + axes.len()] as usize);
    }
    let name = n.required_input(0)?.to_string();
    one(c.apply(n, Op::Pad { pads: per_axis, value }, &[(x, name)], &n.output_name(0))?)
}

fn constant_of_shape(c: &mut Ctx, n: &NodeView) -> Result<Vec<Value>> {
    let dims: Vec<usize> = ints_input(c, n, 0, "the shape")?.iter().map(|&d| d.max(0) as usize).collect();
    let fill = match n.tensor("value")? {
        Some(t) => to_tensor(t).map_err(|e| n.err(e))?,
        None => Tensor::scalar_f32(0.0),
    };
    one(Value::Const(match fill {
        Tensor::F32(a) => Tensor::F32(ArrayD::from_elem(IxDyn(&dims), *a.iter().next().unwrap_or(&0.0))),
        Tensor::I64(a) => Tensor::I64(ArrayD::from_elem(IxDyn(&dims), *a.iter().next().unwrap_or(&0))),
    }))
}

/// Expand: numpy broadcasting of the input against a target shape.
fn expand(c: &mut Ctx, n: &NodeView) -> Result<Vec<Value>> {
    let x = c.input(n, 0)?;
    let target = sym_input(c, n, 1, "the target shape")?;
    let s = c.type_of(&x).shape;
    let dims = expanded_dims(&s, &target.vals).map_err(|e| n.err(e))?;
    one(broadcast_to(c, n, x, n.required_input(0)?, &dims, &n.output_name(0))?)
}

/// A value broadcast to `dims` (which it must broadcast to): leading axes of size 1 added
/// by a reshape, each axis of size 1 that grows by a gather of index 0 repeated, so that
/// it runs on ciphertexts.
pub(super) fn broadcast_to(
    c: &mut Ctx,
    n: &NodeView,
    x: Value,
    x_name: &str,
    dims: &[Dim],
    out: &str,
) -> Result<Value> {
    let s = c.type_of(&x).shape;
    let mut name = x_name.to_string();
    let mut value = x;
    if dims.len() > s.rank() {
        let mut padded = vec![Dim::Fixed(1); dims.len() - s.rank()];
        padded.extend_from_slice(s.dims());
        if s.has_batch() {
            return Err(n.err(format!("broadcasting {s} to rank {} would move the batch dimension", dims.len())));
        }
        let reshaped = format!("{out}_rank{}", dims.len());
        value = c.apply(n, Op::Reshape { shape: Shape(padded) }, &[(value, name)], &reshaped)?;
        name = reshaped;
    }
    let current = c.type_of(&value).shape;
    let grow: Vec<(usize, usize)> = (0..dims.len())
        .filter_map(|a| match (current.dims()[a], dims[a]) {
            (Dim::Fixed(1), Dim::Fixed(k)) if k != 1 => Some((a, k)),
            _ => None,
        })
        .collect();
    for (i, &(axis, k)) in grow.iter().enumerate() {
        let step = if i + 1 == grow.len() { out.to_string() } else { format!("{out}_axis{axis}") };
        value = take(c, n, value, &name, axis, ArrayD::zeros(vec![k]), &step)?;
        name = step;
    }
    Ok(value)
}

/// The result dimensions of Expand (numpy broadcasting, ONNX's rule); the batch size may
/// stay the batch size (target entry N or 1), never become a fixed size or appear.
fn expanded_dims(input: &Shape, target: &[Sym]) -> std::result::Result<Vec<Dim>, String> {
    let rank = input.rank().max(target.len());
    let mut dims = Vec::with_capacity(rank);
    for a in 0..rank {
        let d = (a + input.rank()).checked_sub(rank).map_or(Dim::Fixed(1), |i| input.dims()[i]);
        let t = (a + target.len()).checked_sub(rank).map_or(Sym::Int(1), |i| target[i]);
        dims.push(match (d, t) {
            (Dim::Batch, Sym::Batch | Sym::Int(1)) => Dim::Batch,
            (Dim::Fixed(_), Sym::Batch) => {
                return Err(format!("expanding {input} to {target:?} would give it the batch size"));
            }
            (Dim::Batch, Sym::Int(k)) => {
                return Err(format!("expanding {input} to {target:?} fixes the batch size to {k}"));
            }
            (Dim::Fixed(d), Sym::Int(k)) if d as i64 == k || k == 1 => Dim::Fixed(d),
            (Dim::Fixed(1), Sym::Int(k)) if k > 1 => Dim::Fixed(k as usize),
            _ => return Err(format!("cannot expand {input} to {target:?}")),
        });
    }
    Ok(dims)
}

fn tile(c: &mut Ctx, n: &NodeView) -> Result<Vec<Value>> {
    let x = c.input(n, 0)?;
    let s = c.type_of(&x).shape;
    let repeats = ints_input(c, n, 1, "repeats")?;
    if repeats.len() != s.rank() || repeats.iter().any(|&r| r < 0) {
        return Err(n.err(format!("repeats {repeats:?} do not fit {s}")));
    }
    let out = n.output_name(0);
    let tiled: Vec<usize> = (0..s.rank()).filter(|&a| repeats[a] != 1).collect();
    let mut name = n.required_input(0)?.to_string();
    let mut value = x;
    for (i, &axis) in tiled.iter().enumerate() {
        let d = match s.dims()[axis] {
            Dim::Fixed(d) => d as i64,
            Dim::Batch => return Err(n.err("tiling along the batch dimension mixes samples")),
        };
        let ix: Vec<i64> = (0..d * repeats[axis]).map(|i| i % d).collect();
        let step = if i + 1 == tiled.len() { out.clone() } else { format!("{out}_axis{axis}") };
        value = take(c, n, value, &name, axis, ArrayD::from_shape_vec(vec![ix.len()], ix).expect("1-D"), &step)?;
        name = step;
    }
    one(value)
}

fn split(c: &mut Ctx, n: &NodeView) -> Result<Vec<Value>> {
    let x = c.input(n, 0)?;
    let s = c.type_of(&x).shape;
    let axis = norm_axis(n, n.int("axis", 0)?, s.rank())?;
    let dim = match s.dims()[axis] {
        Dim::Fixed(d) => d,
        Dim::Batch => return Err(n.err("splitting the batch dimension is not supported")),
    };
    let outputs = n.proto.output.len();
    let given = if n.opset >= 13 {
        if n.input(1).is_some() {
            Some(ints_input(c, n, 1, "split")?)
        } else {
            None
        }
    } else {
        n.ints("split")?
    };
    let sizes: Vec<usize> = match given {
        Some(v) => {
            if v.len() != outputs || v.iter().any(|&k| k < 0) || v.iter().sum::<i64>() != dim as i64 {
                return Err(n.err(format!("split sizes {v:?} do not divide axis {axis} of {s} into {outputs} parts")));
            }
            v.iter().map(|&k| k as usize).collect()
        }
        None => {
            // Equal parts; from opset 18 the last may be smaller (ceil), before it must divide.
            let parts = if n.opset >= 18 { n.int("num_outputs", outputs as i64)? as usize } else { outputs };
            if parts == 0 || parts != outputs || (n.opset < 18 && !dim.is_multiple_of(parts)) {
                return Err(n.err(format!("cannot split axis {axis} of {s} into {outputs} equal parts")));
            }
            let size = dim.div_ceil(parts);
            (0..parts).map(|k| size.min(dim.saturating_sub(k * size))).collect()
        }
    };
    let name = n.required_input(0)?.to_string();
    let mut start = 0;
    let mut values = Vec::with_capacity(outputs);
    for (k, &size) in sizes.iter().enumerate() {
        let ix: Vec<i64> = (start as i64..(start + size) as i64).collect();
        start += size;
        let ix = ArrayD::from_shape_vec(vec![size], ix).expect("1-D");
        values.push(take(c, n, x.clone(), &name, axis, ix, &n.output_name(k))?);
    }
    Ok(values)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reshape_keeps_batch_leading() {
        let input = Shape::batched(&[1, 8, 8]);
        assert_eq!(
            resolve_reshape(&input, &[Sym::Batch, Sym::Int(-1)], false).unwrap(),
            vec![Dim::Batch, Dim::Fixed(64)]
        );
        assert_eq!(
            resolve_reshape(&input, &[Sym::Int(-1), Sym::Int(64)], false).unwrap(),
            vec![Dim::Batch, Dim::Fixed(64)]
        );
        assert_eq!(
            resolve_reshape(&input, &[Sym::Int(0), Sym::Int(8), Sym::Int(8)], false).unwrap(),
            Shape::batched(&[8, 8]).0
        );
        assert!(resolve_reshape(&input, &[Sym::Int(-1), Sym::Int(8)], false).unwrap_err().contains("merge samples"));
    }

    #[test]
    fn slices_follow_onnx_clamping() {
        assert_eq!(slice_indices(1, i64::MAX, 1, 4), vec![1, 2, 3]);
        assert_eq!(slice_indices(-1, i64::MIN, -1, 4), vec![3, 2, 1, 0]);
        assert_eq!(slice_indices(0, 4, 2, 5), vec![0, 2]);
    }

    #[test]
    fn expand_broadcasts_like_numpy() {
        let x = Shape::batched(&[1, 4]);
        let t = [Sym::Batch, Sym::Int(3), Sym::Int(4)];
        assert_eq!(expanded_dims(&x, &t).unwrap(), Shape::batched(&[3, 4]).0);
        let t = [Sym::Int(1), Sym::Int(3), Sym::Int(1)];
        assert_eq!(expanded_dims(&x, &t).unwrap(), Shape::batched(&[3, 4]).0);
        assert!(expanded_dims(&Shape::fixed(&[1, 4]), &[Sym::Int(2), Sym::Int(3), Sym::Int(4)]).is_ok());
        assert!(expanded_dims(&x, &[Sym::Int(5), Sym::Int(3), Sym::Int(4)]).unwrap_err().contains("batch size"));
        assert!(expanded_dims(&Shape::fixed(&[4]), &[Sym::Batch, Sym::Int(4)]).unwrap_err().contains("batch size"));
        assert!(expanded_dims(&x, &[Sym::Batch, Sym::Int(3), Sym::Int(5)]).is_err());
    }
}
