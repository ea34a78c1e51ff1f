//! Fusion with an e-graph (egg): rewrites that keep the integer semantics exact, then
//! extraction of the cheapest equivalent graph under a PBS-dominated cost model.
//!
//! Rules (each preserves every integer value exactly, so any extraction is correct):
//! - `tlu(g, tlu(f, x)) → tlu(g∘f, x)`: one bootstrap instead of two;
//! - `tlu(g, scale(x)) → tlu(g∘scale, x)` and `scale(tlu(f, x)) → tlu(scale∘f, x)`:
//!   clear element-wise integer maps fold into tables;
//! - `layout(tlu(f, x)) → tlu(f', layout(x))` for reshape/transpose/gather, the table's
//!   per-element parameters moving with the elements (so lookups can meet across layouts);
//! - `max(tlu(f, a), tlu(f, b)) → tlu(f, max(a, b))` when f is monotone non-decreasing
//!   (max-pooling after ReLU: one lookup per window instead of one per element);
//! - `dense(W2, dense(W1, x)) → dense(W2·W1, x)`: consecutive linear maps merge when that
//!   lowers the multiply-add count.
//!
//! Element-wise regions of one source were already fused by the quantizer (before any
//! rounding was fixed), so these rules act across the boundaries it had to keep.

use crate::error::{PassError, Result};
use egg::{
    define_language, Analysis, Applier, CostFunction, DidMerge, EGraph, Extractor, Id, Language, Pattern, PatternAst,
    Rewrite, Runner, Subst, Symbol, Var,
};
use ndarray::{ArrayD, Axis, IxDyn};
use std::collections::HashMap;
use std::time::Duration;
use veil_ir::linear::{Linear, LinearKind};
use veil_ir::tlu::Monotone;
use veil_ir::{Elem, Expr, Graph, NodeId, Op, Range, TensorType, Tlu};

define_language! {
    /// The e-graph's node kinds: one per integer op, with arena symbols for payloads.
    pub enum Fl {
        "tlu" = Tlu([Id; 2]),
        "lin" = Lin([Id; 2]),
        "add" = Add([Id; 2]),
        "sub" = Sub([Id; 2]),
        "max" = Max([Id; 2]),
        "op" = Other(Box<[Id]>),
        Sym(Symbol),
    }
}

/// A table function without its input range (which the operand's class supplies).
#[derive(Clone, Debug, PartialEq)]
pub struct Fun {
    pub expr: Expr,
    pub params: Vec<ArrayD<f64>>,
    pub label: String,
}

/// Payloads the symbols point to, and the analysis: each tensor class's type.
#[derive(Default)]
pub struct Fuse {
    funs: Vec<Fun>,
    lins: Vec<Linear>,
    ops: Vec<Op>,
    inputs: Vec<TensorType>,
}

impl Fuse {
    fn fun(&mut self, f: Fun) -> Symbol {
        let i = self.funs.iter().position(|g| *g == f).unwrap_or_else(|| {
            self.funs.push(f);
            self.funs.len() - 1
        });
        Symbol::from(format!("f{i}"))
    }

    fn lin(&mut self, l: Linear) -> Symbol {
        self.lins.push(l);
        Symbol::from(format!("l{}", self.lins.len() - 1))
    }

    fn op(&mut self, o: Op) -> Symbol {
        self.ops.push(o);
        Symbol::from(format!("o{}", self.ops.len() - 1))
    }
}

type EG = EGraph<Fl, Fuse>;

/// The arena index behind a symbol class (`f3` → 3), if it has that prefix.
fn sym(egraph: &EG, id: Id, prefix: char) -> Option<usize> {
    egraph[id].nodes.iter().find_map(|n| match n {
        Fl::Sym(s) => s.as_str().strip_prefix(prefix).and_then(|r| r.parse().ok()),
        _ => None,
    })
}

