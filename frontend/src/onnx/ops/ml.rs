//! The `ai.onnx.ml` ops skl2onnx writes for scikit-learn models. Each is expressed with
//! ordinary IR ops (a linear model becomes a Gemm, post-transforms become Sigmoid/Softmax),
//! so later passes need no special cases; the semantics follow onnxruntime's kernels,
//! including their binary-classification conventions.

use super::{one, Registry};
use crate::error::Result;
use crate::onnx::attr::NodeView;
use crate::onnx::{Ctx, Value};
use ndarray::ArrayD;
use std::collections::{BTreeSet, HashMap};
use veil_ir::op::{Aggregate, BranchMode, Norm, TreeEnsemble, TreeNode, UnaryFn};
use veil_ir::{BinaryFn, Dim, Op, Tensor};

const ML: &str = "ai.onnx.ml";

pub(super) fn register(r: &mut Registry) {
    r.insert((ML, "LinearRegressor"), linear_regressor);
    r.insert((ML, "LinearClassifier"), linear_classifier);
    r.insert((ML, "Scaler"), scaler);
    r.insert((ML, "Normalizer"), normalizer);
    r.insert((ML, "ZipMap"), zipmap);
    r.insert((ML, "ArrayFeatureExtractor"), array_feature_extractor);
    r.insert((ML, "TreeEnsembleRegressor"), tree_regressor);
    r.insert((ML, "TreeEnsembleClassifier"), tree_classifier);
}

fn f32_tensor(shape: Vec<usize>, v: Vec<f32>) -> Tensor {
    Tensor::F32(ArrayD::from_shape_vec(shape, v).expect("length matches shape"))
}

/// Features as a [N, F] float matrix (a 1-D input is one sample).
fn features(c: &mut Ctx, n: &NodeView) -> Result<(Value, String, usize)> {
    let x = c.input(n, 0)?;
    let name = n.required_input(0)?.to_string();
    let ty = c.type_of(&x);
    let f = match ty.shape.dims() {
        [_, Dim::Fixed(f)] => *f,
        _ => return Err(n.err(format!("expects [batch, features] input, got {}", ty.shape))),
    };
    let x = if ty.elem == veil_ir::Elem::F32 {
        x
    } else {
        c.apply(n, Op::Cast { to: veil_ir::Elem::F32 }, &[(x, name.clone())], &format!("{name}_f32"))?
    };
    Ok((x, name, f))
}

/// scores = x · Wᵀ + b, as a Gemm with constant weights.
fn linear_scores(c: &mut Ctx, n: &NodeView, targets: usize, out: &str) -> Result<Value> {
    let (x, x_name, f) = features(c, n)?;
    let coef = n.required_floats("coefficients")?;
    if targets == 0 || coef.len() != targets * f {
        return Err(n.err(format!("{} coefficients do not fit {targets} target(s) × {f} features", coef.len())));
    }
    let mut b = n.floats("intercepts")?.unwrap_or_else(|| vec![0.0; targets]);
    if b.len() == 1 && targets > 1 {
        b = vec![b[0]; targets];
    }
    if b.len() != targets {
        return Err(n.err(format!("{} intercepts for {targets} target(s)", b.len())));
    }
    let w = Value::Const(f32_tensor(vec![targets, f], coef));
    let bias = Value::Const(f32_tensor(vec![targets], b));
    let op = Op::Gemm { alpha: 1.0, beta: 1.0, trans_a: false, trans_b: true };
    let base = n.output_name(0);
    c.apply(n, op, &[(x, x_name), (w, format!("{base}_coefficients")), (bias, format!("{base}_intercepts"))], out)
}

fn post_transform(c: &mut Ctx, n: &NodeView, scores: Value, name: &str, out: &str) -> Result<Value> {
    let op = match n.string("post_transform", "NONE")?.as_str() {
        "NONE" => return Ok(scores),
        "LOGISTIC" => Op::Unary(UnaryFn::Sigmoid),
        "SOFTMAX" => Op::Softmax { axis: 1 },
        other => return Err(n.err(format!("post_transform {other} is not supported (NONE, LOGISTIC, SOFTMAX are)"))),
    };
    c.apply(n, op, &[(scores, name.to_string())], out)
}

fn linear_regressor(c: &mut Ctx, n: &NodeView) -> Result<Vec<Value>> {
    c.g.task = Some(veil_ir::Task::Regression);
    let targets = n.int("targets", 1)?;
    let out = n.output_name(0);
    let raw = format!("{out}_scores");
    let scores = linear_scores(c, n, targets.max(0) as usize, &raw)?;
    one(post_transform(c, n, scores, &raw, &out)?)
}

