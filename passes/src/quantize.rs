//! Quantization: float graph → integer graph over encrypted values.
//!
//! Every encrypted tensor is an integer tensor `v` standing for real values
//! `scale ⊙ v + offset`, with per-element `scale` and `offset` (clear, known to the
//! compiler). Linear ops stay exact in integers: their float weights are folded with the
//! input scales and quantized per output channel, and offsets become clear output offsets.
//! Element-wise non-linear ops are not tabulated one by one: they accumulate into a
//! *pending* real-valued function of one encrypted source, which becomes a single table
//! lookup only when something needs an integer again (a linear op, a layout op, the end
//! of the circuit). So `dequantize → bias → activation → requantize` chains, stacked
//! activations and expressions like `x·Φ(x)` each cost one lookup, and no intermediate
//! requantization is ever introduced. The trailing non-linear ops (sigmoid, softmax,
//! argmax, …) move to the client, which runs them after decryption.

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
    /// Outputs of table lookups (activations).
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
    };
    let order = g.topo_order().ok_or_else(|| PassError::Quantize { node: g.name.clone(), msg: "cycle".into() })?;
    for &id in &order {
        if tail.contains(&id) || tail_only_input(g, id, &tail) {
            continue;
        }
        let v = q.node(id)?;
        q.vals.insert(id, v);
    }
    q.finish(&order, &tail)
}

/// Nodes the client computes after decryption: everything downstream of an op that only
/// the client can run (softmax, argmax, …), plus (unless `server_tail`) trailing
/// non-linear ops whose users are all client-side. Linear ops otherwise stay on the server
/// (they are free there and shrink what is decrypted). A non-linear op reading a model
/// input directly stays on the server (as lookups): the client finishing it would compute
/// the whole model in the clear.
fn client_tail(g: &Graph, server_tail: bool) -> Result<HashSet<NodeId>> {
    let order = g.topo_order().ok_or_else(|| PassError::Quantize { node: g.name.clone(), msg: "cycle".into() })?;
    let outputs: HashSet<NodeId> = g.outputs().iter().map(|o| o.node).collect();
    let mut forced = HashSet::new();
    for &id in &order {
        if client_only(&g.node(id).op) || g.operands(id).iter().any(|o| forced.contains(o)) {
            forced.insert(id);
        }
    }
    let reads_input = |id: NodeId| g.operands(id).iter().any(|&o| matches!(g.node(o).op, Op::Input { .. }));
    let mut tail = HashSet::new();
    for &id in order.iter().rev() {
        let node = g.node(id);
        let users = g.users(id);
        // Layout ops move with their users: on the server they shrink nothing.
        let layout =
            matches!(node.op, Op::Concat { .. } | Op::Reshape { .. } | Op::Transpose { .. } | Op::Unary(UnaryFn::Neg));
        let movable = !server_tail
            && !matches!(node.op, Op::Input { .. } | Op::Const(_))
            && (layout || !is_linear(g, id))
            && !reads_input(id);
        if forced.contains(&id)
            || (movable && users.iter().all(|u| tail.contains(u)) && (!users.is_empty() || outputs.contains(&id)))
        {
            tail.insert(id);
        }
    }
    // The client may only finish what the server computed: a client-only op reading a
    // model input directly would mean the client does the whole job in the clear.
    for &id in &order {
        let n = g.node(id);
        if tail.contains(&id) && reads_input(id) {
            let msg = "it reads the model input directly and can only run after decryption, so nothing would be computed on encrypted data".to_string();
            return Err(PassError::Unsupported { node: format!("{} '{}'", n.op.mnemonic(), n.name), msg });
        }
    }
    Ok(tail)
}

fn client_only(op: &Op) -> bool {
    matches!(
        op,
        Op::Softmax { .. } | Op::ArgMax { .. } | Op::ClassLabel { .. } | Op::Normalize { .. } | Op::Cast { .. }
    )
}

