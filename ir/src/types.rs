//! Tensor types: element kind plus shape, where axis 0 of a model input may be the
//! symbolic batch dimension `N`.

use serde::{Deserialize, Serialize};
use std::fmt;

/// One dimension of a shape: a fixed size, or the batch size, unknown until run time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Dim {
    Batch,
    Fixed(usize),
}

impl Dim {
    pub fn fixed(self) -> Option<usize> {
        match self {
            Dim::Fixed(n) => Some(n),
            Dim::Batch => None,
        }
    }
}

impl fmt::Display for Dim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Dim::Batch => write!(f, "N"),
            Dim::Fixed(n) => write!(f, "{n}"),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
pub struct Shape(pub Vec<Dim>);

impl Shape {
    pub fn fixed(dims: &[usize]) -> Shape {
        Shape(dims.iter().map(|&d| Dim::Fixed(d)).collect())
    }

    /// `[N, dims...]`: the usual shape of a batched tensor.
    pub fn batched(dims: &[usize]) -> Shape {
        let mut v = vec![Dim::Batch];
        v.extend(dims.iter().map(|&d| Dim::Fixed(d)));
        Shape(v)
    }

    pub fn rank(&self) -> usize {
        self.0.len()
    }

    pub fn dims(&self) -> &[Dim] {
        &self.0
    }

    pub fn has_batch(&self) -> bool {
        self.0.contains(&Dim::Batch)
    }

    /// All dimensions, if none is symbolic.
    pub fn static_dims(&self) -> Option<Vec<usize>> {
        self.0.iter().map(|d| d.fixed()).collect()
    }

    /// The concrete shape for a given batch size.
    pub fn concrete(&self, batch: usize) -> Vec<usize> {
        self.0
            .iter()
            .map(|d| match d {
                Dim::Batch => batch,
                Dim::Fixed(n) => *n,
            })
            .collect()
    }

    /// Product of the fixed dimensions (elements per sample when the batch axis is symbolic).
    pub fn fixed_volume(&self) -> usize {
        self.0.iter().filter_map(|d| d.fixed()).product()
    }

    /// Does a concrete array shape fit this shape? A batch dimension accepts any size ≥ 1;
    /// returns the batch size it took (1 when the shape has no batch dimension).
    pub fn accepts(&self, dims: &[usize]) -> Option<usize> {
        if dims.len() != self.rank() {
            return None;
        }
        let mut batch = None;
        for (d, &n) in self.0.iter().zip(dims) {
            match d {
                Dim::Fixed(m) if *m != n => return None,
                Dim::Fixed(_) => {}
                Dim::Batch => {
                    if n == 0 || batch.is_some_and(|b| b != n) {
                        return None;
                    }
                    batch = Some(n);
                }
            }
        }
        Some(batch.unwrap_or(1))
    }

    /// Normalise a possibly negative ONNX axis against this rank.
    pub fn axis(&self, axis: i64) -> Option<usize> {
        normalize_axis(axis, self.rank())
    }
}

/// Map a possibly negative axis into `0..rank`.
pub fn normalize_axis(axis: i64, rank: usize) -> Option<usize> {
    let r = rank as i64;
    let a = if axis < 0 { axis + r } else { axis };
    (0..r).contains(&a).then_some(a as usize)
}

impl fmt::Display for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[")?;
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                write!(f, ",")?;
            }
            write!(f, "{d}")?;
        }
        write!(f, "]")
    }
}

/// Numpy-style broadcasting of two shapes.
pub fn broadcast(a: &Shape, b: &Shape) -> Option<Shape> {
    let rank = a.rank().max(b.rank());
    let pad = |s: &Shape| -> Vec<Dim> {
        let mut v = vec![Dim::Fixed(1); rank - s.rank()];
        v.extend_from_slice(&s.0);
        v
    };
    let (pa, pb) = (pad(a), pad(b));
    pa.iter()
        .zip(&pb)
        .map(|(&x, &y)| match (x, y) {
            (x, y) if x == y => Some(x),
            (Dim::Fixed(1), y) => Some(y),
            (x, Dim::Fixed(1)) => Some(x),
            _ => None,
        })
        .collect::<Option<Vec<_>>>()
        .map(Shape)
}

/// An inclusive integer interval: the exact range of an integer value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Range {
    pub lo: i64,
    pub hi: i64,
}

impl Range {
    pub fn new(lo: i64, hi: i64) -> Range {
        debug_assert!(lo <= hi, "empty range {lo}..{hi}");
        Range { lo, hi }
    }

    /// Number of bits needed to hold `v - lo` for every v in the range.
    pub fn bits(&self) -> u32 {
        let span = (self.hi - self.lo) as u64;
        64 - span.leading_zeros()
    }

    pub fn contains(&self, v: i64) -> bool {
        self.lo <= v && v <= self.hi
    }

    pub fn union(&self, o: &Range) -> Range {
        Range::new(self.lo.min(o.lo), self.hi.max(o.hi))
    }

    /// Every value `a − b` can take for a in `self`, b in `o`.
    pub fn minus(&self, o: &Range) -> Range {
        Range::new(self.lo.saturating_sub(o.hi), self.hi.saturating_sub(o.lo))
    }
}

impl fmt::Display for Range {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}..{}", self.lo, self.hi)
    }
}

/// What one element of a tensor is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Elem {
    /// A clear 32-bit float (the float graph).
    F32,
    /// A clear 64-bit integer (indices, labels, shapes).
    I64,
    /// An encrypted integer with an exact inclusive range.
    Enc(Range),
}

impl fmt::Display for Elem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Elem::F32 => write!(f, "f32"),
            Elem::I64 => write!(f, "i64"),
            Elem::Enc(r) => write!(f, "enc<{r}>"),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TensorType {
    pub elem: Elem,
    pub shape: Shape,
}

impl TensorType {
    pub fn new(elem: Elem, shape: Shape) -> TensorType {
        TensorType { elem, shape }
    }

    pub fn f32(shape: Shape) -> TensorType {
        TensorType::new(Elem::F32, shape)
    }

    pub fn i64(shape: Shape) -> TensorType {
        TensorType::new(Elem::I64, shape)
    }

    pub fn with_shape(&self, shape: Shape) -> TensorType {
        TensorType::new(self.elem, shape)
    }
}

impl fmt::Display for TensorType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}", self.elem, self.shape)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broadcast_follows_numpy() {
        let a = Shape::batched(&[3]);
        let b = Shape::fixed(&[3]);
        assert_eq!(broadcast(&a, &b), Some(Shape::batched(&[3])));
        assert_eq!(broadcast(&Shape::fixed(&[2, 1]), &Shape::fixed(&[4])), Some(Shape::fixed(&[2, 4])));
        assert_eq!(broadcast(&Shape::fixed(&[2]), &Shape::fixed(&[3])), None);
        assert_eq!(broadcast(&Shape::batched(&[1]), &Shape::fixed(&[1, 5])), Some(Shape::batched(&[5])));
    }

    #[test]
    fn accepts_any_batch_size() {
        let s = Shape::batched(&[4]);
        assert_eq!(s.accepts(&[7, 4]), Some(7));
        assert_eq!(s.accepts(&[7, 5]), None);
        assert_eq!(s.accepts(&[0, 4]), None);
        assert_eq!(s.accepts(&[4]), None);
    }

    #[test]
    fn range_bits() {
        assert_eq!(Range::new(0, 0).bits(), 0);
        assert_eq!(Range::new(0, 1).bits(), 1);
        assert_eq!(Range::new(-8, 7).bits(), 4);
        assert_eq!(Range::new(0, 1023).bits(), 10);
    }
}
