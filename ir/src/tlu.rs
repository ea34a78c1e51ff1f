//! Table lookups: element-wise functions of one encrypted integer.
//!
//! A [`Tlu`] keeps its function symbolically, as an [`Expr`] over the integer input (for
//! instance: dequantize, apply GELU, requantize to 6 bits). The FHE table is that function
//! tabulated at the points the ciphertext can distinguish, so the same `Tlu` can be
//! re-tabulated for any rounding, and two lookups compose exactly by substitution.

use crate::op::{BinaryFn, UnaryFn};
use crate::types::Range;
use ndarray::ArrayD;
use serde::{Deserialize, Serialize};
use std::fmt;

/// An integer- or real-valued expression of the lookup's integer input.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Expr {
    /// The integer input (the lookup's operand).
    Input,
    Const(f64),
    /// Per-element parameter `k` of the lookup (e.g. a per-channel scale).
    Param(usize),
    Unary(UnaryFn, Box<Expr>),
    Binary(BinaryFn, Box<Expr>, Box<Expr>),
    /// Round half away from zero.
    Round(Box<Expr>),
    Clamp(Box<Expr>, f64, f64),
    /// A table: parameter `first + i` at `i = clamp(round(index), 0, len − 1)`. Lets a
    /// lookup hold arbitrary per-element values (a tree unit's leaf values, say).
    Table {
        index: Box<Expr>,
        first: usize,
        len: usize,
    },
}

impl Expr {
    pub fn unary(f: UnaryFn, e: Expr) -> Expr {
        Expr::Unary(f, Box::new(e))
    }

    pub fn binary(f: BinaryFn, a: Expr, b: Expr) -> Expr {
        Expr::Binary(f, Box::new(a), Box::new(b))
    }

    /// `clamp(round(e / scale), lo, hi)`: quantize a real value to integers in [lo, hi].
    pub fn quantize(e: Expr, scale: Expr, range: Range) -> Expr {
        Expr::Clamp(
            Box::new(Expr::Round(Box::new(Expr::binary(BinaryFn::Div, e, scale)))),
            range.lo as f64,
            range.hi as f64,
        )
    }

    /// Well-formed with `n_params` parameters: every parameter exists, every clamp has
    /// ordered bounds. (A graph read from a file is checked so before it is evaluated.)
    pub fn check(&self, n_params: usize) -> Result<(), String> {
        match self {
            Expr::Input | Expr::Const(_) => Ok(()),
            Expr::Param(k) if *k < n_params => Ok(()),
            Expr::Param(k) => Err(format!("parameter p{k} of a lookup with {n_params} parameters")),
            Expr::Unary(_, e) | Expr::Round(e) => e.check(n_params),
            Expr::Binary(_, a, b) => a.check(n_params).and_then(|_| b.check(n_params)),
            Expr::Clamp(e, lo, hi) if lo <= hi => e.check(n_params),
            Expr::Clamp(_, lo, hi) => Err(format!("clamp to [{lo}, {hi}]")),
            Expr::Table { index, first, len } if *len > 0 && first.saturating_add(*len) <= n_params => {
                index.check(n_params)
            }
            Expr::Table { first, len, .. } => {
                Err(format!("a table of {len} entries from p{first} in a lookup with {n_params} parameters"))
            }
        }
    }

    /// Evaluate at input `x` with this element's parameters.
    pub fn eval(&self, x: f64, params: &[f64]) -> f64 {
        match self {
            Expr::Input => x,
            Expr::Const(c) => *c,
            Expr::Param(k) => params[*k],
            Expr::Unary(f, e) => f.apply(e.eval(x, params)),
            Expr::Binary(f, a, b) => f.apply(a.eval(x, params), b.eval(x, params)),
            Expr::Round(e) => e.eval(x, params).round(),
            Expr::Clamp(e, lo, hi) => e.eval(x, params).clamp(*lo, *hi),
            Expr::Table { index, first, len } => {
                let i = index.eval(x, params).round().clamp(0.0, (*len - 1) as f64);
                params[first + i as usize]
            }
        }
    }

