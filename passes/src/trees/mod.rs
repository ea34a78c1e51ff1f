//! Tree ensembles on encrypted data.
//!
//! **Rank encoding.** A tree only asks whether a feature passes each of its thresholds,
//! so the client sends, per feature, its rank among the cuts (threshold tests) the trees
//! use: the number of cuts that fail (see [`Cut`]). Cut j then holds iff rank ≤ j, and
//! the integer trees take exactly the float trees' branches. When a feature has more
//! cuts than `max_bits` can rank, its cuts are thinned to evenly spaced ones and each
//! node's test snaps to the nearest (the bit-width search checks the agreement).
//!
//! **Circuit.** One comparison lookup per distinct (feature, cut) pair, shared by every
//! node of every tree that tests it: `b = [rank ≤ j]`. Then one leaf lookup per parent
//! of a leaf: a node `p` at depth `d` is reached iff all `d` edge conditions above it
//! hold, each `b` or `1 − b` (linear in the bits), so `S = Σ conditions` equals `d`
//! exactly when `p` is reached; the lookup reads `S + (d + 1)·test_p` (at most
//! `2d + 2` values: 3 bits for depth-4 trees) and returns the value of the leaf child
//! the test leads to, or 0. The leaf values are integers at a fine output scale and
//! are only summed before decryption, so their precision costs nothing in the lookups.
//! Concrete ML's "GEMM" form instead spends one lookup per internal node and one per
//! leaf.

pub mod sums;
pub mod units;

use crate::error::{PassError, Result};
use crate::model::Cut;
use ndarray::{Array2, ArrayD};
use std::collections::HashMap;
use veil_ir::op::{Aggregate, BranchMode, TreeEnsemble, TreeNode};
use veil_ir::{Elem, Expr, Graph, Linear, LinearKind, NodeId, Op, Range, Tlu};

/// Label of the linear maps of a tree circuit: their ranges are exact by construction,
/// so `ranges::narrow` leaves them alone.
pub const TREE_LABEL: &str = "tree";

/// Label of the map that sums the per-tree values into scores (exact, like [`TREE_LABEL`]).
pub const TREE_SUMS_LABEL: &str = "tree sums";

/// Whether a linear map belongs to a tree circuit (exact by construction).
pub fn is_tree_map(label: &str) -> bool {
    label == TREE_LABEL || label == TREE_SUMS_LABEL
}

/// Integer steps the summed leaf values of one target span (before the base value).
const SCORE_STEPS: f64 = 16384.0;

/// The cut a branch tests, and whether the branch's test is the cut (true) or its
/// negation (false).
fn branch_cut(mode: BranchMode, threshold: f32) -> Option<(Cut, bool)> {
    let cut = |inclusive| Cut { threshold, inclusive };
    match mode {
        BranchMode::Leq => Some((cut(true), true)),
        BranchMode::Lt => Some((cut(false), true)),
        BranchMode::Gt => Some((cut(true), false)),
        BranchMode::Gte => Some((cut(false), false)),
        BranchMode::Eq | BranchMode::Neq => None,
    }
}

fn sort_dedup(v: &mut Vec<Cut>) {
    v.sort_by(|a, b| a.cmp_sets(b));
    v.dedup_by(|a, b| a.cmp_sets(b).is_eq());
}

/// Per feature, every cut the ensembles test, ascending. `Err` names an equality test,
/// which no single cut expresses.
pub fn exact_cuts(ensembles: &[&TreeEnsemble], n_features: usize, name: &str) -> Result<Vec<Vec<Cut>>> {
    let mut cuts = vec![Vec::new(); n_features];
    for e in ensembles {
        for (t, tree) in e.trees.iter().enumerate() {
            for (k, node) in tree.iter().enumerate() {
                if let TreeNode::Branch { feature, threshold, mode, .. } = node {
                    let (c, _) = branch_cut(*mode, *threshold).ok_or_else(|| PassError::Unsupported {
                        node: name.into(),
                        msg: format!(
                            "tree {t} node {k} tests equality (BRANCH_EQ/NEQ), which encrypted trees do not support"
                        ),
                    })?;
                    cuts[*feature].push(c);
                }
            }
        }
    }
    cuts.iter_mut().for_each(sort_dedup);
    Ok(cuts)
}

/// Bits that rank a feature with `cuts` cuts (ranks 0..=cuts).
pub fn rank_bits(cuts: usize) -> u32 {
    64 - (cuts as u64).leading_zeros()
}

