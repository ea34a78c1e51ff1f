//! The bit-width search for tree ensembles: how many cuts each feature keeps.
//!
//! A tree circuit has no accumulators to narrow and no activations to round: what the
//! search chooses is the rank width. Lossless ranks (every cut kept) make the integer
//! trees take the float trees' branches exactly; they are tried first when they fit in
//! [`CHEAP_BITS`] (lookups up to that width cost about the same here), else the search
//! thins the cuts to `CHEAP_BITS`, then one bit more at a time up to lossless, and keeps
//! the first width that agrees with the float model within tolerance. At each width the
//! leaf lookups' budget (`act_bits`, see `trees::units`) is the one with the cheapest
//! circuit by the cost model: all budgets compute the same scores.

use crate::bitwidth::{max_precision, Compiled, Search, SearchOptions};
use crate::error::{PassError, Result};
use crate::fuse::count_lookups;
use crate::quantize::QuantConfig;
use veil_ir::Op;

/// Widest rank the search tries first (5-bit lookups cost about 1.4× 2-bit ones here;
/// 6-bit about 6×: see `veil_backend::params::typical_lookup_cost_ms`).
pub const CHEAP_BITS: u32 = 5;

/// Bits of the summed scores the client reads: far above the leaves' own precision in
/// any float model we have seen, and cheap to decrypt.
pub const SCORE_READ_BITS: u32 = 12;

/// Bits that rank every feature of every ensemble in `g` without losing a cut.
pub fn lossless_bits(g: &veil_ir::Graph) -> Result<u32> {
    let mut bits = 1;
    for id in g.node_ids() {
        if let Op::TreeEnsemble(e) = &g.node(id).op {
            let cuts = crate::trees::exact_cuts(&[e.as_ref()], e.n_features, &g.node(id).name)?;
            bits = bits.max(cuts.iter().map(|c| crate::trees::rank_bits(c.len())).max().unwrap_or(1));
        }
    }
    Ok(bits)
}

pub(crate) fn compile(mut s: Search, opts: &SearchOptions, metric_source: &'static str) -> Result<Compiled> {
    s.output_bits = SCORE_READ_BITS;
    let lossless = lossless_bits(s.g)?;
    let first = opts.n_bits.unwrap_or(lossless.min(CHEAP_BITS)).max(1);
    let last = opts.n_bits.unwrap_or(lossless.max(first)).max(first);
    let mut best: Option<(crate::model::QuantizedModel, crate::fuse::FuseReport, f64, QuantConfig, u32, bool)> = None;
    let last = if opts.client_tree_tests { first } else { last };
    for bits in first..=last {
        // the leaf lookups' budget: the cheapest circuit (they take a unit's children
        // along when that fits, halving their count at a wider read)
        let mut cfg = QuantConfig { input_bits: bits, weight_bits: 8, act_bits: 2 };
        let mut cheapest = f64::INFINITY;
        for unit_bits in 2..=CHEAP_BITS.min(opts.max_precision).max(2) {
            let c = QuantConfig { act_bits: unit_bits, ..cfg };
            let g = s.fused(c)?.0.graph;
            let cost = count_lookups(&g) as f64 * (opts.lookup_cost)(max_precision(&g));
            if cost < cheapest {
                (cheapest, cfg) = (cost, c);
            }
        }
        let p = max_precision(&s.fused(cfg)?.0.graph);
        if p > opts.max_precision {
            s.trials.push(s.record(cfg, p, 0, 0.0, false));
            break;
        }
        let (q, report, score, ok) = s.trial(cfg, p)?;
        if best.as_ref().is_none_or(|b| score > b.2) {
            best = Some((q, report, score, cfg, p, ok));
        }
        if ok {
            break;
        }
    }
    let Some((model, fuse, score, config, precision, ok)) = best else {
        return Err(PassError::Search(format!(
            "ranking the trees' features needs lookups wider than --max-precision {} allows",
            opts.max_precision
        )));
    };
    let below_tolerance = (!ok).then(|| {
        format!(
            "the encrypted trees agree with the float model at {score:.4}, below the tolerance {}: the features have more cuts than {} bits rank (allow wider lookups with --max-precision, or more error with --accuracy-tolerance)",
            opts.tolerance, config.input_bits
        )
    });
    if let (Some(msg), true) = (&below_tolerance, opts.strict) {
        return Err(PassError::Search(msg.clone()));
    }
    let unfused = s.fused(config)?.2;
    Ok(Compiled {
        model,
        config,
        precision,
        metric: s.metric,
        metric_source,
        score,
        fuse,
        trials: s.trials,
        calibration: s.calib,
        unfused,
        output_bits: SCORE_READ_BITS,
        below_tolerance,
        near_boundary: None,
        near_boundary_short: false,
        calibration_agreement: None,
        scored_near_boundary: false,
    })
}
