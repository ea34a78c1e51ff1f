//! ONNX import.
//!
//! The importer walks the ONNX graph in order, folding everything it can compute without
//! the input (initializers, `Constant` nodes, and `Shape`-derived subgraphs such as the
//! `Shape → Gather → Unsqueeze → Concat → Reshape` that PyTorch writes for
//! `x.view(x.size(0), -1)`), and adds the rest to a veil IR graph. Each ONNX op has a small
//! converter registered by (domain, name) in [`ops::registry`].

mod attr;
pub mod export;
mod ops;
mod tensor;

use crate::error::{FrontendError, Result};
use attr::NodeView;
use onnx_protobuf::{Message, ModelProto, ValueInfoProto};
use std::collections::{HashMap, HashSet};
use std::path::Path;
use veil_ir::interp::eval_op;
use veil_ir::{Dim, Elem, Graph, NodeId, Op, Shape, Tensor, TensorType};

/// The `ai.onnx` opsets the importer supports.
pub const OPSETS: std::ops::RangeInclusive<i64> = 11..=20;

/// ai.onnx ops whose meaning (as veil reads them) has not changed since opset 7.
const STABLE_SINCE_7: &[&str] =
    &["Identity", "Add", "Sub", "Mul", "Div", "Relu", "Sigmoid", "Tanh", "Exp", "Log", "Abs", "Neg", "Sqrt", "MatMul"];

/// Largest model file read, so that a wrong path cannot exhaust memory.
const MAX_MODEL_BYTES: u64 = 2 << 30;

/// Import an ONNX model file into a verified float graph.
pub fn import_file(path: impl AsRef<Path>) -> Result<Graph> {
    let path = path.as_ref();
    let shown = path.display().to_string();
    let io = |source| FrontendError::Io { path: shown.clone(), source };
    let len = std::fs::metadata(path).map_err(io)?.len();
    if len > MAX_MODEL_BYTES {
        return Err(FrontendError::Model(format!(
            "{shown} is {len} bytes, more than the {MAX_MODEL_BYTES}-byte limit"
        )));
    }
    let bytes = std::fs::read(path).map_err(io)?;
    // models/<name>/model.onnx is a common layout: name it after its folder then.
    let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let name = match path.parent().and_then(|p| p.file_name()) {
        Some(dir) if stem == "model" => dir.to_string_lossy().into_owned(),
        _ => stem,
    };
    import_bytes(&bytes, &shown, &name)
}

/// Import an ONNX model from memory; `path` is only used in messages.
pub fn import_bytes(bytes: &[u8], path: &str, name: &str) -> Result<Graph> {
    let model = ModelProto::parse_from_bytes(bytes)
        .map_err(|e| FrontendError::Parse { path: path.into(), msg: e.to_string() })?;
    import_model(&model, name)
}

/// A value during import: in the graph, a folded constant, or a folded integer tensor
/// whose entries may be the (symbolic) batch size.
#[derive(Clone, Debug)]
pub(crate) enum Value {
    Node(NodeId),
    Const(Tensor),
    Sym(SymTensor),
}

/// One entry of a folded shape computation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Sym {
    Int(i64),
    Batch,
}

/// An integer tensor (rank 0 or 1) computed from shapes, some of whose entries are `N`.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct SymTensor {
    pub dims: Vec<usize>,
    pub vals: Vec<Sym>,
}

impl SymTensor {
    /// A plain constant when no entry depends on the batch size.
    pub fn into_value(self) -> Value {
        if self.vals.iter().all(|v| matches!(v, Sym::Int(_))) {
            let v: Vec<i64> = self.vals.iter().map(|s| if let Sym::Int(i) = s { *i } else { 0 }).collect();
            Value::Const(Tensor::I64(ndarray::ArrayD::from_shape_vec(self.dims, v).expect("dims match values")))
        } else {
            Value::Sym(self)
        }
    }

    pub fn from_const(t: &Tensor) -> Option<SymTensor> {
        let a = t.as_i64()?;
        Some(SymTensor { dims: a.shape().to_vec(), vals: a.iter().map(|&v| Sym::Int(v)).collect() })
    }
}

pub(crate) struct Ctx {
    pub g: Graph,
    values: HashMap<String, Value>,
    /// Constants already placed in the graph, so a weight used twice is one node.
    placed: HashMap<String, NodeId>,
}

impl Ctx {
    /// The value of a tensor, by name.
    pub fn get(&self, n: &NodeView, name: &str) -> Result<Value> {
        self.values
            .get(name)
            .cloned()
            .ok_or_else(|| n.err(format!("input tensor '{name}' is not defined before this node")))
    }