/// At most `2^bits − 1` cuts per feature: evenly spaced picks from each ascending list.
pub fn thin(cuts: &[Vec<Cut>], bits: u32) -> Vec<Vec<Cut>> {
    let max = (1usize << bits.min(16)) - 1;
    cuts.iter()
        .map(|c| {
            if c.len() <= max {
                return c.clone();
            }
            let mut v: Vec<Cut> = (0..max).map(|i| c[((2 * i + 1) * c.len() / (2 * max)).min(c.len() - 1)]).collect();
            sort_dedup(&mut v);
            v
        })
        .collect()
}

/// Index of the cut in `list` a test of `c` uses: `c` itself, or the nearest by
/// threshold when the list was thinned.
fn snap(list: &[Cut], c: Cut) -> usize {
    if let Ok(i) = list.binary_search_by(|x| x.cmp_sets(&c)) {
        return i;
    }
    let dist = |x: &Cut| (x.threshold as f64 - c.threshold as f64).abs();
    (0..list.len()).min_by(|&a, &b| dist(&list[a]).total_cmp(&dist(&list[b]))).expect("a feature a tree tests has cuts")
}

/// The encrypted scores of an ensemble: `real[c] ≈ scale[c]·v[c] + offset[c]`.
pub struct Scores {
    pub node: NodeId,
    pub scale: Vec<f64>,
    pub offset: Vec<f64>,
}

/// Where the comparison bits come from.
pub enum Features<'a> {
    /// Ranks `[batch, features]` over `cuts`: the server compares (one lookup per bit).
    Ranks { node: NodeId, cuts: &'a [Vec<Cut>] },
    /// The bits themselves `[batch, Σ cuts]`, feature by feature, computed by the client
    /// over `cuts` (no comparison lookups; see `InputQuant::unary`).
    Unary { node: NodeId, cuts: &'a [Vec<Cut>] },
}

impl Features<'_> {
    fn cuts(&self) -> &[Vec<Cut>] {
        match self {
            Features::Ranks { cuts, .. } | Features::Unary { cuts, .. } => cuts,
        }
    }
}

