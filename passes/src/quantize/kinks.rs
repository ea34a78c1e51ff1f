//! Activations with one kink, read on the whole torus: composed between two dense layers
//! (`compose_kink`), and elsewhere computed in place from the accumulator
//! (`tabulate_kink`, see its doc).
//!
//! A piecewise-linear activation with one kink (ReLU, leaky ReLU, PReLU, |x|, any of them
//! followed by an affine map such as batch normalisation) is `a·(u − u0) + n·|u − u0| + c`
//! for the pre-activation u. The linear half needs no lookup: when u is a dense layer
//! `h·W1 + b1` of an encrypted h and the activation feeds another dense layer W2, the
//! composition `h·(W1·diag(a)·W2)` is one more clear matrix on h, quantized with the rest
//! of the layer. Only |u − u0| needs a bootstrap, and |·| is anti-periodic, so it is read
//! on the whole torus (`Op::AbsEnc`): 2^(p+1) buckets at the cost of a p-bit lookup,
//! twice the resolution of a ReLU table (whose negative half would all read 0), and its
//! rounding error is halved by the factor n = ½ of a ReLU.
//!
//! The next layer then reads [h, |u − u0|] concatenated. Its weights on h are a product of
//! real matrices, quantized once, so nothing is lost to an intermediate requantization;
//! h is what the first layer read, so the noise is that of a dense layer with K + M
//! inputs.

use super::*;

/// A dense layer as the quantizer built it: its encrypted input and real weights, kept
/// so that a following layer can compose with it.
#[derive(Clone, Debug)]
pub(super) struct DenseSource {
    /// The float node (for its calibrated range).
    pub float: NodeId,
    /// Its integer output v in the quantized graph.
    pub node: NodeId,
    /// The encrypted input h, [K] per sample.
    pub x: Quantized,
    /// Real weights [K, M] on h's real values, and bias [M].
    pub w: Array2<f64>,
    pub bias: Vec<f64>,
    /// Real value of the layer's integer output v: scale ⊙ v + offset, [M].
    pub scale: Vec<f64>,
    pub offset: Vec<f64>,
}

/// `f(v) = a·(v − v0) + n·|v − v0| + k0` on the integer v of the source, per element.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct Kink {
    pub a: f64,
    pub n: f64,
    pub v0: f64,
    pub k0: f64,
}

/// The kink form of `f` if it has one on [−3r, 3r] (r > 0: the source's widest |v|),
/// checked at 65 evenly spaced points and 4 beside the kink, to a relative 1e-7.
pub(super) fn kink_of(f: impl Fn(f64) -> f64, r: f64) -> Option<Kink> {
    let slope = |x0: f64, x1: f64| (f(x1) - f(x0)) / (x1 - x0);
    let (m1, m2) = (slope(-3.0 * r, -2.0 * r), slope(2.0 * r, 3.0 * r));
    if !(m1.is_finite() && m2.is_finite()) || (m2 - m1).abs() <= 1e-9 * (m1.abs() + m2.abs()) {
        return None;
    }
    // where the two outer lines meet
    let (b1, b2) = (f(-3.0 * r) + 3.0 * r * m1, f(3.0 * r) - 3.0 * r * m2);
    let v0 = (b2 - b1) / (m1 - m2);
    if !v0.is_finite() || v0.abs() > 2.0 * r {
        return None;
    }
    let k = Kink { a: (m1 + m2) / 2.0, n: (m2 - m1) / 2.0, v0, k0: f(v0) };
    let model = |v: f64| k.a * (v - v0) + k.n * (v - v0).abs() + k.k0;
    let tol = 1e-7 * ((k.a.abs() + k.n.abs()) * 3.0 * r + k.k0.abs());
    let probes =
        (0..=64).map(|i| -3.0 * r + 6.0 * r * i as f64 / 64.0).chain([v0 - 1.0, v0 + 1.0, v0 - r / 1e3, v0 + r / 1e3]);
    probes.into_iter().all(|v| (f(v) - model(v)).abs() <= tol).then_some(k)
}