/// Class labels from `classlabels_ints`/`classlabels_int64s`; string labels become their
/// index (a .npy of int64 cannot hold strings).
fn class_labels(n: &NodeView, ints_attr: &str, strings_attr: &str) -> Result<Vec<i64>> {
    if let Some(l) = n.ints(ints_attr)? {
        return Ok(l);
    }
    if let Some(s) = n.strings(strings_attr)? {
        return Ok((0..s.len() as i64).collect());
    }
    Err(n.err(format!("needs '{ints_attr}' or '{strings_attr}'")))
}

/// label = labels[argmax(scores)], computed on `scores`.
fn label_of(c: &mut Ctx, n: &NodeView, scores: Value, scores_name: &str, labels: Vec<i64>) -> Result<Value> {
    let base = n.output_name(0);
    let ix_name = format!("{base}_index");
    let ix = c.apply(
        n,
        Op::ArgMax { axis: 1, keepdims: false, select_last: false },
        &[(scores, scores_name.into())],
        &ix_name,
    )?;
    c.apply(n, Op::ClassLabel { labels }, &[(ix, ix_name)], &base)
}

fn concat_pair(c: &mut Ctx, n: &NodeView, a: (Value, String), b: (Value, String), out: &str) -> Result<Value> {
    c.apply(n, Op::Concat { axis: 1 }, &[a, b], out)
}

fn linear_classifier(c: &mut Ctx, n: &NodeView) -> Result<Vec<Value>> {
    c.g.task = Some(veil_ir::Task::Classification);
    let labels = class_labels(n, "classlabels_ints", "classlabels_strings")?;
    let targets = n.floats("intercepts")?.map(|b| b.len()).unwrap_or(labels.len());
    let probs_name = n.output_name(1);
    let raw = format!("{probs_name}_scores");
    let scores = linear_scores(c, n, targets, &raw)?;
    if targets >= 2 {
        // onnxruntime picks the label from the raw scores, then transforms them.
        let label = label_of(c, n, scores.clone(), &raw, labels)?;
        let probs = post_transform(c, n, scores, &raw, &probs_name)?;
        return Ok(vec![label, probs]);
    }
    if labels.len() != 2 {
        return Err(n.err("a single-target classifier needs exactly two class labels"));
    }
    // One score s for two classes: onnxruntime reports [1 - s, s] and label = s > 0.
    let neg = format!("{raw}_neg");
    let neg_v = c.apply(n, Op::Unary(UnaryFn::Neg), &[(scores.clone(), raw.clone())], &neg)?;
    let pm = format!("{raw}_pm");
    let pm_v = concat_pair(c, n, (neg_v, neg), (scores.clone(), raw.clone()), &pm)?;
    let label = label_of(c, n, pm_v, &pm, labels)?;
    let one_c = Value::Const(Tensor::scalar_f32(1.0));
    let comp = format!("{raw}_complement");
    let comp_v =
        c.apply(n, Op::Binary(BinaryFn::Sub), &[(one_c, format!("{raw}_one")), (scores.clone(), raw.clone())], &comp)?;
    let probs = concat_pair(c, n, (comp_v, comp), (scores, raw), &probs_name)?;
    Ok(vec![label, probs])
}

/// Scaler: (x - offset) * scale, per feature or broadcast from one value.
fn scaler(c: &mut Ctx, n: &NodeView) -> Result<Vec<Value>> {
    let (x, x_name, f) = features(c, n)?;
    let fit = |v: Vec<f32>, what: &str| -> Result<Tensor> {
        match v.len() {
            1 => Ok(Tensor::scalar_f32(v[0])),
            l if l == f => Ok(f32_tensor(vec![f], v)),
            l => Err(n.err(format!("{l} {what} values for {f} features"))),
        }
    };
    let offset = fit(n.floats("offset")?.unwrap_or(vec![0.0]), "offset")?;
    let scale = fit(n.floats("scale")?.unwrap_or(vec![1.0]), "scale")?;
    let base = n.output_name(0);
    let shifted = format!("{base}_shifted");
    let y = c.apply(
        n,
        Op::Binary(BinaryFn::Sub),
        &[(x, x_name), (Value::Const(offset), format!("{base}_offset"))],
        &shifted,
    )?;
    one(c.apply(
        n,
        Op::Binary(BinaryFn::Mul),
        &[(y, shifted), (Value::Const(scale), format!("{base}_scale"))],
        &base,
    )?)
}