/// Build the circuit of `e` into `out`. Leaf lookups take a unit's children along when
/// they fit `unit_bits` bits (see [`units`]).
pub fn build(out: &mut Graph, e: &TreeEnsemble, features: Features, unit_bits: u32, name: &str) -> Result<Scores> {
    let err = |msg: String| PassError::Unsupported { node: name.into(), msg };
    if matches!(e.aggregate, Aggregate::Min | Aggregate::Max) {
        return Err(err("encrypted trees aggregate by sum or average, not min/max".into()));
    }
    let per_tree = if e.aggregate == Aggregate::Average { 1.0 / e.trees.len().max(1) as f64 } else { 1.0 };
    let cuts = features.cuts();
    // comparison bits in use: (feature, cut index), numbered as first met
    let mut bits: Vec<(usize, usize)> = Vec::new();
    let mut bit_of: HashMap<(usize, usize), usize> = HashMap::new();
    let mut all_units = Vec::new();
    let mut constant = vec![0.0f64; e.n_targets];
    for (t, tree) in e.trees.iter().enumerate() {
        if let TreeNode::Leaf { weights } = &tree[0] {
            weights.iter().for_each(|&(k, w)| constant[k] += w as f64 * per_tree);
            continue;
        }
        let mut tests: HashMap<usize, units::Test> = HashMap::new();
        for (k, node) in tree.iter().enumerate() {
            if let TreeNode::Branch { feature, threshold, mode, .. } = node {
                let (cut, positive) = branch_cut(*mode, *threshold).ok_or_else(|| {
                    err(format!(
                        "tree {t} node {k} tests equality (BRANCH_EQ/NEQ), which encrypted trees do not support"
                    ))
                })?;
                let key = (*feature, snap(&cuts[*feature], cut));
                let bit = *bit_of.entry(key).or_insert_with(|| {
                    bits.push(key);
                    bits.len() - 1
                });
                tests.insert(k, units::Test { bit, positive });
            }
        }
        all_units.extend(units::partition(t, tree, &|k| tests[&k], unit_bits));
    }
    if bits.is_empty() {
        return Err(err("the trees test no feature: the model is a constant".into()));
    }
    let bit_node = comparison_bits(out, &features, &bits, name)?;
    // what each leaf lookup reads
    let mut w = Array2::<i64>::zeros((all_units.len(), bits.len()));
    for (u, unit) in all_units.iter().enumerate() {
        unit.weights.iter().for_each(|(&b, &c)| w[[u, b]] += c);
    }
    let bias = ArrayD::from_shape_vec(vec![all_units.len()], all_units.iter().map(|u| u.constant).collect())
        .expect("one per unit");
    let lin = Linear::new(LinearKind::Dense { weights: w }, bias, TREE_LABEL);
    let packed = out.add(Op::Linear(Box::new(lin)), &[bit_node], format!("{name}/reach"))?;
    let len = match out.node(packed).ty.elem {
        Elem::Enc(r) if r.lo >= 0 => r.hi as usize + 1,
        _ => return Err(err("internal: a leaf lookup reads a negative value".into())),
    };
    // a leaf's value for target k, before quantization
    let leaf_value = |tree: &[TreeNode], leaf: usize, k: usize| -> f64 {
        match &tree[leaf] {
            TreeNode::Leaf { weights } => weights.iter().filter(|w| w.0 == k).map(|w| w.1 as f64 * per_tree).sum(),
            TreeNode::Branch { .. } => 0.0,
        }
    };
    let leaves_of = |tree: &[TreeNode]| -> Vec<usize> {
        (0..tree.len()).filter(|&i| matches!(tree[i], TreeNode::Leaf { .. })).collect()
    };
    // the trees with branches (single leaves are constants, in the offset)
    let grown: Vec<usize> = (0..e.trees.len()).filter(|&t| !matches!(e.trees[t][0], TreeNode::Leaf { .. })).collect();
    // scale per target: the summed leaf values span SCORE_STEPS integers
    let (mut lo, mut hi) = (constant.clone(), constant.clone());
    for tree in grown.iter().map(|&t| &e.trees[t]) {
        for k in 0..e.n_targets {
            let vals = leaves_of(tree).into_iter().map(|l| leaf_value(tree, l, k));
            let (l, h) = vals.fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), v| (l.min(v), h.max(v)));
            lo[k] += l;
            hi[k] += h;
        }
    }
    let mut scale: Vec<f64> =
        lo.iter().zip(&hi).map(|(&l, &h)| if h > l { (h - l) / SCORE_STEPS } else { 1.0 }).collect();
    // When every tree's leaves sum to one constant over the targets (a forest's class
    // probabilities), the last target is that constant minus the others: its score is a
    // linear function of theirs, with no lookup (half the leaf lookups of a binary
    // forest). All targets then share one scale, and the last one's integer leaves are
    // defined as the tree's constant minus the others' integers, so the identity is exact.
    let complement = complement_target(e, &leaf_value, &leaves_of);
    if complement.is_some() {
        let common = scale.iter().copied().fold(f64::MIN, f64::max);
        scale.iter_mut().for_each(|s| *s = common);
    }
    let last = e.n_targets - 1;
    // the integer value of leaf `leaf` of tree `t` for target k
    let quantized = |t: usize, leaf: usize, k: usize| -> f64 {
        let tree = &e.trees[t];
        match &complement {
            Some(sums) if k == last => {
                (sums[t] / scale[k]).round()
                    - (0..last).map(|j| (leaf_value(tree, leaf, j) / scale[j]).round()).sum::<f64>()
            }
            _ => (leaf_value(tree, leaf, k) / scale[k]).round(),
        }
    };
    // the targets whose leaves are looked up
    let looked_up = if complement.is_some() { last } else { e.n_targets };
    // one leaf lookup per (unit, target one of its leaves writes)
    let mut elems: Vec<(usize, usize)> = Vec::new();
    for (u, unit) in all_units.iter().enumerate() {
        let tree = &e.trees[unit.tree];
        for k in 0..looked_up {
            if unit.leaves(tree).iter().any(|&l| quantized(unit.tree, l, k) != 0.0) {
                elems.push((u, k));
            }
        }
    }
    if elems.is_empty() {
        return Err(err("every leaf is zero: the model is a constant".into()));
    }
    let params: Vec<ArrayD<f64>> = (0..len)
        .map(|v| {
            let vals = elems.iter().map(|&(u, k)| {
                let unit = &all_units[u];
                let tree = &e.trees[unit.tree];
                unit.leaf_at(tree, v as i64).map_or(0.0, |l| quantized(unit.tree, l, k))
            });
            ArrayD::from_shape_vec(vec![elems.len()], vals.collect()).expect("one per element")
        })
        .collect();
    let per_elem = if elems.iter().enumerate().all(|(i, &(u, _))| u == i) && elems.len() == all_units.len() {
        packed
    } else {
        let idx = ArrayD::from_shape_vec(vec![elems.len()], elems.iter().map(|&(u, _)| u as i64).collect())
            .expect("one per element");
        out.add(Op::Gather { axis: 1, indices: idx }, &[packed], format!("{name}/reach_per_target"))?
    };
    let table = Expr::Table { index: Box::new(Expr::Input), first: 0, len };
    let tlu = Tlu { expr: table, input: Range::new(0, len as i64 - 1), params, rounding: 0, label: "leaves".into() };
    let leaves = out.add(Op::Tlu(Box::new(tlu)), &[per_elem], format!("{name}/leaves"))?;
    // per grown tree and target: the range of its leaves' integers; and the constant of
    // its complement row
    let ranges: Vec<Vec<(i64, i64)>> = grown
        .iter()
        .map(|&t| {
            (0..e.n_targets)
                .map(|k| {
                    let q = leaves_of(&e.trees[t]).into_iter().map(|leaf| quantized(t, leaf, k) as i64);
                    q.fold((i64::MAX, i64::MIN), |(l, h), v| (l.min(v), h.max(v)))
                })
                .collect()
        })
        .collect();
    let complement_bias: Option<Vec<i64>> =
        complement.as_ref().map(|sums| grown.iter().map(|&t| (sums[t] / scale[last]).round() as i64).collect());
    let tree_of: Vec<(usize, usize)> = elems.iter().map(|&(u, k)| (all_units[u].tree, k)).collect();
    let node = score_sums(out, leaves, &tree_of, &grown, &ranges, complement_bias.as_deref(), name)?;
    let base = |k: usize| match e.base_values.len() {
        0 => 0.0,
        1 => e.base_values[0] as f64,
        _ => e.base_values[k] as f64,
    };
    let offset = (0..e.n_targets).map(|k| constant[k] + base(k)).collect();
    Ok(Scores { node, scale, offset })
}