impl Quantizer<'_> {
    /// `y = P(u)·W2 + b2` for float dense node `id`, when its operand P is a pending
    /// one-kink function of a dense layer's output u (see the module doc); `None` when it
    /// is not, and the caller tabulates P as usual.
    pub(super) fn compose_kink(
        &mut self,
        id: NodeId,
        operand: NodeId,
        w2: &Array2<f64>,
        b2: &[f64],
    ) -> Result<Option<QVal>> {
        let QVal::Fn(p) = self.val(operand) else { return Ok(None) };
        let Some(src) = self.dense_src.get(&p.src).cloned() else { return Ok(None) };
        let m = src.scale.len();
        if self.sample_dims(operand) != [m] || w2.nrows() != m {
            return Ok(None);
        }
        let r = self.enc_range(p.src);
        let widest = (r.lo.unsigned_abs().max(r.hi.unsigned_abs()) as f64).max(1.0);
        let tlu = Tlu { expr: p.expr.clone(), input: r, params: p.params.clone(), rounding: 0, label: String::new() };
        let params = tlu.element_params(&[m]).map_err(|e| self.err(id, e))?;
        let mut kinks = Vec::with_capacity(m);
        for pe in &params {
            match kink_of(|v| p.expr.eval(v, pe), widest) {
                Some(k) if k.n != 0.0 => kinks.push(k),
                _ => return Ok(None),
            }
        }
        // Each element's calibrated reach from its kink, in real units.
        let Some(ranges) = self.calib.features.get(&src.float).filter(|r| r.len() == m).cloned() else {
            return Ok(None);
        };
        let reach: Vec<f64> = (0..m)
            .map(|e| {
                let u0 = src.scale[e] * kinks[e].v0 + src.offset[e];
                (ranges[e].0 - u0).abs().max((ranges[e].1 - u0).abs())
            })
            .collect();
        // The layer re-quantized with a scale per element that brings its reach to one
        // target: the lookup then resolves every element with most of its buckets (see
        // `fill_source`), where power-of-two scales left the widest with half of them.
        let Some((source, target)) = self.fill_source(&src, &reach)? else { return Ok(None) };
        for (e, k) in kinks.iter_mut().enumerate() {
            // old integer = ratio·new + (new offset − old offset)/old scale
            let ratio = source.scale[e] / src.scale[e];
            let shift = (source.offset[e] - src.offset[e]) / src.scale[e];
            *k = Kink { a: k.a * ratio, n: k.n * ratio, v0: (k.v0 - shift) / ratio, k0: k.k0 };
        }
        let src = source;
        // Integer shift putting each kink at (within half an integer of) 0.
        let c: Vec<i64> = kinks.iter().map(|k| k.v0.round() as i64).collect();
        let widest = target * (1.0 + 2.0 * self.margin.max(0.0));
        // keep act_bits of |v − c|: more would only widen the next layer's integer weights
        // on its other inputs
        let shift = (64 - (widest.ceil() as u64).leading_zeros()).saturating_sub(self.cfg.act_bits);
        let name = self.g.node(operand).name.clone();
        let shifted = Linear::new(
            LinearKind::Scale { factor: ArrayD::ones(vec![m]) },
            ArrayD::from_shape_vec(vec![m], c.iter().map(|&v| -v).collect()).expect("one per element"),
            "kink",
        );
        let v = self.out.add(Op::Linear(Box::new(shifted)), &[src.node], format!("{name}_kink"))?;
        let abs = self.out.add(Op::AbsEnc { rounding: shift, shift }, &[v], format!("{name}_abs"))?;
        // P ≈ a·(u − u0) + k0 + n·2^shift·abs, with u = s·v + o and u0 = s·v0 + o.
        let lam: Vec<f64> = kinks.iter().zip(&src.scale).map(|(k, s)| k.a / s).collect();
        let konst: Vec<f64> =
            kinks.iter().enumerate().map(|(e, k)| k.k0 - lam[e] * (src.scale[e] * k.v0 + src.offset[e])).collect();
        let k_in = src.w.nrows();
        let mut w = Array2::zeros((k_in + m, w2.ncols()));
        let lw = Array2::from_shape_fn((m, w2.ncols()), |(e, j)| lam[e] * w2[[e, j]]);
        w.slice_mut(ndarray::s![..k_in, ..]).assign(&src.w.dot(&lw));
        w.slice_mut(ndarray::s![k_in.., ..]).assign(w2);
        let bias: Vec<f64> = (0..w2.ncols())
            .map(|j| b2[j] + (0..m).map(|e| (lam[e] * src.bias[e] + konst[e]) * w2[[e, j]]).sum::<f64>())
            .collect();
        let (Some(x_scale), Some(x_offset)) =
            (src.x.scale.broadcast(IxDyn(&[k_in])), src.x.offset.broadcast(IxDyn(&[k_in])))
        else {
            return Ok(None);
        };
        let unit = 2f64.powi(shift as i32);
        let scale: Vec<f64> = x_scale.iter().copied().chain(kinks.iter().map(|k| k.n * unit)).collect();
        let offset: Vec<f64> = x_offset.iter().copied().chain(std::iter::repeat_n(0.0, m)).collect();
        let both = self.out.add(Op::Concat { axis: 1 }, &[src.x.node, abs], format!("{name}_and_input"))?;
        let x = Quantized {
            node: both,
            scale: ArrayD::from_shape_vec(vec![k_in + m], scale).expect("one per input"),
            offset: ArrayD::from_shape_vec(vec![k_in + m], offset).expect("one per input"),
        };
        // its scales are `fill_source`'s now: no fill factor of the search applies to it
        self.filled.retain(|&l| l != src.float);
        self.dense_over(id, x, vec![k_in + m], w, bias).map(Some)
    }
}

