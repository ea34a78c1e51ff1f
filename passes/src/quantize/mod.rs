//! Quantization: float graph → integer graph over encrypted values.
//!
//! Every encrypted tensor is an integer tensor `v` standing for real values
//! `scale ⊙ v + offset`, with per-element `scale` and `offset` (clear, known to the
//! compiler). Linear ops stay exact in integers: their float weights are folded with the
//! input scales and quantized per output channel, and offsets become clear output offsets.
//! Element-wise non-linear ops are not tabulated one by one: they accumulate into a
//! *pending* real-valued function of one encrypted source, which becomes a single lookup
//! only when something needs an integer again (a linear op, a layout op, the end of the
//! circuit): a table, or for ReLU-like functions an |x| read on the whole torus
//! (`kinks`). So `dequantize → bias → activation → requantize` chains, stacked
//! activations and expressions like `x·Φ(x)` each cost one lookup, and no intermediate
//! requantization is ever introduced. The trailing non-linear ops (sigmoid, softmax,
//! argmax, …) move to the client, which runs them after decryption.

mod elementwise;
mod kinks;
mod layers;
mod scales;
mod tail;

use scales::{equalize, heterogeneous, median};
use tail::{client_only, client_tail, tail_only_input};

use crate::calibrate::Calibration;
use crate::error::{PassError, Result};
use crate::model::{InputQuant, OutputDecode, QuantizedModel, TailSource};
use ndarray::{Array2, Array4, ArrayD, Axis, IxDyn};
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use veil_ir::interp::eval_op;
use veil_ir::linear::{Linear, LinearKind};
use veil_ir::op::{Conv2d, Pool2d, ReduceKind};
use veil_ir::{BinaryFn, Dim, Elem, Expr, Graph, NodeId, Op, Range, Shape, Tensor, TensorType, Tlu, UnaryFn};

/// Bit widths of the quantization.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct QuantConfig {
    /// Model inputs are quantized to this many bits (per feature for [batch, features]).
    pub input_bits: u32,
    /// Weights, per output channel, signed.
    pub weight_bits: u32,
    /// Outputs of table lookups (activations; |x| reads keep their input's scale).
    pub act_bits: u32,
}

/// Where the work of ops the server could do goes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Placement {
    /// Trailing non-linear ops (an activation, a sigmoid) run on the server as lookups
    /// instead of on the client after decryption, so the client never sees
    /// pre-activation values. Only ops that cannot run encrypted (softmax, argmax, label
    /// mapping) are left to the client.
    pub server_tail: bool,
    /// Tree ensembles: the client sends each threshold test's bit (unary encoding)
    /// instead of each feature's rank, and the server does no comparison lookups. Both
    /// reveal the trees' cuts to the client; unary sends one ciphertext per cut.
    pub client_tree_tests: bool,
    /// Max pooling of a monotone activation (ReLU after a convolution) pools the
    /// activation's input and applies the activation after, with maxima computed as
    /// a + b + |a − b| (twice the max), |·| read on the whole torus: one lookup per
    /// window for the activation, and each max resolves twice the buckets of a
    /// relu(a − b) read with half its error. Otherwise the activation is computed per
    /// element (as |x| or a table) and the maxima read relu(a − b).
    pub whole_torus_max: bool,
    /// Tabulate ReLU-like activations element by element even where
    /// [`Quantizer::tabulate_kink`] could read them as |x| on the whole torus. The search
    /// falls back to tables when no |x| form meets the tolerance: |x| keeps the
    /// accumulator's scale, and a table requantizes to its calibrated range.
    pub kink_tables: bool,
}

impl Default for QuantConfig {
    fn default() -> Self {
        QuantConfig { input_bits: 8, weight_bits: 8, act_bits: 8 }
    }
}

/// An encrypted integer tensor in the new graph: real ≈ scale ⊙ v + offset.
#[derive(Clone, Debug)]
struct Quantized {
    node: NodeId,
    /// Both of the per-sample shape.
    scale: ArrayD<f64>,
    offset: ArrayD<f64>,
}

