//! Choosing a layer's integer weights and output scales: per-channel quantization,
//! equalized channel spans, centred accumulators, ranges that fill the lookup slots.

use super::*;

impl Quantizer<'_> {
    /// Per-output-channel symmetric weight quantization of `w` [out, in]: integer weights
    /// and the scale of each row.
    pub(super) fn quantize_rows(&self, w: &Array2<f64>) -> (Array2<i64>, Vec<f64>) {
        let qmax = ((1i64 << (self.cfg.weight_bits - 1)) - 1).max(1) as f64;
        let scales: Vec<f64> = w
            .outer_iter()
            .map(|row| {
                let m = row.iter().fold(0.0f64, |a, &v| a.max(v.abs()));
                if m > 0.0 {
                    m / qmax
                } else {
                    1.0
                }
            })
            .collect();
        (round_rows(w, &scales), scales)
    }

    /// Does some server-side op read float node `id`? Otherwise it is decrypted: filling
    /// lookup slots would only enlarge its weights (and the noise the outputs carry).
    pub(super) fn read_by_lookups(&self, id: NodeId) -> bool {
        self.g.users(id).iter().any(|u| !self.tail.contains(u))
    }

    /// [`fill`] the integer range of layer `id` when lookups read it, then apply its
    /// factor from `refill`. Records `id` as a candidate for a factor.
    pub(super) fn fill_slots(
        &mut self,
        id: NodeId,
        eff: &Array2<f64>,
        q: Array2<i64>,
        s_out: Vec<f64>,
        spans: Option<&[f64]>,
    ) -> (Array2<i64>, Vec<f64>) {
        if !self.read_by_lookups(id) {
            return (q, s_out);
        }
        self.filled.push(id);
        let (q, s_out) = fill(eff, q, s_out, spans, self.margin);
        match self.refill.get(&id) {
            Some(&f) if f > 0.0 && f < 1.0 => {
                let scales: Vec<f64> = s_out.iter().map(|s| s / f).collect();
                (round_rows(eff, &scales), scales)
            }
            _ => (q, s_out),
        }
    }

    /// Calibrated span of each output channel (axis 1) of float node `id`.
    pub(super) fn channel_spans(&self, id: NodeId) -> Option<Vec<f64>> {
        self.calib.channels.get(&id).map(|c| c.iter().map(|(l, h)| h - l).collect())
    }

    /// Calibrated span of each output feature (last axis) of a dense layer, any rank.
    pub(super) fn feature_spans(&self, id: NodeId) -> Option<Vec<f64>> {
        self.calib.features.get(&id).map(|c| c.iter().map(|(l, h)| h - l).collect())
    }

    /// Centre each output channel's accumulator on zero with a clear integer bias, moving
    /// the shift into the real-valued offset: channels then share one narrow range. The
    /// channel is axis 0 of the sample for convolutions, the last axis for dense layers.
    pub(super) fn center(
        &self,
        id: NodeId,
        s_out: &[f64],
        offset: ArrayD<f64>,
        out_dims: &[usize],
        last_axis: bool,
    ) -> (ArrayD<i64>, ArrayD<f64>) {
        let (ranges, axis) = if last_axis {
            (self.calib.features.get(&id), out_dims.len().saturating_sub(1))
        } else {
            (self.calib.channels.get(&id), 0)
        };
        let Some(chans) = ranges.filter(|c| c.len() == s_out.len() && out_dims.get(axis) == Some(&c.len())) else {
            return (ArrayD::zeros(vec![]), offset);
        };
        let per_chan_offset: Vec<f64> = offset.axis_iter(Axis(axis)).map(|o| o.mean().unwrap_or(0.0)).collect();
        let c: Vec<i64> = chans
            .iter()
            .zip(s_out)
            .zip(&per_chan_offset)
            .map(|((&(lo, hi), &s), &o)| if hi >= lo { (((lo + hi) / 2.0 - o) / s).round() as i64 } else { 0 })
            .collect();
        let mut shape = vec![1; out_dims.len()];
        shape[axis] = c.len();
        let bias = ArrayD::from_shape_vec(shape.clone(), c.iter().map(|&v| -v).collect()).expect("channel vector");
        let shift = ArrayD::from_shape_vec(shape, c.iter().zip(s_out).map(|(&v, &s)| v as f64 * s).collect())
            .expect("channel vector");
        (bias, offset + shift)
    }
}