impl Quantizer<'_> {
    /// Dense layer `src` re-quantized with one scale per output element, so that every
    /// element's reach from its kink (`reach`, real units) spans the same integer target
    /// T: the |u − u0| read then uses most of its buckets for every element. T is
    /// [`WINDOW_SHARE`]·2^j over (1 + 2·margin), since the compiled range widens the
    /// calibrated span (±T) by the margin on each side; j is the smallest with T at least
    /// the widest element's reach at the present scales, so no element's weights get
    /// coarser, and an element is made at most 4× finer (a narrow one keeps a shorter
    /// reach). With power-of-two scales and integer factors the reads reached 0.56–0.70 of
    /// their buckets on the digits MLP. The new layer is not centred: its offset is
    /// W·offset(h) + b. Returns the new source and T.
    /// `None` (the activation is then tabulated) without a finite margin.
    fn fill_source(&mut self, src: &DenseSource, reach: &[f64]) -> Result<Option<(DenseSource, f64)>> {
        if !self.margin.is_finite() {
            return Ok(None);
        }
        let (m, k_in) = (src.scale.len(), src.w.nrows());
        let widest = reach.iter().zip(&src.scale).map(|(r, s)| r / s).fold(1.0, f64::max);
        // the compiled range adds the margin on both sides of the whole tensor's span
        let fit = WINDOW_SHARE / (1.0 + 2.0 * self.margin.max(0.0));
        let target = fit * 2f64.powf((widest / fit).log2().ceil());
        let scale: Vec<f64> = (0..m).map(|e| (reach[e] / target).max(src.scale[e] / 4.0)).collect();
        let (Some(x_scale), Some(x_offset)) =
            (src.x.scale.broadcast(IxDyn(&[k_in])), src.x.offset.broadcast(IxDyn(&[k_in])))
        else {
            return Ok(None);
        };
        let eff = Array2::from_shape_fn((m, k_in), |(e, k)| src.w[[k, e]] * x_scale[k]);
        let q = scales::round_rows(&eff, &scale);
        let offset: Vec<f64> =
            (0..m).map(|e| src.bias[e] + (0..k_in).map(|k| x_offset[k] * src.w[[k, e]]).sum::<f64>()).collect();
        let lin = Linear::new(LinearKind::Dense { weights: q }, ArrayD::zeros(vec![]), "dense");
        let name = format!("{}_filled", self.g.node(src.float).name);
        let node = self.out.add(Op::Linear(Box::new(lin)), &[src.x.node], name)?;
        Ok(Some((DenseSource { node, scale, offset, ..src.clone() }, target)))
    }
}

