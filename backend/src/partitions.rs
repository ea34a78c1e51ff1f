//! Several parameter sets in one circuit ("partitions"): lookups of different precisions
//! bootstrap with different keys, so a few wide lookups no longer make every narrow one
//! pay for a large polynomial. Each partition q has its own large key (GLWE, dimension
//! k·N), small key n, bootstrap key and keyswitch; a lookup of partition q reading a
//! value under partition p's large key keyswitches it with a conversion key p → q (large
//! key of p to small key of q). The noise model is the single set's, applied per
//! partition: a lookup of q reading coefficients c under key p sees
//! c·(bootstrap, fresh noise of p) + keyswitch p→q + modulus switch of q.
//!
//! The search starts from the best single set (every partition using it, which is
//! feasible) and improves one partition at a time with the others fixed, choosing every
//! keyswitch decomposition as the cheapest that fits, until no change lowers the modelled
//! cost: a coordinate descent on the same cost model as [`crate::params::optimize`].

use crate::noise;
use crate::params::{
    best_bases, bootstrap_key_bytes, keyswitch_cost_ms, keyswitch_key_bytes, lookup_cost_ms, rotation_cost_ms,
    sample_cost, Conversion, Decomposition, Params, Requirements,
};
use crate::security::{key_variance, MIN_DIMENSION};
use std::collections::HashMap;

/// One partition's blind-rotation parameters.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Set {
    n: u64,
    k: u64,
    poly: u64,
    pbs_base_log: u32,
    pbs_level: u32,
    var_bootstrap: f64,
}

impl Set {
    fn big(&self) -> u64 {
        self.k * self.poly
    }
}

/// A full assignment's modelled cost and keyswitch decompositions `[from][to]`.
struct Evaluation {
    cost: f64,
    keyswitch: Vec<Vec<Option<Decomposition>>>,
}

struct Search<'a> {
    req: &'a Requirements,
    /// Largest variance at each partition's lookup inputs.
    lookup_max: Vec<f64>,
    ks_cache: HashMap<(u64, u64), Vec<Decomposition>>,
}

impl Search<'_> {
    fn decompositions(&mut self, big: u64, n: u64) -> Vec<Decomposition> {
        self.ks_cache.entry((big, n)).or_insert_with(|| best_bases(12, |b, l| noise::keyswitch(big, n, b, l))).clone()
    }

    /// Cost and keyswitches of `sets`, or `None` when some lookup or output misses its
    /// noise budget.
    fn evaluate(&mut self, sets: &[Set]) -> Option<Evaluation> {
        let parts = &self.req.partitions;
        let p_error = self.req.p_error;
        // outputs decrypt exactly under their key
        for (q, part) in parts.iter().enumerate() {
            let (var_bs, var_fresh) = (sets[q].var_bootstrap, key_variance(sets[q].big()));
            for &i in &part.outputs {
                let (c, hw) = self.req.outputs[i];
                if c.variance(var_bs, var_fresh) > noise::max_variance(hw, p_error) {
                    return None;
                }
            }
        }
        let np = sets.len();
        let mut keyswitch = vec![vec![None; np]; np];
        let mut cost = 0.0;
        for (to, part) in parts.iter().enumerate() {
            let dst = sets[to];
            let var_ms = noise::centered_modulus_switch(dst.n, dst.poly);
            let var_small = key_variance(dst.n);
            cost += part.lookups as f64 * rotation_cost_ms(dst.n, dst.k, dst.poly, dst.pbs_level);
            for (from, src) in sets.iter().enumerate() {
                let count = part.keyswitches_from.get(from).copied().unwrap_or(0);
                if count == 0 && from != to {
                    continue;
                }
                // the keyswitch may add what the worst lookup reading this key leaves
                let mut slack = f64::INFINITY;
                for (f, c) in &part.lookup_noise {
                    if *f != from {
                        continue;
                    }
                    let rest = c.variance_all(src.var_bootstrap, key_variance(src.big()), 0.0, var_small) + var_ms;
                    let room = (self.lookup_max[to] - rest) / c.keyswitched.max(1.0);
                    slack = slack.min(room);
                }
                if slack <= 0.0 {
                    return None;
                }
                let d = self.decompositions(src.big(), dst.n).into_iter().find(|&(_, _, v)| v <= slack)?;
                cost += count as f64 * keyswitch_cost_ms(dst.n, 1, src.big(), d.1);
                keyswitch[from][to] = Some(d);
            }
        }
        Some(Evaluation { cost, keyswitch })
    }

    /// Every candidate set for partition `q` (bootstrap decompositions at their best base).
    fn candidates(&self, q: usize) -> Vec<Set> {
        let p = self.req.partitions[q].precision;
        let mut out = Vec::new();
        for k in 1..=3u64 {
            for log_n in 8..=16u32 {
                let poly = 1u64 << log_n;
                if poly < 1 << (p + 1) || k * poly < MIN_DIMENSION || k * poly > 1 << 16 {
                    continue;
                }
                for n in (MIN_DIMENSION..=1600).step_by(8) {
                    if noise::centered_modulus_switch(n, poly) > self.lookup_max[q] {
                        continue;
                    }
                    for (pb, pl, var) in best_bases(4, |b, l| noise::bootstrap(n, k, poly, b, l)) {
                        out.push(Set { n, k, poly, pbs_base_log: pb, pbs_level: pl, var_bootstrap: var });
                    }
                }
            }
        }
        out
    }
}