fn range_of(t: &TensorType) -> Option<Range> {
    match t.elem {
        Elem::Enc(r) => Some(r),
        _ => None,
    }
}

impl Fuse {
    /// The IR op a node stands for, given its children's types.
    fn ir_op(&self, egraph: &EG, enode: &Fl) -> Option<(Op, Vec<Id>)> {
        Some(match enode {
            Fl::Tlu([f, x]) => {
                let fun = &self.funs[sym(egraph, *f, 'f')?];
                let input = range_of(egraph[*x].data.as_ref()?)?;
                let t = Tlu {
                    expr: fun.expr.clone(),
                    input,
                    params: fun.params.clone(),
                    rounding: 0,
                    label: fun.label.clone(),
                };
                (Op::Tlu(Box::new(t)), vec![*x])
            }
            Fl::Lin([l, x]) => (Op::Linear(Box::new(self.lins[sym(egraph, *l, 'l')?].clone())), vec![*x]),
            Fl::Add([a, b]) => (Op::AddEnc, vec![*a, *b]),
            Fl::Sub([a, b]) => (Op::SubEnc, vec![*a, *b]),
            Fl::Max([a, b]) => (Op::MaxEnc { rounding: 0, diff: None }, vec![*a, *b]),
            Fl::Other(ch) => (self.ops[sym(egraph, ch[0], 'o')?].clone(), ch[1..].to_vec()),
            Fl::Sym(_) => return None,
        })
    }
}

impl Analysis<Fl> for Fuse {
    /// The type of a tensor class (None for symbol classes).
    type Data = Option<TensorType>;

    fn make(egraph: &mut EG, enode: &Fl) -> Self::Data {
        if let Fl::Sym(s) = enode {
            return s
                .as_str()
                .strip_prefix("in")
                .and_then(|i| i.parse::<usize>().ok())
                .map(|i| egraph.analysis.inputs[i].clone());
        }
        let (op, kids) = egraph.analysis.ir_op(egraph, enode)?;
        let tys: Vec<TensorType> = kids.iter().map(|k| egraph[*k].data.clone()).collect::<Option<_>>()?;
        let refs: Vec<&TensorType> = tys.iter().collect();
        op.infer(&refs).ok()
    }

    /// Equal classes hold equal values, so each sound range bounds both: intersect.
    fn merge(&mut self, a: &mut Self::Data, b: Self::Data) -> DidMerge {
        match (a.as_mut(), b) {
            (Some(x), Some(y)) => match (x.elem, y.elem) {
                (Elem::Enc(r), Elem::Enc(s)) => {
                    let m = Range::new(r.lo.max(s.lo), r.hi.min(s.hi).max(r.lo.max(s.lo)));
                    let changed = m != r;
                    x.elem = Elem::Enc(m);
                    DidMerge(changed, m != s)
                }
                _ => DidMerge(false, false),
            },
            (None, Some(y)) => {
                *a = Some(y);
                DidMerge(true, false)
            }
            _ => DidMerge(false, false),
        }
    }
}

/// Per-element parameters of a table over a tensor with per-sample shape `dims`, as full
/// arrays of that shape.
fn full_params(params: &[ArrayD<f64>], dims: &[usize]) -> Option<Vec<ArrayD<f64>>> {
    params.iter().map(|p| p.broadcast(IxDyn(dims)).map(|v| v.to_owned())).collect()
}

fn sample_dims(t: &TensorType) -> Vec<usize> {
    let d = t.shape.dims();
    let skip = usize::from(d.first() == Some(&veil_ir::Dim::Batch));
    d[skip..].iter().map(|x| x.fixed().unwrap_or(1)).collect()
}

/// `g ∘ f`: f's output is g's input; parameters of f are numbered after g's.
fn compose(g: &Fun, f: &Fun) -> Fun {
    let mut params = g.params.clone();
    params.extend(f.params.iter().cloned());
    Fun {
        expr: g.expr.substitute(&f.expr.shift_params(g.params.len())),
        params,
        label: format!("{}+{}", f.label, g.label),
    }
}