impl Quantizer<'_> {
    /// A pending ReLU-like function of one encrypted tensor as `n·(α·(v − c) + β·|v − c|)
    /// + k` per element, with |·| read on the whole torus: ReLU (α = β = 1), a ReLU of −v
    /// (α = −1) or |v| (α = 0), each possibly followed by a per-element affine map; an
    /// element whose kink lies beyond the source's range is affine there (α = 2, β = 0).
    /// One lookup per element, as a table would take, but twice the buckets and half the
    /// error (see the module doc), and exact beyond the calibrated range. The result
    /// keeps the source's integer scale, so it is taken only while the source is under
    /// 2^[`KINK_SOURCE_BITS`] (each linear layer after it adds weight and sum bits).
    /// `None` when the function is not of that form (then it is tabulated).
    pub(super) fn tabulate_kink(&mut self, id: NodeId, p: &Pending) -> Result<Option<Quantized>> {
        let r = self.enc_range(p.src);
        let widest = r.lo.unsigned_abs().max(r.hi.unsigned_abs()).max(1);
        if widest >= 1 << KINK_SOURCE_BITS || self.placement.kink_tables {
            return Ok(None);
        }
        let dims = self.sample_dims(id);
        if sample_dims(&self.out.node(p.src).ty.shape) != dims {
            return Ok(None);
        }
        let tlu = Tlu { expr: p.expr.clone(), input: r, params: p.params.clone(), rounding: 0, label: String::new() };
        let params = tlu.element_params(&dims).map_err(|e| self.err(id, e))?;
        // parameters are usually per channel: fit each distinct function once
        let mut found: HashMap<Vec<u64>, Option<KinkTerms>> = HashMap::new();
        let mut terms = Vec::with_capacity(params.len());
        for pe in &params {
            let key: Vec<u64> = pe.iter().map(|v| v.to_bits()).collect();
            let fit = found.entry(key).or_insert_with(|| kink_terms(|v| p.expr.eval(v, pe), r));
            match fit {
                Some(t) => terms.push(*t),
                None => return Ok(None),
            }
        }
        snap_scales(&mut terms);
        if terms.iter().all(|t| t.beta == 0) {
            // affine on the whole range: the source itself, rescaled (no lookup)
            let (scale, offset) =
                (per_element(&dims, &terms, |t| t.alpha as f64 * t.n), per_element(&dims, &terms, |t| t.k));
            return Ok(Some(Quantized { node: p.src, scale, offset }));
        }
        let ints = |f: fn(&KinkTerms) -> i64| per_element(&dims, &terms, f);
        let reals = |f: fn(&KinkTerms) -> f64| per_element(&dims, &terms, f);
        let name = self.g.node(id).name.clone();
        let scale = |out: &mut Graph, x: NodeId, factor: ArrayD<i64>, bias: ArrayD<i64>, tag: &str| -> Result<NodeId> {
            let lin = Linear::new(LinearKind::Scale { factor }, bias, tag);
            Ok(out.add(Op::Linear(Box::new(lin)), &[x], format!("{name}_{tag}"))?)
        };
        let v = scale(&mut self.out, p.src, ArrayD::from_elem(vec![], 1), ints(|t| -t.c), "kink")?;
        let linear = terms.iter().any(|t| t.alpha != 0).then(|| match terms.iter().all(|t| t.alpha == 1) {
            true => Ok(v),
            false => scale(&mut self.out, v, ints(|t| t.alpha), ArrayD::zeros(dims.clone()), "linear"),
        });
        let linear = linear.transpose()?;
        let abs = self.out.add(Op::AbsEnc { rounding: 0, shift: 0 }, &[v], format!("{name}_abs"))?;
        let abs = match terms.iter().all(|t| t.beta == 1) {
            true => abs,
            false => scale(&mut self.out, abs, ints(|t| t.beta), ArrayD::zeros(dims.clone()), "kinked")?,
        };
        let node = match linear {
            Some(l) => self.out.add(Op::AddEnc, &[l, abs], name)?,
            None => abs,
        };
        Ok(Some(Quantized { node, scale: reals(|t| t.n), offset: reals(|t| t.k) }))
    }
}

