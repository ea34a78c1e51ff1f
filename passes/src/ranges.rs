//! Compiled ranges: narrow each accumulator's range to what calibration observed, plus a
//! margin, instead of the worst case interval arithmetic proves.
//!
//! A bootstrap resolves its input to `p` bits over the input's whole range, so a range
//! four times wider than the values that occur costs two bits of resolution (or, at
//! equal resolution, a 4× dearer bootstrap). Worst-case bounds of a dot product are
//! rarely approached, so veil encodes each accumulator for its calibrated range widened
//! by a margin (never beyond the worst case), and marks that with an `assume` node. Values
//! beyond it would overflow their encoding: `veil predict --mode clear` and `veil encrypt`
//! report any input that reaches one, so a user learns before trusting an FHE result.

use crate::error::{PassError, Result};
use std::collections::HashMap;
use veil_ir::{Elem, Graph, NodeId, Op, Range, Tensor};

/// Fraction of the observed span added on each side.
pub const DEFAULT_MARGIN: f64 = 0.25;

/// Insert `assume` nodes after accumulators whose calibrated range (widened by `margin`)
/// is narrower than their worst case. `inputs` are the graph's integer inputs on the
/// calibration set.
pub fn narrow(g: &Graph, inputs: &[Tensor], margin: f64) -> Result<Graph> {
    let mut seen: HashMap<NodeId, (i64, i64)> = HashMap::new();
    let mut diffs: HashMap<NodeId, (i64, i64)> = HashMap::new();
    let extent =
        |a: &ndarray::ArrayD<i64>| (a.iter().copied().min().unwrap_or(0), a.iter().copied().max().unwrap_or(0));
    veil_ir::interp::run_observed(g, inputs, &mut |id, t, args| {
        if let Some(a) = t.as_i64() {
            seen.insert(id, extent(a));
        }
        if let (Op::MaxEnc { .. }, [a, b]) = (&g.node(id).op, args) {
            if let (Some(a), Some(b)) = (a.as_i64(), b.as_i64()) {
                if let Ok(d) = veil_ir::interp::zip_broadcast(a, b, |x, y| x - y) {
                    diffs.insert(id, extent(&d));
                }
            }
        }
    })?;
    let widen = |seen: (i64, i64), sound: Range| widen(seen, sound, margin);
    let (out, _) = g.rebuild(|out, id, ops| {
        let node = g.node(id);
        let new = match &node.op {
            Op::MaxEnc { rounding, .. } => {
                // The lookup inside a max reads a − b: narrow that range too.
                let sound = out.enc_range(ops[0]).minus(&out.enc_range(ops[1]));
                let diff = diffs.get(&id).map(|&d| widen(d, sound)).filter(|r| *r != sound);
                out.add(Op::MaxEnc { rounding: *rounding, diff }, ops, node.name.clone())?
            }
            op => out.add(op.clone(), ops, node.name.clone())?,
        };
        // (a tree circuit's sums are exact value sets, not accumulators: see trees.rs)
        let tree = matches!(&node.op, Op::Linear(l) if crate::trees::is_tree_map(&l.label));
        let widened = !tree && matches!(node.op, Op::Linear(_) | Op::AddEnc | Op::SubEnc | Op::MaxEnc { .. });
        let target = match (out.node(new).ty.elem, seen.get(&id)) {
            (Elem::Enc(sound), Some(&seen)) if widened => {
                let r = widen(seen, sound);
                (r != sound).then_some(r)
            }
            _ => None,
        };
        Ok::<_, PassError>(Some(match target {
            Some(range) => out.add(Op::Assume { range }, &[new], node.name.clone())?,
            None => new,
        }))
    })?;
    veil_ir::verify(&out)?;
    Ok(out)
}

/// The observed extent `(lo, hi)` widened by `margin` of its span on each side (at least
/// one), never beyond the `sound` (worst-case) range.
pub fn widen((lo, hi): (i64, i64), sound: Range, margin: f64) -> Range {
    let pad = ((hi - lo) as f64 * margin).ceil().max(1.0) as i64;
    Range::new((lo - pad).max(sound.lo), (hi + pad).min(sound.hi))
}
