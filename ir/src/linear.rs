//! Exact integer linear maps with clear weights: what an encrypted tensor can go through
//! without a bootstrap.

use crate::op::{Conv2d, Pool2d};
use crate::types::{Dim, Range, Shape};
use ndarray::{Array2, Array4, ArrayD, Axis, IxDyn};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum LinearKind {
    /// `y[.., j] = Σ_k w[j, k] · x[.., k]` over the last axis.
    Dense { weights: Array2<i64> },
    /// NCHW convolution with weights [M, C/group, kH, kW].
    Conv { weights: Array4<i64>, conv: Conv2d },
    /// Sum over each pooling window (padding contributes 0).
    SumPool { pool: Pool2d },
    /// Sum over axes.
    Sum { axes: Vec<usize>, keepdims: bool },
    /// Element-wise multiplication by clear integers, broadcast over the sample.
    Scale { factor: ArrayD<i64> },
    /// A matrix on the flattened sample: `y = W · vec(x)`, shaped `[N, out_dims..]`.
    Matrix { weights: Array2<i64>, out_dims: Vec<usize> },
}

/// `kind(x) + bias`, all in exact integer arithmetic.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Linear {
    pub kind: LinearKind,
    /// Broadcast over the per-sample output shape.
    pub bias: ArrayD<i64>,
    /// Where it came from, for dumps (e.g. "gemm").
    pub label: String,
}

impl Linear {
    pub fn new(kind: LinearKind, bias: ArrayD<i64>, label: impl Into<String>) -> Linear {
        Linear { kind, bias, label: label.into() }
    }

    /// Output shape for an input shape (the batch axis, if any, leads and is kept).
    pub fn out_shape(&self, input: &Shape) -> Result<Shape, String> {
        let d = input.dims();
        let out = match &self.kind {
            LinearKind::Dense { weights } => {
                let last = d.last().and_then(|x| x.fixed()).ok_or("dense needs a fixed last axis")?;
                if last != weights.ncols() {
                    return Err(format!("dense weights take {} inputs, the tensor has {last}", weights.ncols()));
                }
                let mut o = d.to_vec();
                *o.last_mut().expect("non-empty") = Dim::Fixed(weights.nrows());
                Shape(o)
            }
            LinearKind::Conv { weights, conv } => {
                let op = crate::op::Op::Conv(conv.clone());
                let w = crate::types::TensorType::f32(Shape::fixed(weights.shape()));
                let x = crate::types::TensorType::f32(input.clone());
                op.infer(&[&x, &w])?.shape
            }
            LinearKind::SumPool { pool } => {
                let x = crate::types::TensorType::f32(input.clone());
                crate::op::Op::AvgPool(pool.clone()).infer(&[&x])?.shape
            }
            LinearKind::Sum { axes, keepdims } => {
                let x = crate::types::TensorType::f32(input.clone());
                let op =
                    crate::op::Op::Reduce { kind: crate::op::ReduceKind::Sum, axes: axes.clone(), keepdims: *keepdims };
                op.infer(&[&x])?.shape
            }
            LinearKind::Scale { factor } => {
                let s = crate::types::broadcast(input, &Shape::fixed(factor.shape()))
                    .ok_or("scale factors do not broadcast")?;
                if &s != input {
                    return Err(format!("scale factors {:?} would change the shape {input}", factor.shape()));
                }
                input.clone()
            }
            LinearKind::Matrix { weights, out_dims } => {
                let batch = d.first() == Some(&Dim::Batch);
                let vol = input.fixed_volume();
                if vol != weights.ncols() || out_dims.iter().product::<usize>() != weights.nrows() {
                    return Err(format!("matrix {:?} does not map {input} to {out_dims:?}", weights.shape()));
                }
                if batch {
                    Shape::batched(out_dims)
                } else {
                    Shape::fixed(out_dims)
                }
            }
        };
        let per_sample: Vec<usize> = out.dims().iter().filter_map(|d| d.fixed()).collect();
        if self.bias.broadcast(IxDyn(&per_sample)).is_none() && self.bias.broadcast(IxDyn(&out.concrete(1))).is_none() {
            return Err(format!("bias of shape {:?} does not fit output {out}", self.bias.shape()));
        }
        Ok(out)
    }