/// One value per element, of the per-sample shape `dims`.
fn per_element<T>(dims: &[usize], terms: &[KinkTerms], f: impl Fn(&KinkTerms) -> T) -> ArrayD<T> {
    ArrayD::from_shape_vec(dims.to_vec(), terms.iter().map(f).collect()).expect("one per element")
}

/// Scales n that differ only by float rounding (slopes found by finite differences, per
/// element at a padded border) are made equal, so that consumers needing one scale per
/// channel (max pooling, convolutions) see one.
fn snap_scales(terms: &mut [KinkTerms]) {
    let mut seen: Vec<f64> = Vec::new();
    for t in terms.iter_mut() {
        match seen.iter().find(|&&n| (n - t.n).abs() <= 1e-9 * n.abs().max(t.n.abs())) {
            Some(&n) => t.n = n,
            None => seen.push(t.n),
        }
    }
}

/// One element's `f(v) ≈ n·(α·(v − c) + β·|v − c|) + k` (see [`Quantizer::tabulate_kink`]),
/// with n ≥ 0, so that a larger integer is a larger value (max pooling compares integers).
#[derive(Clone, Copy, Debug, PartialEq)]
struct KinkTerms {
    c: i64,
    alpha: i64,
    beta: i64,
    n: f64,
    k: f64,
}

/// [`KinkTerms`] of `f` on the integer range `r`: a kink inside `r` with slopes a ± n and
/// a/n ∈ {−1, 0, 1}, or `f` affine on `r`. The kink is put at the nearest integer c; the
/// offset k = f(v0) + a·(c − v0) splits the move between both sides, so f moves by at
/// most |n|/2 anywhere.
fn kink_terms(f: impl Fn(f64) -> f64, r: Range) -> Option<KinkTerms> {
    let widest = r.lo.unsigned_abs().max(r.hi.unsigned_abs()).max(1) as f64;
    if let Some(k) = kink_of(&f, widest) {
        let ratio = k.a / k.n;
        let alpha = ratio.round();
        let inside = k.v0 > r.lo as f64 && k.v0 < r.hi as f64;
        if inside && alpha.abs() <= 1.0 && (ratio - alpha).abs() <= 1e-9 {
            let c = k.v0.round() as i64;
            let offset = k.k0 + k.a * (c as f64 - k.v0);
            // n < 0 (a negative batch-norm scale after a ReLU): the integer carries the sign
            let (sign, n) = if k.n < 0.0 { (-1, -k.n) } else { (1, k.n) };
            return Some(KinkTerms { c, alpha: sign * alpha as i64, beta: sign, n, k: offset });
        }
    }
    // affine on r: f(v) = s·v + b, as n·(2v) + b with n = s/2 (no |·| term)
    let (lo, hi) = (r.lo as f64, r.hi as f64);
    let s = if hi > lo { (f(hi) - f(lo)) / (hi - lo) } else { 0.0 };
    let b = f(lo) - s * lo;
    let tol = 1e-7 * (s.abs() * widest + b.abs()).max(f64::MIN_POSITIVE);
    let affine = (0..=16).map(|i| lo + (hi - lo) * i as f64 / 16.0).all(|v| (f(v) - (s * v + b)).abs() <= tol);
    let (alpha, n) = if s < 0.0 { (-2, -s / 2.0) } else { (2, s / 2.0) };
    affine.then_some(KinkTerms { c: 0, alpha, beta: 0, n, k: b })
}

/// Widest source (bits of its largest |v|) whose ReLU-like functions [`Quantizer::tabulate_kink`]
/// keeps at the source's scale: a dense or convolution layer after it adds 15–20 bits
/// (8-bit weights, sums of hundreds to thousands); past it a table resets the scale. A
/// chain that still overflows fails to quantize, and the search falls back to tables.
const KINK_SOURCE_BITS: u32 = 24;