/// Integer weights of `eff` [out, in] at one scale per output row.
pub(super) fn round_rows(eff: &Array2<f64>, scales: &[f64]) -> Array2<i64> {
    Array2::from_shape_fn(eff.raw_dim(), |(j, k)| (eff[[j, k]] / scales[j]).round() as i64)
}

/// Give every output channel the same calibrated accumulator span: a channel whose
/// values span less than the widest gets a finer scale (larger integer weights, up to 16×),
/// so that a lookup rounding the whole tensor to p bits resolves every channel equally.
pub(super) fn equalize(
    eff: &Array2<f64>,
    q: Array2<i64>,
    s_out: Vec<f64>,
    spans: Option<&[f64]>,
) -> (Array2<i64>, Vec<f64>) {
    let Some(spans) = spans.filter(|s| s.len() == s_out.len()) else { return (q, s_out) };
    let int_spans: Vec<f64> = spans.iter().zip(&s_out).map(|(sp, s)| sp / s).collect();
    let widest = int_spans.iter().cloned().fold(0.0, f64::max);
    if widest <= 0.0 {
        return (q, s_out);
    }
    let scales: Vec<f64> = s_out
        .iter()
        .zip(&int_spans)
        .map(|(&s, &w)| if w > 0.0 { s * (w / widest).max(1.0 / 16.0) } else { s })
        .collect();
    let q = round_rows(eff, &scales);
    (q, scales)
}

/// Scale a layer so its compiled range fills the lookup slots. A lookup reads its input
/// in buckets of 2^k, so a range just over a power of two wastes half the slots. After
/// equalizing and centring, the compiled range is predictable: the common channel span
/// times (1 + 2·margin). Finer scales (up to 2×) put it at 0.75·2^m, where a rounded
/// lookup of p ≥ 4 bits uses all its usable slots (two are spares and one may be lost to
/// bucket alignment).
pub(super) fn fill(
    eff: &Array2<f64>,
    q: Array2<i64>,
    s_out: Vec<f64>,
    spans: Option<&[f64]>,
    margin: f64,
) -> (Array2<i64>, Vec<f64>) {
    let Some(spans) = spans.filter(|s| s.len() == s_out.len()) else { return (q, s_out) };
    let span = spans.iter().zip(&s_out).map(|(sp, s)| sp / s).fold(0.0, f64::max);
    if !margin.is_finite() || span < 16.0 {
        return (q, s_out);
    }
    let range = span * (1.0 + 2.0 * margin) + 2.0;
    let target = 0.75 * 2f64.powf((range / 0.75).log2().ceil());
    let f = target / range;
    if f < 1.01 {
        return (q, s_out);
    }
    let scales: Vec<f64> = s_out.iter().map(|s| s / f).collect();
    let q = round_rows(eff, &scales);
    (q, scales)
}

/// Do the features' calibrated spans differ enough to deserve a scale each? The widest
/// against the lower median (so that with two features, one narrow one counts): features
/// of one kind (pixels) share a scale, a [0, 1] feature beside a [0, 100] one does not.
pub(super) fn heterogeneous(lo: &ArrayD<f64>, hi: &ArrayD<f64>) -> bool {
    let mut spans: Vec<f64> = lo.iter().zip(hi.iter()).map(|(l, h)| h - l).filter(|s| *s > 0.0).collect();
    spans.sort_by(f64::total_cmp);
    let max = spans.last().copied().unwrap_or(0.0);
    spans.get(spans.len().saturating_sub(1) / 2).is_some_and(|&m| max > 8.0 * m)
}

pub(super) fn median(values: impl Iterator<Item = f64>) -> Option<f64> {
    let mut v: Vec<f64> = values.collect();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied()
}
