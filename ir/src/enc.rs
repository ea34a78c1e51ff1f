//! Exact integer semantics of the ops that combine encrypted values with lookups beyond a
//! single table: the product of two encrypted matrices and saturation. The interpreter,
//! the type rules and the backend's lowering all use these definitions.

use crate::types::Range;
use ndarray::{ArrayD, IxDyn};

/// Sound range of `Σ_k a_k·b_k` over `k` terms with every a in `ra`, every b in `rb`.
pub fn matmul_range(ra: Range, rb: Range, k: usize) -> Range {
    // Saturating: a range this wide is refused by the verifier (see `MAX_ENC_MAGNITUDE`).
    let corners = [
        ra.lo.saturating_mul(rb.lo),
        ra.lo.saturating_mul(rb.hi),
        ra.hi.saturating_mul(rb.lo),
        ra.hi.saturating_mul(rb.hi),
    ];
    let lo = *corners.iter().min().expect("four corners");
    let hi = *corners.iter().max().expect("four corners");
    Range::new(lo.saturating_mul(k as i64), hi.saturating_mul(k as i64))
}

/// `[N, M, K] × [N, K, L] → [N, M, L]`, one matrix product per sample.
pub fn matmul(a: &ArrayD<i64>, b: &ArrayD<i64>) -> Result<ArrayD<i64>, String> {
    let (sa, sb) = (a.shape(), b.shape());
    if sa.len() != 3 || sb.len() != 3 || sa[0] != sb[0] || sa[2] != sb[1] {
        return Err(format!("matmul_enc of shapes {sa:?} and {sb:?}"));
    }
    let (n, m, k, l) = (sa[0], sa[1], sa[2], sb[2]);
    let mut out = ArrayD::<i64>::zeros(IxDyn(&[n, m, l]));
    for s in 0..n {
        for i in 0..m {
            for j in 0..l {
                out[[s, i, j]] = (0..k).map(|t| a[[s, i, t]] * b[[s, t, j]]).sum();
            }
        }
    }
    Ok(out)
}

/// The bucket a value is read in when its low `rounding` bits are dropped (round half
/// up), as a multiple of 2^rounding.
pub fn rounded(v: i64, rounding: u32) -> i64 {
    if rounding == 0 {
        return v;
    }
    let step = 1i64 << rounding;
    (v + step / 2).div_euclid(step) * step
}

/// What a saturation subtracts once its input reads as `q` (a multiple of 2^rounding):
/// how far q lies beyond the bounds.
pub fn saturate_excess(q: i64, lo: i64, hi: i64) -> i64 {
    q - q.clamp(lo, hi)
}

/// Saturation of `v` toward [lo, hi] (see `Op::SatEnc`): `v − excess(round(v))`.
pub fn saturate(v: i64, lo: i64, hi: i64, rounding: u32) -> i64 {
    saturate_read(v, v, lo, hi, rounding)
}

/// As [`saturate`], with the bucket taken from `read` (the value the bootstrap saw, noise
/// included), as the encrypted circuit computes it.
pub fn saturate_read(v: i64, read: i64, lo: i64, hi: i64, rounding: u32) -> i64 {
    v - saturate_excess(rounded(read, rounding), lo, hi)
}

/// Sound range of a saturation of values in `r`, for a read in either bucket next to the
/// value (the bootstrap's approximate rounding): inside the bounds a value is kept, beyond
/// them it lands less than a bucket from the nearer bound.
pub fn saturate_range(r: Range, lo: i64, hi: i64, rounding: u32) -> Range {
    let slack = 1i64.checked_shl(rounding).unwrap_or(i64::MAX).saturating_sub(1);
    let low = lo.saturating_sub(slack).max(r.lo.min(hi.saturating_sub(slack)));
    let high = hi.saturating_add(slack).min(r.hi.max(lo.saturating_add(slack)));
    Range::new(low.min(high), high.max(low))
}

/// |v| read to a multiple of 2^rounding, divided by 2^shift (see `Op::AbsEnc`).
pub fn abs_read(v: i64, rounding: u32, shift: u32) -> i64 {
    rounded(v, rounding).saturating_abs() >> shift
}

