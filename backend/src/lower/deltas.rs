//! The scale of every encrypted value: delta = 2^d, as coarse as its readers allow.
//!
//! A coarse scale keeps noise small relative to the value, so each value gets the largest
//! d that every constraint on it allows:
//! - a lookup reading it with k low bits dropped: d ≤ 63 − p − k (slots 2^(63−p) apart);
//!   products and saturations read their operands the same way;
//! - a decrypted output: d ≤ 63 − bits(range), so the range fits below the padding bit;
//!   an output that takes only values in its range (tree scores, whose ranges are exact
//!   by construction) needs no padding bit, since only the client reads it: its noise
//!   stays under half its read step 2^r, so d ≤ 64 − bits(span + 2^r) leaves a gap
//!   between the largest and the smallest value it can decrypt to, and the client decodes
//!   around the middle of that gap (`OutputEncoding::decode_rows`): up to twice the room
//!   for noise;
//! - an affine op using it with weights whose 2-adic valuation is at least j: d ≤ d_out + j
//!   (2^j·w times a value at scale d_out + j is w times the same ciphertext).
//!
//! Constraints flow from readers back to operands, so one pass in reverse topological order
//! settles them. State pairs (an output fed back as an input) must share a scale: both take
//! the smaller and the pass runs again until nothing changes.

use super::err;
use crate::error::Result;
use std::collections::HashMap;
use veil_ir::{Graph, NodeId, Op};

/// A reader's demand on one operand.
pub(super) enum Demand {
    /// The operand is read by a bootstrap at scale 2^d (or a copy of it scaled up to that).
    Read(u32),
    /// The operand is a term of an affine result with weights divisible by 2^j (`None`:
    /// every weight is zero, no constraint).
    Affine(Option<u32>),
}

/// Bits a range spans.
pub(super) fn bits(span: i64) -> u32 {
    64 - (span.max(0) as u64).leading_zeros()
}

/// Scales for every node of `g`, in topological `order`. `demands(id)` lists what node
/// `id` asks of each of its operands (by operand position).
pub(super) fn assign(
    g: &Graph,
    order: &[NodeId],
    demands: &dyn Fn(NodeId) -> Vec<(usize, Demand)>,
    state: &[(NodeId, NodeId)],
    output_rounding: &[u32],
) -> Result<HashMap<NodeId, u32>> {
    let mut extra: HashMap<NodeId, u32> = HashMap::new();
    loop {
        let d = one_pass(g, order, demands, &extra, output_rounding)?;
        let mut changed = false;
        for &(input, output) in state {
            let (a, b) = (d[&input], d[&output]);
            if a != b {
                let m = a.min(b);
                for n in [input, output] {
                    let e = extra.entry(n).or_insert(m);
                    if *e > m {
                        *e = m;
                    }
                }
                changed = true;
            }
        }
        if !changed {
            return Ok(d);
        }
    }
}

/// Whether output `o` takes only values within its range: a sum of a tree circuit's
/// per-tree values (see `veil_passes::trees`), under the exact `assume` the trees give it
/// (and read by nothing else, so that it is encoded for that range).
pub(crate) fn exact_output(g: &Graph, o: NodeId) -> bool {
    let lin = match g.node(o).op {
        Op::Assume { .. } if g.users(g.operands(o)[0]) == [o] => g.operands(o)[0],
        Op::Assume { .. } => return false,
        _ => o,
    };
    matches!(&g.node(lin).op, Op::Linear(l) if l.label == veil_passes::trees::TREE_SUMS_LABEL)
}

/// The finest scale an output may have: below the padding bit, or for an exact output
/// read to multiples of 2^`rounding`, with a gap wider than its noise on the whole torus.
pub(crate) fn output_scale_bound(span: i64, exact: bool, rounding: u32) -> i64 {
    if exact {
        let guarded = span.max(0).saturating_add(1i64 << rounding.min(62));
        (64 - bits(guarded) as i64).min(62)
    } else {
        63 - bits(span) as i64
    }
}

fn one_pass(
    g: &Graph,
    order: &[NodeId],
    demands: &dyn Fn(NodeId) -> Vec<(usize, Demand)>,
    extra: &HashMap<NodeId, u32>,
    output_rounding: &[u32],
) -> Result<HashMap<NodeId, u32>> {
    // bound[n]: the largest d every constraint seen so far allows
    let mut bound: HashMap<NodeId, i64> = HashMap::new();
    let tighten = |bound: &mut HashMap<NodeId, i64>, n: NodeId, v: i64| {
        let e = bound.entry(n).or_insert(v);
        if *e > v {
            *e = v;
        }
    };
    for (i, o) in g.outputs().iter().enumerate() {
        let r = g.enc_range(o.node);
        let rounding = output_rounding.get(i).copied().unwrap_or(0);
        tighten(&mut bound, o.node, output_scale_bound(r.hi - r.lo, exact_output(g, o.node), rounding));
    }
    for (&n, &v) in extra {
        tighten(&mut bound, n, v as i64);
    }
    let mut d: HashMap<NodeId, u32> = HashMap::new();
    for &id in order.iter().rev() {
        let r = g.enc_range(id);
        // a value nothing constrains (dead, or clear) still gets a scale its range fits
        let own = bound.get(&id).copied().unwrap_or(62 - bits(r.hi - r.lo) as i64);
        if own < 0 {
            return Err(err(g, id, "no scale fits this value's range and its readers"));
        }
        d.insert(id, own as u32);
        let ops = g.operands(id);
        for (k, demand) in demands(id) {
            let Some(&o) = ops.get(k) else { continue };
            match demand {
                Demand::Read(t) => tighten(&mut bound, o, t as i64),
                Demand::Affine(Some(j)) => tighten(&mut bound, o, own + j as i64),
                Demand::Affine(None) => {}
            }
        }
    }
    // an assume reuses its operand's ciphertexts: it has the operand's scale
    for &id in order {
        if matches!(g.node(id).op, Op::Assume { .. }) {
            let src = g.operands(id)[0];
            let s = d[&src];
            d.insert(id, s);
        }
    }
    Ok(d)
}