/// Parameters with one set per partition of `req` when they cost less (modelled) than
/// `single`, the best single set for the whole circuit; `None` otherwise (or when `req`
/// has one partition).
pub fn optimize(req: &Requirements, single: &Params) -> Option<(Params, f64)> {
    let parts = &req.partitions;
    if parts.len() < 2 || !single.has_lookups() {
        return None;
    }
    let lookup_max: Vec<f64> =
        parts.iter().map(|p| noise::max_variance(noise::lookup_half_width(p.precision), req.p_error)).collect();
    let mut search = Search { req, lookup_max, ks_cache: HashMap::new() };
    let start = Set {
        n: single.lwe_dimension,
        k: single.glwe_dimension,
        poly: single.polynomial_size,
        pbs_base_log: single.pbs_base_log,
        pbs_level: single.pbs_level,
        var_bootstrap: single.bootstrap_variance(),
    };
    let mut sets = vec![start; parts.len()];
    let mut best = search.evaluate(&sets)?;
    let candidates: Vec<Vec<Set>> = (0..parts.len()).map(|q| search.candidates(q)).collect();
    for _round in 0..4 {
        let mut improved = false;
        for q in 0..parts.len() {
            for &c in &candidates[q] {
                let mut trial = sets.clone();
                trial[q] = c;
                if let Some(e) = search.evaluate(&trial) {
                    if e.cost < best.cost * (1.0 - 1e-9) {
                        best = e;
                        sets = trial;
                        improved = true;
                    }
                }
            }
        }
        if !improved {
            break;
        }
    }
    let single_cost = sample_cost(
        &Requirements { partitions: Vec::new(), ..req.clone() },
        single.lwe_dimension,
        single.glwe_dimension,
        single.polynomial_size,
        single.pbs_level,
        single.ks_level,
    );
    // several sets cost more keys and keygen: worth it for a clear gain only
    if best.cost > 0.9 * single_cost {
        return None;
    }
    Some((build(req, &sets, &best), best.cost))
}

