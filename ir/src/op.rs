//! The operations of veil's IR, and the type each computes from its operands' types.
//!
//! One enum serves every stage: the float ops imported from ONNX or built with the DSL,
//! the integer ops the quantizer produces, and clear constants. One printer, one verifier
//! and one interpreter then cover every stage.

use crate::linear::Linear;
use crate::tensor::Tensor;
use crate::tlu::Tlu;
use crate::types::{broadcast, Dim, Elem, Range, Shape, TensorType};
use ndarray::ArrayD;
use serde::{Deserialize, Serialize};

/// Element-wise functions of one real variable. Kept as data (not closures) so that the
/// quantizer can tabulate any of them into a lookup table.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub enum UnaryFn {
    Relu,
    LeakyRelu {
        alpha: f32,
    },
    Sigmoid,
    Tanh,
    Erf,
    /// GELU, exact (erf) or the tanh approximation.
    Gelu {
        tanh: bool,
    },
    Softplus,
    Softsign,
    Elu {
        alpha: f32,
    },
    Selu {
        alpha: f32,
        gamma: f32,
    },
    HardSigmoid {
        alpha: f32,
        beta: f32,
    },
    HardSwish,
    Clip {
        min: f32,
        max: f32,
    },
    Abs,
    Neg,
    Exp,
    Log,
    Sqrt,
    Reciprocal,
    Pow {
        exponent: f32,
    },
}

impl UnaryFn {
    pub fn name(&self) -> &'static str {
        use UnaryFn::*;
        match self {
            Relu => "relu",
            LeakyRelu { .. } => "leaky_relu",
            Sigmoid => "sigmoid",
            Tanh => "tanh",
            Erf => "erf",
            Gelu { .. } => "gelu",
            Softplus => "softplus",
            Softsign => "softsign",
            Elu { .. } => "elu",
            Selu { .. } => "selu",
            HardSigmoid { .. } => "hard_sigmoid",
            HardSwish => "hard_swish",
            Clip { .. } => "clip",
            Abs => "abs",
            Neg => "neg",
            Exp => "exp",
            Log => "log",
            Sqrt => "sqrt",
            Reciprocal => "reciprocal",
            Pow { .. } => "pow",
        }
    }

    /// The function at one point, in f64 so that tables built from it are exact to f32.
    pub fn apply(&self, x: f64) -> f64 {
        use UnaryFn::*;
        match *self {
            Relu => x.max(0.0),
            LeakyRelu { alpha } => {
                if x >= 0.0 {
                    x
                } else {
                    alpha as f64 * x
                }
            }
            Sigmoid => sigmoid(x),
            Tanh => x.tanh(),
            Erf => libm::erf(x),
            Gelu { tanh: false } => 0.5 * x * (1.0 + libm::erf(x / std::f64::consts::SQRT_2)),
            Gelu { tanh: true } => {
                let c = (2.0 / std::f64::consts::PI).sqrt();
                0.5 * x * (1.0 + (c * (x + 0.044715 * x * x * x)).tanh())
            }
            // log(1 + e^x) without overflow for large x.
            Softplus => x.max(0.0) + (-x.abs()).exp().ln_1p(),
            Softsign => x / (1.0 + x.abs()),
            Elu { alpha } => {
                if x > 0.0 {
                    x
                } else {
                    alpha as f64 * x.exp_m1()
                }
            }
            Selu { alpha, gamma } => {
                let g = gamma as f64;
                if x > 0.0 {
                    g * x
                } else {
                    g * alpha as f64 * x.exp_m1()
                }
            }
            HardSigmoid { alpha, beta } => (alpha as f64 * x + beta as f64).clamp(0.0, 1.0),
            HardSwish => x * (x / 6.0 + 0.5).clamp(0.0, 1.0),
            Clip { min, max } => x.max(min as f64).min(max as f64),
            Abs => x.abs(),
            Neg => -x,
            Exp => x.exp(),
            Log => x.ln(),
            Sqrt => x.sqrt(),
            Reciprocal => 1.0 / x,
            Pow { exponent } => x.powf(exponent as f64),
        }
    }

    /// Attributes, for the printer.
    pub fn attrs(&self) -> String {
        use UnaryFn::*;
        match self {
            LeakyRelu { alpha } | Elu { alpha } => format!("alpha={alpha}"),
            Gelu { tanh: true } => "approximate=tanh".into(),
            Selu { alpha, gamma } => format!("alpha={alpha} gamma={gamma}"),
            HardSigmoid { alpha, beta } => format!("alpha={alpha} beta={beta}"),
            Clip { min, max } => format!("min={min} max={max}"),
            Pow { exponent } => format!("exponent={exponent}"),
            _ => String::new(),
        }
    }
}

pub fn sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