/// Sound range of an `abs_enc` of values in `r`: a read may land in the bucket next to the
/// value's (the bootstrap's approximate rounding).
pub fn abs_range(r: Range, rounding: u32) -> Range {
    let step = 1i64.checked_shl(rounding).unwrap_or(i64::MAX);
    let (lo, hi) = (rounded(r.lo, rounding), rounded(r.hi, rounding));
    let top = lo.saturating_abs().max(hi.saturating_abs());
    let top = if rounding == 0 { top } else { top.saturating_add(step) };
    let bottom = if lo <= 0 && hi >= 0 { 0 } else { lo.saturating_abs().min(hi.saturating_abs()) };
    let bottom = if rounding == 0 { bottom } else { bottom.saturating_sub(step).max(0) };
    Range::new(bottom, top)
}

/// Bits a whole-torus read of `abs_enc` needs for inputs in `r` with `rounding` low bits
/// dropped: the buckets must lie in [−(2^p − 1), 2^p − 1], so that a read one bucket off
/// (noise at the edge) still lands in the window [−2^p, 2^p] where |q| is read right.
pub fn abs_precision(r: Range, rounding: u32) -> u32 {
    let step = 1i64.checked_shl(rounding).unwrap_or(i64::MAX);
    let bucket = |v: i64| v.saturating_add(step / 2).div_euclid(step);
    let far = bucket(r.lo).saturating_neg().max(bucket(r.hi)).max(1) as u64;
    64 - far.leading_zeros()
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::array;

    #[test]
    fn matmul_per_sample() {
        let a = array![[[1i64, 2], [3, 4]]].into_dyn();
        let b = array![[[5i64], [-6]]].into_dyn();
        assert_eq!(matmul(&a, &b).unwrap(), array![[[-7i64], [-9]]].into_dyn());
        assert!(matmul(&a, &a.clone().into_shape_with_order(IxDyn(&[1, 4, 1])).unwrap()).is_err());
        assert_eq!(matmul_range(Range::new(-3, 3), Range::new(-4, 2), 5), Range::new(-60, 60));
    }

    #[test]
    fn saturation_keeps_inside_and_stays_in_its_range() {
        for rounding in 0..4u32 {
            let (lo, hi) = (-20, 30);
            let r = Range::new(-200, 170);
            let out = saturate_range(r, lo, hi, rounding);
            let step = 1i64 << rounding;
            for v in r.lo..=r.hi {
                let s = saturate(v, lo, hi, rounding);
                assert!(out.contains(s), "v {v} → {s} outside {out} (rounding {rounding})");
                if v >= lo + step && v <= hi - step {
                    assert_eq!(s, v, "inside the bounds a value is kept");
                }
                // a read moved by noise under half a bucket (approximate rounding, not a
                // failure) can land in the neighbouring bucket: the range holds then too
                for read in [v - step / 2, v + (step / 2 - 1).max(0)] {
                    assert!(out.contains(saturate_read(v, read, lo, hi, rounding)));
                }
            }
        }
        // exact saturation is a clamp
        assert_eq!(saturate(99, -5, 5, 0), 5);
        assert_eq!(saturate_range(Range::new(-100, 100), -5, 5, 0), Range::new(-5, 5));
        assert_eq!(saturate_range(Range::new(0, 3), -5, 5, 0), Range::new(0, 3));
    }

    #[test]
    fn absolute_value_reads_and_their_precision() {
        assert_eq!(abs_read(-13, 2, 0), 12); // −13 reads as −12 (round half up)
        assert_eq!(abs_read(-14, 2, 0), 12); // −14 reads as −12 too
        assert_eq!(abs_read(14, 2, 1), 8); // 14 reads as 16, shifted by 1
                                           // buckets must lie within ±(2^p − 1): a read one bucket off stays in the window
        assert_eq!(abs_precision(Range::new(-15, 15), 0), 4);
        assert_eq!(abs_precision(Range::new(-16, 15), 0), 5);
        assert_eq!(abs_precision(Range::new(-118, 117), 3), 4);
        assert_eq!(abs_precision(Range::new(0, 0), 3), 1);
        let r = abs_range(Range::new(-118, 117), 3);
        assert!(r.lo == 0 && r.hi >= 120 + 8);
        let r = abs_range(Range::new(20, 40), 2);
        assert!(r.lo <= 16 && r.hi >= 44);
    }
}