/// The parameters of an assignment: set 0 holds the others and the conversion keys.
/// Failure probabilities are then read off the parameters' own noise formulas.
fn build(req: &Requirements, sets: &[Set], e: &Evaluation) -> Params {
    let parts = &req.partitions;
    let mut all: Vec<Params> = sets
        .iter()
        .enumerate()
        .map(|(q, s)| {
            let (kb, kl, _) = e.keyswitch[q][q].expect("every partition has its own keyswitch");
            let big = s.big();
            Params {
                lwe_dimension: s.n,
                glwe_dimension: s.k,
                polynomial_size: s.poly,
                pbs_base_log: s.pbs_base_log,
                pbs_level: s.pbs_level,
                ks_base_log: kb,
                ks_level: kl,
                lwe_noise_std: key_variance(s.n).sqrt(),
                glwe_noise_std: key_variance(big).sqrt(),
                precision: parts[q].precision,
                p_error: 0.0,
                global_p_error: 0.0,
                pbs_cost_ms: lookup_cost_ms(s.n, s.k, s.poly, s.pbs_level, kl),
                bootstrap_key_bytes: bootstrap_key_bytes(s.n, s.k, s.poly, s.pbs_level),
                keyswitch_key_bytes: keyswitch_key_bytes(big, kl, s.n),
                partitions: Vec::new(),
                conversions: Vec::new(),
                products: Default::default(),
            }
        })
        .collect();
    let mut conversions = Vec::new();
    for (from, row) in e.keyswitch.iter().enumerate() {
        for (to, d) in row.iter().enumerate() {
            if let (true, Some((b, l, _))) = (from != to, d) {
                conversions.push(Conversion { from: from as u32, to: to as u32, base_log: *b, level: *l });
            }
        }
    }
    let mut first = all.remove(0);
    first.partitions = all;
    first.conversions = conversions;
    // each set's worst lookup, as the noise model predicts it
    let p_errors: Vec<f64> = parts
        .iter()
        .enumerate()
        .map(|(q, part)| {
            let worst = part
                .lookup_noise
                .iter()
                .map(|(from, c)| first.lookup_input_variance_between(*from, q, c))
                .fold(0.0, f64::max);
            noise::p_error(worst, noise::lookup_half_width(part.precision))
        })
        .collect();
    let mut global_ok = 1.0;
    for (q, (&p_err, part)) in p_errors.iter().zip(parts).enumerate() {
        let per_sample = 1.0 - (1.0 - p_err).powf(part.lookups as f64);
        global_ok *= 1.0 - per_sample;
        let set = if q == 0 { &mut first } else { &mut first.partitions[q - 1] };
        set.p_error = p_err;
        set.global_p_error = per_sample;
    }
    first.global_p_error = 1.0 - global_ok;
    first
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::params::{optimize as optimize_single, NoiseCoefs, PartitionRequirements};

    /// 64 narrow lookups (3 bits) reading fresh inputs feed 8 wide ones (7 bits) reading
    /// sums of 8 of them; the wide outputs are decrypted.
    fn two_classes() -> Requirements {
        let narrow_in = NoiseCoefs { fresh: 1.0, keyswitched: 1.0, ..Default::default() };
        let wide_in = NoiseCoefs { bootstrapped: 8.0, keyswitched: 1.0, ..Default::default() };
        let out = NoiseCoefs { bootstrapped: 1.0, ..Default::default() };
        Requirements {
            precision: 7,
            lookups: 72,
            keyswitches: 72,
            lookup_noise: vec![narrow_in, wide_in],
            outputs: vec![(out, 2f64.powi(-20))],
            p_error: 2f64.powi(-40),
            partitions: vec![
                PartitionRequirements {
                    precision: 3,
                    lookups: 64,
                    keyswitches_from: vec![64, 0],
                    lookup_noise: vec![(0, narrow_in)],
                    outputs: vec![],
                },
                PartitionRequirements {
                    precision: 7,
                    lookups: 8,
                    keyswitches_from: vec![8, 0],
                    lookup_noise: vec![(0, wide_in)],
                    outputs: vec![0],
                },
            ],
            products: Default::default(),
        }
    }

    #[test]
    fn two_sets_meet_every_budget_and_cost_less_than_one() {
        let req = two_classes();
        let single = optimize_single(&Requirements { partitions: Vec::new(), ..req.clone() }).unwrap();
        let (p, cost) = optimize(&req, &single).expect("two sets are cheaper here");
        assert_eq!(p.set_count(), 2);
        assert!(p.is_secure() && p.partitions[0].is_secure(), "{p:?}");
        assert!(p.validate().is_ok(), "{:?}", p.validate());
        let single_cost = 72.0 * single.pbs_cost_ms;
        assert!(cost < 0.5 * single_cost, "two sets {cost} ms, one {single_cost} ms");
        // every lookup, recomputed from the parameters (Params' own noise formulas),
        // stays within its partition's budget
        for (q, part) in req.partitions.iter().enumerate() {
            for (from, c) in &part.lookup_noise {
                let var = p.lookup_input_variance_between(*from, q, c);
                let perr = noise::p_error(var, noise::lookup_half_width(part.precision));
                assert!(perr <= req.p_error * 1.0001, "set {q}: p_error {perr:e}");
            }
        }
        // the decrypted output under set 1's key reads exactly
        let (c, hw) = req.outputs[0];
        let s1 = p.set(1);
        assert!(c.variance(s1.bootstrap_variance(), s1.fresh_variance()) <= noise::max_variance(hw, req.p_error));
    }

    #[test]
    fn one_partition_keeps_one_set() {
        let mut req = two_classes();
        req.partitions.truncate(1);
        let single = optimize_single(&req).unwrap();
        assert!(optimize(&req, &single).is_none());
    }
}