/// An element-wise integer map `x·factor + bias` as a table function, if `l` is one.
fn scale_fun(l: &Linear) -> Option<Fun> {
    let LinearKind::Scale { factor } = &l.kind else { return None };
    let f = factor.mapv(|v| v as f64);
    let b = l.bias.mapv(|v| v as f64);
    let expr = Expr::binary(
        veil_ir::BinaryFn::Add,
        Expr::binary(veil_ir::BinaryFn::Mul, Expr::Input, Expr::Param(0)),
        Expr::Param(1),
    );
    Some(Fun { expr, params: vec![f, b], label: "scale".into() })
}

struct Compose {
    g: Var,
    f: Var,
    x: Var,
}

impl Applier<Fl, Fuse> for Compose {
    fn apply_one(&self, eg: &mut EG, eclass: Id, subst: &Subst, _: Option<&PatternAst<Fl>>, _: Symbol) -> Vec<Id> {
        let (Some(gi), Some(fi)) = (sym(eg, subst[self.g], 'f'), sym(eg, subst[self.f], 'f')) else { return vec![] };
        let fun = compose(&eg.analysis.funs[gi], &eg.analysis.funs[fi]);
        let s = eg.analysis.fun(fun);
        let s = eg.add(Fl::Sym(s));
        let new = eg.add(Fl::Tlu([s, subst[self.x]]));
        union(eg, eclass, new)
    }
}

fn union(eg: &mut EG, a: Id, b: Id) -> Vec<Id> {
    if eg.union(a, b) {
        vec![a]
    } else {
        vec![]
    }
}

/// `tlu(g, scale(x)) → tlu(g∘scale, x)`.
struct AbsorbIn {
    g: Var,
    l: Var,
    x: Var,
}

impl Applier<Fl, Fuse> for AbsorbIn {
    fn apply_one(&self, eg: &mut EG, eclass: Id, subst: &Subst, _: Option<&PatternAst<Fl>>, _: Symbol) -> Vec<Id> {
        let (Some(gi), Some(li)) = (sym(eg, subst[self.g], 'f'), sym(eg, subst[self.l], 'l')) else { return vec![] };
        let Some(sf) = scale_fun(&eg.analysis.lins[li]) else { return vec![] };
        let fun = compose(&eg.analysis.funs[gi], &sf);
        let s = eg.analysis.fun(fun);
        let s = eg.add(Fl::Sym(s));
        let new = eg.add(Fl::Tlu([s, subst[self.x]]));
        union(eg, eclass, new)
    }
}

/// `scale(tlu(f, x)) → tlu(scale∘f, x)`.
struct AbsorbOut {
    l: Var,
    f: Var,
    x: Var,
}

impl Applier<Fl, Fuse> for AbsorbOut {
    fn apply_one(&self, eg: &mut EG, eclass: Id, subst: &Subst, _: Option<&PatternAst<Fl>>, _: Symbol) -> Vec<Id> {
        let (Some(li), Some(fi)) = (sym(eg, subst[self.l], 'l'), sym(eg, subst[self.f], 'f')) else { return vec![] };
        let Some(sf) = scale_fun(&eg.analysis.lins[li]) else { return vec![] };
        let fun = compose(&sf, &eg.analysis.funs[fi]);
        let s = eg.analysis.fun(fun);
        let s = eg.add(Fl::Sym(s));
        let new = eg.add(Fl::Tlu([s, subst[self.x]]));
        union(eg, eclass, new)
    }
}

/// `layout(tlu(f, x)) → tlu(f', layout(x))` for reshape, transpose and gather.
struct SinkLayout;