    /// Sound range of the outputs for inputs in `r` (interval arithmetic per output row or
    /// channel, then the union), given the input shape.
    pub fn out_range(&self, r: Range, input: &Shape) -> Range {
        let term = |w: i64, zero_possible: bool| -> (i64, i64) {
            // Saturating: a range this wide is refused by the verifier.
            let (a, b) = (w.saturating_mul(r.lo), w.saturating_mul(r.hi));
            let (lo, hi) = (a.min(b), a.max(b));
            if zero_possible {
                (lo.min(0), hi.max(0))
            } else {
                (lo, hi)
            }
        };
        let row_sum = |row: &mut dyn Iterator<Item = i64>, zero: bool| {
            row.fold((0i64, 0i64), |(l, h), w| {
                let (a, b) = term(w, zero);
                (l.saturating_add(a), h.saturating_add(b))
            })
        };
        let per_out: Vec<(i64, i64)> = match &self.kind {
            LinearKind::Dense { weights } | LinearKind::Matrix { weights, .. } => {
                weights.outer_iter().map(|row| row_sum(&mut row.iter().copied(), false)).collect()
            }
            LinearKind::Conv { weights, conv } => {
                let padded = conv.pads.iter().any(|&p| p > 0);
                weights.outer_iter().map(|w| row_sum(&mut w.iter().copied(), padded)).collect()
            }
            LinearKind::SumPool { pool } => {
                // a window holds between 1 (at a padded edge) and k·k inputs
                let k = (pool.kernel[0] * pool.kernel[1]) as i64;
                let partial = pool.pads.iter().any(|&p| p > 0) || pool.ceil_mode;
                let (l, h) = (k.saturating_mul(r.lo), k.saturating_mul(r.hi));
                if partial {
                    vec![(l.min(r.lo), h.max(r.hi))]
                } else {
                    vec![(l, h)]
                }
            }
            LinearKind::Sum { axes, .. } => {
                let count: i64 =
                    axes.iter().map(|&a| input.dims().get(a).and_then(|d| d.fixed()).unwrap_or(1) as i64).product();
                vec![(count.saturating_mul(r.lo), count.saturating_mul(r.hi))]
            }
            LinearKind::Scale { factor } => factor.iter().map(|&f| term(f, false)).collect(),
        };
        // A bias with one value per output row/channel pairs with that row; otherwise its
        // extremes add to every output.
        let bias: Vec<i64> = self.bias.iter().copied().collect();
        let paired = bias.len() == per_out.len() && bias.len() > 1;
        let (bl, bh) = bias.iter().fold((i64::MAX, i64::MIN), |(l, h), &b| (l.min(b), h.max(b)));
        let (bl, bh) = if bias.is_empty() { (0, 0) } else { (bl, bh) };
        let (lo, hi) = per_out.iter().enumerate().fold((i64::MAX, i64::MIN), |(l, h), (j, &(a, b))| {
            let (db_lo, db_hi) = if paired { (bias[j], bias[j]) } else { (bl, bh) };
            (l.min(a.saturating_add(db_lo)), h.max(b.saturating_add(db_hi)))
        });
        Range::new(lo, hi)
    }

    /// Number of clear multiply-adds per sample (the cost of the map on ciphertexts).
    pub fn macs(&self, input: &Shape) -> usize {
        let out = self.out_shape(input).map(|s| s.fixed_volume()).unwrap_or(0);
        match &self.kind {
            LinearKind::Dense { weights } => out * weights.ncols(),
            LinearKind::Matrix { weights, .. } => weights.iter().filter(|&&w| w != 0).count(),
            LinearKind::Conv { weights, .. } => out * weights.len() / weights.shape()[0],
            LinearKind::SumPool { pool } => out * pool.kernel[0] * pool.kernel[1],
            LinearKind::Sum { .. } => input.fixed_volume(),
            LinearKind::Scale { .. } => out,
        }
    }