/// Ops that are exact integer maps on an encrypted tensor (given constant weights).
fn is_linear(g: &Graph, id: NodeId) -> bool {
    let ops = g.operands(id);
    let is_const = |i: usize| ops.get(i).is_some_and(|&o| g.const_value(o).is_some());
    match &g.node(id).op {
        Op::Gemm { .. } | Op::MatMul | Op::Conv(_) => ops.iter().skip(1).all(|&o| g.const_value(o).is_some()),
        Op::Binary(BinaryFn::Add | BinaryFn::Sub) => true,
        Op::Binary(BinaryFn::Mul) => is_const(0) || is_const(1),
        Op::Binary(BinaryFn::Div) => is_const(1),
        Op::Unary(UnaryFn::Neg) => true,
        Op::BatchNorm { .. } | Op::AvgPool(_) | Op::GlobalAvgPool => true,
        Op::Reduce { kind, .. } => matches!(kind, ReduceKind::Sum | ReduceKind::Mean),
        Op::Reshape { .. } | Op::Transpose { .. } | Op::Concat { .. } | Op::Gather { .. } | Op::Pad { .. } => true,
        _ => false,
    }
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
                let x = self.enc_operand(id, ops[0])?;
                self.dense(id, x, w.mapv(|v| *alpha as f64 * v as f64), bias)
            }
            Op::MatMul => {
                let w = self.const_operand(id, &ops, 1, "right operand")?;
                let w = to2(&w).map_err(|_| self.unsupported(id, "MatMul needs a constant 2-D right operand"))?;
                let x = self.enc_operand(id, ops[0])?;
                let m = w.ncols();
                self.dense(id, x, w.mapv(|v| v as f64), vec![0.0; m])
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

    /// Start or continue a pending function of one source.
    fn pending(&self, v: QVal) -> Pending {
        match v {
            QVal::Fn(p) => p,
            QVal::Enc(q) => Pending {
                src: q.node,
                expr: Expr::binary(
                    BinaryFn::Add,
                    Expr::binary(BinaryFn::Mul, Expr::Input, Expr::Param(0)),
                    Expr::Param(1),
                ),
                params: vec![q.scale, q.offset],
                label: String::new(),
            },
            QVal::Const(_) => unreachable!("constants are folded before quantization"),
        }
    }

    /// Turn a pending function (the value of float node `id`) into one table lookup whose
    /// output is requantized to `act_bits` over the calibrated range.
    fn tabulate(&mut self, id: NodeId, p: Pending) -> Result<Quantized> {
        if let Some(q) = self.tables.get(&id) {
            return Ok(q.clone());
        }
        // The output is requantized over its calibrated range: headroom there would cost
        // every value resolution (a 25% margin each side lost one sample in 100 on a small
        // classifier). Values beyond it saturate, and `veil predict`/`encrypt` report the
        // samples that reach them.
        let (lo, hi) = self.calib.range(id).ok_or_else(|| self.err(id, "no calibration range"))?;
        let input = match self.out.node(p.src).ty.elem {
            Elem::Enc(r) => r,
            _ => return Err(self.err(id, "lookup source is not encrypted")),
        };
        let levels = ((1u64 << self.cfg.act_bits) - 1) as f64;
        let s = if hi > lo { (hi - lo) / levels } else { lo.abs().max(1.0) };
        let range = Range::new((lo / s).round() as i64, (hi / s).round() as i64);
        let label = if p.label.is_empty() { "requant".to_string() } else { p.label.clone() };
        let tlu =
            Tlu { expr: Expr::quantize(p.expr, Expr::Const(s), range), input, params: p.params, rounding: 0, label };
        let name = self.g.node(id).name.clone();
        let node = self.out.add(Op::Tlu(Box::new(tlu)), &[p.src], name)?;
        let dims = self.sample_dims(id);
        let q = Quantized { node, scale: ArrayD::from_elem(dims.clone(), s), offset: ArrayD::zeros(dims) };
        self.tables.insert(id, q.clone());
        Ok(q)
    }

    /// A constant broadcast to the per-sample shape of node `id`.
    fn sample_const(&self, id: NodeId, c: &ArrayD<f32>) -> Result<ArrayD<f64>> {
        let full = self.g.node(id).ty.shape.concrete(1);
        let has_batch = self.g.node(id).ty.shape.has_batch();
        let b = c.broadcast(IxDyn(&full)).ok_or_else(|| {
            self.unsupported(id, format!("constant of shape {:?} does not broadcast to the sample", c.shape()))
        })?;
        let b = b.mapv(|v| v as f64);
        Ok(if has_batch { b.index_axis(Axis(0), 0).to_owned() } else { b })
    }

    /// x·k + b for clear per-element k, b (of the per-sample shape of x).
    fn affine(&mut self, x: NodeId, k: &ArrayD<f64>, b: &ArrayD<f64>) -> Result<QVal> {
        match self.val(x) {
            QVal::Enc(q) => {
                let scale = &q.scale * k;
                let offset = &q.offset * k + b;
                Ok(QVal::Enc(Quantized { node: q.node, scale, offset }))
            }
            QVal::Fn(mut p) => {
                let (ik, ib) = (p.params.len(), p.params.len() + 1);
                p.params.push(k.clone());
                p.params.push(b.clone());
                p.expr =
                    Expr::binary(BinaryFn::Add, Expr::binary(BinaryFn::Mul, p.expr, Expr::Param(ik)), Expr::Param(ib));
                Ok(QVal::Fn(p))
            }
            QVal::Const(_) => unreachable!("constants are folded before quantization"),
        }
    }

    fn binary(&mut self, id: NodeId, f: BinaryFn, a: NodeId, b: NodeId) -> Result<QVal> {
        let dims = self.sample_dims(id);
        match (self.val(a), self.val(b)) {
            (QVal::Const(_), QVal::Const(_)) => Err(self.err(id, "constant operands should have been folded")),
            (x, QVal::Const(c)) => {
                let c = self.sample_const(id, &c)?;
                self.check_same_dims(id, a)?;
                match f {
                    BinaryFn::Add => self.affine(a, &ArrayD::ones(dims), &c),
                    BinaryFn::Sub => self.affine(a, &ArrayD::ones(dims), &-c),
                    BinaryFn::Mul => self.affine(a, &c, &ArrayD::zeros(dims)),
                    BinaryFn::Div => self.affine(a, &c.mapv(|v| 1.0 / v), &ArrayD::zeros(dims)),
                    _ => Ok(QVal::Fn(self.with_param(x, f, c, false))),
                }
            }
            (QVal::Const(c), y) => {
                let c = self.sample_const(id, &c)?;
                self.check_same_dims(id, b)?;
                match f {
                    BinaryFn::Add => self.affine(b, &ArrayD::ones(dims), &c),
                    BinaryFn::Sub => self.affine(b, &-ArrayD::<f64>::ones(dims), &c),
                    BinaryFn::Mul => self.affine(b, &c, &ArrayD::zeros(dims)),
                    _ => Ok(QVal::Fn(self.with_param(y, f, c, true))),
                }
            }
            (x, y) => {
                let (sx, sy) = (source(&x), source(&y));
                if sx == sy && self.sample_dims(a) == self.sample_dims(b) {
                    // Both are functions of the same encrypted tensor: still one lookup.
                    let px = self.pending(x);
                    let py = self.pending(y);
                    let shift = px.params.len();
                    let mut params = px.params;
                    params.extend(py.params);
                    let expr = Expr::binary(f, px.expr, py.expr.shift_params(shift));
                    return Ok(QVal::Fn(Pending {
                        src: px.src,
                        expr,
                        params,
                        label: join_label(&join_label(&px.label, f.name()), &py.label),
                    }));
                }
                match f {
                    BinaryFn::Add | BinaryFn::Sub => self.add_enc(id, f, a, b),
                    _ => Err(self.unsupported(
                        id,
                        format!(
                            "{} of two encrypted tensors computed from different inputs is not supported",
                            f.name()
                        ),
                    )),
                }
            }
        }
    }

    fn check_same_dims(&self, id: NodeId, operand: NodeId) -> Result<()> {
        if self.sample_dims(id) != self.sample_dims(operand) {
            return Err(self.unsupported(id, "a constant that broadcasts the encrypted operand to a larger shape"));
        }
        Ok(())
    }

    /// f(x, c) or f(c, x) for a non-linear f and a clear per-element c.
    fn with_param(&self, x: QVal, f: BinaryFn, c: ArrayD<f64>, const_first: bool) -> Pending {
        let mut p = self.pending(x);
        let k = p.params.len();
        p.params.push(c);
        p.expr =
            if const_first { Expr::binary(f, Expr::Param(k), p.expr) } else { Expr::binary(f, p.expr, Expr::Param(k)) };
        p.label = join_label(&p.label, f.name());
        p
    }

    /// Sum or difference of encrypted tensors from different sources: exact when they share
    /// a scale; otherwise the finer one is requantized to the coarser scale first.
    fn add_enc(&mut self, id: NodeId, f: BinaryFn, a: NodeId, b: NodeId) -> Result<QVal> {
        let mut qa = self.enc_operand(id, a)?;
        let mut qb = self.enc_operand(id, b)?;
        let dims = self.sample_dims(id);
        let sa = qa.scale.broadcast(IxDyn(&dims)).map(|v| v.to_owned());
        let sb = qb.scale.broadcast(IxDyn(&dims)).map(|v| v.to_owned());
        let (Some(sa), Some(sb)) = (sa, sb) else {
            return Err(self.unsupported(id, "operands do not broadcast"));
        };
        if !close(&sa, &sb) {
            // The coarser magnitude (scales are negative after a negation, zero where a
            // constant mask removed a value); a value whose scales are both 0 is 0.
            let target = ndarray::Zip::from(&sa).and(&sb).map_collect(|&x, &y| {
                let m = x.abs().max(y.abs());
                if m > 0.0 {
                    m
                } else {
                    1.0
                }
            });
            if !close(&sa, &target) {
                qa = self.rescale(id, a, qa, &target)?;
            }
            if !close(&sb, &target) {
                qb = self.rescale(id, b, qb, &target)?;
            }
        }
        let op = if f == BinaryFn::Add { Op::AddEnc } else { Op::SubEnc };
        let name = self.g.node(id).name.clone();
        let node = self.out.add(op, &[qa.node, qb.node], name)?;
        let oa = qa.offset.broadcast(IxDyn(&dims)).expect("checked").to_owned();
        let ob = qb.offset.broadcast(IxDyn(&dims)).expect("checked").to_owned();
        let offset = if f == BinaryFn::Add { oa + ob } else { oa - ob };
        let scale = qa.scale.broadcast(IxDyn(&dims)).expect("checked").to_owned();
        Ok(QVal::Enc(Quantized { node, scale, offset }))
    }

    /// Requantize an encrypted tensor to a coarser scale (the offset, in real units, stays):
    /// one lookup, or none when the ratios are whole numbers.
    fn rescale(&mut self, id: NodeId, operand: NodeId, q: Quantized, target: &ArrayD<f64>) -> Result<Quantized> {
        let input = self.enc_range(q.node);
        let ratio = &q.scale / target;
        let name = format!("{}_rescaled", self.g.node(operand).name);
        if ratio.iter().all(|r| (r - r.round()).abs() < 1e-9) {
            // Whole ratios (a sign flip, a masked-out value): exact and free, no lookup.
            let factor = ratio.mapv(|r| r.round() as i64);
            let lin = Linear::new(LinearKind::Scale { factor }, ArrayD::zeros(vec![]), "rescale");
            let node = self.out.add(Op::Linear(Box::new(lin)), &[q.node], name)?;
            return Ok(Quantized { node, scale: target.clone(), offset: q.offset });
        }
        let (lo, hi) = ratio.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), &r| {
            let (a, b) = (r * input.lo as f64, r * input.hi as f64);
            (l.min(a.min(b)), h.max(a.max(b)))
        });
        let range = Range::new(lo.floor() as i64, hi.ceil() as i64);
        let expr = Expr::Clamp(
            Box::new(Expr::Round(Box::new(Expr::binary(BinaryFn::Mul, Expr::Input, Expr::Param(0))))),
            range.lo as f64,
            range.hi as f64,
        );
        let tlu = Tlu { expr, input, params: vec![ratio], rounding: 0, label: "rescale".into() };
        let node = self.out.add(Op::Tlu(Box::new(tlu)), &[q.node], name).map_err(|e| self.err(id, e.to_string()))?;
        Ok(Quantized { node, scale: target.clone(), offset: q.offset })
    }

    fn enc_range(&self, node: NodeId) -> Range {
        match self.out.node(node).ty.elem {
            Elem::Enc(r) => r,
            _ => unreachable!("quantized values are encrypted"),
        }
    }

    /// Per-output-channel symmetric weight quantization of `w` [out, in]: integer weights
    /// and the scale of each row.
    fn quantize_rows(&self, w: &Array2<f64>) -> (Array2<i64>, Vec<f64>) {
        let qmax = ((1i64 << (self.cfg.weight_bits - 1)) - 1).max(1) as f64;
        let mut q = Array2::zeros(w.raw_dim());
        let mut scales = Vec::with_capacity(w.nrows());
        for (j, row) in w.outer_iter().enumerate() {
            let m = row.iter().fold(0.0f64, |a, &v| a.max(v.abs()));
            let s = if m > 0.0 { m / qmax } else { 1.0 };
            for (k, &v) in row.iter().enumerate() {
                q[[j, k]] = (v / s).round() as i64;
            }
            scales.push(s);
        }
        (q, scales)
    }

    /// Does some server-side op read float node `id`? Otherwise it is decrypted: filling
    /// lookup slots would only enlarge its weights (and the noise the outputs carry).
    fn read_by_lookups(&self, id: NodeId) -> bool {
        self.g.users(id).iter().any(|u| !self.tail.contains(u))
    }

    /// Calibrated span of each output channel (axis 1) of float node `id`.
    fn channel_spans(&self, id: NodeId) -> Option<Vec<f64>> {
        self.calib.channels.get(&id).map(|c| c.iter().map(|(l, h)| h - l).collect())
    }

    /// Calibrated span of each output feature (last axis) of a dense layer, any rank.
    fn feature_spans(&self, id: NodeId) -> Option<Vec<f64>> {
        self.calib.features.get(&id).map(|c| c.iter().map(|(l, h)| h - l).collect())
    }

    /// Centre each output channel's accumulator on zero with a clear integer bias, moving
    /// the shift into the real-valued offset: channels then share one narrow range. The
    /// channel is axis 0 of the sample for convolutions, the last axis for dense layers.
    fn center(
        &self,
        id: NodeId,
        s_out: &[f64],
        offset: ArrayD<f64>,
        out_dims: &[usize],
        last_axis: bool,
    ) -> (ArrayD<i64>, ArrayD<f64>) {
        let (ranges, axis) = if last_axis {
            (self.calib.features.get(&id), out_dims.len().saturating_sub(1))
        } else {
            (self.calib.channels.get(&id), 0)
        };
        let Some(chans) = ranges.filter(|c| c.len() == s_out.len() && out_dims.get(axis) == Some(&c.len())) else {
            return (ArrayD::zeros(vec![]), offset);
        };
        let per_chan_offset: Vec<f64> = offset.axis_iter(Axis(axis)).map(|o| o.mean().unwrap_or(0.0)).collect();
        let c: Vec<i64> = chans
            .iter()
            .zip(s_out)
            .zip(&per_chan_offset)
            .map(|((&(lo, hi), &s), &o)| if hi >= lo { (((lo + hi) / 2.0 - o) / s).round() as i64 } else { 0 })
            .collect();
        let mut shape = vec![1; out_dims.len()];
        shape[axis] = c.len();
        let bias = ArrayD::from_shape_vec(shape.clone(), c.iter().map(|&v| -v).collect()).expect("channel vector");
        let shift = ArrayD::from_shape_vec(shape, c.iter().zip(s_out).map(|(&v, &s)| v as f64 * s).collect())
            .expect("channel vector");
        (bias, offset + shift)
    }

    /// x·W + bias over the last axis; `w` is [K, M] in real units.
    fn dense(&mut self, id: NodeId, x: Quantized, w: Array2<f64>, bias: Vec<f64>) -> Result<QVal> {
        let in_dims = self.sample_dims(self.float_operand(id, 0));
        let k = *in_dims.last().ok_or_else(|| self.err(id, "dense on a scalar"))?;
        if w.nrows() != k {
            return Err(self.err(id, format!("weights take {} inputs, the tensor has {k}", w.nrows())));
        }
        let s_in = along_last(&x.scale, &in_dims)
            .ok_or_else(|| self.unsupported(id, "input scales vary along more than the contracted axis"))?;
        // Fold input scales into the weights, then quantize each output row.
        let eff = Array2::from_shape_fn((w.ncols(), k), |(j, kk)| w[[kk, j]] * s_in[kk]);
        let (q, s_out) = self.quantize_rows(&eff);
        // per output feature, whatever the rank: a leading size-1 axis must not cost accuracy
        let spans = self.feature_spans(id);
        let (q, s_out) = equalize(&eff, q, s_out, spans.as_deref());
        let (q, s_out) =
            if self.read_by_lookups(id) { fill(&eff, q, s_out, spans.as_deref(), self.margin) } else { (q, s_out) };
        // Offsets enter as a clear per-output offset: W·offset + bias, per sample position.
        let off = x.offset.broadcast(IxDyn(&in_dims)).ok_or_else(|| self.err(id, "offset shape"))?.to_owned();
        let off2 = off.to_shape((off.len() / k, k)).map_err(|e| self.err(id, e.to_string()))?.to_owned();
        let out_off = off2.dot(&w) + &Array2::from_shape_fn((1, w.ncols()), |(_, j)| bias[j]);
        let mut out_dims = in_dims.clone();
        *out_dims.last_mut().expect("non-empty") = w.ncols();
        let offset = out_off
            .as_standard_layout()
            .into_owned()
            .into_shape_with_order(IxDyn(&out_dims))
            .map_err(|e| self.err(id, e.to_string()))?;
        let (bias, offset) = self.center(id, &s_out, offset, &out_dims, true);
        let scale = ArrayD::from_shape_vec(vec![w.ncols()], s_out)
            .expect("one per row")
            .broadcast(IxDyn(&out_dims))
            .expect("last axis")
            .to_owned();
        let lin = Linear::new(LinearKind::Dense { weights: q }, bias, self.g.node(id).op.mnemonic());
        let node = self.out.add(Op::Linear(Box::new(lin)), &[x.node], self.g.node(id).name.clone())?;
        Ok(QVal::Enc(Quantized { node, scale, offset }))
    }

    fn float_operand(&self, id: NodeId, i: usize) -> NodeId {
        self.g.operands(id)[i]
    }

    fn conv(&mut self, id: NodeId, x: Quantized, c: &Conv2d, w: &ArrayD<f32>, b: Option<&ArrayD<f32>>) -> Result<QVal> {
        let xin = self.float_operand(id, 0);
        let in_dims = self.sample_dims(xin);
        let s_in = per_channel_of(&x.scale, &in_dims)
            .ok_or_else(|| self.unsupported(id, "input scales vary within a channel"))?;
        let w4: Array4<f32> = w.clone().into_dimensionality().map_err(|_| self.err(id, "weights must be 4-D"))?;
        let (m, cg, kh, kw) = w4.dim();
        let mg = m / c.group;
        let eff = Array2::from_shape_fn((m, cg * kh * kw), |(o, r)| {
            let ci = r / (kh * kw);
            let chan = (o / mg) * cg + ci;
            w4[[o, ci, (r / kw) % kh, r % kw]] as f64 * s_in[chan]
        });
        let (q, s_out) = self.quantize_rows(&eff);
        let spans = self.channel_spans(id);
        let (q, s_out) = equalize(&eff, q, s_out, spans.as_deref());
        let (q, s_out) =
            if self.read_by_lookups(id) { fill(&eff, q, s_out, spans.as_deref(), self.margin) } else { (q, s_out) };
        let q4 = q.into_shape_with_order((m, cg, kh, kw)).map_err(|e| self.err(id, e.to_string()))?;
        // Offsets (and zero padding, whose real value is 0) enter through a float
        // convolution of the offset image: exact per output position.
        let off_img = x
            .offset
            .broadcast(IxDyn(&in_dims))
            .ok_or_else(|| self.err(id, "offset shape"))?
            .mapv(|v| v as f32)
            .insert_axis(Axis(0));
        let mut args: Vec<Tensor> = vec![Tensor::F32(off_img), Tensor::F32(w.clone())];
        if let Some(b) = b {
            args.push(Tensor::F32(b.clone()));
        }
        let refs: Vec<&Tensor> = args.iter().collect();
        let off = eval_op(&Op::Conv(c.clone()), &refs).map_err(|e| self.err(id, e))?;
        let offset = off.to_f32().index_axis(Axis(0), 0).mapv(|v| v as f64);
        let out_dims = offset.shape().to_vec();
        let (bias, offset) = self.center(id, &s_out, offset, &out_dims, false);
        let scale = per_channel(&s_out, &out_dims);
        let lin = Linear::new(LinearKind::Conv { weights: q4, conv: c.clone() }, bias, "conv");
        let node = self.out.add(Op::Linear(Box::new(lin)), &[x.node], self.g.node(id).name.clone())?;
        Ok(QVal::Enc(Quantized { node, scale, offset }))
    }

    fn avg_pool(&mut self, id: NodeId, x: Quantized, p: &Pool2d) -> Result<QVal> {
        let in_dims = self.sample_dims(self.float_operand(id, 0));
        let s_in = per_channel_of(&x.scale, &in_dims)
            .ok_or_else(|| self.unsupported(id, "input scales vary within a channel"))?;
        // The integer op sums each window; the divisor (which varies at padded edges) goes
        // into the output scale, and offsets through a float average pool.
        let float = |img: ArrayD<f32>| -> Result<ArrayD<f32>> {
            let t = eval_op(&Op::AvgPool(p.clone()), &[&Tensor::F32(img.insert_axis(Axis(0)))])
                .map_err(|e| self.err(id, e))?;
            Ok(t.to_f32().index_axis(Axis(0), 0).to_owned())
        };
        let ones = ArrayD::<f32>::ones(in_dims.clone());
        let avg_ones = float(ones.clone())?;
        let sums = eval_op(
            &Op::Linear(Box::new(Linear::new(LinearKind::SumPool { pool: p.clone() }, ArrayD::zeros(vec![]), "sum"))),
            &[&Tensor::I64(ones.mapv(|_| 1i64).insert_axis(Axis(0)))],
        )
        .map_err(|e| self.err(id, e))?;
        let sums = sums.as_i64().expect("integer").index_axis(Axis(0), 0).mapv(|v| v as f64);
        let out_dims = avg_ones.shape().to_vec();
        let s_chan = per_channel(&s_in, &out_dims);
        let scale = ndarray::Zip::from(&s_chan).and(&avg_ones).and(&sums).map_collect(|&s, &a, &n| s * a as f64 / n);
        let offset =
            float(x.offset.broadcast(IxDyn(&in_dims)).expect("offset shape").mapv(|v| v as f32))?.mapv(|v| v as f64);
        let lin = Linear::new(LinearKind::SumPool { pool: p.clone() }, ArrayD::zeros(vec![]), "avg_pool");
        let node = self.out.add(Op::Linear(Box::new(lin)), &[x.node], self.g.node(id).name.clone())?;
        Ok(QVal::Enc(Quantized { node, scale, offset }))
    }

    /// Sum over `axes` (axes of the full tensor), dividing the real value by `div`.
    fn sum(&mut self, id: NodeId, x: Quantized, axes: Vec<usize>, keepdims: bool, div: f64) -> Result<QVal> {
        let xin = self.float_operand(id, 0);
        let in_dims = self.sample_dims(xin);
        let batch = self.g.node(xin).ty.shape.has_batch() as usize;
        let sample_axes: Vec<usize> = axes.iter().map(|&a| a - batch).collect();
        let full_scale = x.scale.broadcast(IxDyn(&in_dims)).expect("scale shape").to_owned();
        let full_offset = x.offset.broadcast(IxDyn(&in_dims)).expect("offset shape").to_owned();
        let (x, full_scale, mut offset) = match reduce_uniform(&full_scale, &sample_axes) {
            Some(_) => (x, full_scale, full_offset),
            None => self.common_scale(id, x, &full_scale, &full_offset, &sample_axes)?,
        };
        let reduced_first = reduce_uniform(&full_scale, &sample_axes).expect("one scale along the summed axes");
        let mut scale = reduced_first.mapv(|s| s / div);
        let mut sorted = sample_axes.clone();
        sorted.sort_unstable();
        for &a in sorted.iter().rev() {
            offset = offset.sum_axis(Axis(a));
        }
        if keepdims {
            for &a in &sorted {
                offset.insert_axis_inplace(Axis(a));
                scale.insert_axis_inplace(Axis(a));
            }
        }
        let offset = offset.mapv(|o| o / div);
        let lin = Linear::new(LinearKind::Sum { axes, keepdims }, ArrayD::zeros(vec![]), self.g.node(id).op.mnemonic());
        let node = self.out.add(Op::Linear(Box::new(lin)), &[x.node], self.g.node(id).name.clone())?;
        let out_dims = self.sample_dims(id);
        let scale = scale.into_shape_with_order(IxDyn(&out_dims)).map_err(|e| self.err(id, e.to_string()))?;
        Ok(QVal::Enc(Quantized { node, scale, offset }))
    }

    /// Bring values with different scales along `axes` (sample axes) to one scale per
    /// lane before they are summed, as a dense layer's weights are quantized: integer
    /// factors `round(s_i / s)` of `weight_bits`, with `s = max |s_i| / (2^(bits−1) − 1)`
    /// over the lane. This is how `Σ x_i · c_i` (a Mul by clear values, then a sum) runs.
    /// Returns the scaled tensor with its per-element scale (now uniform) and offset.
    fn common_scale(
        &mut self,
        id: NodeId,
        x: Quantized,
        scale: &ArrayD<f64>,
        offset: &ArrayD<f64>,
        axes: &[usize],
    ) -> Result<(Quantized, ArrayD<f64>, ArrayD<f64>)> {
        let qmax = ((1i64 << (self.cfg.weight_bits - 1)) - 1).max(1) as f64;
        let mut lane_max = scale.mapv(f64::abs);
        for &a in axes {
            lane_max = lane_max.fold_axis(Axis(a), 0.0f64, |m, &v| m.max(v)).insert_axis(Axis(a));
        }
        let common = lane_max.mapv(|m| if m > 0.0 { m / qmax } else { 1.0 });
        let common = common.broadcast(scale.raw_dim()).expect("lanes broadcast").to_owned();
        let factor = ndarray::Zip::from(scale).and(&common).map_collect(|&s, &c| (s / c).round() as i64);
        let label = format!("{}_weights", self.g.node(id).op.mnemonic());
        let lin = Linear::new(LinearKind::Scale { factor }, ArrayD::zeros(vec![]), label);
        let name = format!("{}_weighted", self.g.node(id).name);
        let node = self.out.add(Op::Linear(Box::new(lin)), &[x.node], name)?;
        Ok((Quantized { node, scale: common.clone(), offset: offset.clone() }, common, offset.clone()))
    }

    /// ReduceMax/ReduceMin as trees of exact element-wise maxima, one reduced axis at a
    /// time; a minimum is `a + b − max(a, b)`, which costs no extra lookup. The values
    /// compared must share a scale and offset along the reduced axes.
    fn extremum(&mut self, id: NodeId, x: Quantized, axes: &[usize], keepdims: bool, max: bool) -> Result<QVal> {
        let xin = self.float_operand(id, 0);
        if !self.g.node(xin).ty.shape.has_batch() {
            return Err(self.unsupported(id, "a reduction of an unbatched tensor"));
        }
        let in_dims = self.sample_dims(xin);
        let sample_axes: Vec<usize> = axes.iter().map(|&a| a - 1).collect();
        let mut x = x;
        let mut scale = x.scale.broadcast(IxDyn(&in_dims)).expect("scale").to_owned();
        if reduce_uniform(&scale, &sample_axes).is_none() {
            // Compared values need one scale: the coarsest magnitude of the lane (exact and
            // free for a sign flip or whole ratios, a lookup otherwise).
            let mut lane = scale.mapv(f64::abs);
            for &a in &sample_axes {
                lane = lane.fold_axis(Axis(a), 0.0f64, |m, &v| m.max(v)).insert_axis(Axis(a));
            }
            let target =
                lane.mapv(|m| if m > 0.0 { m } else { 1.0 }).broadcast(scale.raw_dim()).expect("lane").to_owned();
            x.scale = scale;
            x = self.rescale(id, xin, x, &target)?;
            scale = target;
        }
        let mut offset = x.offset.broadcast(IxDyn(&in_dims)).expect("offset").to_owned();
        if reduce_uniform(&offset, &sample_axes).is_none() {
            // And one offset: each value moves by whole steps toward the lane's smallest
            // offset (within half a step of it, as rounding to the scale is).
            let mut lane = offset.clone();
            for &a in &sample_axes {
                lane = lane.fold_axis(Axis(a), f64::INFINITY, |m, &v| m.min(v)).insert_axis(Axis(a));
            }
            let lane = lane.broadcast(offset.raw_dim()).expect("lane").to_owned();
            let shift = ndarray::Zip::from(&offset)
                .and(&lane)
                .and(&scale)
                .map_collect(|&o, &l, &s| ((o - l) / s).round() as i64);
            let lin = Linear::new(LinearKind::Scale { factor: ArrayD::ones(vec![]) }, shift, "shift");
            let name = format!("{}_shifted", self.g.node(id).name);
            x.node = self.out.add(Op::Linear(Box::new(lin)), &[x.node], name)?;
            offset = lane;
        }
        let (mut scale, mut offset) =
            match (reduce_uniform(&scale, &sample_axes), reduce_uniform(&offset, &sample_axes)) {
                (Some(s), Some(o)) => (s, o),
                _ => return Err(self.unsupported(id, "offsets vary along the reduced axes")),
            };
        let name = self.g.node(id).name.clone();
        let mut cur = x.node;
        for &axis in axes {
            let taps = (0..in_dims[axis - 1])
                .map(|i| {
                    let indices = ArrayD::from_shape_vec(vec![1], vec![i as i64]).expect("1-D");
                    self.out.add(Op::Gather { axis, indices }, &[cur], format!("{name}_ax{axis}_{i}"))
                })
                .collect::<std::result::Result<Vec<_>, _>>()?;
            cur = self.extremum_tree(&format!("{name}_ax{axis}"), taps, max)?;
        }
        if !keepdims {
            cur = self.out.add(Op::Reshape { shape: self.g.node(id).ty.shape.clone() }, &[cur], name)?;
        } else {
            let mut sorted = sample_axes;
            sorted.sort_unstable();
            for &a in &sorted {
                scale.insert_axis_inplace(Axis(a));
                offset.insert_axis_inplace(Axis(a));
            }
        }
        let out_dims = self.sample_dims(id);
        let scale = scale.into_shape_with_order(IxDyn(&out_dims)).map_err(|e| self.err(id, e.to_string()))?;
        let offset = offset.into_shape_with_order(IxDyn(&out_dims)).map_err(|e| self.err(id, e.to_string()))?;
        Ok(QVal::Enc(Quantized { node: cur, scale, offset }))
    }

    /// A balanced tree of pairwise maxima (or minima) of equally shaped encrypted values.
    fn extremum_tree(&mut self, name: &str, mut taps: Vec<NodeId>, max: bool) -> Result<NodeId> {
        let mut level = 0;
        while taps.len() > 1 {
            let mut next = Vec::new();
            for (i, pair) in taps.chunks(2).enumerate() {
                let [a, b] = *pair else {
                    next.push(pair[0]);
                    continue;
                };
                let tag = format!("{name}_{}{level}_{i}", if max { "max" } else { "min" });
                let max_name = if max { tag.clone() } else { format!("{tag}_max") };
                let m = self.out.add(Op::MaxEnc { rounding: 0, diff: None }, &[a, b], max_name)?;
                next.push(if max {
                    m
                } else {
                    let sum = self.out.add(Op::AddEnc, &[a, b], format!("{tag}_sum"))?;
                    let min = self.out.add(Op::SubEnc, &[sum, m], format!("{tag}_diff"))?;
                    // Interval arithmetic cannot see that a + b − max(a, b) is min(a, b).
                    let (ra, rb) = (self.enc_range(a), self.enc_range(b));
                    let range = Range::new(ra.lo.min(rb.lo), ra.hi.min(rb.hi));
                    self.out.add(Op::Assume { range }, &[min], tag)?
                });
            }
            taps = next;
            level += 1;
        }
        Ok(taps[0])
    }

    /// Max pooling as a tree of exact element-wise maxima over the window's taps.
    fn max_pool(&mut self, id: NodeId, x: Quantized, p: &Pool2d) -> Result<QVal> {
        let xin = self.float_operand(id, 0);
        let in_dims = self.sample_dims(xin);
        let scale = x.scale.broadcast(IxDyn(&in_dims)).expect("scale").to_owned();
        let offset = x.offset.broadcast(IxDyn(&in_dims)).expect("offset").to_owned();
        if per_channel_of(&scale, &in_dims).is_none() || per_channel_of(&offset, &in_dims).is_none() {
            return Err(self.unsupported(id, "max pooling needs one scale and offset per channel"));
        }
        let (h, w) = (in_dims[1], in_dims[2]);
        let [oh, ow] = p.out_size(h, w).ok_or_else(|| self.err(id, "window does not fit"))?;
        let name = self.g.node(id).name.clone();
        let r = self.enc_range(x.node);
        // Pad with the smallest representable value so padded taps never win.
        let span_h = (oh - 1) * p.strides[0] + (p.kernel[0] - 1) * p.dilations[0] + 1;
        let span_w = (ow - 1) * p.strides[1] + (p.kernel[1] - 1) * p.dilations[1] + 1;
        let (bottom, right) = ((span_h).saturating_sub(h + p.pads[0]), (span_w).saturating_sub(w + p.pads[1]));
        let mut src = x.node;
        if p.pads.iter().any(|&v| v > 0) || bottom > 0 || right > 0 {
            let pads = vec![(0, 0), (0, 0), (p.pads[0], bottom), (p.pads[1], right)];
            src = self.out.add(Op::Pad { pads, value: r.lo as f32 }, &[src], format!("{name}_padded"))?;
        }
        let mut taps = Vec::new();
        for ki in 0..p.kernel[0] {
            let rows: Vec<i64> = (0..oh).map(|o| (o * p.strides[0] + ki * p.dilations[0]) as i64).collect();
            let by_row = self.out.add(
                Op::Gather { axis: 2, indices: ArrayD::from_shape_vec(vec![oh], rows).expect("1-D") },
                &[src],
                format!("{name}_row{ki}"),
            )?;
            for kj in 0..p.kernel[1] {
                let cols: Vec<i64> = (0..ow).map(|o| (o * p.strides[1] + kj * p.dilations[1]) as i64).collect();
                let tap = self.out.add(
                    Op::Gather { axis: 3, indices: ArrayD::from_shape_vec(vec![ow], cols).expect("1-D") },
                    &[by_row],
                    format!("{name}_tap{ki}{kj}"),
                )?;
                taps.push(tap);
            }
        }
        // Balanced tree: depth log2(k²) keeps the ranges (and rounding) shallow.
        let top = self.extremum_tree(&name, taps, true)?;
        let out_dims = self.sample_dims(id);
        let s = per_channel_of(&scale, &in_dims).expect("checked");
        let o = per_channel_of(&offset, &in_dims).expect("checked");
        Ok(QVal::Enc(Quantized { node: top, scale: per_channel(&s, &out_dims), offset: per_channel(&o, &out_dims) }))
    }

    /// Layout ops move ciphertexts; the per-element scales and offsets move with them.
    fn layout(&mut self, id: NodeId, xs: &[Quantized]) -> Result<QVal> {
        let op = self.g.node(id).op.clone();
        if let Op::Pad { value, .. } = &op {
            let x = &xs[0];
            if *value != 0.0 || x.offset.iter().any(|&o| o != 0.0) {
                return Err(self.unsupported(id, "padding an encrypted tensor with a non-zero value or offset"));
            }
        }
        if let Op::Transpose { perm } = &op {
            if self.g.node(id).ty.shape.has_batch() && perm[0] != 0 {
                return Err(self.unsupported(id, "a transpose that moves the batch axis"));
            }
        }
        if !self.g.node(id).ty.shape.has_batch() {
            return Err(self.unsupported(id, "layout on an unbatched tensor"));
        }
        // Run the op on the parameter images (with a batch of one) to move them.
        let ops = self.g.operands(id);
        let mut scales = Vec::new();
        let mut offsets = Vec::new();
        for (x, &o) in xs.iter().zip(&ops) {
            let dims = self.sample_dims(o);
            let batched =
                |a: &ArrayD<f64>| a.broadcast(IxDyn(&dims)).expect("per-sample").to_owned().insert_axis(Axis(0));
            scales.push(batched(&x.scale));
            offsets.push(batched(&x.offset));
        }
        let moved = |arrays: &[ArrayD<f64>], pad_with: f64| -> Result<ArrayD<f64>> {
            let refs: Vec<&ArrayD<f64>> = arrays.iter().collect();
            let a = veil_ir::interp::layout(&op, &refs, pad_with).map_err(|e| self.err(id, e))?;
            Ok(a.index_axis(Axis(0), 0).to_owned())
        };
        let scale = moved(&scales, 1.0)?;
        let offset = moved(&offsets, 0.0)?;
        let ids: Vec<NodeId> = xs.iter().map(|x| x.node).collect();
        let node = self.out.add(op.clone(), &ids, self.g.node(id).name.clone())?;
        Ok(QVal::Enc(Quantized { node, scale, offset }))
    }

    /// Register server outputs, build the client tail and the model.
    fn finish(mut self, order: &[NodeId], tail: &HashSet<NodeId>) -> Result<QuantizedModel> {
        let g = self.g;
        let mut tail_graph = Graph::new(format!("{}_client", g.name));
        let mut tail_inputs = Vec::new();
        let mut decode = Vec::new();
        let mut map: HashMap<NodeId, NodeId> = HashMap::new();
        // A server value the client needs: decrypted and decoded, then a tail input.
        let mut to_client =
            |q: &mut Self, tail_graph: &mut Graph, map: &mut HashMap<NodeId, NodeId>, id: NodeId| -> Result<NodeId> {
                if let Some(&t) = map.get(&id) {
                    return Ok(t);
                }
                let node = g.node(id);
                let t = if let (Op::Input { index }, true) = (&node.op, tail_only_input(g, id, tail)) {
                    tail_inputs.push(TailSource::Model(*index));
                    tail_graph.add_input(node.name.clone(), node.ty.clone())
                } else {
                    match q.val(id) {
                        QVal::Const(c) => tail_graph.add_const(Tensor::F32(c), node.name.clone()),
                        QVal::Enc(e) => {
                            tail_inputs.push(q.server_output(id, e, &mut decode));
                            tail_graph.add_input(node.name.clone(), node.ty.clone())
                        }
                        QVal::Fn(p) => {
                            let e = q.tabulate(id, p)?;
                            tail_inputs.push(q.server_output(id, e, &mut decode));
                            tail_graph.add_input(node.name.clone(), node.ty.clone())
                        }
                    }
                };
                map.insert(id, t);
                Ok(t)
            };
        for &id in order {
            if !tail.contains(&id) {
                continue;
            }
            let mut operands = Vec::new();
            for o in g.operands(id) {
                operands.push(if tail.contains(&o) {
                    map[&o]
                } else {
                    to_client(&mut self, &mut tail_graph, &mut map, o)?
                });
            }
            let n = g.node(id);
            let t = tail_graph.add(n.op.clone(), &operands, n.name.clone())?;
            map.insert(id, t);
        }
        for o in g.outputs() {
            let t = if tail.contains(&o.node) {
                map[&o.node]
            } else {
                to_client(&mut self, &mut tail_graph, &mut map, o.node)?
            };
            tail_graph.set_output(o.name.clone(), t);
        }
        veil_ir::verify(&tail_graph)?;
        self.out.remove_dead();
        veil_ir::verify(&self.out)?;
        let model_inputs = g.inputs().iter().map(|&i| g.node(i).name.clone()).collect();
        Ok(QuantizedModel {
            name: g.name.clone(),
            graph: self.out,
            inputs: self.inputs,
            input_of: self.input_of,
            decode,
            tail: tail_graph,
            tail_inputs,
            model_inputs,
        })
    }

    fn server_output(&mut self, id: NodeId, e: Quantized, decode: &mut Vec<OutputDecode>) -> TailSource {
        let i = self.out.outputs().len();
        self.out.set_output(self.g.node(id).name.clone(), e.node);
        let dims = self.sample_dims(id);
        let b = |a: &ArrayD<f64>| a.broadcast(IxDyn(&dims)).map(|v| v.to_owned()).unwrap_or_else(|| a.clone());
        decode.push(OutputDecode { scale: b(&e.scale), offset: b(&e.offset), rounding: 0 });
        TailSource::Server(i)
    }
}

