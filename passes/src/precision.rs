//! Lookup precision: how many low bits each rounded read drops to fit p bits, and how
//! many bits a graph's lookups need. The bit-width search sets one precision for all
//! lookups (`set_precision`); the backend reads it back (`max_precision`).

use crate::error::{PassError, Result};
use veil_ir::enc::abs_precision;
use veil_ir::tlu::lookup_precision;
use veil_ir::{Graph, NodeId, Op, Range};

/// Rounding (low bits dropped) for a lookup over `input` to need at most `p` bits; `None`
/// when no rounding fits (a rounded lookup needs at least 2 bits for its spare slots).
pub fn rounding_for(input: Range, p: u32) -> Option<u32> {
    (0..48).find(|&k| lookup_precision(entries(input, k), k) <= p)
}

/// Rounding for an `abs_enc` over `input` to need at most `p` bits (a whole-torus read:
/// see [`veil_ir::enc::abs_precision`]).
pub fn abs_rounding_for(input: Range, p: u32) -> Option<u32> {
    (0..63).find(|&k| abs_precision(input, k) <= p)
}

/// Buckets a range spans when read to multiples of 2^k (aligned, round half up).
pub fn entries(r: Range, k: u32) -> u64 {
    let step = 1i64 << k;
    let bucket = |v: i64| (v + step / 2).div_euclid(step);
    (bucket(r.hi) - bucket(r.lo)) as u64 + 1
}

/// Set every lookup's rounding so that none needs more than `p` bits, re-deriving ranges
/// downstream (a rounded max can overshoot by half a step).
pub fn set_precision(g: &Graph, p: u32) -> Result<Graph> {
    let (out, _) = g.rebuild(|out, id, ops| {
        let node = g.node(id);
        let op = match &node.op {
            Op::Tlu(t) => {
                let mut t = t.clone();
                t.input = out.enc_range(ops[0]);
                t.rounding = rounding_for(t.input, p).ok_or_else(|| too_narrow(p, &node.name))?;
                Op::Tlu(t)
            }
            Op::MaxEnc { diff, .. } => {
                let d = diff.unwrap_or_else(|| out.enc_range(ops[0]).minus(&out.enc_range(ops[1])));
                let rounding = rounding_for(d, p).ok_or_else(|| too_narrow(p, &node.name))?;
                Op::MaxEnc { rounding, diff: *diff }
            }
            Op::SatEnc { lo, hi, .. } => {
                let rounding = rounding_for(out.enc_range(ops[0]), p).ok_or_else(|| too_narrow(p, &node.name))?;
                Op::SatEnc { lo: *lo, hi: *hi, rounding }
            }
            Op::AbsEnc { shift, .. } => {
                let r = out.enc_range(ops[0]);
                let rounding = abs_rounding_for(r, p).ok_or_else(|| too_narrow(p, &node.name))?;
                // the output's scale is fixed by `shift`: a finer read would not show in it
                Op::AbsEnc { rounding: rounding.max(*shift), shift: *shift }
            }
            op => op.clone(),
        };
        Ok::<_, PassError>(Some(out.add(op, ops, node.name.clone())?))
    })?;
    Ok(out)
}

fn too_narrow(p: u32, node: &str) -> PassError {
    PassError::Search(format!("no rounding lets lookup '{node}' fit in {p} bits"))
}

/// The widest precision any lookup of `g` needs.
pub fn max_precision(g: &Graph) -> u32 {
    g.node_ids().map(|id| max_precision_of(g, id)).max().unwrap_or(0)
}

/// What a rounded lookup node reads: its input range (for a max, the range of the
/// difference it reads) and whether the read is on the whole torus (|x|, which must fit
/// max |x| rather than the span). `None` for other nodes.
pub fn lookup_input(g: &Graph, id: NodeId) -> Option<(Range, bool)> {
    let ops = g.operands(id);
    match &g.node(id).op {
        // `t.input` is refreshed by `set_precision` only; the operand's range is current
        Op::Tlu(_) => Some((g.enc_range(ops[0]), false)),
        Op::SatEnc { .. } => Some((g.enc_range(ops[0]), false)),
        Op::MaxEnc { diff, .. } => {
            Some((diff.unwrap_or_else(|| g.enc_range(ops[0]).minus(&g.enc_range(ops[1]))), false))
        }
        Op::AbsEnc { .. } => Some((g.enc_range(ops[0]), true)),
        _ => None,
    }
}

/// The precision one node's lookups need (0 if it has none).
pub fn max_precision_of(g: &Graph, id: NodeId) -> u32 {
    let read = || lookup_input(g, id).map_or(Range::new(0, 0), |(r, _)| r);
    match &g.node(id).op {
        Op::Tlu(t) => t.input_bits(),
        Op::MaxEnc { rounding, .. } | Op::SatEnc { rounding, .. } => {
            lookup_precision(entries(read(), *rounding), *rounding)
        }
        Op::AbsEnc { rounding, .. } => abs_precision(read(), *rounding),
        // the sums a + b are read exactly
        Op::MatMulEnc => {
            let ops = g.operands(id);
            let (a, b) = (g.enc_range(ops[0]), g.enc_range(ops[1]));
            lookup_precision(entries(Range::new(a.lo + b.lo, a.hi + b.hi), 0), 0)
        }
        _ => 0,
    }
}