    /// Apply to a concrete integer tensor (the batch axis, if any, leads).
    pub fn apply(&self, x: &ArrayD<i64>) -> Result<ArrayD<i64>, String> {
        let y = match &self.kind {
            LinearKind::Dense { weights } => {
                let k = *x.shape().last().ok_or("dense on a scalar")?;
                let rows = x.len() / k.max(1);
                let x2 = x.to_shape((rows, k)).map_err(|e| e.to_string())?;
                // a product with one inner term may come back column-major: reshape a
                // standard-layout copy
                let y = x2.dot(&weights.t()).as_standard_layout().into_owned();
                let mut shape = x.shape().to_vec();
                *shape.last_mut().expect("non-empty") = weights.nrows();
                y.into_shape_with_order(IxDyn(&shape)).map_err(|e| e.to_string())?
            }
            LinearKind::Conv { weights, conv } => {
                crate::interp::conv2d_generic(conv, x, &weights.clone().into_dyn(), None)?
            }
            LinearKind::SumPool { pool } => crate::interp::sum_pool(pool, x)?,
            LinearKind::Sum { axes, keepdims } => {
                let mut y = x.clone();
                let mut sorted = axes.clone();
                sorted.sort_unstable_by(|a, b| b.cmp(a));
                for &a in &sorted {
                    y = y.sum_axis(Axis(a));
                    if *keepdims {
                        y.insert_axis_inplace(Axis(a));
                    }
                }
                y
            }
            LinearKind::Scale { factor } => {
                let f = factor.broadcast(x.raw_dim()).ok_or("scale factors do not broadcast")?;
                let mut y = x.clone();
                y.zip_mut_with(&f, |a, &b| *a *= b);
                y
            }
            LinearKind::Matrix { weights, out_dims } => {
                let n = x.shape()[0];
                let x2 = x.to_shape((n, weights.ncols())).map_err(|e| e.to_string())?;
                let y = x2.dot(&weights.t()).as_standard_layout().into_owned();
                let mut shape = vec![n];
                shape.extend_from_slice(out_dims);
                y.into_shape_with_order(IxDyn(&shape)).map_err(|e| e.to_string())?
            }
        };
        if self.bias.is_empty() {
            return Ok(y);
        }
        let b = self
            .bias
            .broadcast(y.raw_dim())
            .ok_or_else(|| format!("bias {:?} does not fit output {:?}", self.bias.shape(), y.shape()))?;
        let mut y = y;
        y.zip_mut_with(&b, |a, &c| *a += c);
        Ok(y)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::array;

    #[test]
    fn dense_range_is_exact_per_row() {
        let l = Linear::new(LinearKind::Dense { weights: array![[1, -2], [3, 0]] }, array![10, 0].into_dyn(), "gemm");
        // row 0: [0..7] - 2[0..7] + 10 → [-4, 17]; row 1: 3[0..7] → [0, 21]
        assert_eq!(l.out_range(Range::new(0, 7), &Shape::batched(&[2])), Range::new(-4, 21));
        let y = l.apply(&array![[1i64, 2], [7, 0]].into_dyn()).unwrap();
        assert_eq!(y, array![[7i64, 3], [17, 21]].into_dyn());
    }

    #[test]
    fn sum_range_counts_elements() {
        let l = Linear::new(LinearKind::Sum { axes: vec![1], keepdims: false }, ArrayD::zeros(vec![]), "sum");
        assert_eq!(l.out_range(Range::new(-1, 2), &Shape::batched(&[4])), Range::new(-4, 8));
    }
}
