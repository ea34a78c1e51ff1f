//! Wide outputs sent as digits.
//!
//! A decrypted output shares its encoding scale with the values it is computed from, and
//! that scale must leave room for the output's whole range. When the output is a wide
//! accumulator (say 16 bits) and lookups read its inputs at 5 bits, those lookups read a
//! copy multiplied by 2^11, which multiplies the bootstrap noise they see by 2^22 and can
//! cost a bootstrap level for every lookup in the circuit. Splitting the weights of the
//! output layer into `D` balanced digits, `W = Σ_j 2^(b·j) · W_j`, makes the server send
//! `D` narrower outputs `W_j·x` (the first one with the bias); the client reads each,
//! adds them scaled by 2^(b·j), and reads the sum to the output's own step before its
//! float tail. The integers are the same; only how the client reads them changes.
//!
//! The client learns the `D` partial sums rather than their total; it already holds the
//! compiled model (the artifact carries the integer graph), so this reveals nothing new.

use crate::error::{PassError, Result};
use crate::model::{OutputDecode, QuantizedModel, TailSource};
use crate::ranges::widen;
use ndarray::ArrayD;
use std::collections::{HashMap, HashSet};
use veil_ir::{Elem, Graph, Linear, LinearKind, NodeId, Op, Output, Tensor};

/// Split every wide, approximately read output that a linear layer with clear weights
/// computes into `digits` outputs. Returns `None` when no output can be split (fewer
/// than two digits, no such output, or weights too narrow to split). `calib` are the
/// float calibration inputs: the digits get compiled ranges like every accumulator.
pub fn split_outputs(q: &QuantizedModel, digits: u32, calib: &[Tensor], margin: f64) -> Result<Option<QuantizedModel>> {
    if digits < 2 {
        return Ok(None);
    }
    let split = |g: &Graph, graph: &mut Graph, o: &Output, d: &OutputDecode| -> Result<Option<Parts>> {
        let Some((lin_id, lin, b)) = splittable(g, o.node, d, digits) else { return Ok(None) };
        let x = g.operands(lin_id)[0];
        let mut parts = Vec::new();
        for j in 0..digits {
            let kind = digit_kind(&lin.kind, b, digits, j);
            let bias = if j == 0 { lin.bias.clone() } else { ArrayD::zeros(lin.bias.raw_dim()) };
            let label = format!("{} digit {j}", lin.label);
            let name = format!("{}_digit{j}", g.node(lin_id).name);
            let id = graph.add(Op::Linear(Box::new(Linear::new(kind, bias, label))), &[x], name)?;
            parts.push((Output { name: format!("{}_digit{j}", o.name), node: id }, digit_decode(d, b, digits, j)));
        }
        Ok(Some(Parts { outputs: parts, shift: b }))
    };
    let Some((mut model, new_nodes)) = replace_outputs(q, split)? else { return Ok(None) };
    assume_observed(&mut model.graph, &new_nodes, &q.encode_inputs(calib)?, margin)?;
    veil_ir::verify(&model.graph)?;
    Ok(Some(model))
}

/// The outputs one output is replaced by, and the weight 2^shift between consecutive ones.
pub(crate) struct Parts {
    pub outputs: Vec<(Output, OutputDecode)>,
    pub shift: u32,
}

