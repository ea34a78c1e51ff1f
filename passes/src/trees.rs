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

use crate::error::{PassError, Result};
use crate::model::Cut;
use ndarray::{Array2, ArrayD};
use std::collections::HashMap;
use veil_ir::op::{Aggregate, BranchMode, TreeEnsemble, TreeNode};
use veil_ir::{Elem, Expr, Graph, Linear, LinearKind, NodeId, Op, Range, Tlu};

/// Label of the linear maps of a tree circuit: their ranges are exact by construction,
/// so `ranges::narrow` leaves them alone.
pub const TREE_LABEL: &str = "tree";

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

/// One leaf lookup: a leaf's parent and the linear form of what it reads.
struct Unit {
    /// Coefficient per comparison bit, and the constant.
    weights: HashMap<usize, i64>,
    constant: i64,
    depth: i64,
    /// The leaf child's weights when the test holds / fails (None: an internal child).
    on_true: Option<Vec<(usize, f32)>>,
    on_false: Option<Vec<(usize, f32)>>,
}

/// Build the circuit of `e` into `out`, reading the rank-encoded features `ranks`
/// (`[batch, features]`, ranks over `cuts`).
pub fn build(out: &mut Graph, e: &TreeEnsemble, ranks: NodeId, cuts: &[Vec<Cut>], name: &str) -> Result<Scores> {
    let err = |msg: String| PassError::Unsupported { node: name.into(), msg };
    if matches!(e.aggregate, Aggregate::Min | Aggregate::Max) {
        return Err(err("encrypted trees aggregate by sum or average, not min/max".into()));
    }
    let per_tree = if e.aggregate == Aggregate::Average { 1.0 / e.trees.len().max(1) as f64 } else { 1.0 };
    // comparison bits: (feature, cut index) → position
    let mut bits: Vec<(usize, usize)> = Vec::new();
    let mut bit_of: HashMap<(usize, usize), usize> = HashMap::new();
    let mut units: Vec<Unit> = Vec::new();
    let mut constant = vec![0.0f64; e.n_targets];
    for tree in &e.trees {
        if let TreeNode::Leaf { weights } = &tree[0] {
            weights.iter().for_each(|&(t, w)| constant[t] += w as f64 * per_tree);
            continue;
        }
        // depth-first: (node, depth, path conditions as (bit, sign) with cond = sign·b + (1 − sign)/2·2…)
        let mut stack: Vec<(usize, Vec<(usize, bool)>)> = vec![(0, Vec::new())];
        while let Some((k, path)) = stack.pop() {
            let TreeNode::Branch { feature, threshold, mode, if_true, if_false, .. } = &tree[k] else { continue };
            let (cut, positive) = branch_cut(*mode, *threshold).ok_or_else(|| {
                err("a tree tests equality (BRANCH_EQ/NEQ), which encrypted trees do not support".into())
            })?;
            let j = snap(&cuts[*feature], cut);
            let bit = *bit_of.entry((*feature, j)).or_insert_with(|| {
                bits.push((*feature, j));
                bits.len() - 1
            });
            // the test is b (positive) or 1 − b; an edge condition is the test or its negation
            let leaf = |c: usize| match &tree[c] {
                TreeNode::Leaf { weights } => Some(weights.clone()),
                TreeNode::Branch { .. } => None,
            };
            let (on_true, on_false) = (leaf(*if_true), leaf(*if_false));
            if on_true.is_some() || on_false.is_some() {
                let depth = path.len() as i64;
                let mut u = Unit { weights: HashMap::new(), constant: 0, depth, on_true, on_false };
                for &(b, holds) in &path {
                    add_condition(&mut u, b, holds);
                }
                // (d + 1)·test
                let (w, c) = if positive { (1, 0) } else { (-1, 1) };
                *u.weights.entry(bit).or_default() += (depth + 1) * w;
                u.constant += (depth + 1) * c;
                units.push(u);
            }
            for (child, taken) in [(*if_true, positive), (*if_false, !positive)] {
                let mut p = path.clone();
                // the edge to `child` holds when b == taken
                p.push((bit, taken));
                stack.push((child, p));
            }
        }
    }
    if bits.is_empty() {
        return Err(err("the trees test no feature: the model is a constant".into()));
    }
    let rank_max = cuts.iter().map(|c| c.len()).max().unwrap_or(0) as i64;
    // comparisons: gather each bit's feature, then b = clamp(j + 1 − rank, 0, 1)
    let features =
        ArrayD::from_shape_vec(vec![bits.len()], bits.iter().map(|&(f, _)| f as i64).collect()).expect("one per bit");
    let gathered = out.add(Op::Gather { axis: 1, indices: features }, &[ranks], format!("{name}/ranks"))?;
    // b = [rank ≤ j] as a table over the ranks (a clamp would read as saturation to
    // the overflow report)
    let thresholds: Vec<ArrayD<f64>> = (0..=rank_max)
        .map(|r| {
            let v = bits.iter().map(|&(_, j)| f64::from(u8::from(r <= j as i64))).collect();
            ArrayD::from_shape_vec(vec![bits.len()], v).expect("one per bit")
        })
        .collect();
    let compare = Expr::Table { index: Box::new(Expr::Input), first: 0, len: rank_max as usize + 1 };
    let tlu =
        Tlu { expr: compare, input: Range::new(0, rank_max), params: thresholds, rounding: 0, label: "compare".into() };
    let bit_node = out.add(Op::Tlu(Box::new(tlu)), &[gathered], format!("{name}/compare"))?;
    // what each leaf lookup reads
    let mut w = Array2::<i64>::zeros((units.len(), bits.len()));
    for (u, unit) in units.iter().enumerate() {
        unit.weights.iter().for_each(|(&b, &c)| w[[u, b]] += c);
    }
    let bias =
        ArrayD::from_shape_vec(vec![units.len()], units.iter().map(|u| u.constant).collect()).expect("one per unit");
    let lin = Linear::new(LinearKind::Dense { weights: w }, bias, TREE_LABEL);
    let packed = out.add(Op::Linear(Box::new(lin)), &[bit_node], format!("{name}/reach"))?;
    let len = match out.node(packed).ty.elem {
        Elem::Enc(r) if r.lo >= 0 => r.hi as usize + 1,
        _ => return Err(err("internal: a leaf lookup reads a negative value".into())),
    };
    // scale per target: the summed leaf values span SCORE_STEPS integers
    let (mut lo, mut hi) = (constant.clone(), constant.clone());
    for tree in &e.trees {
        for t in 0..e.n_targets {
            let vals = tree.iter().filter_map(|n| match n {
                TreeNode::Leaf { weights } => {
                    Some(weights.iter().filter(|w| w.0 == t).map(|w| w.1 as f64 * per_tree).sum::<f64>())
                }
                TreeNode::Branch { .. } => None,
            });
            let (l, h) = vals.fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), v| (l.min(v), h.max(v)));
            if l.is_finite() && !matches!(tree[0], TreeNode::Leaf { .. }) {
                lo[t] += l;
                hi[t] += h;
            }
        }
    }
    let scale: Vec<f64> = lo.iter().zip(&hi).map(|(&l, &h)| if h > l { (h - l) / SCORE_STEPS } else { 1.0 }).collect();
    // one leaf lookup per (unit, target it writes)
    let mut elems: Vec<(usize, usize)> = Vec::new();
    for (u, unit) in units.iter().enumerate() {
        for t in 0..e.n_targets {
            let writes = |l: &Option<Vec<(usize, f32)>>| l.iter().flatten().any(|w| w.0 == t && w.1 != 0.0);
            if writes(&unit.on_true) || writes(&unit.on_false) {
                elems.push((u, t));
            }
        }
    }
    if elems.is_empty() {
        return Err(err("every leaf is zero: the model is a constant".into()));
    }
    let value = |l: &Option<Vec<(usize, f32)>>, t: usize| -> f64 {
        let v: f64 = l.iter().flatten().filter(|w| w.0 == t).map(|w| w.1 as f64 * per_tree).sum();
        (v / scale[t]).round()
    };
    let params: Vec<ArrayD<f64>> = (0..len)
        .map(|i| {
            let vals = elems.iter().map(|&(u, t)| {
                let unit = &units[u];
                let (s, test) = (i as i64 % (unit.depth + 1), i as i64 / (unit.depth + 1));
                match (s == unit.depth, test) {
                    (true, 1) => value(&unit.on_true, t),
                    (true, 0) => value(&unit.on_false, t),
                    _ => 0.0,
                }
            });
            ArrayD::from_shape_vec(vec![elems.len()], vals.collect()).expect("one per element")
        })
        .collect();
    let units_idx = ArrayD::from_shape_vec(vec![elems.len()], elems.iter().map(|&(u, _)| u as i64).collect())
        .expect("one per element");
    let per_elem =
        out.add(Op::Gather { axis: 1, indices: units_idx }, &[packed], format!("{name}/reach_per_target"))?;
    let table = Expr::Table { index: Box::new(Expr::Input), first: 0, len };
    let input = Range::new(0, len as i64 - 1);
    let tlu = Tlu { expr: table, input, params, rounding: 0, label: "leaves".into() };
    let leaves = out.add(Op::Tlu(Box::new(tlu)), &[per_elem], format!("{name}/leaves"))?;
    // sum per target
    let mut sum = Array2::<i64>::zeros((e.n_targets, elems.len()));
    elems.iter().enumerate().for_each(|(k, &(_, t))| sum[[t, k]] = 1);
    let lin = Linear::new(LinearKind::Dense { weights: sum }, ArrayD::zeros(vec![e.n_targets]), TREE_LABEL);
    let sums = out.add(Op::Linear(Box::new(lin)), &[leaves], format!("{name}/scores"))?;
    // Exactly one leaf per tree is reached: the scores lie within Σ_trees [min, max] of
    // their leaves' integers, far inside the interval bound of a sum over all units.
    let (mut lo_sum, mut hi_sum) = (vec![0i64; e.n_targets], vec![0i64; e.n_targets]);
    for tree in e.trees.iter().filter(|t| !matches!(t[0], TreeNode::Leaf { .. })) {
        for t in 0..e.n_targets {
            let q = tree.iter().filter_map(|n| match n {
                TreeNode::Leaf { weights } => Some(value(&Some(weights.clone()), t) as i64),
                TreeNode::Branch { .. } => None,
            });
            let (l, h) = q.fold((i64::MAX, i64::MIN), |(l, h), v| (l.min(v), h.max(v)));
            lo_sum[t] += l;
            hi_sum[t] += h;
        }
    }
    let exact = Range::new(lo_sum.iter().copied().min().unwrap_or(0), hi_sum.iter().copied().max().unwrap_or(0));
    let node = out.add(Op::Assume { range: exact }, &[sums], format!("{name}/scores"))?;
    let base = |t: usize| match e.base_values.len() {
        0 => 0.0,
        1 => e.base_values[0] as f64,
        _ => e.base_values[t] as f64,
    };
    let offset = (0..e.n_targets).map(|t| constant[t] + base(t)).collect();
    Ok(Scores { node, scale, offset })
}

/// Add the condition "edge taken when bit `b` == `holds`" to a unit's sum.
fn add_condition(u: &mut Unit, b: usize, holds: bool) {
    if holds {
        *u.weights.entry(b).or_default() += 1;
    } else {
        *u.weights.entry(b).or_default() -= 1;
        u.constant += 1;
    }
}
