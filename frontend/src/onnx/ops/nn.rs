//! Convolution, pooling, normalisation and reductions.

use super::{one, Registry};
use crate::error::Result;
use crate::onnx::attr::NodeView;
use crate::onnx::{Ctx, Value};
use veil_ir::op::{Conv2d, Pool2d, ReduceKind, UnaryFn};
use veil_ir::{Dim, Op, Shape, Tensor};

pub(super) fn register(r: &mut Registry) {
    r.insert(("", "Conv"), conv);
    r.insert(("", "AveragePool"), |c, n| pool(c, n, false));
    r.insert(("", "MaxPool"), |c, n| pool(c, n, true));
    r.insert(("", "GlobalAveragePool"), |c, n| global_pool(c, n, false));
    r.insert(("", "GlobalMaxPool"), |c, n| global_pool(c, n, true));
    r.insert(("", "BatchNormalization"), batch_norm);
    r.insert(("", "ReduceSum"), |c, n| reduce(c, n, Reduction::plain(ReduceKind::Sum, 13)));
    r.insert(("", "ReduceMean"), |c, n| reduce(c, n, Reduction::plain(ReduceKind::Mean, 18)));
    r.insert(("", "ReduceMax"), |c, n| reduce(c, n, Reduction::plain(ReduceKind::Max, 18)));
    r.insert(("", "ReduceMin"), |c, n| reduce(c, n, Reduction::plain(ReduceKind::Min, 18)));
    r.insert(("", "ReduceL1"), |c, n| reduce(c, n, Reduction { pre: Some(UnaryFn::Abs), ..Reduction::sum() }));
    r.insert(("", "ReduceSumSquare"), |c, n| reduce(c, n, Reduction { pre: Some(SQUARE), ..Reduction::sum() }));
    r.insert(("", "ReduceL2"), |c, n| {
        reduce(c, n, Reduction { pre: Some(SQUARE), post: Some(UnaryFn::Sqrt), ..Reduction::sum() })
    });
}

const SQUARE: UnaryFn = UnaryFn::Pow { exponent: 2.0 };

/// A reduction as veil builds it: an element-wise map, a sum/mean/max/min over axes, and
/// a map of the result (ReduceL2 = sqrt ∘ sum ∘ square), so that each part compiles as
/// what it is (a lookup, a linear sum, a lookup).
struct Reduction {
    pre: Option<UnaryFn>,
    kind: ReduceKind,
    post: Option<UnaryFn>,
    /// First opset that takes the axes as input 1 rather than an attribute.
    axes_input_from: i64,
}

impl Reduction {
    fn plain(kind: ReduceKind, axes_input_from: i64) -> Reduction {
        Reduction { pre: None, kind, post: None, axes_input_from }
    }

    fn sum() -> Reduction {
        Reduction::plain(ReduceKind::Sum, 18)
    }
}

/// Strides, pads (top, left, bottom, right) and dilations of a 2-D window, resolving
/// `auto_pad` against the input's spatial size.
fn window(n: &NodeView, spatial: [usize; 2], kernel: [usize; 2]) -> Result<([usize; 2], [usize; 4], [usize; 2])> {
    let pair = |name: &str| -> Result<[usize; 2]> {
        match n.ints(name)? {
            None => Ok([1, 1]),
            Some(v) if v.len() == 2 && v.iter().all(|&x| x >= 1) => Ok([v[0] as usize, v[1] as usize]),
            Some(v) => Err(n.err(format!("attribute '{name}' = {v:?}: expected two positive values"))),
        }
    };
    let strides = pair("strides")?;
    let dilations = pair("dilations")?;
    let pads = match n.string("auto_pad", "NOTSET")?.as_str() {
        "NOTSET" => match n.ints("pads")? {
            None => [0; 4],
            Some(p) if p.len() == 4 && p.iter().all(|&x| x >= 0) => {
                [p[0] as usize, p[1] as usize, p[2] as usize, p[3] as usize]
            }
            Some(p) => return Err(n.err(format!("attribute 'pads' = {p:?}: expected four non-negative values"))),
        },
        "VALID" => [0; 4],
        mode @ ("SAME_UPPER" | "SAME_LOWER") => {
            let mut pads = [0; 4];
            for i in 0..2 {
                let out = spatial[i].div_ceil(strides[i]);
                let span = dilations[i] * (kernel[i] - 1) + 1;
                let total = ((out - 1) * strides[i] + span).saturating_sub(spatial[i]);
                let (small, big) = (total / 2, total - total / 2);
                let (begin, end) = if mode == "SAME_UPPER" { (small, big) } else { (big, small) };
                pads[i] = begin;
                pads[i + 2] = end;
            }
            pads
        }
        other => return Err(n.err(format!("unknown auto_pad '{other}'"))),
    };
    Ok((strides, pads, dilations))
}