fn normalizer(c: &mut Ctx, n: &NodeView) -> Result<Vec<Value>> {
    let norm = match n.string("norm", "MAX")?.as_str() {
        "MAX" => Norm::Max,
        "L1" => Norm::L1,
        "L2" => Norm::L2,
        other => return Err(n.err(format!("unknown norm '{other}'"))),
    };
    let (x, name, _) = features(c, n)?;
    one(c.apply(n, Op::Normalize { norm }, &[(x, name)], &n.output_name(0))?)
}

/// ZipMap turns probabilities into a list of {label: p} maps; veil keeps the tensor.
fn zipmap(c: &mut Ctx, n: &NodeView) -> Result<Vec<Value>> {
    one(c.input(n, 0)?)
}

/// skl2onnx uses ArrayFeatureExtractor both to pick columns and to map class indices to
/// labels (`classes[argmax]`).
fn array_feature_extractor(c: &mut Ctx, n: &NodeView) -> Result<Vec<Value>> {
    let x = c.input(n, 0)?;
    let y = c.input(n, 1)?;
    match (x, y) {
        (Value::Const(Tensor::I64(labels)), idx @ Value::Node(_)) if labels.ndim() == 1 => {
            let name = n.required_input(1)?.to_string();
            one(c.apply(
                n,
                Op::ClassLabel { labels: labels.iter().copied().collect() },
                &[(idx, name)],
                &n.output_name(0),
            )?)
        }
        (x, Value::Const(Tensor::I64(ix))) => {
            let rank = c.type_of(&x).shape.rank();
            let ix = ArrayD::from_shape_vec(vec![ix.len()], ix.iter().copied().collect()).expect("1-D");
            let name = n.required_input(0)?.to_string();
            one(c.apply(n, Op::Gather { axis: rank - 1, indices: ix }, &[(x, name)], &n.output_name(0))?)
        }
        _ => Err(n.err("needs either constant class labels or constant column indices")),
    }
}

/// The shared tree attributes: `prefix` is "target" (regressor) or "class" (classifier).
struct Trees {
    ensemble: TreeEnsemble,
    /// All leaf weights ≥ 0 (decides onnxruntime's binary convention).
    weights_positive: bool,
    /// Distinct target/class ids leaves write to.
    ids: BTreeSet<usize>,
}

