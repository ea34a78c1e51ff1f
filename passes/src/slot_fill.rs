//! Choosing each layer's integer scale so that the lookups reading its outputs downstream
//! fill their slots.
//!
//! A lookup reads its input in buckets of 2^k, k the smallest rounding that fits the
//! input's range into the lookup's precision. Scales are powers of two, so a range just
//! over a power of two leaves half the slots empty: one bit of resolution lost. The
//! quantizer sizes each layer's accumulator for a table reading it directly
//! (`quantize::scales::fill`), but ReLUs and maxima read as |x| keep the accumulator's
//! scale through a chain of reads (max-pool tree levels, then the activation), and their
//! ranges are not the layer's. On a digits CNN, two of its four reads used 56% of their
//! slots.
//!
//! So, after quantizing once (`Search::refilled` in `bitwidth`): each candidate layer is
//! quantized again with its integer range scaled by [`PROBE`]; the reads whose range
//! shrank by that factor are the layer's (a read following two layers is the first's).
//! For each layer, the factor in [[`MIN_FACTOR`], 1] that maximises the resolution of its
//! reads (Σ lookups · log2(extent / 2^k), over precisions 3–7 bits, since the precision is
//! chosen later) is applied, and the result is kept when all reads together resolve finer
//! than before. Coarser weights are the price: at most log2(1/[`MIN_FACTOR`]) = 0.74 bit
//! of 8, where a read drops 12–16 bits. ReLUs composed between dense layers fill their
//! reads themselves (`kinks`, `fill_source`), so their source layers are not candidates.

use crate::precision::{abs_rounding_for, lookup_input, rounding_for};
use veil_ir::{Graph, Range};

/// The factor a probe quantization scales one layer's integer range by.
pub const PROBE: f64 = 0.75;

/// The smallest factor a layer's range is scaled by. Near 1/2 a factor trades a whole bit
/// of weights for one bit less rounding (k − 1), which [`resolution`] scores as a small
/// gain but is none (a matrix product's case lost agreement at 0.52).
pub const MIN_FACTOR: f64 = 0.6;

/// One lookup site: what it reads and how many lookups it makes per sample.
#[derive(Clone, Debug, PartialEq)]
pub struct ReadSite {
    pub name: String,
    /// The range its input takes (for a max, the range of the difference it reads).
    pub range: Range,
    /// A whole-torus |x| read, which fits `max |x|` rather than the span.
    pub abs: bool,
    pub lookups: usize,
}

impl ReadSite {
    /// The extent the read's rounding must fit: max |x| for an |x| read, the span otherwise.
    fn extent(&self, r: Range) -> f64 {
        if self.abs {
            r.lo.saturating_abs().max(r.hi.saturating_abs()) as f64
        } else {
            r.hi.saturating_sub(r.lo) as f64
        }
    }

    /// Low bits dropped to read `r` at `p` bits.
    fn rounding(&self, r: Range, p: u32) -> Option<u32> {
        if self.abs {
            abs_rounding_for(r, p)
        } else {
            rounding_for(r, p)
        }
    }
}

/// The lookup sites of an integer graph, in node order.
pub fn read_sites(g: &Graph) -> Vec<ReadSite> {
    g.node_ids()
        .filter_map(|id| {
            let (range, abs) = lookup_input(g, id)?;
            let node = g.node(id);
            Some(ReadSite { name: node.name.clone(), range, abs, lookups: node.ty.shape.fixed_volume() })
        })
        .collect()
}

/// The sites of `base` whose extent `probe` (the same graph with one layer's range scaled
/// by `factor`) scaled by about that factor: the reads that layer's scale sets. `None`
/// when the two graphs' sites do not correspond.
pub fn attributed(base: &[ReadSite], probe: &[ReadSite], factor: f64) -> Option<Vec<usize>> {
    if base.len() != probe.len() || base.iter().zip(probe).any(|(a, b)| a.name != b.name || a.abs != b.abs) {
        return None;
    }
    let near = |a: &ReadSite, b: &ReadSite| {
        let (ea, eb) = (a.extent(a.range), b.extent(b.range));
        ea > 64.0 && (eb / ea - factor).abs() < 0.05
    };
    Some((0..base.len()).filter(|&i| near(&base[i], &probe[i])).collect())
}

/// Total resolution (Σ lookups · log2(extent / 2^k) over precisions 3–7) of `sites` with
/// their ranges scaled by `factor`; precisions at which some site does not fit are skipped.
pub fn resolution(sites: &[&ReadSite], factor: f64) -> f64 {
    let scaled = |r: Range| Range::new((r.lo as f64 * factor).round() as i64, (r.hi as f64 * factor).round() as i64);
    let mut total = 0.0;
    for p in 3..=7 {
        let per_site: Option<f64> = sites
            .iter()
            .map(|s| {
                let r = scaled(s.range);
                let k = s.rounding(r, p)?;
                Some(s.lookups as f64 * (s.extent(r).max(1.0).log2() - k as f64))
            })
            .sum();
        total += per_site.unwrap_or(0.0);
    }
    total
}

/// The factor in [`MIN_FACTOR`, 1] (steps of 1/100) that maximises [`resolution`]; the
/// largest one among equals (the finest weights).
pub fn best_factor(sites: &[&ReadSite]) -> f64 {
    let mut best = (1.0, resolution(sites, 1.0));
    let steps = ((1.0 - MIN_FACTOR) * 100.0).round() as i32;
    for i in 1..=steps {
        let f = 1.0 - i as f64 / 100.0;
        let r = resolution(sites, f);
        if r > best.1 + 1e-9 {
            best = (f, r);
        }
    }
    best.0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn site(lo: i64, hi: i64, abs: bool) -> ReadSite {
        ReadSite { name: "r".into(), range: Range::new(lo, hi), abs, lookups: 36 }
    }

    #[test]
    fn a_range_just_over_a_power_of_two_is_scaled_under_it() {
        // |x| up to 1.09·2^20: at 5 bits, k = 16 and 18 of 31 buckets a side are used;
        // scaled by 0.88 it fits k = 15 with all of them
        let s = site(-613_409, 1_141_697, true);
        let f = best_factor(&[&s]);
        assert!((0.75..0.9).contains(&f), "{f}");
        let k = |f: f64| s.rounding(Range::new((s.range.lo as f64 * f) as i64, (s.range.hi as f64 * f) as i64), 5);
        assert_eq!((k(1.0), k(f)), (Some(16), Some(15)));
        // a range that fills its slots at every precision already keeps its scale
        let full = site(0, 117_964, true);
        assert_eq!(best_factor(&[&full]), 1.0);
    }

    #[test]
    fn reads_are_attributed_by_how_their_extent_moved() {
        let base = vec![site(0, 1000, false), site(-500, 500, true), site(0, 100, false)];
        let mut probe = base.clone();
        probe[0].range = Range::new(0, 752);
        probe[1].range = Range::new(-374, 376);
        assert_eq!(attributed(&base, &probe, PROBE), Some(vec![0, 1]));
        probe.pop();
        assert_eq!(attributed(&base, &probe, PROBE), None);
    }
}