/// The share of a power of two a composed kink's compiled reach is brought to. A
/// whole-torus read of p bits resolves buckets within ±(2^p − 1) of the kink, half a
/// bucket kept for rounding: 0.81 of 2^p at p = 3, 0.91 at 4, 0.95 at 5. The narrowed
/// range overshoots the margin's estimate by a few percent (rounded kinks, a span a
/// little over 2T), so 0.8 leaves every p ≥ 4 room.
const WINDOW_SHARE: f64 = 0.8;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_kink_of_relu_like_functions() {
        let relu = |v: f64| (0.5 * v - 3.0).max(0.0);
        let k = kink_of(relu, 100.0).unwrap();
        assert!((k.v0 - 6.0).abs() < 1e-9 && (k.a - 0.25).abs() < 1e-12 && (k.n - 0.25).abs() < 1e-12);
        let leaky = |v: f64| if v > 1.0 { 2.0 * (v - 1.0) } else { 0.02 * (v - 1.0) } + 7.0;
        let k = kink_of(leaky, 10.0).unwrap();
        assert!((k.v0 - 1.0).abs() < 1e-9 && (k.k0 - 7.0).abs() < 1e-9);
        assert!((k.a - 1.01).abs() < 1e-9 && (k.n - 0.99).abs() < 1e-9);
        let abs = |v: f64| (v + 2.0).abs();
        assert!(kink_of(abs, 10.0).is_some_and(|k| k.a.abs() < 1e-12 && (k.n - 1.0).abs() < 1e-12));
    }

    #[test]
    fn refuses_smooth_and_doubly_kinked_functions() {
        assert!(kink_of(|v: f64| v.clamp(0.0, 6.0), 10.0).is_none(), "relu6 has two kinks");
        assert!(kink_of(|v: f64| 1.0 / (1.0 + (-v).exp()), 10.0).is_none());
        assert!(kink_of(|v: f64| 3.0 * v + 1.0, 10.0).is_none(), "affine: nothing to read");
        // GELU is ReLU-like far out but not piecewise linear
        assert!(kink_of(|v: f64| 0.5 * v * (1.0 + (v / 2f64.sqrt()).tanh()), 10.0).is_none());
    }

    #[test]
    fn kink_terms_rebuild_relu_like_functions_on_integers() {
        let r = Range::new(-300, 500);
        let rebuilt =
            |t: &KinkTerms, v: i64| t.n * (t.alpha * (v - t.c)) as f64 + t.n * (t.beta * (v - t.c).abs()) as f64 + t.k;
        let check = |f: &dyn Fn(f64) -> f64, alpha: i64, beta: i64| {
            let t = kink_terms(f, r).expect("ReLU-like");
            assert_eq!((t.alpha, t.beta), (alpha, beta), "{t:?}");
            for v in r.lo..=r.hi {
                // the kink moves to the nearest integer: f moves by at most n/2
                assert!(t.n >= 0.0, "{t:?}");
                assert!((rebuilt(&t, v) - f(v as f64)).abs() <= t.n / 2.0 + 1e-9, "v {v}: {t:?}");
            }
        };
        // ReLU then batch norm with a negative scale, at a kink between integers: the
        // integer carries the sign, so that it grows with the value
        check(&|v| -0.3 * (0.01 * v - 0.555).max(0.0) + 2.0, -1, -1);
        check(&|v| (2.0 - 0.1 * v).max(0.0), -1, 1);
        check(&|v| 0.5 * (v - 7.0).abs(), 0, 1);
        // kinks beyond the range: a dead and an always active unit are affine there
        check(&|v| (0.01 * v - 9.0).max(0.0) + 1.5, 2, 0);
        check(&|v| (0.01 * v + 9.0).max(0.0), 2, 0);
        check(&|v| -(0.01 * v + 9.0).max(0.0), -2, 0);
        // leaky ReLU is not n·(α·x + |x|) with an integer α; sigmoid has no kink
        assert!(kink_terms(|v| if v > 0.0 { v } else { 0.1 * v }, r).is_none());
        assert!(kink_terms(|v| 1.0 / (1.0 + (-0.01 * v).exp()), r).is_none());
    }
}