impl SinkLayout {
    fn rewrite(eg: &mut EG, eclass: Id, node: &Fl) -> Option<Id> {
        let Fl::Other(ch) = node else { return None };
        if ch.len() != 2 {
            return None;
        }
        let op = eg.analysis.ops[sym(eg, ch[0], 'o')?].clone();
        if !matches!(op, Op::Reshape { .. } | Op::Transpose { .. } | Op::Gather { .. }) {
            return None;
        }
        let (f, x) = eg[ch[1]].nodes.iter().find_map(|n| match n {
            Fl::Tlu([f, x]) => Some((*f, *x)),
            _ => None,
        })?;
        let fun = eg.analysis.funs[sym(eg, f, 'f')?].clone();
        let before = sample_dims(eg[ch[1]].data.as_ref()?);
        // Move each parameter image through the layout op (with a batch of one).
        let mut params = Vec::new();
        for p in full_params(&fun.params, &before)? {
            let moved = veil_ir::interp::layout(&op, &[&p.insert_axis(Axis(0))], 0.0).ok()?;
            params.push(moved.index_axis(Axis(0), 0).to_owned());
        }
        let s = eg.analysis.fun(Fun { params, ..fun });
        let s = eg.add(Fl::Sym(s));
        let moved = eg.add(Fl::Other(vec![ch[0], x].into_boxed_slice()));
        let new = eg.add(Fl::Tlu([s, moved]));
        eg.union(eclass, new).then_some(eclass)
    }
}

/// `max(tlu(f, a), tlu(f, b)) → tlu(f, max(a, b))` for monotone non-decreasing f.
struct MaxCommute {
    f: Var,
    a: Var,
    b: Var,
}

impl Applier<Fl, Fuse> for MaxCommute {
    fn apply_one(&self, eg: &mut EG, eclass: Id, subst: &Subst, _: Option<&PatternAst<Fl>>, _: Symbol) -> Vec<Id> {
        let Some(fi) = sym(eg, subst[self.f], 'f') else { return vec![] };
        let fun = &eg.analysis.funs[fi];
        let bounds: Vec<(f64, f64)> = fun
            .params
            .iter()
            .map(|p| p.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), &v| (l.min(v), h.max(v))))
            .collect();
        if fun.expr.monotone(&bounds) != Some(Monotone::Increasing) {
            return vec![];
        }
        let m = eg.add(Fl::Max([subst[self.a], subst[self.b]]));
        let new = eg.add(Fl::Tlu([subst[self.f], m]));
        union(eg, eclass, new)
    }
}

/// `dense(W2, dense(W1, x)) → dense(W2·W1, x)`.
struct MergeDense {
    l2: Var,
    l1: Var,
    x: Var,
}

impl Applier<Fl, Fuse> for MergeDense {
    fn apply_one(&self, eg: &mut EG, eclass: Id, subst: &Subst, _: Option<&PatternAst<Fl>>, _: Symbol) -> Vec<Id> {
        let (Some(i2), Some(i1)) = (sym(eg, subst[self.l2], 'l'), sym(eg, subst[self.l1], 'l')) else { return vec![] };
        let (a, b) = (&eg.analysis.lins[i2], &eg.analysis.lins[i1]);
        let (LinearKind::Dense { weights: w2 }, LinearKind::Dense { weights: w1 }) = (&a.kind, &b.kind) else {
            return vec![];
        };
        if b.bias.ndim() > 1 || a.bias.ndim() > 1 {
            return vec![];
        }
        let w = w2.dot(w1);
        let b1 = b.bias.broadcast(IxDyn(&[w1.nrows()])).map(|v| v.to_owned());
        let b2 = a.bias.broadcast(IxDyn(&[w2.nrows()])).map(|v| v.to_owned());
        let (Some(b1), Some(b2)) = (b1, b2) else { return vec![] };
        let b1 = b1.into_dimensionality::<ndarray::Ix1>().expect("1-D");
        let bias = (w2.dot(&b1) + b2.into_dimensionality::<ndarray::Ix1>().expect("1-D")).into_dyn();
        let merged = Linear::new(LinearKind::Dense { weights: w }, bias, format!("{}+{}", b.label, a.label));
        let s = eg.analysis.lin(merged);
        let s = eg.add(Fl::Sym(s));
        let new = eg.add(Fl::Lin([s, subst[self.x]]));
        union(eg, eclass, new)
    }
}