    /// Sound bounds of the expression for inputs in `[lo, hi]` and parameters within
    /// `params` (per parameter: min, max), by interval arithmetic.
    pub fn bounds(&self, lo: f64, hi: f64, params: &[(f64, f64)]) -> (f64, f64) {
        match self {
            Expr::Input => (lo, hi),
            Expr::Const(c) => (*c, *c),
            Expr::Param(k) => params[*k],
            Expr::Unary(f, e) => {
                let (a, b) = e.bounds(lo, hi, params);
                f.range_on(a, b)
            }
            Expr::Binary(f, x, y) => {
                let (a, b) = x.bounds(lo, hi, params);
                let (c, d) = y.bounds(lo, hi, params);
                binary_bounds(*f, (a, b), (c, d))
            }
            Expr::Round(e) => {
                let (a, b) = e.bounds(lo, hi, params);
                (a.round(), b.round())
            }
            Expr::Clamp(e, l, h) => {
                let (a, b) = e.bounds(lo, hi, params);
                (a.clamp(*l, *h), b.clamp(*l, *h))
            }
            Expr::Table { first, len, .. } => params[*first..first + len]
                .iter()
                .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &(l, h)| (a.min(l), b.max(h))),
        }
    }

    /// Replace the input by `inner` (composition: self ∘ inner). The caller numbers
    /// `inner`'s parameters after ours (see [`Expr::shift_params`]).
    pub fn substitute(&self, inner: &Expr) -> Expr {
        match self {
            Expr::Input => inner.clone(),
            Expr::Const(c) => Expr::Const(*c),
            Expr::Param(k) => Expr::Param(*k),
            Expr::Unary(f, e) => Expr::unary(*f, e.substitute(inner)),
            Expr::Binary(f, a, b) => Expr::binary(*f, a.substitute(inner), b.substitute(inner)),
            Expr::Round(e) => Expr::Round(Box::new(e.substitute(inner))),
            Expr::Clamp(e, l, h) => Expr::Clamp(Box::new(e.substitute(inner)), *l, *h),
            Expr::Table { index, first, len } => {
                Expr::Table { index: Box::new(index.substitute(inner)), first: *first, len: *len }
            }
        }
    }

    /// Renumber parameters by adding `offset`.
    pub fn shift_params(&self, offset: usize) -> Expr {
        match self {
            Expr::Param(k) => Expr::Param(k + offset),
            Expr::Input | Expr::Const(_) => self.clone(),
            Expr::Unary(f, e) => Expr::unary(*f, e.shift_params(offset)),
            Expr::Binary(f, a, b) => Expr::binary(*f, a.shift_params(offset), b.shift_params(offset)),
            Expr::Round(e) => Expr::Round(Box::new(e.shift_params(offset))),
            Expr::Clamp(e, l, h) => Expr::Clamp(Box::new(e.shift_params(offset)), *l, *h),
            Expr::Table { index, first, len } => {
                Expr::Table { index: Box::new(index.shift_params(offset)), first: first + offset, len: *len }
            }
        }
    }
}

/// How an expression varies with its input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Monotone {
    Constant,
    Increasing,
    Decreasing,
}

impl Monotone {
    fn flip(self) -> Monotone {
        match self {
            Monotone::Increasing => Monotone::Decreasing,
            Monotone::Decreasing => Monotone::Increasing,
            Monotone::Constant => Monotone::Constant,
        }
    }

    /// Sum of two terms.
    fn plus(self, o: Monotone) -> Option<Monotone> {
        match (self, o) {
            (a, Monotone::Constant) => Some(a),
            (Monotone::Constant, b) => Some(b),
            (a, b) if a == b => Some(a),
            _ => None,
        }
    }
}