/// A model input that only the client tail reads stays in the clear on the client.
fn tail_only_input(g: &Graph, id: NodeId, tail: &HashSet<NodeId>) -> bool {
    matches!(g.node(id).op, Op::Input { .. })
        && g.users(id).iter().all(|u| tail.contains(u))
        && !g.outputs().iter().any(|o| o.node == id)
}

/// Give every output channel the same calibrated accumulator span: a channel whose
/// values span less than the widest gets a finer scale (larger integer weights, up to 16×),
/// so that a lookup rounding the whole tensor to p bits resolves every channel equally.
fn equalize(eff: &Array2<f64>, q: Array2<i64>, s_out: Vec<f64>, spans: Option<&[f64]>) -> (Array2<i64>, Vec<f64>) {
    let Some(spans) = spans.filter(|s| s.len() == s_out.len()) else { return (q, s_out) };
    let int_spans: Vec<f64> = spans.iter().zip(&s_out).map(|(sp, s)| sp / s).collect();
    let widest = int_spans.iter().cloned().fold(0.0, f64::max);
    if widest <= 0.0 {
        return (q, s_out);
    }
    let scales: Vec<f64> = s_out
        .iter()
        .zip(&int_spans)
        .map(|(&s, &w)| if w > 0.0 { s * (w / widest).max(1.0 / 16.0) } else { s })
        .collect();
    let q = Array2::from_shape_fn(eff.raw_dim(), |(j, k)| (eff[[j, k]] / scales[j]).round() as i64);
    (q, scales)
}