/// For a 1-D op, the attribute lists have one entry; lift them to 2-D with a unit first axis.
fn lift_1d(v: Option<Vec<i64>>, fill: i64) -> Option<Vec<i64>> {
    v.map(|v| match v.len() {
        1 => vec![fill, v[0]],
        2 => vec![fill, v[0], fill, v[1]],
        _ => v,
    })
}

/// The input's layout: rank 4 (NCHW) is native; rank 3 (NCL) becomes N,C,1,L.
fn spatial_of(c: &Ctx, n: &NodeView, x: &Value) -> Result<(bool, [usize; 2])> {
    let ty = c.type_of(x);
    let fixed = |i: usize| {
        ty.shape.dims()[i].fixed().ok_or_else(|| n.err(format!("spatial dimension {i} of {} is symbolic", ty.shape)))
    };
    match ty.shape.rank() {
        4 => Ok((false, [fixed(2)?, fixed(3)?])),
        3 => Ok((true, [1, fixed(2)?])),
        r => Err(n.err(format!("only 1-D and 2-D windows are supported (input {} has rank {r})", ty.shape))),
    }
}

/// Reshape a value to `dims` (keeping the batch axis symbolic).
fn reshape(c: &mut Ctx, n: &NodeView, v: Value, name: &str, dims: Vec<Dim>, out: &str) -> Result<Value> {
    c.apply(n, Op::Reshape { shape: Shape(dims) }, &[(v, name.to_string())], out)
}

fn to_2d(c: &mut Ctx, n: &NodeView, x: Value, name: &str) -> Result<Value> {
    let mut d = c.type_of(&x).shape.0;
    d.insert(2, Dim::Fixed(1));
    reshape(c, n, x, name, d, &format!("{}_2d", n.output_name(0)))
}

fn back_to_1d(c: &mut Ctx, n: &NodeView, y: Value) -> Result<Value> {
    let mut d = c.type_of(&y).shape.0;
    d.remove(2);
    let tmp = format!("{}_2d_out", n.output_name(0));
    reshape(c, n, y, &tmp, d, &n.output_name(0))
}

/// An attribute view with 1-D lists lifted to 2-D, so one code path serves both.
struct Lifted<'a> {
    inner: &'a NodeView<'a>,
    one_d: bool,
}

impl Lifted<'_> {
    fn ints(&self, name: &str) -> Result<Option<Vec<i64>>> {
        let v = self.inner.ints(name)?;
        Ok(if self.one_d { lift_1d(v, if name == "pads" { 0 } else { 1 }) } else { v })
    }
}