/// Element-wise functions of two tensors, with numpy broadcasting.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum BinaryFn {
    Add,
    Sub,
    Mul,
    Div,
    Pow,
    Max,
    Min,
    /// x if x ≥ 0 else slope·x; operands (x, slope).
    PRelu,
}

impl BinaryFn {
    pub fn name(&self) -> &'static str {
        match self {
            BinaryFn::Add => "add",
            BinaryFn::Sub => "sub",
            BinaryFn::Mul => "mul",
            BinaryFn::Div => "div",
            BinaryFn::Pow => "pow",
            BinaryFn::Max => "max",
            BinaryFn::Min => "min",
            BinaryFn::PRelu => "prelu",
        }
    }

    pub fn apply(&self, a: f64, b: f64) -> f64 {
        match self {
            BinaryFn::Add => a + b,
            BinaryFn::Sub => a - b,
            BinaryFn::Mul => a * b,
            BinaryFn::Div => a / b,
            BinaryFn::Pow => a.powf(b),
            BinaryFn::Max => a.max(b),
            BinaryFn::Min => a.min(b),
            BinaryFn::PRelu => {
                if a >= 0.0 {
                    a
                } else {
                    a * b
                }
            }
        }
    }
}

/// 2-D convolution over NCHW tensors; weights [M, C/group, kH, kW].
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Conv2d {
    pub strides: [usize; 2],
    /// top, left, bottom, right
    pub pads: [usize; 4],
    pub dilations: [usize; 2],
    pub group: usize,
}

/// 2-D pooling window over NCHW tensors.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Pool2d {
    pub kernel: [usize; 2],
    pub strides: [usize; 2],
    /// top, left, bottom, right
    pub pads: [usize; 4],
    pub dilations: [usize; 2],
    pub ceil_mode: bool,
    /// Average pooling: divide by the whole window, padding included.
    pub count_include_pad: bool,
}