/// Scale a layer so its compiled range fills the lookup slots. A lookup reads its input
/// in buckets of 2^k, so a range just over a power of two wastes half the slots. After
/// equalizing and centring, the compiled range is predictable: the common channel span
/// times (1 + 2·margin). Finer scales (up to 2×) put it at 0.75·2^m, where a rounded
/// lookup of p ≥ 4 bits uses all its usable slots (two are spares and one may be lost to
/// bucket alignment).
fn fill(
    eff: &Array2<f64>,
    q: Array2<i64>,
    s_out: Vec<f64>,
    spans: Option<&[f64]>,
    margin: f64,
) -> (Array2<i64>, Vec<f64>) {
    let Some(spans) = spans.filter(|s| s.len() == s_out.len()) else { return (q, s_out) };
    let span = spans.iter().zip(&s_out).map(|(sp, s)| sp / s).fold(0.0, f64::max);
    if !margin.is_finite() || span < 16.0 {
        return (q, s_out);
    }
    let range = span * (1.0 + 2.0 * margin) + 2.0;
    let target = 0.75 * 2f64.powf((range / 0.75).log2().ceil());
    let f = target / range;
    if f < 1.01 {
        return (q, s_out);
    }
    let scales: Vec<f64> = s_out.iter().map(|s| s / f).collect();
    let q = Array2::from_shape_fn(eff.raw_dim(), |(j, k)| (eff[[j, k]] / scales[j]).round() as i64);
    (q, scales)
}

/// Are some features' calibrated ranges over 8 times wider than the typical one?
/// Do the features' calibrated spans differ enough to deserve a scale each? The widest
/// against the lower median (so that with two features, one narrow one counts): features
/// of one kind (pixels) share a scale, a [0, 1] feature beside a [0, 100] one does not.
fn heterogeneous(lo: &ArrayD<f64>, hi: &ArrayD<f64>) -> bool {
    let mut spans: Vec<f64> = lo.iter().zip(hi.iter()).map(|(l, h)| h - l).filter(|s| *s > 0.0).collect();
    spans.sort_by(f64::total_cmp);
    let max = spans.last().copied().unwrap_or(0.0);
    spans.get(spans.len().saturating_sub(1) / 2).is_some_and(|&m| max > 8.0 * m)
}

fn median(values: impl Iterator<Item = f64>) -> Option<f64> {
    let mut v: Vec<f64> = values.collect();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied()
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