    /// Input `i` of the node (which must be present).
    pub fn input(&self, n: &NodeView, i: usize) -> Result<Value> {
        self.get(n, n.required_input(i)?)
    }

    /// Input `i` as a constant, or an error saying the op needs it constant.
    pub fn const_input(&self, n: &NodeView, i: usize, what: &str) -> Result<Tensor> {
        match self.input(n, i)? {
            Value::Const(t) => Ok(t),
            _ => Err(n.err(format!("{what} (input {i}) must be a constant"))),
        }
    }

    pub fn opt_const_input(&self, n: &NodeView, i: usize, what: &str) -> Result<Option<Tensor>> {
        match n.input(i) {
            None => Ok(None),
            Some(_) => self.const_input(n, i, what).map(Some),
        }
    }

    /// The type of a value.
    pub fn type_of(&self, v: &Value) -> TensorType {
        match v {
            Value::Node(id) => self.g.node(*id).ty.clone(),
            Value::Const(t) => TensorType::new(t.elem(), Shape::fixed(t.shape())),
            Value::Sym(s) => TensorType::i64(Shape::fixed(&s.dims)),
        }
    }

    /// The value as a graph node, placing a constant in the graph if needed.
    pub fn place(&mut self, n: &NodeView, v: &Value, name: &str) -> Result<NodeId> {
        match v {
            Value::Node(id) => Ok(*id),
            Value::Const(t) => {
                if let Some(&id) = self.placed.get(name) {
                    return Ok(id);
                }
                let id = self.g.add_const(t.clone(), name);
                self.placed.insert(name.to_string(), id);
                Ok(id)
            }
            Value::Sym(_) => Err(n.err(format!("'{name}' depends on the batch size and cannot be used as data here"))),
        }
    }

    /// Apply `op` to `inputs` (value, tensor name): folded when every input is constant,
    /// otherwise added to the graph.
    pub fn apply(&mut self, n: &NodeView, op: Op, inputs: &[(Value, String)], out: &str) -> Result<Value> {
        if inputs.iter().all(|(v, _)| matches!(v, Value::Const(_))) {
            let (lo, hi) = op.arity();
            if !(lo..=hi).contains(&inputs.len()) {
                return Err(n.err(format!(
                    "{} takes {lo} to {hi} inputs, this node has {}",
                    op.mnemonic(),
                    inputs.len()
                )));
            }
            let args: Vec<&Tensor> =
                inputs.iter().map(|(v, _)| if let Value::Const(t) = v { t } else { unreachable!() }).collect();
            return eval_op(&op, &args).map(Value::Const).map_err(|e| n.err(e));
        }
        let mut ids = Vec::with_capacity(inputs.len());
        for (v, name) in inputs {
            ids.push(self.place(n, v, name)?);
        }
        let id = self.g.add(op, &ids, out).map_err(|e| n.err(strip_node(e)))?;
        Ok(Value::Node(id))
    }

    /// `apply` for an op whose operands are the node's own inputs 0..k.
    pub fn apply_inputs(&mut self, n: &NodeView, op: Op, count: usize) -> Result<Value> {
        let mut inputs = Vec::new();
        for i in 0..count {
            if let Some(name) = n.input(i) {
                inputs.push((self.get(n, name)?, name.to_string()));
            }
        }
        self.apply(n, op, &inputs, &n.output_name(0))
    }
}

/// The IR's error already names an op; the importer names the ONNX node instead.
fn strip_node(e: veil_ir::IrError) -> String {
    match e {
        veil_ir::IrError::Type { msg, .. } => msg,
        other => other.to_string(),
    }
}

