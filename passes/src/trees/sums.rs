//! Tree scores sent as partial sums over groups of trees.
//!
//! A score sums one leaf lookup per unit of every tree, and the client reads it to a step
//! of its range: the noise of all those bootstrap outputs must stay under half that step,
//! in an encoding whose scale leaves room for the whole score's range. Sending `G`
//! partial sums over groups of trees instead divides both the bootstraps each one sums
//! and, about, the range it must fit by `G`; the output noise bound loosens by about
//! `G^1.5`, which can take a bootstrap level off every leaf lookup. The client reads the
//! partial sums, adds them (as digits with no shift, see [`crate::digits`]) and reads the
//! total at the score's own step. It holds the compiled model already (the artifact
//! carries the integer graph), so the partial sums reveal nothing new; Concrete ML
//! likewise decrypts one output per tree and sums them on the client by default.

use super::TREE_SUMS_LABEL;
use crate::digits::{digit_decode, replace_outputs, Parts};
use crate::error::Result;
use crate::model::{OutputDecode, QuantizedModel};
use ndarray::Array2;
use veil_ir::{Graph, Linear, LinearKind, NodeId, Op, Output};

/// Most partial sums a score is sent as (the artifact reader accepts up to 1024 parts).
pub const MAX_GROUPS: usize = 64;

/// The sum behind a tree score output (under its `assume`): its node, its linear map
/// (weights `[targets, trees·targets]`) and the per-tree values it reads.
fn scores_of(g: &Graph, out: NodeId) -> Option<(NodeId, &Linear, &Array2<i64>, NodeId)> {
    let lin_id = match g.node(out).op {
        Op::Assume { .. } => g.operands(out)[0],
        _ => out,
    };
    let Op::Linear(lin) = &g.node(lin_id).op else { return None };
    let LinearKind::Dense { weights } = &lin.kind else { return None };
    (lin.label == TREE_SUMS_LABEL && g.users(lin_id).len() <= 1)
        .then(|| (lin_id, &**lin, weights, g.operands(lin_id)[0]))
}

/// Trees in a score output, when it is one (`None` otherwise).
pub fn trees_in_scores(q: &QuantizedModel) -> Option<usize> {
    let g = &q.graph;
    g.outputs().iter().filter_map(|o| scores_of(g, o.node)).map(|(_, _, w, _)| w.ncols() / w.nrows().max(1)).max()
}

/// Send every tree score output as `groups` partial sums over consecutive trees (fewer
/// when it has fewer trees). `None` when no output is a tree score or `groups < 2`.
pub fn split_scores(q: &QuantizedModel, groups: usize) -> Result<Option<QuantizedModel>> {
    if groups < 2 {
        return Ok(None);
    }
    let split = |g: &Graph, graph: &mut Graph, o: &Output, d: &OutputDecode| -> Result<Option<Parts>> {
        let Some((lin_id, lin, weights, trees)) = scores_of(g, o.node) else { return Ok(None) };
        let targets = weights.nrows().max(1);
        let n_trees = weights.ncols() / targets;
        let count = groups.min(n_trees);
        if count < 2 {
            return Ok(None);
        }
        let mut parts = Vec::new();
        for j in 0..count {
            let (from, to) = (j * n_trees / count, (j + 1) * n_trees / count);
            let mut w = weights.clone();
            w.indexed_iter_mut().filter(|((_, c), _)| !(from..to).contains(&(c / targets))).for_each(|(_, v)| *v = 0);
            let bias = if j == 0 { lin.bias.clone() } else { lin.bias.mapv(|_| 0) };
            let part = Linear::new(LinearKind::Dense { weights: w }, bias, TREE_SUMS_LABEL);
            let name = format!("{}_part{j}", g.node(lin_id).name);
            let id = graph.add(Op::Linear(Box::new(part)), &[trees], name)?;
            let decode = digit_decode(d, 0, count as u32, j as u32);
            parts.push((Output { name: format!("{}_part{j}", o.name), node: id }, decode));
        }
        Ok(Some(Parts { outputs: parts, shift: 0 }))
    };
    let Some((model, _)) = replace_outputs(q, split)? else { return Ok(None) };
    veil_ir::verify(&model.graph)?;
    Ok(Some(model))
}