/// A real-valued element-wise function of one encrypted tensor, not yet tabulated.
#[derive(Clone, Debug)]
struct Pending {
    src: NodeId,
    /// Real value as a function of the source integer (`Expr::Input`).
    expr: Expr,
    /// Per-element parameters, each of the per-sample shape.
    params: Vec<ArrayD<f64>>,
    label: String,
}

#[derive(Clone, Debug)]
enum QVal {
    Const(ArrayD<f32>),
    Enc(Quantized),
    Fn(Pending),
}

/// Quantize `g` with calibration `calib` and bit widths `cfg`.
pub fn quantize(g: &Graph, calib: &Calibration, cfg: &QuantConfig) -> Result<QuantizedModel> {
    quantize_with_margin(g, calib, cfg, crate::ranges::DEFAULT_MARGIN)
}

/// [`quantize`], sizing accumulators for compiled ranges with headroom `margin` (see
/// [`crate::ranges`]).
pub fn quantize_with_margin(g: &Graph, calib: &Calibration, cfg: &QuantConfig, margin: f64) -> Result<QuantizedModel> {
    quantize_with(g, calib, cfg, margin, Placement::default())
}

/// [`quantize_with_margin`], with the work placed as `placement` says.
pub fn quantize_with(
    g: &Graph,
    calib: &Calibration,
    cfg: &QuantConfig,
    margin: f64,
    placement: Placement,
) -> Result<QuantizedModel> {
    Ok(quantize_refilled(g, calib, cfg, margin, placement, &HashMap::new())?.0)
}

/// [`quantize_with`], with the integer output range of each dense or convolution layer
/// (float node id) in `refill` multiplied by its factor (in (0, 1): coarser weights, a
/// narrower accumulator; others are ignored), so that the lookups reading it downstream fill their slots (see
/// [`crate::slot_fill`]). Also returns the layers whose outputs lookups read: the
/// candidates for a factor.
pub fn quantize_refilled(
    g: &Graph,
    calib: &Calibration,
    cfg: &QuantConfig,
    margin: f64,
    placement: Placement,
    refill: &HashMap<NodeId, f64>,
) -> Result<(QuantizedModel, Vec<NodeId>)> {
    let tail = client_tail(g, placement.server_tail)?;
    let mut q = Quantizer {
        g,
        calib,
        cfg,
        margin,
        tail: &tail,
        out: Graph::new(g.name.clone()),
        vals: HashMap::new(),
        tables: HashMap::new(),
        inputs: Vec::new(),
        input_of: Vec::new(),
        rank_cuts: HashMap::new(),
        placement,
        dense_src: HashMap::new(),
        refill,
        filled: Vec::new(),
    };
    let order = g.topo_order().ok_or_else(|| PassError::Quantize { node: g.name.clone(), msg: "cycle".into() })?;
    for &id in &order {
        if tail.contains(&id) || tail_only_input(g, id, &tail) {
            continue;
        }
        let v = q.node(id)?;
        q.vals.insert(id, v);
    }
    let filled = std::mem::take(&mut q.filled);
    Ok((q.finish(&order, &tail)?, filled))
}

struct Quantizer<'a> {
    g: &'a Graph,
    calib: &'a Calibration,
    cfg: &'a QuantConfig,
    /// Headroom the compiled ranges will get (to size accumulators for them).
    margin: f64,
    /// Nodes the client computes.
    tail: &'a HashSet<NodeId>,
    out: Graph,
    vals: HashMap<NodeId, QVal>,
    /// Float node → the lookup that tabulated its pending function, so a value used twice
    /// is tabulated once.
    tables: HashMap<NodeId, Quantized>,
    inputs: Vec<InputQuant>,
    input_of: Vec<usize>,
    /// Rank-encoded inputs (read by tree ensembles only) and their cuts.
    rank_cuts: HashMap<NodeId, Vec<Vec<crate::model::Cut>>>,
    placement: Placement,
    /// Dense layers on [batch, K] inputs, by their output node, for composition with a
    /// following one-kink activation and dense layer (see `kinks`).
    dense_src: HashMap<NodeId, kinks::DenseSource>,
    /// Extra factors on layers' integer output ranges (see [`quantize_refilled`]).
    refill: &'a HashMap<NodeId, f64>,
    /// Layers whose outputs lookups read, in quantization order.
    filled: Vec<NodeId>,
}