fn import_model(model: &ModelProto, name: &str) -> Result<Graph> {
    let graph = model.graph.as_ref().ok_or_else(|| FrontendError::Model("the model has no graph".into()))?;
    let mut opsets: HashMap<String, i64> = HashMap::new();
    for o in &model.opset_import {
        let d = if o.domain == "ai.onnx" { String::new() } else { o.domain.clone() };
        opsets.insert(d, o.version);
    }
    let opset = *opsets.get("").unwrap_or(OPSETS.start());
    // Tree converters (onnxmltools' LightGBM: opset 8) declare old opsets for graphs whose
    // only ai.onnx ops mean the same since opset 7: those are read as they are.
    let default_ops = || graph.node.iter().filter(|n| n.domain.is_empty() || n.domain == "ai.onnx");
    let stable =
        (7..*OPSETS.start()).contains(&opset) && default_ops().all(|n| STABLE_SINCE_7.contains(&n.op_type.as_str()));
    if !OPSETS.contains(&opset) && !stable {
        return Err(FrontendError::Model(format!(
            "the model uses ai.onnx opset {opset}; veil supports opsets {}–{}: re-export with opset_version in that range",
            OPSETS.start(),
            OPSETS.end()
        )));
    }
    let gname = if graph.name.is_empty() { name.to_string() } else { graph.name.clone() };
    let mut ctx = Ctx {
        g: Graph::new(if name.is_empty() { gname } else { name.to_string() }),
        values: HashMap::new(),
        placed: HashMap::new(),
    };

    for init in &graph.initializer {
        let t = tensor::to_tensor(init).map_err(FrontendError::Model)?;
        ctx.values.insert(init.name.clone(), Value::Const(t));
    }
    for input in &graph.input {
        if ctx.values.contains_key(&input.name) {
            continue; // an initializer listed as input (old exporters): it is a constant
        }
        let ty = input_type(input)?;
        let id = ctx.g.add_input(&input.name, ty);
        ctx.values.insert(input.name.clone(), Value::Node(id));
    }

    // Tensors some later node or the graph reads: a converter must produce each of these.
    let mut used: HashSet<&str> = graph.node.iter().flat_map(|n| n.input.iter().map(|s| s.as_str())).collect();
    used.extend(graph.output.iter().map(|o| o.name.as_str()));

    let registry = ops::registry();
    for (index, proto) in graph.node.iter().enumerate() {
        let domain = if proto.domain == "ai.onnx" { "" } else { proto.domain.as_str() };
        let node_opset = *opsets.get(domain).unwrap_or(&1);
        let view = NodeView { proto, opset: node_opset, index };
        let convert =
            registry.get(&(domain, proto.op_type.as_str())).ok_or_else(|| unsupported(&view, domain, &registry))?;
        let outs = convert(&mut ctx, &view)?;
        for (i, out) in proto.output.iter().enumerate() {
            if out.is_empty() {
                continue;
            }
            match outs.get(i) {
                Some(v) => {
                    ctx.values.insert(out.clone(), v.clone());
                }
                None if used.contains(out.as_str()) => {
                    return Err(view.err(format!("output {i} ('{out}') is not supported, but the model uses it")));
                }
                None => {}
            }
        }
    }

    for out in &graph.output {
        let v = ctx
            .values
            .get(&out.name)
            .cloned()
            .ok_or_else(|| FrontendError::Model(format!("graph output '{}' is never computed", out.name)))?;
        let id = match v {
            Value::Node(id) => id,
            Value::Const(t) => ctx.g.add_const(t, &out.name),
            Value::Sym(_) => {
                return Err(FrontendError::Model(format!(
                    "graph output '{}' is a shape that depends on the batch size",
                    out.name
                )))
            }
        };
        ctx.g.set_output(&out.name, id);
    }
    ctx.g.remove_dead();
    veil_ir::verify(&ctx.g)?;
    Ok(ctx.g)
}

/// A graph input's type: its first dimension, when symbolic or unknown, is the batch.
fn input_type(input: &ValueInfoProto) -> Result<TensorType> {
    use onnx_protobuf::tensor_shape_proto::dimension::Value as D;
    use onnx_protobuf::type_proto::Value as T;
    let bad = |msg: String| FrontendError::Model(format!("graph input '{}': {msg}", input.name));
    let Some(T::TensorType(tt)) = input.type_.as_ref().and_then(|t| t.value.as_ref()) else {
        return Err(bad("only tensor inputs are supported".into()));
    };
    let elem = tensor::elem_of(tt.elem_type).map_err(bad)?;
    let shape = tt.shape.as_ref().ok_or_else(|| bad("the model does not declare the input's shape".into()))?;
    let mut dims = Vec::new();
    for (axis, d) in shape.dim.iter().enumerate() {
        dims.push(match &d.value {
            Some(D::DimValue(v)) if *v > 0 => Dim::Fixed(*v as usize),
            _ if axis == 0 => Dim::Batch,
            _ => return Err(bad(format!("dimension {axis} is symbolic; only the first (batch) dimension may be"))),
        });
    }
    let elem = if elem == Elem::F32 { Elem::F32 } else { Elem::I64 };
    Ok(TensorType::new(elem, Shape(dims)))
}

fn unsupported(n: &NodeView, domain: &str, registry: &ops::Registry) -> FrontendError {
    let mut names: Vec<String> =
        registry.keys().map(|(d, op)| if d.is_empty() { op.to_string() } else { format!("{d}.{op}") }).collect();
    names.sort();
    FrontendError::Unsupported {
        op: n.proto.op_type.clone(),
        domain: if domain.is_empty() { String::new() } else { format!("{domain}.") },
        node: if n.proto.name.is_empty() { n.output_name(0) } else { n.proto.name.clone() },
        opset: n.opset,
        supported: names.join(", "),
    }
}