/// Replace each output `split` splits (it adds the parts' nodes to the new graph) by its
/// parts, which the client recombines as digits (`Σ_j 2^(shift·j)·part_j`) before its
/// tail. Returns the new model and the parts' nodes, or `None` when nothing was split.
pub(crate) fn replace_outputs(
    q: &QuantizedModel,
    mut split: impl FnMut(&Graph, &mut Graph, &Output, &OutputDecode) -> Result<Option<Parts>>,
) -> Result<Option<(QuantizedModel, Vec<NodeId>)>> {
    let g = &q.graph;
    let mut graph = g.clone();
    let mut outputs: Vec<Output> = Vec::new();
    let mut decode: Vec<OutputDecode> = Vec::new();
    // old output index → (first new index, count, shift, rounding)
    let mut place: Vec<(usize, usize, u32, u32)> = Vec::new();
    let mut part_nodes: Vec<NodeId> = Vec::new();
    for (o, d) in g.outputs().iter().zip(&q.decode) {
        let first = outputs.len();
        let mut shift = 0;
        match split(g, &mut graph, o, d)? {
            Some(parts) => {
                shift = parts.shift;
                for (out, dec) in parts.outputs {
                    part_nodes.push(out.node);
                    outputs.push(out);
                    decode.push(dec);
                }
            }
            None => {
                outputs.push(o.clone());
                decode.push(d.clone());
            }
        }
        place.push((first, outputs.len() - first, shift, d.rounding));
    }
    if part_nodes.is_empty() {
        return Ok(None);
    }
    *graph.outputs_mut() = outputs;
    let (graph, map) = prune(&graph)?;
    let part_nodes = part_nodes.iter().map(|n| map[n]).collect();
    let tail_inputs = q
        .tail_inputs
        .iter()
        .map(|s| match *s {
            TailSource::Server(i) => match place[i] {
                (first, 1, ..) => TailSource::Server(first),
                (first, count, shift, rounding) => TailSource::Digits { first, count, shift, rounding },
            },
            other => other,
        })
        .collect();
    Ok(Some((QuantizedModel { graph, decode, tail_inputs, ..q.clone() }, part_nodes)))
}

/// The linear layer behind output `out` (possibly under an `assume`), with the digit base
/// (bits per digit), if it can be split: clear weights, read approximately (exact reads
/// belong to circuits without lookups, where nothing is amplified), used only as output.
fn splittable(g: &Graph, out: NodeId, d: &OutputDecode, digits: u32) -> Option<(NodeId, Linear, u32)> {
    if d.rounding == 0 || !g.users(out).is_empty() {
        return None;
    }
    let lin_id = match g.node(out).op {
        Op::Assume { .. } => g.operands(out)[0],
        _ => out,
    };
    if lin_id != out && g.users(lin_id) != [out] {
        return None;
    }
    let Op::Linear(lin) = &g.node(lin_id).op else { return None };
    let widest = weights(&lin.kind)?.iter().map(|w| w.unsigned_abs()).max()?;
    // signed magnitude bits, spread over the digits; each digit needs at least 2 bits
    let bits = 65 - widest.leading_zeros();
    let b = bits.div_ceil(digits);
    (b >= 2).then(|| (lin_id, (**lin).clone(), b))
}

fn weights(kind: &LinearKind) -> Option<Vec<i64>> {
    match kind {
        LinearKind::Dense { weights } | LinearKind::Matrix { weights, .. } => Some(weights.iter().copied().collect()),
        LinearKind::Conv { weights, .. } => Some(weights.iter().copied().collect()),
        _ => None,
    }
}

/// Digit `j` of `w` in balanced base 2^b: digits below the top one lie in
/// [−2^(b−1), 2^(b−1)); the top one takes what is left, so Σ_j 2^(b·j)·digit_j = w.
pub fn digit(w: i64, b: u32, digits: u32, j: u32) -> i64 {
    let half = 1i64 << (b - 1);
    let mut rest = w;
    for k in 0..digits {
        if k + 1 == digits {
            return rest;
        }
        let low = (rest + half).rem_euclid(1 << b) - half;
        if k == j {
            return low;
        }
        rest = (rest - low) >> b;
    }
    unreachable!("j < digits")
}

fn digit_kind(kind: &LinearKind, b: u32, digits: u32, j: u32) -> LinearKind {
    let f = |w: &i64| digit(*w, b, digits, j);
    match kind {
        LinearKind::Dense { weights } => LinearKind::Dense { weights: weights.map(f) },
        LinearKind::Matrix { weights, out_dims } => {
            LinearKind::Matrix { weights: weights.map(f), out_dims: out_dims.clone() }
        }
        LinearKind::Conv { weights, conv } => LinearKind::Conv { weights: weights.map(f), conv: conv.clone() },
        other => other.clone(),
    }
}