impl<'a> Quantizer<'a> {
    fn label(&self, id: NodeId) -> String {
        let n = self.g.node(id);
        format!("{} '{}'", n.op.mnemonic(), n.name)
    }

    fn err(&self, id: NodeId, msg: impl Into<String>) -> PassError {
        PassError::Quantize { node: self.label(id), msg: msg.into() }
    }

    fn unsupported(&self, id: NodeId, msg: impl Into<String>) -> PassError {
        PassError::Unsupported { node: self.label(id), msg: msg.into() }
    }

    /// The per-sample shape of a float node (its shape without the leading batch axis).
    fn sample_dims(&self, id: NodeId) -> Vec<usize> {
        sample_dims(&self.g.node(id).ty.shape)
    }

    fn val(&self, id: NodeId) -> QVal {
        self.vals[&id].clone()
    }

    fn node(&mut self, id: NodeId) -> Result<QVal> {
        let node = self.g.node(id);
        let ops = self.g.operands(id);
        match &node.op {
            Op::Input { index } => self.input(id, *index),
            Op::Const(t) => Ok(QVal::Const(t.to_f32())),
            Op::Gemm { alpha, beta, trans_a, trans_b } => {
                if *trans_a {
                    return Err(self.unsupported(id, "Gemm with transA on the encrypted operand"));
                }
                let w = self.const_operand(id, &ops, 1, "weights")?;
                let w = if *trans_b { w.t().to_owned() } else { w };
                let w = to2(&w).map_err(|e| self.err(id, e))?; // [K, M]
                let c = ops.get(2).map(|&o| self.const_of(id, o, "bias")).transpose()?;
                let m = w.ncols();
                let bias = match c {
                    Some(c) => c
                        .broadcast(IxDyn(&[m]))
                        .or_else(|| c.broadcast(IxDyn(&[1, m])))
                        .map(|b| b.iter().map(|&v| *beta as f64 * v as f64).collect::<Vec<_>>()),
                    None => Some(vec![0.0; m]),
                };
                let bias = bias.ok_or_else(|| self.unsupported(id, "a Gemm bias that varies per sample"))?;
                let w = w.mapv(|v| *alpha as f64 * v as f64);
                if let Some(v) = self.compose_kink(id, ops[0], &w, &bias)? {
                    return Ok(v);
                }
                let x = self.enc_operand(id, ops[0])?;
                self.dense(id, x, w, bias)
            }
            Op::MatMul => {
                let w = self.const_operand(id, &ops, 1, "right operand")?;
                let w = to2(&w).map_err(|_| self.unsupported(id, "MatMul needs a constant 2-D right operand"))?;
                let (w, bias) = (w.mapv(|v| v as f64), vec![0.0; w.ncols()]);
                if let Some(v) = self.compose_kink(id, ops[0], &w, &bias)? {
                    return Ok(v);
                }
                let x = self.enc_operand(id, ops[0])?;
                self.dense(id, x, w, bias)
            }
            Op::Conv(c) => {
                let w = self.const_operand(id, &ops, 1, "weights")?;
                let b = ops.get(2).map(|&o| self.const_of(id, o, "bias")).transpose()?;
                let x = self.enc_operand(id, ops[0])?;
                self.conv(id, x, c, &w, b.as_ref())
            }
            Op::Unary(f) => {
                let v = self.val(ops[0]);
                match v {
                    QVal::Const(_) => Err(self.err(id, "constant operand should have been folded")),
                    QVal::Enc(q) if *f == UnaryFn::Neg => {
                        Ok(QVal::Enc(Quantized { node: q.node, scale: -q.scale, offset: -q.offset }))
                    }
                    other => {
                        let mut p = self.pending(other);
                        p.expr = Expr::unary(*f, p.expr);
                        p.label = join_label(&p.label, f.name());
                        Ok(QVal::Fn(p))
                    }
                }
            }
            Op::Binary(f) => self.binary(id, *f, ops[0], ops[1]),
            Op::BatchNorm { epsilon } => {
                let c = self.sample_dims(id)[0];
                let get = |i: usize| self.const_of(id, ops[i], "batch-norm parameter");
                let (gamma, beta, mean, var) = (get(1)?, get(2)?, get(3)?, get(4)?);
                let k: Vec<f64> = (0..c).map(|i| gamma[[i]] as f64 / ((var[[i]] + epsilon) as f64).sqrt()).collect();
                let b: Vec<f64> = (0..c).map(|i| beta[[i]] as f64 - mean[[i]] as f64 * k[i]).collect();
                let dims = self.sample_dims(id);
                let kk = per_channel(&k, &dims);
                let bb = per_channel(&b, &dims);
                self.affine(ops[0], &kk, &bb)
            }
            Op::AvgPool(p) => {
                let x = self.enc_operand(id, ops[0])?;
                self.avg_pool(id, x, p)
            }
            Op::GlobalAvgPool => {
                let x = self.enc_operand(id, ops[0])?;
                let dims = self.sample_dims(ops[0]);
                let area = (dims[1] * dims[2]) as f64;
                self.sum(id, x, vec![2, 3], true, area)
            }
            Op::Reduce { kind: kind @ (ReduceKind::Max | ReduceKind::Min), axes, keepdims } => {
                let x = self.enc_operand(id, ops[0])?;
                self.extremum(id, x, axes, *keepdims, *kind == ReduceKind::Max)
            }
            Op::Reduce { kind, axes, keepdims } => {
                let x = self.enc_operand(id, ops[0])?;
                let in_dims = self.g.node(ops[0]).ty.shape.dims().to_vec();
                let count: usize = axes.iter().map(|&a| in_dims[a].fixed().unwrap_or(1)).product();
                let div = if *kind == ReduceKind::Mean { count as f64 } else { 1.0 };
                self.sum(id, x, axes.clone(), *keepdims, div)
            }
            Op::MaxPool(p) => {
                if let Some(v) = self.pool_then_activate(id, ops[0], p)? {
                    return Ok(v);
                }
                let x = self.enc_operand(id, ops[0])?;
                self.max_pool(id, x, p)
            }
            Op::Reshape { .. } | Op::Transpose { .. } | Op::Gather { .. } | Op::Pad { .. } => {
                let x = self.enc_operand(id, ops[0])?;
                self.layout(id, &[x])
            }
            Op::Concat { .. } => {
                let mut xs = Vec::new();
                for &o in &ops {
                    xs.push(self.enc_operand(id, o)?);
                }
                self.layout(id, &xs)
            }
            Op::TreeEnsemble(e) => {
                let cuts =
                    self.rank_cuts.get(&ops[0]).cloned().ok_or_else(|| {
                        self.unsupported(id, "encrypted tree ensembles must read a model input directly")
                    })?;
                let QVal::Enc(x) = self.val(ops[0]) else { return Err(self.err(id, "rank input is not encrypted")) };
                let label = self.label(id);
                let features = if self.placement.client_tree_tests {
                    crate::trees::Features::Unary { node: x.node, cuts: &cuts }
                } else {
                    crate::trees::Features::Ranks { node: x.node, cuts: &cuts }
                };
                // for trees, act_bits bounds the leaf lookups (see `tree_search`)
                let s = crate::trees::build(&mut self.out, e, features, self.cfg.act_bits, &label)?;
                let dims = self.sample_dims(id);
                let shaped =
                    |v: Vec<f64>| ArrayD::from_shape_vec(dims.clone(), v).map_err(|e| self.err(id, e.to_string()));
                Ok(QVal::Enc(Quantized { node: s.node, scale: shaped(s.scale)?, offset: shaped(s.offset)? }))
            }
            op if client_only(op) => Err(self.unsupported(id, "only supported at the end of a model")),
            _ => Err(self.unsupported(id, "not supported by the quantizer")),
        }
    }