impl Expr {
    /// Whether the expression is monotone (non-strictly) in its input, given the range of
    /// each parameter; `None` when it cannot tell.
    pub fn monotone(&self, params: &[(f64, f64)]) -> Option<Monotone> {
        use Monotone::*;
        let sign = |e: &Expr| -> Option<f64> {
            let (lo, hi) = e.bounds(0.0, 0.0, params);
            // only meaningful for input-free expressions
            (e.monotone(params)? == Constant).then_some(if lo >= 0.0 {
                1.0
            } else if hi <= 0.0 {
                -1.0
            } else {
                0.0
            })
        };
        match self {
            Expr::Input => Some(Increasing),
            Expr::Const(_) | Expr::Param(_) => Some(Constant),
            Expr::Round(e) | Expr::Clamp(e, _, _) => e.monotone(params),
            Expr::Table { index, .. } if index.monotone(params)? == Constant => Some(Constant),
            Expr::Table { .. } => None,
            Expr::Unary(f, e) => {
                let m = e.monotone(params)?;
                if m == Constant {
                    return Some(Constant);
                }
                match f {
                    UnaryFn::Neg => Some(m.flip()),
                    UnaryFn::Relu
                    | UnaryFn::Sigmoid
                    | UnaryFn::Tanh
                    | UnaryFn::Erf
                    | UnaryFn::Softplus
                    | UnaryFn::Softsign
                    | UnaryFn::Exp
                    | UnaryFn::Log
                    | UnaryFn::Sqrt
                    | UnaryFn::Clip { .. } => Some(m),
                    UnaryFn::LeakyRelu { alpha } | UnaryFn::Elu { alpha } if *alpha >= 0.0 => Some(m),
                    UnaryFn::Selu { alpha, gamma } if *alpha >= 0.0 && *gamma >= 0.0 => Some(m),
                    UnaryFn::HardSigmoid { alpha, .. } if *alpha >= 0.0 => Some(m),
                    _ => None,
                }
            }
            Expr::Binary(f, a, b) => {
                let (ma, mb) = (a.monotone(params)?, b.monotone(params)?);
                match f {
                    BinaryFn::Add => ma.plus(mb),
                    BinaryFn::Sub => ma.plus(mb.flip()),
                    BinaryFn::Max | BinaryFn::Min => ma.plus(mb),
                    BinaryFn::Mul | BinaryFn::Div => {
                        let (m, c) = match (ma, mb) {
                            (m, Constant) => (m, b),
                            (Constant, m) if *f == BinaryFn::Mul => (m, a),
                            _ => return None,
                        };
                        match sign(c)? {
                            s if s > 0.0 => Some(m),
                            s if s < 0.0 => Some(m.flip()),
                            _ => None,
                        }
                    }
                    BinaryFn::Pow | BinaryFn::PRelu => None,
                }
            }
        }
    }
}

impl fmt::Display for Expr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Expr::Input => write!(f, "x"),
            Expr::Const(c) => write!(f, "{}", *c as f32),
            Expr::Param(k) => write!(f, "p{k}"),
            Expr::Unary(u, e) => write!(f, "{}({e})", u.name()),
            Expr::Binary(b, x, y) => match b {
                BinaryFn::Add => write!(f, "({x} + {y})"),
                BinaryFn::Sub => write!(f, "({x} - {y})"),
                BinaryFn::Mul => write!(f, "{x}*{y}"),
                BinaryFn::Div => write!(f, "{x}/{y}"),
                other => write!(f, "{}({x}, {y})", other.name()),
            },
            Expr::Round(e) => write!(f, "round({e})"),
            Expr::Clamp(e, l, h) => write!(f, "clamp({e}, {l}, {h})"),
            Expr::Table { index, first, len } => write!(f, "table(p{first}..p{})[{index}]", first + len),
        }
    }
}

fn binary_bounds(f: BinaryFn, (a, b): (f64, f64), (c, d): (f64, f64)) -> (f64, f64) {
    let corners = |g: &dyn Fn(f64, f64) -> f64| {
        let v = [g(a, c), g(a, d), g(b, c), g(b, d)];
        (v.iter().cloned().fold(f64::INFINITY, f64::min), v.iter().cloned().fold(f64::NEG_INFINITY, f64::max))
    };
    match f {
        BinaryFn::Add => (a + c, b + d),
        BinaryFn::Sub => (a - d, b - c),
        BinaryFn::Mul => corners(&|x, y| x * y),
        BinaryFn::Div if c > 0.0 || d < 0.0 => corners(&|x, y| x / y),
        BinaryFn::Div => (f64::NEG_INFINITY, f64::INFINITY),
        BinaryFn::Max => (a.max(c), b.max(d)),
        BinaryFn::Min => (a.min(c), b.min(d)),
        BinaryFn::PRelu => {
            // x where x ≥ 0, x·slope where x < 0: the union of both pieces' ranges.
            let mut out = (f64::INFINITY, f64::NEG_INFINITY);
            if b >= 0.0 {
                out = (a.max(0.0), b);
            }
            if a < 0.0 {
                let neg_hi = b.min(0.0);
                for v in [a * c, a * d, neg_hi * c, neg_hi * d] {
                    out = (out.0.min(v), out.1.max(v));
                }
            }
            out
        }
        BinaryFn::Pow if a >= 0.0 => {
            let (lo, hi) = corners(&|x, y| x.powf(y));
            if lo.is_nan() || hi.is_nan() {
                (f64::NEG_INFINITY, f64::INFINITY)
            } else {
                (lo, hi)
            }
        }
        BinaryFn::Pow => (f64::NEG_INFINITY, f64::INFINITY),
    }
}