fn parse_trees(c: &Ctx, n: &NodeView, prefix: &str, n_targets: usize) -> Result<Trees> {
    let ints = |name: &str| n.required_ints(name);
    let tree_ids = ints("nodes_treeids")?;
    let node_ids = ints("nodes_nodeids")?;
    let features = ints("nodes_featureids")?;
    let modes = n.strings("nodes_modes")?.ok_or_else(|| n.err("attribute 'nodes_modes' is required"))?;
    let values = match n.floats("nodes_values")? {
        Some(v) => v,
        None => match n.tensor("nodes_values_as_tensor")? {
            Some(t) => crate::onnx::tensor::to_tensor(t)
                .map_err(|e| n.err(e))?
                .values_f64()
                .iter()
                .map(|&v| v as f32)
                .collect(),
            None => return Err(n.err("attribute 'nodes_values' is required")),
        },
    };
    let if_true = ints("nodes_truenodeids")?;
    let if_false = ints("nodes_falsenodeids")?;
    let missing = n.ints("nodes_missing_value_tracks_true")?.unwrap_or_else(|| vec![0; tree_ids.len()]);
    let len = tree_ids.len();
    if [node_ids.len(), features.len(), modes.len(), values.len(), if_true.len(), if_false.len(), missing.len()]
        .iter()
        .any(|&l| l != len)
    {
        return Err(n.err("the nodes_* attributes have different lengths"));
    }
    // Position of each (tree, node id) within its tree's node list.
    let mut tree_index: HashMap<i64, usize> = HashMap::new();
    let mut pos: HashMap<(i64, i64), (usize, usize)> = HashMap::new();
    let mut trees: Vec<Vec<TreeNode>> = Vec::new();
    // ONNX ids of each tree and of its nodes, in list order, to name faults
    let (mut onnx_tree, mut onnx_node): (Vec<i64>, Vec<Vec<i64>>) = (Vec::new(), Vec::new());
    for i in 0..len {
        let t = *tree_index.entry(tree_ids[i]).or_insert_with(|| {
            trees.push(Vec::new());
            onnx_tree.push(tree_ids[i]);
            onnx_node.push(Vec::new());
            trees.len() - 1
        });
        if pos.insert((tree_ids[i], node_ids[i]), (t, trees[t].len())).is_some() {
            return Err(n.err(format!("tree {} lists node {} twice", tree_ids[i], node_ids[i])));
        }
        trees[t].push(TreeNode::Leaf { weights: Vec::new() });
        onnx_node[t].push(node_ids[i]);
    }
    for i in 0..len {
        let (t, k) = pos[&(tree_ids[i], node_ids[i])];
        let mode = match modes[i].as_str() {
            "LEAF" => continue,
            "BRANCH_LEQ" => BranchMode::Leq,
            "BRANCH_LT" => BranchMode::Lt,
            "BRANCH_GTE" => BranchMode::Gte,
            "BRANCH_GT" => BranchMode::Gt,
            "BRANCH_EQ" => BranchMode::Eq,
            "BRANCH_NEQ" => BranchMode::Neq,
            other => return Err(n.err(format!("unknown node mode '{other}'"))),
        };
        let child = |id: i64| {
            pos.get(&(tree_ids[i], id))
                .map(|&(_, k)| k)
                .ok_or_else(|| n.err(format!("tree {} has no node {id}", tree_ids[i])))
        };
        trees[t][k] = TreeNode::Branch {
            feature: usize::try_from(features[i]).map_err(|_| n.err("negative feature id"))?,
            threshold: values[i],
            mode,
            if_true: child(if_true[i])?,
            if_false: child(if_false[i])?,
            nan_true: missing[i] != 0,
        };
    }
    let w_trees = ints(&format!("{prefix}_treeids"))?;
    let w_nodes = ints(&format!("{prefix}_nodeids"))?;
    let w_ids = ints(&format!("{prefix}_ids"))?;
    let w_vals = n.required_floats(&format!("{prefix}_weights"))?;
    if w_nodes.len() != w_trees.len() || w_ids.len() != w_trees.len() || w_vals.len() != w_trees.len() {
        return Err(n.err(format!("the {prefix}_* attributes have different lengths")));
    }
    let mut ids = BTreeSet::new();
    for i in 0..w_trees.len() {
        let (t, k) = *pos
            .get(&(w_trees[i], w_nodes[i]))
            .ok_or_else(|| n.err(format!("weight for missing node {} of tree {}", w_nodes[i], w_trees[i])))?;
        let id = usize::try_from(w_ids[i])
            .ok()
            .filter(|&id| id < n_targets.max(1))
            .ok_or_else(|| n.err(format!("{prefix} id {} out of range", w_ids[i])))?;
        ids.insert(id);
        match &mut trees[t][k] {
            TreeNode::Leaf { weights } => weights.push((id, w_vals[i])),
            TreeNode::Branch { .. } => {
                return Err(n.err(format!("weight on branch node {} of tree {}", w_nodes[i], w_trees[i])))
            }
        }
    }
    let x = c.input(n, 0)?;
    let n_features = match c.type_of(&x).shape.dims() {
        [_, Dim::Fixed(f)] => *f,
        _ => return Err(n.err("expects [batch, features] input")),
    };
    if let Some(bad) = trees.iter().flatten().find_map(|t| match t {
        TreeNode::Branch { feature, .. } if *feature >= n_features => Some(*feature),
        _ => None,
    }) {
        return Err(n.err(format!("a tree reads feature {bad}, the input has {n_features}")));
    }
    let probe =
        TreeEnsemble { n_features, n_targets: n_targets.max(1), trees, aggregate: Aggregate::Sum, base_values: vec![] };
    if let Err(f) = probe.check() {
        let node = onnx_node[f.tree].get(f.node).copied().unwrap_or(f.node as i64);
        return Err(n.err(format!("tree {} node {node}: {}", onnx_tree[f.tree], f.msg)));
    }
    let trees = probe.trees;
    let base_values = match n.floats("base_values")? {
        Some(v) => v,
        None => match n.tensor("base_values_as_tensor")? {
            Some(t) => crate::onnx::tensor::to_tensor(t)
                .map_err(|e| n.err(e))?
                .values_f64()
                .iter()
                .map(|&v| v as f32)
                .collect(),
            None => Vec::new(),
        },
    };
    Ok(Trees {
        weights_positive: w_vals.iter().all(|&w| w >= 0.0),
        ids,
        ensemble: TreeEnsemble { n_features, n_targets, trees, aggregate: Aggregate::Sum, base_values },
    })
}