/// Digit `j` decodes at 2^(b·j) times the output's scale; only the first carries the
/// offset. Each digit is read log2(D) + 3 bits finer than its share, so the digits' read
/// errors add up to at most 1/16 of the whole output's step; the client reads the
/// recombined sum at the output's own step, so the semantics the search validated hold
/// except for values within that error of a step edge. (Reading only log2(D) bits finer
/// moved a CNN's test accuracy by a sample; 3 more bits cost no bootstrap level.)
pub(crate) fn digit_decode(d: &OutputDecode, b: u32, digits: u32, j: u32) -> OutputDecode {
    let finer = 32 - (digits - 1).leading_zeros() + 3;
    OutputDecode {
        scale: d.scale.mapv(|s| s * 2f64.powi((b * j) as i32)),
        offset: if j == 0 { d.offset.clone() } else { d.offset.mapv(|_| 0.0) },
        rounding: d.rounding.saturating_sub(b * j).saturating_sub(finer),
    }
}

/// Copy the nodes the outputs need (and every input), in order. Returns the map old → new.
fn prune(g: &Graph) -> Result<(Graph, HashMap<NodeId, NodeId>)> {
    let mut live: HashSet<NodeId> = HashSet::new();
    let mut stack: Vec<NodeId> = g.outputs().iter().map(|o| o.node).collect();
    while let Some(n) = stack.pop() {
        if live.insert(n) {
            stack.extend(g.operands(n));
        }
    }
    g.rebuild(|out, id, ops| {
        let node = g.node(id);
        let kept = live.contains(&id).then(|| out.add_typed(node.op.clone(), node.ty.clone(), ops, node.name.clone()));
        Ok::<_, PassError>(kept)
    })
}

/// Give each of `nodes` (graph outputs) the range calibration observes, widened by
/// `margin`, through an `assume`, as [`crate::ranges::narrow`] does for accumulators.
fn assume_observed(g: &mut Graph, nodes: &[NodeId], inputs: &[Tensor], margin: f64) -> Result<()> {
    let wanted: HashSet<NodeId> = nodes.iter().copied().collect();
    let mut seen: HashMap<NodeId, (i64, i64)> = HashMap::new();
    veil_ir::interp::run_observed(g, inputs, &mut |id, t, _| {
        if let (true, Some(a)) = (wanted.contains(&id), t.as_i64()) {
            let lo = a.iter().copied().min().unwrap_or(0);
            let hi = a.iter().copied().max().unwrap_or(0);
            seen.insert(id, (lo, hi));
        }
    })?;
    for &n in nodes {
        let (Elem::Enc(sound), Some(&obs)) = (g.node(n).ty.elem, seen.get(&n)) else { continue };
        let range = widen(obs, sound, margin);
        if range == sound {
            continue;
        }
        let name = g.node(n).name.clone();
        let a = g.add(Op::Assume { range }, &[n], name)?;
        for o in g.outputs_mut().iter_mut().filter(|o| o.node == n) {
            o.node = a;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digits_recompose_every_weight() {
        for digits in 2..=4u32 {
            for w in -300i64..=300 {
                let b = (65 - w.unsigned_abs().max(1).leading_zeros()).div_ceil(digits).max(2);
                let parts: Vec<i64> = (0..digits).map(|j| digit(w, b, digits, j)).collect();
                let sum: i64 = parts.iter().enumerate().map(|(j, d)| d << (b * j as u32)).sum();
                assert_eq!(sum, w, "w {w} digits {digits} b {b}: {parts:?}");
                for d in &parts[..parts.len() - 1] {
                    assert!((-(1 << (b - 1))..(1 << (b - 1))).contains(d), "w {w}: {parts:?}");
                }
            }
        }
    }
}