fn var(s: &str) -> Var {
    s.parse().expect("valid variable")
}

fn pat(s: &str) -> Pattern<Fl> {
    s.parse().expect("valid pattern")
}

/// Which optional rewrites to use: commuting a lookup past a max trades lookups for
/// precision (maxima of wide accumulators need finer lookups), so the bit-width search
/// tries both.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Rules {
    pub max_commute: bool,
}

impl Default for Rules {
    fn default() -> Self {
        Rules { max_commute: true }
    }
}

fn rules(opts: Rules) -> Vec<Rewrite<Fl, Fuse>> {
    let mut r = vec![
        Rewrite::new("compose", pat("(tlu ?g (tlu ?f ?x))"), Compose { g: var("?g"), f: var("?f"), x: var("?x") })
            .expect("rule"),
        Rewrite::new("absorb-in", pat("(tlu ?g (lin ?l ?x))"), AbsorbIn { g: var("?g"), l: var("?l"), x: var("?x") })
            .expect("rule"),
        Rewrite::new("absorb-out", pat("(lin ?l (tlu ?f ?x))"), AbsorbOut { l: var("?l"), f: var("?f"), x: var("?x") })
            .expect("rule"),
        Rewrite::new(
            "merge-dense",
            pat("(lin ?l2 (lin ?l1 ?x))"),
            MergeDense { l2: var("?l2"), l1: var("?l1"), x: var("?x") },
        )
        .expect("rule"),
    ];
    if opts.max_commute {
        r.push(
            Rewrite::new(
                "max-commute",
                pat("(max (tlu ?f ?a) (tlu ?f ?b))"),
                MaxCommute { f: var("?f"), a: var("?a"), b: var("?b") },
            )
            .expect("rule"),
        );
    }
    r
}

/// Relative costs: a bootstrap per element dominates; a clear multiply-add on a ciphertext
/// costs about a thousandth of one; wider inputs make a bootstrap somewhat dearer.
const PBS: f64 = 1000.0;
const MAC: f64 = 1.0;

struct CircuitCost<'a> {
    eg: &'a EG,
}

impl CircuitCost<'_> {
    fn elems(&self, id: Id) -> f64 {
        self.eg[id].data.as_ref().map_or(0.0, |t| sample_dims(t).iter().product::<usize>() as f64)
    }

    fn bits(&self, id: Id) -> f64 {
        self.eg[id].data.as_ref().and_then(range_of).map_or(0.0, |r| r.bits() as f64)
    }

    fn lookup(&self, elems: f64, bits: f64) -> f64 {
        PBS * elems * (1.0 + 0.05 * bits)
    }
}

impl CostFunction<Fl> for CircuitCost<'_> {
    type Cost = f64;

    fn cost<C: FnMut(Id) -> f64>(&mut self, enode: &Fl, mut costs: C) -> f64 {
        let own = match enode {
            Fl::Tlu([_, x]) => self.lookup(self.elems(*x), self.bits(*x)),
            Fl::Max([a, b]) => self.lookup(self.elems(*a), self.bits(*a).max(self.bits(*b)) + 1.0),
            Fl::Lin([l, x]) => {
                let macs = match (sym(self.eg, *l, 'l'), self.eg[*x].data.as_ref()) {
                    (Some(i), Some(t)) => self.eg.analysis.lins[i].macs(&t.shape) as f64,
                    _ => 0.0,
                };
                MAC * macs
            }
            Fl::Add([a, _]) | Fl::Sub([a, _]) => self.elems(*a),
            Fl::Other(_) | Fl::Sym(_) => 0.0,
        };
        enode.fold(own, |sum, id| sum + costs(id))
    }
}