impl UnaryFn {
    /// Sound range of the function on `[lo, hi]`: its values at the ends and at its
    /// interior extrema.
    pub fn range_on(&self, lo: f64, hi: f64) -> (f64, f64) {
        let mut pts = vec![lo, hi];
        // Interior points where the function turns or has a kink.
        match self {
            UnaryFn::Gelu { .. } => pts.push(-0.751_791_524_693_564_5),
            UnaryFn::HardSwish => pts.push(-1.5),
            UnaryFn::Abs => pts.push(0.0),
            UnaryFn::Pow { exponent } if exponent.fract() == 0.0 && (*exponent as i64) % 2 == 0 => pts.push(0.0),
            UnaryFn::Pow { .. } | UnaryFn::Sqrt | UnaryFn::Log | UnaryFn::Reciprocal if lo <= 0.0 => {
                return (f64::NEG_INFINITY, f64::INFINITY);
            }
            UnaryFn::Selu { .. } | UnaryFn::Elu { .. } => {}
            _ => {}
        }
        let mut out = (f64::INFINITY, f64::NEG_INFINITY);
        for p in pts.into_iter().filter(|p| (lo..=hi).contains(p)) {
            let v = self.apply(p);
            out = (out.0.min(v), out.1.max(v));
        }
        // GELU's minimum is slightly below the value at the approximate critical point.
        if matches!(self, UnaryFn::Gelu { .. }) && lo < -0.75 && hi > -0.76 {
            out.0 -= 1e-6;
        }
        out
    }
}

/// Bits a bootstrap needs to read a value from `entries` buckets. An exact lookup
/// (`rounding` 0) reads exact values, so `entries` slots suffice. A rounded lookup reads
/// values anywhere within a bucket, and noise can carry a value at the extreme buckets'
/// outer edge one slot further: a spare slot on each side (holding its neighbour's value)
/// keeps that a rounding wobble instead of a wrap through the padding bit.
pub fn lookup_precision(entries: u64, rounding: u32) -> u32 {
    let slots = if rounding == 0 { entries } else { entries + 2 };
    64 - slots.saturating_sub(1).leading_zeros()
}

/// An element-wise lookup: `out[e] = expr(in[e], params[..][e])`, read from the input
/// rounded to multiples of `2^rounding` (the low bits the PBS drops).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Tlu {
    pub expr: Expr,
    /// The input range the lookup is defined on (the operand's range must lie within).
    pub input: Range,
    /// Per-element parameters, each broadcastable to the per-sample shape.
    pub params: Vec<ArrayD<f64>>,
    /// Number of low bits dropped (approximately, by the PBS's modulus switch) before the
    /// lookup; 0 reads the exact input.
    pub rounding: u32,
    /// What the lookup computes, for dumps (e.g. "relu").
    pub label: String,
}

impl Tlu {
    /// The input value a rounded lookup actually tabulates: the input rounded (half up) to
    /// a multiple of 2^rounding, clipped into the input range. Buckets are aligned to
    /// multiples of 2^rounding, not to the range, so rounding never depends on ranges.
    pub fn representative(&self, v: i64) -> i64 {
        if self.rounding == 0 {
            return v;
        }
        let step = 1i64 << self.rounding.min(62);
        v.saturating_add(step / 2).div_euclid(step).saturating_mul(step).clamp(self.input.lo, self.input.hi)
    }

    /// The bucket (table index before offsetting) a value falls in.
    pub fn bucket(&self, v: i64) -> i64 {
        let step = 1i64 << self.rounding.min(62);
        v.saturating_add(step / 2).div_euclid(step)
    }

    /// Number of table entries the lookup needs for its input range.
    pub fn entries(&self) -> u64 {
        (self.bucket(self.input.hi) as i128 - self.bucket(self.input.lo) as i128).clamp(0, u64::MAX as i128 - 1) as u64
            + 1
    }

    /// Precision of the lookup's input in bits: what the bootstrap must resolve.
    pub fn input_bits(&self) -> u32 {
        lookup_precision(self.entries(), self.rounding)
    }