    /// A model input: per-feature quantization for [batch, features], per tensor otherwise.
    fn input(&mut self, id: NodeId, index: usize) -> Result<QVal> {
        let node = self.g.node(id);
        if node.ty.elem != Elem::F32 {
            return Err(self.unsupported(id, "only float inputs can be encrypted"));
        }
        if node.ty.shape.dims().first() != Some(&Dim::Batch) {
            return Err(
                self.unsupported(id, "the input needs a leading batch dimension; export it with a dynamic batch axis")
            );
        }
        let trees: Vec<&veil_ir::op::TreeEnsemble> = self
            .g
            .users(id)
            .iter()
            .filter_map(|&u| match &self.g.node(u).op {
                Op::TreeEnsemble(e) => Some(e.as_ref()),
                _ => None,
            })
            .collect();
        if !trees.is_empty() {
            if trees.len() != self.g.users(id).len() {
                return Err(self.unsupported(id, "an input read by tree ensembles cannot also feed other ops"));
            }
            let exact = crate::trees::exact_cuts(&trees, trees[0].n_features, &self.label(id))?;
            let unary = self.placement.client_tree_tests;
            // unary bits cost no precision: every cut is kept
            let cuts = if unary { exact } else { crate::trees::thin(&exact, self.cfg.input_bits) };
            let (range, shape) = if unary {
                let bits = cuts.iter().map(|c| c.len()).sum::<usize>();
                (Range::new(0, 1), Shape(vec![Dim::Batch, Dim::Fixed(bits)]))
            } else {
                (Range::new(0, cuts.iter().map(|c| c.len()).max().unwrap_or(0) as i64), node.ty.shape.clone())
            };
            let nid = self.out.add_input(node.name.clone(), TensorType::new(Elem::Enc(range), shape.clone()));
            let dims = sample_dims(&shape);
            let (scale, offset) = (ArrayD::from_elem(dims.clone(), 1.0), ArrayD::zeros(dims));
            self.inputs.push(InputQuant {
                name: node.name.clone(),
                scale: scale.clone(),
                offset: offset.clone(),
                range,
                cuts: Some(cuts.clone()),
                unary,
            });
            self.input_of.push(index);
            self.rank_cuts.insert(id, cuts);
            return Ok(QVal::Enc(Quantized { node: nid, scale, offset }));
        }
        let (lo, hi) = &self.calib.input_elements[index];
        let dims = self.sample_dims(id);
        let levels = ((1u64 << self.cfg.input_bits) - 1) as f64;
        // Per-feature scales help tabular data whose features have very different ranges;
        // features of one kind (pixels) share a scale, which also avoids clipping test
        // values beyond a small calibration set's per-feature extremes.
        // A sample is a feature vector when one axis holds all its elements ([F], [1, F]).
        let vector = dims.iter().filter(|&&d| d > 1).count() <= 1;
        let per_feature = vector && heterogeneous(lo, hi);
        let (lo, hi) = if per_feature {
            (lo.clone(), hi.clone())
        } else {
            let l = lo.iter().cloned().fold(f64::INFINITY, f64::min);
            let h = hi.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            (ArrayD::from_elem(dims.clone(), l), ArrayD::from_elem(dims.clone(), h))
        };
        // A feature constant on the calibration set borrows the typical scale: a fallback
        // of 1 would dominate the weight scales it is folded into.
        let typical =
            median(lo.iter().zip(hi.iter()).map(|(l, h)| h - l).filter(|s| *s > 0.0)).unwrap_or(levels) / levels;
        let scale =
            ndarray::Zip::from(&lo).and(&hi).map_collect(|&l, &h| if h > l { (h - l) / levels } else { typical });
        let range = Range::new(0, levels as i64);
        let ty = TensorType::new(Elem::Enc(range), node.ty.shape.clone());
        let nid = self.out.add_input(node.name.clone(), ty);
        self.inputs.push(InputQuant {
            name: node.name.clone(),
            scale: scale.clone(),
            offset: lo.clone(),
            range,
            cuts: None,
            unary: false,
        });
        self.input_of.push(index);
        Ok(QVal::Enc(Quantized { node: nid, scale, offset: lo }))
    }