fn conv(c: &mut Ctx, n: &NodeView) -> Result<Vec<Value>> {
    let x = c.input(n, 0)?;
    let x_name = n.required_input(0)?;
    let (one_d, spatial) = spatial_of(c, n, &x)?;
    let w = c.input(n, 1)?;
    let wty = c.type_of(&w);
    let wd = wty.shape.static_dims().ok_or_else(|| n.err("weights must have a static shape"))?;
    let kernel =
        if one_d { [1, *wd.get(2).unwrap_or(&1)] } else { [*wd.get(2).unwrap_or(&1), *wd.get(3).unwrap_or(&1)] };
    let lifted = Lifted { inner: n, one_d };
    let (strides, pads, dilations) = window_lifted(n, &lifted, spatial, kernel)?;
    let group = n.int("group", 1)?;
    if group < 1 {
        return Err(n.err(format!("group = {group}")));
    }
    let op = Op::Conv(Conv2d { strides, pads, dilations, group: group as usize });
    let (x, w) = if one_d {
        let x2 = to_2d(c, n, x, x_name)?;
        let mut wd2 = wd.clone();
        wd2.insert(2, 1);
        let w_name = format!("{}_2d", n.required_input(1)?);
        let w2 = reshape(c, n, w, n.required_input(1)?, wd2.iter().map(|&d| Dim::Fixed(d)).collect(), &w_name)?;
        ((x2, format!("{}_2d", n.output_name(0))), (w2, w_name))
    } else {
        ((x, x_name.to_string()), (w, n.required_input(1)?.to_string()))
    };
    let mut inputs = vec![x, w];
    if let Some(b) = n.input(2) {
        inputs.push((c.get(n, b)?, b.to_string()));
    }
    let out = if one_d { format!("{}_2d_out", n.output_name(0)) } else { n.output_name(0) };
    let y = c.apply(n, op, &inputs, &out)?;
    one(if one_d { back_to_1d(c, n, y)? } else { y })
}

fn window_lifted(
    n: &NodeView,
    l: &Lifted,
    spatial: [usize; 2],
    kernel: [usize; 2],
) -> Result<([usize; 2], [usize; 4], [usize; 2])> {
    if !l.one_d {
        return window(n, spatial, kernel);
    }
    // Resolve the 1-D attributes by hand, then reuse the 2-D resolution on a 1×L image.
    let strides = l.ints("strides")?.unwrap_or(vec![1, 1]);
    let dilations = l.ints("dilations")?.unwrap_or(vec![1, 1]);
    let pads = l.ints("pads")?.unwrap_or(vec![0; 4]);
    if strides.len() != 2
        || dilations.len() != 2
        || pads.len() != 4
        || strides.iter().chain(&dilations).any(|&v| v < 1)
        || pads.iter().any(|&p| p < 0)
    {
        return Err(n.err("malformed strides, dilations or pads"));
    }
    let auto = n.string("auto_pad", "NOTSET")?;
    if auto != "NOTSET" && auto != "VALID" {
        return Err(n.err(format!("auto_pad {auto} on a 1-D window is not supported")));
    }
    let pads =
        if auto == "VALID" { [0; 4] } else { [pads[0] as usize, pads[1] as usize, pads[2] as usize, pads[3] as usize] };
    Ok(([strides[0] as usize, strides[1] as usize], pads, [dilations[0] as usize, dilations[1] as usize]))
}

fn pool(c: &mut Ctx, n: &NodeView, max: bool) -> Result<Vec<Value>> {
    let x = c.input(n, 0)?;
    let x_name = n.required_input(0)?;
    let (one_d, spatial) = spatial_of(c, n, &x)?;
    let l = Lifted { inner: n, one_d };
    let k = l.ints("kernel_shape")?.ok_or_else(|| n.err("attribute 'kernel_shape' is required"))?;
    if k.len() != 2 || k.iter().any(|&v| v < 1) {
        return Err(n.err(format!("kernel_shape {k:?} is not a 1-D or 2-D window")));
    }
    let kernel = [k[0] as usize, k[1] as usize];
    let (strides, pads, dilations) = window_lifted(n, &l, spatial, kernel)?;
    let p = Pool2d {
        kernel,
        strides,
        pads,
        dilations,
        ceil_mode: n.int("ceil_mode", 0)? != 0,
        count_include_pad: n.int("count_include_pad", 0)? != 0,
    };
    let op = if max { Op::MaxPool(p) } else { Op::AvgPool(p) };
    if one_d {
        let x2 = to_2d(c, n, x, x_name)?;
        let y = c.apply(n, op, &[(x2, format!("{}_2d", n.output_name(0)))], &format!("{}_2d_out", n.output_name(0)))?;
        return one(back_to_1d(c, n, y)?);
    }
    one(c.apply(n, op, &[(x, x_name.to_string())], &n.output_name(0))?)
}