    /// Sound output range for an input range.
    pub fn output_range(&self) -> Result<Range, String> {
        let input = self.input;
        let pb: Vec<(f64, f64)> = self
            .params
            .iter()
            .map(|p| p.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &v| (a.min(v), b.max(v))))
            .collect();
        let (lo, hi) = self.expr.bounds(input.lo as f64, input.hi as f64, &pb);
        if !lo.is_finite() || !hi.is_finite() || lo.abs() > 2f64.powi(62) || hi.abs() > 2f64.powi(62) {
            return Err(format!("lookup {} has no finite integer output range on {input}", self.label));
        }
        Ok(Range::new(lo.floor() as i64, hi.ceil() as i64))
    }

    /// The parameters of every element of a per-sample tensor of shape `dims`, flattened:
    /// `[element][param]`.
    pub fn element_params(&self, dims: &[usize]) -> Result<Vec<Vec<f64>>, String> {
        let count: usize = dims.iter().product();
        let mut out = vec![Vec::with_capacity(self.params.len()); count];
        for p in &self.params {
            let b = p
                .broadcast(dims.to_vec())
                .ok_or_else(|| format!("lookup parameter of shape {:?} does not fit elements {:?}", p.shape(), dims))?;
            for (slot, &v) in out.iter_mut().zip(b.iter()) {
                slot.push(v);
            }
        }
        Ok(out)
    }

    /// Evaluate on one input value with one element's parameters: the integer the FHE
    /// table holds for it.
    pub fn apply(&self, v: i64, params: &[f64]) -> i64 {
        self.expr.eval(self.representative(v) as f64, params).round() as i64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn relu_q() -> Tlu {
        // dequantize by 0.5, relu, requantize by 0.25 into 0..15
        let e = Expr::quantize(
            Expr::unary(UnaryFn::Relu, Expr::binary(BinaryFn::Mul, Expr::Input, Expr::Param(0))),
            Expr::Const(0.25),
            Range::new(0, 15),
        );
        Tlu {
            expr: e,
            input: Range::new(-10, 10),
            params: vec![ArrayD::from_elem(vec![], 0.5)],
            rounding: 0,
            label: "relu".into(),
        }
    }

    #[test]
    fn exact_lookup_and_bounds() {
        let t = relu_q();
        assert_eq!(t.apply(3, &[0.5]), 6);
        assert_eq!(t.apply(-3, &[0.5]), 0);
        assert_eq!(t.apply(10, &[0.5]), 15);
        assert_eq!(t.output_range().unwrap(), Range::new(0, 15));
        assert_eq!(t.input_bits(), 5);
    }

    #[test]
    fn rounding_reads_bucket_centres() {
        let mut t = relu_q();
        t.rounding = 2;
        // multiples of 4: 1 rounds to 0, 2 (half) up to 4, 10 to 12 clipped to 10
        assert_eq!(t.representative(1), 0);
        assert_eq!(t.representative(2), 4);
        assert_eq!(t.representative(-10), -8);
        assert_eq!(t.representative(10), 10);
        // buckets -2..=3 (-10 → -2, 10 → 3), plus a spare slot on each side
        assert_eq!(t.entries(), 6);
        assert_eq!(t.input_bits(), 3);
        assert_eq!(lookup_precision(7, 2), 4);
        assert_eq!(lookup_precision(16, 0), 4);
    }

    #[test]
    fn composition_substitutes_input() {
        let inner = relu_q();
        let outer = Expr::binary(BinaryFn::Add, Expr::Input, Expr::Const(1.0));
        let composed = outer.substitute(&inner.expr);
        assert_eq!(composed.eval(3.0, &[0.5]), 7.0);
    }

    #[test]
    fn monotonicity_follows_structure() {
        let p = [(0.5, 0.5)];
        assert_eq!(relu_q().expr.monotone(&p), Some(Monotone::Increasing));
        let neg = Expr::binary(BinaryFn::Mul, Expr::Input, Expr::Const(-2.0));
        assert_eq!(Expr::unary(UnaryFn::Sigmoid, neg).monotone(&[]), Some(Monotone::Decreasing));
        assert_eq!(Expr::unary(UnaryFn::Gelu { tanh: false }, Expr::Input).monotone(&[]), None);
    }

    #[test]
    fn gelu_range_includes_its_minimum() {
        let (lo, _) = UnaryFn::Gelu { tanh: false }.range_on(-3.0, 3.0);
        assert!(lo <= UnaryFn::Gelu { tanh: false }.apply(-0.7517915));
    }
}