/// The scores `[batch, targets]` from the leaf lookups: per grown tree and target, the
/// tree's value (exactly one unit of a tree answers; the complement target, when given, is
/// the tree's constant minus the others), assumed within the trees' union leaf range; then
/// their sum per target, assumed within Σ_trees [min leaf, max leaf]. The per-tree values
/// let the backend send the scores as partial sums over groups of trees (see [`sums`]).
/// `tree_of[i]` is leaf lookup i's (tree, target); `ranges[g][k]` the integer leaf range of
/// grown tree `grown[g]` for target k.
fn score_sums(
    out: &mut Graph,
    leaves: NodeId,
    tree_of: &[(usize, usize)],
    grown: &[usize],
    ranges: &[Vec<(i64, i64)>],
    complement_bias: Option<&[i64]>,
    name: &str,
) -> Result<NodeId> {
    // every grown tree has a range per target (and there is at least one grown tree: the
    // trees test a feature)
    let n_targets = ranges.first().map_or(1, |r| r.len());
    let last = n_targets - 1;
    let row_of: HashMap<usize, usize> = grown.iter().enumerate().map(|(i, &t)| (t, i)).collect();
    let rows = grown.len() * n_targets;
    let mut per_tree = Array2::<i64>::zeros((rows, tree_of.len()));
    let mut tree_bias = ArrayD::zeros(vec![rows]);
    for (i, &(t, k)) in tree_of.iter().enumerate() {
        let r = row_of[&t] * n_targets;
        per_tree[[r + k, i]] = 1;
        if complement_bias.is_some() {
            per_tree[[r + last, i]] = -1;
        }
    }
    if let Some(bias) = complement_bias {
        bias.iter().enumerate().for_each(|(g, &c)| tree_bias[g * n_targets + last] = c);
    }
    let all = ranges.iter().flatten();
    let (lo, hi) = all.fold((i64::MAX, i64::MIN), |(l, h), &(a, b)| (l.min(a), h.max(b)));
    let lin = Linear::new(LinearKind::Dense { weights: per_tree }, tree_bias, TREE_LABEL);
    let trees = out.add(Op::Linear(Box::new(lin)), &[leaves], format!("{name}/trees"))?;
    let trees = out.add(Op::Assume { range: Range::new(lo, hi) }, &[trees], format!("{name}/trees"))?;
    let mut sum = Array2::<i64>::zeros((n_targets, rows));
    (0..rows).for_each(|c| sum[[c % n_targets, c]] = 1);
    let lin = Linear::new(LinearKind::Dense { weights: sum }, ArrayD::zeros(vec![n_targets]), TREE_SUMS_LABEL);
    let sums = out.add(Op::Linear(Box::new(lin)), &[trees], format!("{name}/scores"))?;
    let (mut lo_sum, mut hi_sum) = (i64::MAX, i64::MIN);
    for k in 0..n_targets {
        let (l, h) = ranges.iter().fold((0, 0), |(l, h), r| (l + r[k].0, h + r[k].1));
        (lo_sum, hi_sum) = (lo_sum.min(l), hi_sum.max(h));
    }
    Ok(out.add(Op::Assume { range: Range::new(lo_sum, hi_sum) }, &[sums], format!("{name}/scores"))?)
}