fn global_pool(c: &mut Ctx, n: &NodeView, max: bool) -> Result<Vec<Value>> {
    let x = c.input(n, 0)?;
    let ty = c.type_of(&x);
    let name = n.required_input(0)?.to_string();
    if ty.shape.rank() < 3 {
        return Err(n.err(format!("expects [N, C, spatial...], got {}", ty.shape)));
    }
    if !max && ty.shape.rank() == 4 {
        return one(c.apply(n, Op::GlobalAvgPool, &[(x, name)], &n.output_name(0))?);
    }
    if max {
        let (one_d, spatial) = spatial_of(c, n, &x)?;
        let p = Pool2d {
            kernel: spatial,
            strides: [1, 1],
            pads: [0; 4],
            dilations: [1, 1],
            ceil_mode: false,
            count_include_pad: false,
        };
        if one_d {
            let x2 = to_2d(c, n, x, &name)?;
            let y = c.apply(
                n,
                Op::MaxPool(p),
                &[(x2, format!("{}_2d", n.output_name(0)))],
                &format!("{}_2d_out", n.output_name(0)),
            )?;
            return one(back_to_1d(c, n, y)?);
        }
        return one(c.apply(n, Op::MaxPool(p), &[(x, name)], &n.output_name(0))?);
    }
    let axes = (2..ty.shape.rank()).collect();
    one(c.apply(n, Op::Reduce { kind: ReduceKind::Mean, axes, keepdims: true }, &[(x, name)], &n.output_name(0))?)
}

fn batch_norm(c: &mut Ctx, n: &NodeView) -> Result<Vec<Value>> {
    if n.int("training_mode", 0)? != 0 {
        return Err(n.err("training-mode batch normalization is not supported; export the model in eval mode"));
    }
    let op = Op::BatchNorm { epsilon: n.float("epsilon", 1e-5)? };
    one(c.apply_inputs(n, op, 5)?)
}

fn reduce(c: &mut Ctx, n: &NodeView, r: Reduction) -> Result<Vec<Value>> {
    let x = c.input(n, 0)?;
    let ty = c.type_of(&x);
    let axes: Option<Vec<i64>> = if n.opset >= r.axes_input_from {
        c.opt_const_input(n, 1, "axes")?
            .map(|t| match t {
                Tensor::I64(a) => Ok(a.iter().copied().collect()),
                _ => Err(n.err("axes must be integers")),
            })
            .transpose()?
    } else {
        n.ints("axes")?
    };
    let rank = ty.shape.rank();
    let axes: Vec<usize> = match axes {
        Some(a) if !a.is_empty() => {
            let mut v = a
                .iter()
                .map(|&ax| ty.shape.axis(ax).ok_or_else(|| n.err(format!("axis {ax} out of range for {}", ty.shape))))
                .collect::<Result<Vec<_>>>()?;
            v.sort_unstable();
            v.dedup();
            v
        }
        _ if n.int("noop_with_empty_axes", 0)? != 0 => return one(x),
        _ => (0..rank).collect(),
    };
    let out = n.output_name(0);
    let mut value = (x, n.required_input(0)?.to_string());
    if let Some(f) = r.pre {
        let name = format!("{out}_{}", f.name());
        value = (c.apply(n, Op::Unary(f), &[value], &name)?, name);
    }
    let op = Op::Reduce { kind: r.kind, axes, keepdims: n.int("keepdims", 1)? != 0 };
    let name = if r.post.is_some() { format!("{out}_{}", op.mnemonic()) } else { out.clone() };
    value = (c.apply(n, op, &[value], &name)?, name);
    if let Some(f) = r.post {
        value = (c.apply(n, Op::Unary(f), &[value], &out)?, out);
    }
    one(value.0)
}