/// What fusion did, for the compile report.
#[derive(Clone, Debug, Default)]
pub struct FuseReport {
    pub lookups_before: usize,
    pub lookups_after: usize,
    pub iterations: usize,
    pub egraph_nodes: usize,
}

/// Lookups (bootstraps) per sample in an integer graph: one per element of every Tlu,
/// MaxEnc and AbsEnc.
pub fn count_lookups(g: &Graph) -> usize {
    g.node_ids()
        .filter(|&n| matches!(g.node(n).op, Op::Tlu(_) | Op::MaxEnc { .. } | Op::AbsEnc { .. }))
        .map(|n| g.node(n).ty.shape.fixed_volume())
        .sum()
}

/// Fuse an integer graph: saturate the rules (with limits), extract the cheapest graph.
pub fn fuse(g: &Graph) -> Result<(Graph, FuseReport)> {
    fuse_with(g, Rules::default())
}

/// [`fuse`] with a choice of optional rules.
pub fn fuse_with(g: &Graph, opts: Rules) -> Result<(Graph, FuseReport)> {
    let mut eg = EG::new(Fuse::default());
    let mut class_of: HashMap<NodeId, Id> = HashMap::new();
    let mut names: HashMap<Id, String> = HashMap::new();
    let order = g.topo_order().ok_or_else(|| PassError::Fuse("the graph has a cycle".into()))?;
    for &id in &order {
        let node = g.node(id);
        let kids: Vec<Id> = g.operands(id).iter().map(|o| class_of[o]).collect();
        let enode = match &node.op {
            Op::Input { index } => {
                if eg.analysis.inputs.len() <= *index {
                    eg.analysis.inputs.resize(*index + 1, node.ty.clone());
                }
                eg.analysis.inputs[*index] = node.ty.clone();
                Fl::Sym(Symbol::from(format!("in{index}")))
            }
            Op::Tlu(t) => {
                let s = eg.analysis.fun(Fun { expr: t.expr.clone(), params: t.params.clone(), label: t.label.clone() });
                Fl::Tlu([eg.add(Fl::Sym(s)), kids[0]])
            }
            Op::Linear(l) => {
                let s = eg.analysis.lin((**l).clone());
                Fl::Lin([eg.add(Fl::Sym(s)), kids[0]])
            }
            Op::AddEnc => Fl::Add([kids[0], kids[1]]),
            Op::SubEnc => Fl::Sub([kids[0], kids[1]]),
            Op::MaxEnc { rounding: 0, diff: None } => Fl::Max([kids[0], kids[1]]),
            other => {
                let s = eg.analysis.op(other.clone());
                let mut ch = vec![eg.add(Fl::Sym(s))];
                ch.extend(kids);
                Fl::Other(ch.into_boxed_slice())
            }
        };
        let c = eg.add(enode);
        class_of.insert(id, c);
        names.entry(c).or_insert_with(|| node.name.clone());
    }
    let before = count_lookups(g);
    // Layout sinking is a per-node rewrite (its pattern needs the op's kind), applied
    // between saturation rounds.
    let mut iterations = 0;
    for _ in 0..4 {
        let classes: Vec<(Id, Fl)> =
            eg.classes().flat_map(|c| c.nodes.iter().map(move |n| (c.id, n.clone()))).collect();
        let mut changed = false;
        for (c, n) in classes {
            changed |= SinkLayout::rewrite(&mut eg, c, &n).is_some();
        }
        eg.rebuild();
        let runner = Runner::default()
            .with_egraph(eg)
            .with_iter_limit(8)
            .with_node_limit(20_000)
            .with_time_limit(Duration::from_secs(2))
            .run(&rules(opts));
        iterations += runner.iterations.len();
        eg = runner.egraph;
        if !changed {
            break;
        }
    }
    let nodes = eg.total_number_of_nodes();
    let out = extract(g, &eg, &class_of, &names)?;
    let report =
        FuseReport { lookups_before: before, lookups_after: count_lookups(&out), iterations, egraph_nodes: nodes };
    Ok((out, report))
}