/// Per tree, the constant its leaves' values sum to over the targets, when every tree
/// (single-leaf trees aside) has one (within 1e-6 of the values' magnitude: float32 sums)
/// and there are
/// at least two targets; `None` otherwise.
fn complement_target(
    e: &TreeEnsemble,
    leaf_value: &dyn Fn(&[TreeNode], usize, usize) -> f64,
    leaves_of: &dyn Fn(&[TreeNode]) -> Vec<usize>,
) -> Option<Vec<f64>> {
    if e.n_targets < 2 {
        return None;
    }
    let mut sums = vec![0.0; e.trees.len()];
    for (t, tree) in e.trees.iter().enumerate() {
        if matches!(tree[0], TreeNode::Leaf { .. }) {
            continue;
        }
        let totals: Vec<f64> =
            leaves_of(tree).into_iter().map(|l| (0..e.n_targets).map(|k| leaf_value(tree, l, k)).sum()).collect();
        let first = *totals.first()?;
        let size = (0..e.n_targets)
            .flat_map(|k| leaves_of(tree).into_iter().map(move |l| (l, k)))
            .map(|(l, k)| leaf_value(tree, l, k).abs())
            .fold(first.abs(), f64::max);
        // leaf weights are float32: their sums agree to a few float32 steps
        if totals.iter().any(|v| (v - first).abs() > 1e-6 * size.max(f64::MIN_POSITIVE)) {
            return None;
        }
        sums[t] = first;
    }
    Some(sums)
}

/// The comparison bits `[batch, bits]` in the order of `bits` ((feature, cut index)).
fn comparison_bits(out: &mut Graph, features: &Features, bits: &[(usize, usize)], name: &str) -> Result<NodeId> {
    match features {
        Features::Unary { node, cuts } => {
            // the client sent every cut's bit, feature by feature: pick the ones in use
            let start: Vec<usize> = cuts.iter().scan(0, |at, c| Some(std::mem::replace(at, *at + c.len()))).collect();
            let idx = bits.iter().map(|&(f, j)| (start[f] + j) as i64).collect();
            let idx = ArrayD::from_shape_vec(vec![bits.len()], idx).expect("one per bit");
            Ok(out.add(Op::Gather { axis: 1, indices: idx }, &[*node], format!("{name}/bits"))?)
        }
        Features::Ranks { node, cuts } => {
            // Per feature: its rank (assumed within its own cut count, which the client's
            // ranks never exceed), then one lookup per cut it is compared with. The
            // lookups of one feature read one value, so the backend serves two of them
            // with one bootstrap when the rank takes at most half the slots (and the
            // evaluator runs independent lookups together).
            let mut per_bit: Vec<Option<NodeId>> = vec![None; bits.len()];
            let mut features: Vec<usize> = bits.iter().map(|&(f, _)| f).collect();
            features.sort_unstable();
            features.dedup();
            for f in features {
                let m = cuts[f].len() as i64;
                let idx = ArrayD::from_shape_vec(vec![1], vec![f as i64]).expect("one index");
                let rank = out.add(Op::Gather { axis: 1, indices: idx }, &[*node], format!("{name}/rank{f}"))?;
                let rank = out.add(Op::Assume { range: Range::new(0, m) }, &[rank], format!("{name}/rank{f}"))?;
                for (k, &(_, j)) in bits.iter().enumerate().filter(|(_, b)| b.0 == f) {
                    // b = [rank ≤ j] as a table (a clamp would read as saturation to the
                    // overflow report)
                    let params =
                        (0..=m).map(|r| ArrayD::from_elem(vec![1], f64::from(u8::from(r <= j as i64)))).collect();
                    let compare = Expr::Table { index: Box::new(Expr::Input), first: 0, len: m as usize + 1 };
                    let tlu =
                        Tlu { expr: compare, input: Range::new(0, m), params, rounding: 0, label: "compare".into() };
                    per_bit[k] = Some(out.add(Op::Tlu(Box::new(tlu)), &[rank], format!("{name}/cut{f}_{j}"))?);
                }
            }
            let parts: Vec<NodeId> = per_bit.into_iter().map(|b| b.expect("every bit compared")).collect();
            Ok(out.add(Op::Concat { axis: 1 }, &parts, format!("{name}/compare"))?)
        }
    }
}