    fn const_of(&self, id: NodeId, operand: NodeId, what: &str) -> Result<ArrayD<f32>> {
        match self.vals.get(&operand) {
            Some(QVal::Const(c)) => Ok(c.clone()),
            _ => Err(self.unsupported(id, format!("the {what} must be constant"))),
        }
    }

    fn const_operand(&self, id: NodeId, ops: &[NodeId], i: usize, what: &str) -> Result<ArrayD<f32>> {
        let o = *ops.get(i).ok_or_else(|| self.err(id, format!("missing {what}")))?;
        self.const_of(id, o, what)
    }

    /// The operand as an encrypted integer tensor, tabulating a pending function if needed.
    fn enc_operand(&mut self, id: NodeId, operand: NodeId) -> Result<Quantized> {
        match self.val(operand) {
            QVal::Enc(q) => Ok(q),
            QVal::Fn(p) => self.tabulate(operand, p),
            QVal::Const(_) => Err(self.unsupported(id, "an op on constants only should have been folded at import")),
        }
    }

    fn enc_range(&self, node: NodeId) -> Range {
        match self.out.node(node).ty.elem {
            Elem::Enc(r) => r,
            _ => unreachable!("quantized values are encrypted"),
        }
    }
}

fn source(v: &QVal) -> Option<NodeId> {
    match v {
        QVal::Enc(q) => Some(q.node),
        QVal::Fn(p) => Some(p.src),
        QVal::Const(_) => None,
    }
}