fn tree_regressor(c: &mut Ctx, n: &NodeView) -> Result<Vec<Value>> {
    c.g.task = Some(veil_ir::Task::Regression);
    let n_targets = n.int("n_targets", 1)?.max(1) as usize;
    let mut t = parse_trees(c, n, "target", n_targets)?;
    t.ensemble.aggregate = match n.string("aggregate_function", "SUM")?.as_str() {
        "SUM" => Aggregate::Sum,
        "AVERAGE" => Aggregate::Average,
        "MIN" => Aggregate::Min,
        "MAX" => Aggregate::Max,
        other => return Err(n.err(format!("unknown aggregate_function '{other}'"))),
    };
    // One base value for one target is onnxruntime's "origin"; otherwise one per target.
    if !t.ensemble.base_values.is_empty() && t.ensemble.base_values.len() != n_targets {
        return Err(n.err(format!("{} base values for {n_targets} targets", t.ensemble.base_values.len())));
    }
    let (x, x_name, _) = features(c, n)?;
    let out = n.output_name(0);
    let raw = format!("{out}_scores");
    let scores = c.apply(n, Op::TreeEnsemble(Box::new(t.ensemble)), &[(x, x_name)], &raw)?;
    one(post_transform(c, n, scores, &raw, &out)?)
}

fn tree_classifier(c: &mut Ctx, n: &NodeView) -> Result<Vec<Value>> {
    c.g.task = Some(veil_ir::Task::Classification);
    let labels = class_labels(n, "classlabels_int64s", "classlabels_strings")?;
    let n_classes = labels.len();
    let mut t = parse_trees(c, n, "class", n_classes)?;
    let (x, x_name, _) = features(c, n)?;
    let probs_name = n.output_name(1);
    let raw = format!("{probs_name}_scores");
    let binary = n_classes == 2 && t.ids.len() == 1;
    if !binary {
        if n_classes == 2 {
            return Err(n.err("two-class trees writing to both class ids are not supported"));
        }
        if !t.ensemble.base_values.is_empty() && t.ensemble.base_values.len() != n_classes {
            return Err(n.err(format!("{} base values for {n_classes} classes", t.ensemble.base_values.len())));
        }
        t.ensemble.n_targets = n_classes;
        let scores = c.apply(n, Op::TreeEnsemble(Box::new(t.ensemble)), &[(x, x_name)], &raw)?;
        let label = label_of(c, n, scores.clone(), &raw, labels)?;
        let probs = post_transform(c, n, scores, &raw, &probs_name)?;
        return Ok(vec![label, probs]);
    }
    // Binary: the trees produce one score s (for class id 0). onnxruntime reports
    // [1 - s, s] when every weight is positive (label: s > 0.5), otherwise
    // [σ(-s), σ(s)] under LOGISTIC or [-s, s] (label: s > 0).
    if t.ids.first() != Some(&0) {
        return Err(n.err("binary trees must write their score to class id 0"));
    }
    match t.ensemble.base_values.len() {
        0 | 1 => {}
        k => return Err(n.err(format!("{k} base values for a binary classifier are not supported"))),
    }
    t.ensemble.n_targets = 1;
    let s = c.apply(n, Op::TreeEnsemble(Box::new(t.ensemble)), &[(x, x_name)], &raw)?;
    let transform = n.string("post_transform", "NONE")?;
    let probs = if t.weights_positive {
        let comp = format!("{raw}_complement");
        let one_c = (Value::Const(Tensor::scalar_f32(1.0)), format!("{raw}_one"));
        let comp_v = c.apply(n, Op::Binary(BinaryFn::Sub), &[one_c, (s.clone(), raw.clone())], &comp)?;
        concat_pair(c, n, (comp_v, comp), (s, raw.clone()), &probs_name)?
    } else {
        let neg = format!("{raw}_neg");
        let neg_v = c.apply(n, Op::Unary(UnaryFn::Neg), &[(s.clone(), raw.clone())], &neg)?;
        match transform.as_str() {
            "LOGISTIC" => {
                let (a, b) = (format!("{raw}_p0"), format!("{raw}_p1"));
                let pa = c.apply(n, Op::Unary(UnaryFn::Sigmoid), &[(neg_v, neg)], &a)?;
                let pb = c.apply(n, Op::Unary(UnaryFn::Sigmoid), &[(s, raw.clone())], &b)?;
                concat_pair(c, n, (pa, a), (pb, b), &probs_name)?
            }
            "NONE" => concat_pair(c, n, (neg_v, neg), (s, raw.clone()), &probs_name)?,
            other => return Err(n.err(format!("post_transform {other} on a binary tree classifier is not supported"))),
        }
    };
    // argmax of the two columns is the label rule in every case above.
    let label = label_of(c, n, probs.clone(), &probs_name, labels)?;
    Ok(vec![label, probs])
}