/// Rebuild an IR graph from the cheapest node of each needed class.
fn extract(g: &Graph, eg: &EG, class_of: &HashMap<NodeId, Id>, names: &HashMap<Id, String>) -> Result<Graph> {
    let extractor = Extractor::new(eg, CircuitCost { eg });
    let mut out = Graph::new(g.name.clone());
    let mut built: HashMap<Id, NodeId> = HashMap::new();
    for &i in g.inputs() {
        let n = g.node(i);
        let id = out.add_input(n.name.clone(), n.ty.clone());
        built.insert(eg.find(class_of[&i]), id);
    }
    let mut fresh = 0usize;
    for o in g.outputs() {
        let root = eg.find(class_of[&o.node]);
        let id = build(eg, &extractor, root, &mut out, &mut built, names, &mut fresh)?;
        out.set_output(o.name.clone(), id);
    }
    veil_ir::verify(&out).map_err(|e| PassError::Fuse(format!("the fused graph does not verify: {e}")))?;
    Ok(out)
}

fn build(
    eg: &EG,
    ex: &Extractor<CircuitCost, Fl, Fuse>,
    class: Id,
    out: &mut Graph,
    built: &mut HashMap<Id, NodeId>,
    names: &HashMap<Id, String>,
    fresh: &mut usize,
) -> Result<NodeId> {
    let class = eg.find(class);
    if let Some(&n) = built.get(&class) {
        return Ok(n);
    }
    let node = ex.find_best_node(class).clone();
    let (op, kids) =
        eg.analysis.ir_op(eg, &node).ok_or_else(|| PassError::Fuse(format!("class {class} has no tensor value")))?;
    let mut ids = Vec::with_capacity(kids.len());
    for k in kids {
        ids.push(build(eg, ex, k, out, built, names, fresh)?);
    }
    // The op's Tlu input range must be the operand's range in the rebuilt graph.
    let op = match op {
        Op::Tlu(mut t) => {
            if let Elem::Enc(r) = out.node(ids[0]).ty.elem {
                t.input = r;
            }
            Op::Tlu(t)
        }
        o => o,
    };
    let name = names.get(&class).cloned().unwrap_or_else(|| {
        *fresh += 1;
        format!("fused_{}", *fresh)
    });
    let id = out.add(op, &ids, name)?;
    built.insert(class, id);
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use veil_ir::{BinaryFn, Shape, Tensor, UnaryFn};

    fn relu_tlu(input: Range, scale: f64) -> Tlu {
        let e = Expr::quantize(
            Expr::unary(UnaryFn::Relu, Expr::binary(BinaryFn::Mul, Expr::Input, Expr::Const(scale))),
            Expr::Const(1.0),
            Range::new(0, 100),
        );
        Tlu { expr: e, input, params: vec![], rounding: 0, label: "relu".into() }
    }

    #[test]
    fn two_lookups_in_a_row_become_one() {
        let mut g = Graph::new("t");
        let x = g.add_input("x", TensorType::new(Elem::Enc(Range::new(-50, 50)), Shape::batched(&[4])));
        let a = g.add(Op::Tlu(Box::new(relu_tlu(Range::new(-50, 50), 1.0))), &[x], "a").unwrap();
        let sig = Expr::quantize(
            Expr::unary(UnaryFn::Sigmoid, Expr::binary(BinaryFn::Mul, Expr::Input, Expr::Const(0.1))),
            Expr::Const(0.01),
            Range::new(0, 100),
        );
        let b = g
            .add(
                Op::Tlu(Box::new(Tlu {
                    expr: sig,
                    input: Range::new(0, 100),
                    params: vec![],
                    rounding: 0,
                    label: "sigmoid".into(),
                })),
                &[a],
                "b",
            )
            .unwrap();
        g.set_output("y", b);
        let (f, report) = fuse(&g).unwrap();
        assert_eq!((report.lookups_before, report.lookups_after), (8, 4));
        // exact: same integers on every input
        let xs = Tensor::I64(ArrayD::from_shape_vec(vec![101, 4], (-50..=50).flat_map(|v| [v; 4]).collect()).unwrap());
        assert_eq!(
            veil_ir::interp::run(&g, std::slice::from_ref(&xs)).unwrap(),
            veil_ir::interp::run(&f, &[xs]).unwrap()
        );
    }

    #[test]
    fn relu_moves_after_max() {
        let mut g = Graph::new("t");
        let r = Range::new(-1000, 1000);
        let x = g.add_input("x", TensorType::new(Elem::Enc(r), Shape::batched(&[2])));
        let y = g.add_input("y", TensorType::new(Elem::Enc(r), Shape::batched(&[2])));
        let a = g.add(Op::Tlu(Box::new(relu_tlu(r, 0.1))), &[x], "a").unwrap();
        let b = g.add(Op::Tlu(Box::new(relu_tlu(r, 0.1))), &[y], "b").unwrap();
        let m = g.add(Op::MaxEnc { rounding: 0, diff: None }, &[a, b], "m").unwrap();
        g.set_output("m", m);
        let (f, report) = fuse(&g).unwrap();
        assert_eq!(report.lookups_before, 6);
        assert_eq!(report.lookups_after, 4, "{}", veil_ir::print::to_text(&f));
        let vals: Vec<i64> = (-1000..=1000).step_by(7).collect();
        let n = vals.len();
        let xs = Tensor::I64(ArrayD::from_shape_vec(vec![n, 2], vals.iter().flat_map(|&v| [v, -v]).collect()).unwrap());
        let ys = Tensor::I64(
            ArrayD::from_shape_vec(vec![n, 2], vals.iter().rev().flat_map(|&v| [v, v / 2]).collect()).unwrap(),
        );
        assert_eq!(
            veil_ir::interp::run(&g, &[xs.clone(), ys.clone()]).unwrap(),
            veil_ir::interp::run(&f, &[xs, ys]).unwrap()
        );
    }

    #[test]
    fn consecutive_dense_maps_merge() {
        let mut g = Graph::new("t");
        let x = g.add_input("x", TensorType::new(Elem::Enc(Range::new(0, 15)), Shape::batched(&[8])));
        let w1 = ArrayD::from_shape_fn(vec![8, 8], |i| (i[0] as i64 - i[1] as i64) % 3).into_dimensionality().unwrap();
        let w2 = ArrayD::from_shape_fn(vec![2, 8], |i| i[0] as i64 + i[1] as i64 - 4).into_dimensionality().unwrap();
        let l1 = g
            .add(
                Op::Linear(Box::new(Linear::new(
                    LinearKind::Dense { weights: w1 },
                    ArrayD::from_elem(vec![8], 3),
                    "a",
                ))),
                &[x],
                "l1",
            )
            .unwrap();
        let l2 = g
            .add(
                Op::Linear(Box::new(Linear::new(
                    LinearKind::Dense { weights: w2 },
                    ArrayD::from_elem(vec![2], -1),
                    "b",
                ))),
                &[l1],
                "l2",
            )
            .unwrap();
        g.set_output("y", l2);
        let (f, _) = fuse(&g).unwrap();
        assert_eq!(f.node_count(), 2, "{}", veil_ir::print::to_text(&f));
        let xs = Tensor::I64(ArrayD::from_shape_fn(vec![5, 8], |i| ((i[0] * 7 + i[1] * 3) % 16) as i64));
        assert_eq!(
            veil_ir::interp::run(&g, std::slice::from_ref(&xs)).unwrap(),
            veil_ir::interp::run(&f, &[xs]).unwrap()
        );
    }
}