fn join_label(a: &str, b: &str) -> String {
    match (a.is_empty(), b.is_empty()) {
        (true, _) => b.to_string(),
        (_, true) => a.to_string(),
        _ => format!("{a}+{b}"),
    }
}

fn sample_dims(s: &Shape) -> Vec<usize> {
    let d = s.dims();
    let skip = usize::from(d.first() == Some(&Dim::Batch));
    d[skip..].iter().map(|x| x.fixed().unwrap_or(1)).collect()
}

fn to2(a: &ArrayD<f32>) -> std::result::Result<Array2<f32>, String> {
    a.clone().into_dimensionality().map_err(|_| format!("expected a matrix, got shape {:?}", a.shape()))
}

fn close(a: &ArrayD<f64>, b: &ArrayD<f64>) -> bool {
    a.shape() == b.shape() && a.iter().zip(b.iter()).all(|(x, y)| (x - y).abs() <= 1e-12 * x.abs().max(y.abs()))
}

/// The values along the last axis, if the array (broadcast to `dims`) varies only there.
fn along_last(a: &ArrayD<f64>, dims: &[usize]) -> Option<Vec<f64>> {
    let full = a.broadcast(IxDyn(dims))?;
    let k = *dims.last()?;
    let rows = full.to_shape((full.len() / k.max(1), k)).ok()?;
    let first = rows.row(0).to_vec();
    rows.outer_iter().all(|r| r.iter().zip(&first).all(|(x, y)| x == y)).then_some(first)
}

/// One value per channel (axis 0 of the sample), if the array is uniform within channels.
fn per_channel_of(a: &ArrayD<f64>, dims: &[usize]) -> Option<Vec<f64>> {
    let full = a.broadcast(IxDyn(dims))?;
    let mut out = Vec::with_capacity(dims[0]);
    for ch in full.outer_iter() {
        let v = *ch.iter().next()?;
        if ch.iter().any(|&x| x != v) {
            return None;
        }
        out.push(v);
    }
    Some(out)
}

/// A per-channel vector broadcast to a sample of shape `dims` (channel = axis 0).
fn per_channel(v: &[f64], dims: &[usize]) -> ArrayD<f64> {
    let mut shape = vec![1; dims.len()];
    shape[0] = v.len();
    let a = ArrayD::from_shape_vec(shape, v.to_vec()).expect("channel vector");
    a.broadcast(IxDyn(dims)).expect("channels match").to_owned()
}

/// The array with `axes` removed, if it is constant along them.
fn reduce_uniform(a: &ArrayD<f64>, axes: &[usize]) -> Option<ArrayD<f64>> {
    let mut out = a.clone();
    let mut sorted = axes.to_vec();
    sorted.sort_unstable_by(|x, y| y.cmp(x));
    for &ax in &sorted {
        let first = out.index_axis(Axis(ax), 0).to_owned();
        for lane in out.axis_iter(Axis(ax)) {
            if lane != first {
                return None;
            }
        }
        out = first;
    }
    Some(out)
}