impl Pool2d {
    /// Output spatial size for an input spatial size.
    pub fn out_size(&self, h: usize, w: usize) -> Option<[usize; 2]> {
        let one = |len: usize, i: usize| -> Option<usize> {
            let span = self.dilations[i] * (self.kernel[i] - 1) + 1;
            let padded = len + self.pads[i] + self.pads[i + 2];
            if padded < span || self.strides[i] == 0 {
                return None;
            }
            let steps = padded - span;
            let mut out = steps / self.strides[i] + 1;
            // ceil_mode: a last partial window counts if it starts inside the input or the
            // leading padding (ONNX/PyTorch rule).
            if self.ceil_mode && !steps.is_multiple_of(self.strides[i]) && out * self.strides[i] < len + self.pads[i] {
                out += 1;
            }
            Some(out)
        };
        Some([one(h, 0)?, one(w, 1)?])
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ReduceKind {
    Sum,
    Mean,
    Max,
    Min,
}

/// ai.onnx.ml Normalizer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Norm {
    Max,
    L1,
    L2,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Aggregate {
    Sum,
    Average,
    Min,
    Max,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum BranchMode {
    Leq,
    Lt,
    Gte,
    Gt,
    Eq,
    Neq,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum TreeNode {
    Branch {
        feature: usize,
        threshold: f32,
        mode: BranchMode,
        /// Index of the child taken when the test holds, within the same tree.
        if_true: usize,
        if_false: usize,
        /// Which way a NaN feature goes.
        nan_true: bool,
    },
    /// (target, weight) pairs added to the scores.
    Leaf { weights: Vec<(usize, f32)> },
}

/// A decision-tree ensemble producing raw per-target scores (before any post-transform,
/// which the importer expresses with ordinary ops).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TreeEnsemble {
    pub n_features: usize,
    pub n_targets: usize,
    /// Each tree is a list of nodes; node 0 is the root.
    pub trees: Vec<Vec<TreeNode>>,
    pub aggregate: Aggregate,
    /// Added to each target after aggregation (empty: none).
    pub base_values: Vec<f32>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Op {
    /// The `index`-th graph input.
    Input {
        index: usize,
    },
    Const(Tensor),
    /// alpha·op(A)·op(B) + beta·C; operands A, B and optional C.
    Gemm {
        alpha: f32,
        beta: f32,
        trans_a: bool,
        trans_b: bool,
    },
    /// Numpy matmul.
    MatMul,
    /// Operands: x, weights, optional bias.
    Conv(Conv2d),
    Unary(UnaryFn),
    Binary(BinaryFn),
    /// Inference batch norm; operands x, scale, bias, mean, var.
    BatchNorm {
        epsilon: f32,
    },
    AvgPool(Pool2d),
    MaxPool(Pool2d),
    GlobalAvgPool,
    Reduce {
        kind: ReduceKind,
        axes: Vec<usize>,
        keepdims: bool,
    },
    Reshape {
        shape: Shape,
    },
    Transpose {
        perm: Vec<usize>,
    },
    Concat {
        axis: usize,
    },
    /// Take `indices` along `axis` (also how slices are expressed).
    Gather {
        axis: usize,
        indices: ArrayD<i64>,
    },
    /// Constant padding: (before, after) per axis.
    Pad {
        pads: Vec<(usize, usize)>,
        value: f32,
    },
    Cast {
        to: Elem,
    },
    Softmax {
        axis: usize,
    },
    ArgMax {
        axis: usize,
        keepdims: bool,
        select_last: bool,
    },
    /// Map class indices to class labels.
    ClassLabel {
        labels: Vec<i64>,
    },
    /// Normalise each row (last axis) by its max, L1 or L2 norm.
    Normalize {
        norm: Norm,
    },
    TreeEnsemble(Box<TreeEnsemble>),

    // Integer ops over encrypted tensors (after quantization).
    /// Exact integer linear map with clear weights.
    Linear(Box<Linear>),
    /// Encrypted + encrypted (no bootstrap).
    AddEnc,
    /// Encrypted − encrypted (no bootstrap).
    SubEnc,
    /// Element-wise maximum of two encrypted tensors with the same scale, computed as
    /// `b + relu(a − b)`: one lookup per element on the difference, read with `rounding`
    /// low bits dropped. `diff` is the compiled range of `a − b` when narrower than the
    /// worst case (as for `Assume`).
    MaxEnc {
        rounding: u32,
        diff: Option<Range>,
    },
    /// Element-wise table lookup: one programmable bootstrap per element.
    Tlu(Box<Tlu>),
    /// Matrix product of two encrypted tensors, per sample: `[N, M, K] × [N, K, L] →
    /// [N, M, L]`, exact in integers. Lowered to table lookups of squares (see
    /// `veil_backend::lower`); each operand is read exactly, so the sums a + b must fit
    /// the circuit's precision.
    MatMulEnc,
    /// Saturation toward `[lo, hi]` with one lookup: the input is read to a multiple q of
    /// 2^rounding, and `q − clamp(q, lo, hi)` is subtracted from it. Inside the bounds the
    /// value is kept exactly; beyond them it lands less than a bucket from the nearer
    /// bound. Lets a narrow lookup follow a value whose sound range is wide (see
    /// [`crate::enc::saturate`]).
    SatEnc {
        lo: i64,
        hi: i64,
        rounding: u32,
    },
    /// Absolute value with one lookup on the whole torus: the input is read to a multiple
    /// q of 2^rounding (round half up) and the result is |q| / 2^shift (`shift ≤
    /// rounding`, so the division is exact: the output keeps the read's resolution in
    /// fewer bits, which balances it against other inputs of the layer it feeds). Its table is anti-periodic
    /// (|q| + |q + W| = W for q in [−W, 0), W = 2^(p + rounding)), so the bootstrap needs
    /// no padding bit: a precision-p read resolves 2^(p+1) buckets instead of 2^p (see
    /// [`crate::enc::abs_precision`]). ReLU-like activations become `(x + |x|)/2`
    /// (Chillotti et al., "Improved programmable bootstrapping with larger precision",
    /// ASIACRYPT 2021, §4: negacyclic functions need no padding bit).
    AbsEnc {
        rounding: u32,
        shift: u32,
    },
    /// The compiled range of an encrypted tensor: values are encoded for `range`, narrower
    /// than the worst case that interval arithmetic proves. Free at run time; a value
    /// outside it would overflow its encoding (the clear interpreter reports and saturates).
    Assume {
        range: Range,
    },
}

impl Op {
    /// The short name printed in dumps.
    pub fn mnemonic(&self) -> &'static str {
        match self {
            Op::Input { .. } => "input",
            Op::Const(_) => "const",
            Op::Gemm { .. } => "gemm",
            Op::MatMul => "matmul",
            Op::Conv(_) => "conv",
            Op::Unary(f) => f.name(),
            Op::Binary(f) => f.name(),
            Op::BatchNorm { .. } => "batch_norm",
            Op::AvgPool(_) => "avg_pool",
            Op::MaxPool(_) => "max_pool",
            Op::GlobalAvgPool => "global_avg_pool",
            Op::Reduce { kind: ReduceKind::Sum, .. } => "reduce_sum",
            Op::Reduce { kind: ReduceKind::Mean, .. } => "reduce_mean",
            Op::Reduce { kind: ReduceKind::Max, .. } => "reduce_max",
            Op::Reduce { kind: ReduceKind::Min, .. } => "reduce_min",
            Op::Reshape { .. } => "reshape",
            Op::Transpose { .. } => "transpose",
            Op::Concat { .. } => "concat",
            Op::Gather { .. } => "gather",
            Op::Pad { .. } => "pad",
            Op::Cast { .. } => "cast",
            Op::Softmax { .. } => "softmax",
            Op::ArgMax { .. } => "argmax",
            Op::ClassLabel { .. } => "class_label",
            Op::Normalize { .. } => "normalize",
            Op::TreeEnsemble(_) => "tree_ensemble",
            Op::Linear(_) => "linear",
            Op::AddEnc => "add_enc",
            Op::SubEnc => "sub_enc",
            Op::MaxEnc { .. } => "max_enc",
            Op::Tlu(_) => "tlu",
            Op::MatMulEnc => "matmul_enc",
            Op::SatEnc { .. } => "saturate",
            Op::AbsEnc { .. } => "abs_enc",
            Op::Assume { .. } => "assume",
        }
    }

    /// How many operands the op takes: (min, max).
    pub fn arity(&self) -> (usize, usize) {
        match self {
            Op::Input { .. } | Op::Const(_) => (0, 0),
            Op::Gemm { .. } | Op::Conv(_) => (2, 3),
            Op::MatMul | Op::Binary(_) | Op::AddEnc | Op::SubEnc | Op::MaxEnc { .. } | Op::MatMulEnc => (2, 2),
            Op::BatchNorm { .. } => (5, 5),
            Op::Concat { .. } => (1, usize::MAX),
            _ => (1, 1),
        }
    }

    /// The type of the result, given the operand types; `Err` says what does not fit.
    pub fn infer(&self, operands: &[&TensorType]) -> Result<TensorType, String> {
        let (lo, hi) = self.arity();
        if operands.len() < lo || operands.len() > hi {
            return Err(format!(
                "{} takes {} operand(s), got {}",
                self.mnemonic(),
                if lo == hi { lo.to_string() } else { format!("{lo} to {hi}") },
                operands.len()
            ));
        }
        let x = operands.first().copied();
        match self {
            Op::Input { .. } => Err("an input's type is given, not inferred".into()),
            Op::Const(t) => Ok(TensorType::new(t.elem(), Shape::fixed(t.shape()))),
            Op::Gemm { trans_a, trans_b, .. } => infer_gemm(operands, *trans_a, *trans_b),
            Op::MatMul => infer_matmul(operands[0], operands[1]),
            Op::Conv(c) => infer_conv(c, operands),
            Op::Unary(_) => float_only(x.unwrap()).cloned(),
            Op::Binary(f) => {
                let (a, b) = (operands[0], operands[1]);
                float_only(a)?;
                float_only(b)?;
                if *f == BinaryFn::PRelu {
                    // slope broadcasts to x, never the other way
                    return match broadcast(&a.shape, &b.shape) {
                        Some(s) if s == a.shape => Ok(a.clone()),
                        _ => Err(format!("prelu slope {} does not broadcast to {}", b.shape, a.shape)),
                    };
                }
                broadcast(&a.shape, &b.shape)
                    .map(TensorType::f32)
                    .ok_or_else(|| format!("shapes {} and {} do not broadcast", a.shape, b.shape))
            }
            Op::BatchNorm { .. } => infer_batch_norm(operands),
            Op::AvgPool(p) | Op::MaxPool(p) => {
                let t = float_only(x.unwrap())?;
                let (n, c, h, w) = nchw(&t.shape)?;
                let [oh, ow] = p
                    .out_size(h, w)
                    .ok_or_else(|| format!("pool window {:?} does not fit input {}", p.kernel, t.shape))?;
                Ok(TensorType::f32(Shape(vec![n, c, Dim::Fixed(oh), Dim::Fixed(ow)])))
            }
            Op::GlobalAvgPool => {
                let t = float_only(x.unwrap())?;
                let (n, c, _, _) = nchw(&t.shape)?;
                Ok(TensorType::f32(Shape(vec![n, c, Dim::Fixed(1), Dim::Fixed(1)])))
            }
            Op::Reduce { axes, keepdims, .. } => {
                let t = float_only(x.unwrap())?;
                let mut dims = Vec::new();
                for (i, d) in t.shape.dims().iter().enumerate() {
                    if axes.contains(&i) {
                        if *d == Dim::Batch {
                            return Err("reducing over the batch dimension mixes samples".into());
                        }
                        if *keepdims {
                            dims.push(Dim::Fixed(1));
                        }
                    } else {
                        dims.push(*d);
                    }
                }
                if let Some(&a) = axes.iter().find(|&&a| a >= t.shape.rank()) {
                    return Err(format!("reduce axis {a} out of range for {}", t.shape));
                }
                Ok(t.with_shape(Shape(dims)))
            }
            Op::Reshape { shape } => {
                let t = x.unwrap();
                if t.shape.has_batch() != shape.has_batch() || t.shape.fixed_volume() != shape.fixed_volume() {
                    return Err(format!("cannot reshape {} to {}", t.shape, shape));
                }
                // Reshapes act per sample: the batch axis stays the single leading one.
                let leading = |s: &Shape| {
                    s.0.first() == Some(&Dim::Batch) && s.0.iter().filter(|d| **d == Dim::Batch).count() == 1
                };
                if t.shape.has_batch() && !(leading(&t.shape) && leading(shape)) {
                    return Err(format!("reshape of {} to {} moves the batch dimension", t.shape, shape));
                }
                Ok(t.with_shape(shape.clone()))
            }
            Op::Transpose { perm } => {
                let t = x.unwrap();
                let mut seen = perm.clone();
                seen.sort_unstable();
                if seen != (0..t.shape.rank()).collect::<Vec<_>>() {
                    return Err(format!("permutation {perm:?} does not fit {}", t.shape));
                }
                Ok(t.with_shape(Shape(perm.iter().map(|&p| t.shape.0[p]).collect())))
            }
            Op::Concat { axis } => infer_concat(operands, *axis),
            Op::Gather { axis, indices } => {
                let t = x.unwrap();
                let d = t
                    .shape
                    .dims()
                    .get(*axis)
                    .ok_or_else(|| format!("gather axis {axis} out of range for {}", t.shape))?;
                let n = d.fixed().ok_or("gather along the batch dimension mixes samples")?;
                if let Some(bad) = indices.iter().find(|&&i| i < 0 || i as usize >= n) {
                    return Err(format!("gather index {bad} out of range 0..{n}"));
                }
                let mut dims = t.shape.0[..*axis].to_vec();
                dims.extend(indices.shape().iter().map(|&d| Dim::Fixed(d)));
                dims.extend_from_slice(&t.shape.0[axis + 1..]);
                Ok(t.with_shape(Shape(dims)))
            }
            Op::Pad { pads, value } => {
                let t = x.unwrap();
                let elem = match t.elem {
                    Elem::F32 => Elem::F32,
                    Elem::Enc(r) if value.fract() == 0.0 => {
                        Elem::Enc(r.union(&Range::new(*value as i64, *value as i64)))
                    }
                    _ => return Err(format!("cannot pad {t} with {value}")),
                };
                if pads.len() != t.shape.rank() {
                    return Err(format!("pad has {} axes, input {} has {}", pads.len(), t.shape, t.shape.rank()));
                }
                let dims = t
                    .shape
                    .dims()
                    .iter()
                    .zip(pads)
                    .map(|(d, &(b, e))| match d {
                        Dim::Batch if b + e > 0 => Err("padding the batch dimension".to_string()),
                        Dim::Batch => Ok(Dim::Batch),
                        Dim::Fixed(n) => Ok(Dim::Fixed(n + b + e)),
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(TensorType::new(elem, Shape(dims)))
            }
            Op::Cast { to } => match x.unwrap().elem {
                Elem::Enc(_) => Err("cannot cast an encrypted tensor".into()),
                _ => Ok(x.unwrap().clone().with_elem(*to)),
            },
            Op::Softmax { axis } => {
                let t = float_only(x.unwrap())?;
                check_axis(&t.shape, *axis)?;
                Ok(t.clone())
            }
            Op::ArgMax { axis, keepdims, .. } => {
                let t = x.unwrap();
                check_axis(&t.shape, *axis)?;
                let mut dims = t.shape.0.clone();
                if *keepdims {
                    dims[*axis] = Dim::Fixed(1);
                } else {
                    dims.remove(*axis);
                }
                Ok(TensorType::i64(Shape(dims)))
            }
            Op::ClassLabel { labels } => {
                let t = x.unwrap();
                if t.elem != Elem::I64 || labels.is_empty() {
                    return Err(format!("class_label maps i64 class indices, got {t}"));
                }
                Ok(t.clone())
            }
            Op::Normalize { .. } => {
                let t = float_only(x.unwrap())?;
                if t.shape.rank() != 2 {
                    return Err(format!("normalize expects a [batch, features] input, got {}", t.shape));
                }
                Ok(t.clone())
            }
            Op::Linear(l) => {
                let (r, t) = enc_only(x.unwrap())?;
                let shape = l.out_shape(&t.shape)?;
                Ok(TensorType::new(Elem::Enc(l.out_range(r, &t.shape)), shape))
            }
            Op::AddEnc | Op::SubEnc | Op::MaxEnc { .. } => {
                let (a, ta) = enc_only(operands[0])?;
                let (b, tb) = enc_only(operands[1])?;
                let shape = broadcast(&ta.shape, &tb.shape)
                    .ok_or_else(|| format!("shapes {} and {} do not broadcast", ta.shape, tb.shape))?;
                let r = match self {
                    Op::AddEnc => Range::new(a.lo.saturating_add(b.lo), a.hi.saturating_add(b.hi)),
                    Op::SubEnc => a.minus(&b),
                    // b + relu(round(a − b)): rounding may overshoot the exact max by half a step
                    Op::MaxEnc { rounding, .. } => {
                        let slack = if *rounding == 0 { 0 } else { 1i64.checked_shl(rounding - 1).unwrap_or(i64::MAX) };
                        Range::new(a.lo.max(b.lo), a.hi.max(b.hi).saturating_add(slack))
                    }
                    _ => unreachable!(),
                };
                Ok(TensorType::new(Elem::Enc(r), shape))
            }
            Op::AbsEnc { rounding, shift } => {
                let (r, ty) = enc_only(x.unwrap())?;
                if shift > rounding || *rounding > 62 {
                    return Err(format!("abs_enc shifts by {shift} bits but drops {rounding}"));
                }
                let a = crate::enc::abs_range(r, *rounding);
                Ok(TensorType::new(Elem::Enc(Range::new(a.lo >> shift, a.hi >> shift)), ty.shape.clone()))
            }
            Op::Assume { range } => {
                let (r, ty) = enc_only(x.unwrap())?;
                let lo = r.lo.max(range.lo);
                let hi = r.hi.min(range.hi);
                if lo > hi {
                    return Err(format!("assumed range {range} does not meet the operand's range {r}"));
                }
                Ok(TensorType::new(Elem::Enc(Range::new(lo, hi)), ty.shape.clone()))
            }
            Op::MatMulEnc => {
                let (ra, ta) = enc_only(operands[0])?;
                let (rb, tb) = enc_only(operands[1])?;
                let (n, m, k) = match ta.shape.dims() {
                    [n, m, Dim::Fixed(k)] => (*n, *m, *k),
                    _ => return Err(format!("matmul_enc expects [N, M, K] operands, got {}", ta.shape)),
                };
                match tb.shape.dims() {
                    [nb, Dim::Fixed(kb), l] if *nb == n && *kb == k => {
                        Ok(TensorType::new(Elem::Enc(crate::enc::matmul_range(ra, rb, k)), Shape(vec![n, m, *l])))
                    }
                    _ => Err(format!("matmul_enc of {} and {}: expects [N, {k}, L]", ta.shape, tb.shape)),
                }
            }
            Op::SatEnc { lo, hi, rounding } => {
                let (r, ty) = enc_only(x.unwrap())?;
                if lo > hi {
                    return Err(format!("saturation bounds {lo}..{hi} are empty"));
                }
                Ok(TensorType::new(Elem::Enc(crate::enc::saturate_range(r, *lo, *hi, *rounding)), ty.shape.clone()))
            }
            Op::Tlu(t) => {
                let (r, ty) = enc_only(x.unwrap())?;
                if r.lo < t.input.lo || r.hi > t.input.hi {
                    return Err(format!("lookup defined on {} reads values in {r}", t.input));
                }
                t.expr.check(t.params.len()).map_err(|e| format!("malformed lookup: {e}"))?;
                let sample: Vec<usize> = ty.shape.dims().iter().filter_map(|d| d.fixed()).collect();
                let batched = ty.shape.dims().first() == Some(&Dim::Batch);
                if t.rounding > 62
                    || t.params.iter().any(|p| {
                        p.broadcast(ndarray::IxDyn(&sample)).is_none()
                            && (batched || p.broadcast(ndarray::IxDyn(&ty.shape.concrete(1))).is_none())
                    })
                {
                    return Err("malformed lookup: its rounding or parameter shapes do not fit".into());
                }
                Ok(TensorType::new(Elem::Enc(t.output_range()?), ty.shape.clone()))
            }
            Op::TreeEnsemble(e) => {
                e.check().map_err(|f| format!("malformed tree ensemble: {f}"))?;
                let t = float_only(x.unwrap())?;
                match t.shape.dims() {
                    [n, Dim::Fixed(f)] if *f == e.n_features => {
                        Ok(TensorType::f32(Shape(vec![*n, Dim::Fixed(e.n_targets)])))
                    }
                    _ => Err(format!("tree ensemble expects [batch, {}] features, got {}", e.n_features, t.shape)),
                }
            }
        }
    }
}

impl TensorType {
    fn with_elem(mut self, elem: Elem) -> TensorType {
        self.elem = elem;
        self
    }
}

fn float_only(t: &TensorType) -> Result<&TensorType, String> {
    match t.elem {
        Elem::F32 => Ok(t),
        _ => Err(format!("expects a float tensor, got {t}")),
    }
}

fn enc_only(t: &TensorType) -> Result<(Range, &TensorType), String> {
    match t.elem {
        Elem::Enc(r) => Ok((r, t)),
        _ => Err(format!("expects an encrypted integer tensor, got {t}")),
    }
}

fn check_axis(s: &Shape, axis: usize) -> Result<(), String> {
    if axis >= s.rank() {
        return Err(format!("axis {axis} out of range for {s}"));
    }
    Ok(())
}

fn nchw(s: &Shape) -> Result<(Dim, Dim, usize, usize), String> {
    match s.dims() {
        [n, c, Dim::Fixed(h), Dim::Fixed(w)] => Ok((*n, *c, *h, *w)),
        _ => Err(format!("expects an NCHW tensor with fixed height and width, got {s}")),
    }
}

fn matrix(t: &TensorType, what: &str) -> Result<(Dim, Dim), String> {
    match t.shape.dims() {
        [a, b] => Ok((*a, *b)),
        _ => Err(format!("{what} must be 2-D, got {}", t.shape)),
    }
}

fn same_dim(a: Dim, b: Dim, what: &str) -> Result<(), String> {
    if a == b {
        Ok(())
    } else {
        Err(format!("{what}: {a} vs {b}"))
    }
}

fn infer_gemm(ops: &[&TensorType], trans_a: bool, trans_b: bool) -> Result<TensorType, String> {
    for t in ops {
        float_only(t)?;
    }
    let (a0, a1) = matrix(ops[0], "gemm A")?;
    let (b0, b1) = matrix(ops[1], "gemm B")?;
    let (m, ka) = if trans_a { (a1, a0) } else { (a0, a1) };
    let (kb, n) = if trans_b { (b1, b0) } else { (b0, b1) };
    same_dim(ka, kb, "gemm inner dimensions differ")?;
    if matches!(ka, Dim::Batch) || matches!(n, Dim::Batch) {
        return Err("gemm contracts or outputs along the batch dimension".into());
    }
    let out = Shape(vec![m, n]);
    if let Some(c) = ops.get(2) {
        match broadcast(&out, &c.shape) {
            Some(s) if s == out => {}
            _ => return Err(format!("gemm C {} does not broadcast to {}", c.shape, out)),
        }
    }
    Ok(TensorType::f32(out))
}

fn infer_matmul(a: &TensorType, b: &TensorType) -> Result<TensorType, String> {
    float_only(a)?;
    float_only(b)?;
    if a.shape.rank() == 0 || b.shape.rank() == 0 {
        return Err("matmul operands must have rank ≥ 1".into());
    }
    // Promote 1-D operands as numpy does, then drop the added axes from the result.
    let mut ad = a.shape.0.clone();
    let mut bd = b.shape.0.clone();
    let a_vec = ad.len() == 1;
    let b_vec = bd.len() == 1;
    if a_vec {
        ad.insert(0, Dim::Fixed(1));
    }
    if b_vec {
        bd.push(Dim::Fixed(1));
    }
    let (m, ka) = (ad[ad.len() - 2], ad[ad.len() - 1]);
    let (kb, n) = (bd[bd.len() - 2], bd[bd.len() - 1]);
    same_dim(ka, kb, "matmul inner dimensions differ")?;
    if matches!(ka, Dim::Batch) || matches!(n, Dim::Batch) {
        return Err("matmul contracts or outputs along the batch dimension".into());
    }
    let lead = broadcast(&Shape(ad[..ad.len() - 2].to_vec()), &Shape(bd[..bd.len() - 2].to_vec()))
        .ok_or_else(|| format!("matmul batch dimensions of {} and {} do not broadcast", a.shape, b.shape))?;
    let mut dims = lead.0;
    if !a_vec {
        dims.push(m);
    }
    if !b_vec {
        dims.push(n);
    }
    Ok(TensorType::f32(Shape(dims)))
}

fn infer_conv(c: &Conv2d, ops: &[&TensorType]) -> Result<TensorType, String> {
    for t in ops {
        float_only(t)?;
    }
    let (n, ch, h, w) = nchw(&ops[0].shape)?;
    let wd = ops[1]
        .shape
        .static_dims()
        .filter(|d| d.len() == 4)
        .ok_or_else(|| format!("conv weights must be [M, C/group, kH, kW], got {}", ops[1].shape))?;
    let ch = ch.fixed().ok_or("conv over a symbolic channel dimension")?;
    if c.group == 0 || ch % c.group != 0 || wd[0] % c.group != 0 || wd[1] * c.group != ch {
        return Err(format!("conv weights {:?} do not fit {} input channels in {} group(s)", wd, ch, c.group));
    }
    if let Some(b) = ops.get(2) {
        if b.shape != Shape::fixed(&[wd[0]]) {
            return Err(format!("conv bias must be [{}], got {}", wd[0], b.shape));
        }
    }
    let window = Pool2d {
        kernel: [wd[2], wd[3]],
        strides: c.strides,
        pads: c.pads,
        dilations: c.dilations,
        ceil_mode: false,
        count_include_pad: true,
    };
    let [oh, ow] = window
        .out_size(h, w)
        .ok_or_else(|| format!("conv kernel {}x{} does not fit input {}x{}", wd[2], wd[3], h, w))?;
    Ok(TensorType::f32(Shape(vec![n, Dim::Fixed(wd[0]), Dim::Fixed(oh), Dim::Fixed(ow)])))
}

fn infer_batch_norm(ops: &[&TensorType]) -> Result<TensorType, String> {
    let x = float_only(ops[0])?;
    let c = x
        .shape
        .dims()
        .get(1)
        .and_then(|d| d.fixed())
        .ok_or_else(|| format!("batch norm needs a fixed channel axis 1, got {}", x.shape))?;
    for (t, name) in ops[1..].iter().zip(["scale", "bias", "mean", "var"]) {
        if t.shape != Shape::fixed(&[c]) {
            return Err(format!("batch norm {name} must be [{c}], got {}", t.shape));
        }
    }
    Ok(x.clone())
}

fn infer_concat(ops: &[&TensorType], axis: usize) -> Result<TensorType, String> {
    let first = ops[0];
    check_axis(&first.shape, axis)?;
    let mut total = 0;
    let mut elem = first.elem;
    for t in ops {
        elem = match (elem, t.elem) {
            (Elem::Enc(a), Elem::Enc(b)) => Elem::Enc(a.union(&b)),
            (a, b) if a == b => a,
            _ => return Err(format!("concat of {} and {}", first, t)),
        };
        if t.shape.rank() != first.shape.rank() {
            return Err(format!("concat of {} and {}", first, t));
        }
        for (i, (a, b)) in first.shape.dims().iter().zip(t.shape.dims()).enumerate() {
            if i != axis && a != b {
                return Err(format!("concat along axis {axis} of {} and {}", first.shape, t.shape));
            }
        }
        total += t.shape.0[axis].fixed().ok_or("concat along the batch dimension")?;
    }
    let mut dims = first.shape.0.clone();
    dims[axis] = Dim::Fixed(total);
    Ok(TensorType::new(elem, Shape(dims)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(shape: Shape) -> TensorType {
        TensorType::f32(shape)
    }

    #[test]
    fn gemm_shapes() {
        let op = Op::Gemm { alpha: 1.0, beta: 1.0, trans_a: false, trans_b: true };
        let a = f(Shape::batched(&[64]));
        let b = f(Shape::fixed(&[32, 64]));
        let c = f(Shape::fixed(&[32]));
        assert_eq!(op.infer(&[&a, &b, &c]).unwrap(), f(Shape::batched(&[32])));
        let bad = f(Shape::fixed(&[32, 63]));
        assert!(op.infer(&[&a, &bad]).unwrap_err().contains("inner dimensions"));
    }

    #[test]
    fn conv_and_pool_shapes() {
        let conv = Op::Conv(Conv2d { strides: [1, 1], pads: [1, 1, 1, 1], dilations: [1, 1], group: 1 });
        let x = f(Shape::batched(&[1, 8, 8]));
        let w = f(Shape::fixed(&[4, 1, 3, 3]));
        let y = conv.infer(&[&x, &w]).unwrap();
        assert_eq!(y, f(Shape::batched(&[4, 8, 8])));
        let pool = Op::MaxPool(Pool2d {
            kernel: [2, 2],
            strides: [2, 2],
            pads: [0; 4],
            dilations: [1, 1],
            ceil_mode: false,
            count_include_pad: false,
        });
        assert_eq!(pool.infer(&[&y]).unwrap(), f(Shape::batched(&[4, 4, 4])));
    }

    #[test]
    fn ceil_mode_adds_partial_window() {
        let p = Pool2d {
            kernel: [2, 2],
            strides: [2, 2],
            pads: [0; 4],
            dilations: [1, 1],
            ceil_mode: true,
            count_include_pad: false,
        };
        assert_eq!(p.out_size(5, 4), Some([3, 2]));
    }

    #[test]
    fn matmul_promotes_vectors() {
        let a = f(Shape::batched(&[3, 4]));
        let b = f(Shape::fixed(&[4]));
        assert_eq!(Op::MatMul.infer(&[&a, &b]).unwrap(), f(Shape::batched(&[3])));
    }

    #[test]
    fn unary_functions_match_closed_forms() {
        assert!((UnaryFn::Gelu { tanh: false }.apply(1.0) - 0.841_344_746).abs() < 1e-8);
        assert!((UnaryFn::Softplus.apply(100.0) - 100.0).abs() < 1e-12);
        assert!((UnaryFn::Erf.apply(0.5) - 0.520_499_877_8).abs() < 1e-9);
        assert_eq!(UnaryFn::HardSwish.apply(-4.0), 0.0);
    }
}
