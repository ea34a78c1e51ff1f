//! The graph: nodes are ops with their result type; edges run from operand to user and
//! carry the operand position.

use crate::error::{IrError, Result};
use crate::op::Op;
use crate::tensor::Tensor;
use crate::types::{Elem, Range, TensorType};
use petgraph::stable_graph::{NodeIndex, StableDiGraph};
use petgraph::visit::EdgeRef;
use petgraph::Direction;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeSet, HashMap};

pub type NodeId = NodeIndex;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Node {
    pub op: Op,
    pub ty: TensorType,
    /// The tensor name from the source model (or the DSL), for dumps and error messages.
    pub name: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Output {
    pub name: String,
    pub node: NodeId,
}

/// What a model's outputs are, when the model says so (e.g. a scikit-learn regressor or
/// classifier op): it decides how faithfulness to the float model is scored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Task {
    /// Class scores: judged by argmax agreement.
    Classification,
    /// Values (regression targets, element-wise maps): judged by R² per output.
    Regression,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Graph {
    pub name: String,
    g: StableDiGraph<Node, usize>,
    inputs: Vec<NodeId>,
    outputs: Vec<Output>,
    /// The task, when the source model tells it.
    #[serde(default)]
    pub task: Option<Task>,
}

impl Graph {
    pub fn new(name: impl Into<String>) -> Graph {
        Graph { name: name.into(), g: StableDiGraph::new(), inputs: Vec::new(), outputs: Vec::new(), task: None }
    }

    pub fn add_input(&mut self, name: impl Into<String>, ty: TensorType) -> NodeId {
        let index = self.inputs.len();
        let id = self.g.add_node(Node { op: Op::Input { index }, ty, name: name.into() });
        self.inputs.push(id);
        id
    }

    pub fn add_const(&mut self, tensor: Tensor, name: impl Into<String>) -> NodeId {
        let op = Op::Const(tensor);
        let ty = op.infer(&[]).expect("a constant always has a type");
        self.g.add_node(Node { op, ty, name: name.into() })
    }

    /// Add an op applied to `operands`; its type is inferred, and a mismatch is an error
    /// naming `name`.
    pub fn add(&mut self, op: Op, operands: &[NodeId], name: impl Into<String>) -> Result<NodeId> {
        let name = name.into();
        let tys: Vec<&TensorType> = operands.iter().map(|&o| &self.g[o].ty).collect();
        let ty = op.infer(&tys).map_err(|msg| IrError::Type { node: format!("{} '{}'", op.mnemonic(), name), msg })?;
        Ok(self.add_typed(op, ty, operands, name))
    }

    /// Add a node whose type the caller has already established (passes that compute exact
    /// integer ranges themselves); the verifier re-checks it.
    pub fn add_typed(&mut self, op: Op, ty: TensorType, operands: &[NodeId], name: impl Into<String>) -> NodeId {
        let id = self.g.add_node(Node { op, ty, name: name.into() });
        for (pos, &o) in operands.iter().enumerate() {
            self.g.add_edge(o, id, pos);
        }
        id
    }

    pub fn set_output(&mut self, name: impl Into<String>, node: NodeId) {
        self.outputs.push(Output { name: name.into(), node });
    }

    pub fn node(&self, id: NodeId) -> &Node {
        &self.g[id]
    }

    /// The range of an encrypted node's integers (0..0 for a node that is not encrypted).
    pub fn enc_range(&self, id: NodeId) -> Range {
        match self.g[id].ty.elem {
            Elem::Enc(r) => r,
            _ => Range::new(0, 0),
        }
    }

    pub fn node_mut(&mut self, id: NodeId) -> &mut Node {
        &mut self.g[id]
    }

    pub fn contains(&self, id: NodeId) -> bool {
        self.g.contains_node(id)
    }

    pub fn inputs(&self) -> &[NodeId] {
        &self.inputs
    }

    pub fn outputs(&self) -> &[Output] {
        &self.outputs
    }

    pub fn outputs_mut(&mut self) -> &mut Vec<Output> {
        &mut self.outputs
    }

    pub fn node_count(&self) -> usize {
        self.g.node_count()
    }

    pub fn node_ids(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.g.node_indices()
    }

    /// Operands of a node, in position order.
    pub fn operands(&self, id: NodeId) -> Vec<NodeId> {
        let mut e: Vec<(usize, NodeId)> =
            self.g.edges_directed(id, Direction::Incoming).map(|e| (*e.weight(), e.source())).collect();
        e.sort_unstable();
        e.into_iter().map(|(_, n)| n).collect()
    }

    /// Positions of a node's incoming edges, sorted (the verifier checks they are 0..n).
    pub(crate) fn operand_positions(&self, id: NodeId) -> Vec<usize> {
        let mut p: Vec<usize> = self.g.edges_directed(id, Direction::Incoming).map(|e| *e.weight()).collect();
        p.sort_unstable();
        p
    }

    /// Nodes that use `id`, each once, in id order.
    pub fn users(&self, id: NodeId) -> Vec<NodeId> {
        let set: BTreeSet<NodeId> = self.g.neighbors_directed(id, Direction::Outgoing).collect();
        set.into_iter().collect()
    }

    /// Replace every use of `old` (as operand or output) by `new`.
    pub fn replace_uses(&mut self, old: NodeId, new: NodeId) {
        let uses: Vec<(NodeId, usize)> =
            self.g.edges_directed(old, Direction::Outgoing).map(|e| (e.target(), *e.weight())).collect();
        for (user, pos) in uses {
            if let Some(e) = self.g.find_edge(old, user) {
                self.g.remove_edge(e);
            }
            self.g.add_edge(new, user, pos);
        }
        for o in &mut self.outputs {
            if o.node == old {
                o.node = new;
            }
        }
    }

    /// A new graph built node by node in dependency order, for passes that rewrite some
    /// nodes and copy the rest. Inputs are copied as they are; for every other node `f`
    /// gets the graph being built, the old node's id and its operands' new ids, adds the
    /// node's replacement and returns its id, or `None` to drop it (no kept node may use
    /// a dropped one). Outputs follow their nodes. Also returns the old → new id map.
    pub fn rebuild<E: From<IrError>>(
        &self,
        mut f: impl FnMut(&mut Graph, NodeId, &[NodeId]) -> std::result::Result<Option<NodeId>, E>,
    ) -> std::result::Result<(Graph, HashMap<NodeId, NodeId>), E> {
        let order = self
            .topo_order()
            .ok_or_else(|| IrError::Verify { node: self.name.clone(), msg: "the graph has a cycle".into() })?;
        let mut out = Graph::new(self.name.clone());
        out.task = self.task;
        let mut map: HashMap<NodeId, NodeId> = HashMap::new();
        for id in order {
            let node = &self.g[id];
            let new = match node.op {
                Op::Input { .. } => Some(out.add_input(node.name.clone(), node.ty.clone())),
                _ => {
                    let ops: Vec<NodeId> = self.operands(id).iter().filter_map(|o| map.get(o).copied()).collect();
                    f(&mut out, id, &ops)?
                }
            };
            if let Some(new) = new {
                map.insert(id, new);
            }
        }
        for o in &self.outputs {
            out.set_output(o.name.clone(), map[&o.node]);
        }
        Ok((out, map))
    }

    /// Nodes in a deterministic topological order: Kahn's algorithm, lowest id first.
    /// Returns `None` when the graph has a cycle.
    pub fn topo_order(&self) -> Option<Vec<NodeId>> {
        let mut indeg: HashMap<NodeId, usize> =
            self.g.node_indices().map(|n| (n, self.g.edges_directed(n, Direction::Incoming).count())).collect();
        let mut ready: BTreeSet<NodeId> = indeg.iter().filter(|(_, &d)| d == 0).map(|(&n, _)| n).collect();
        let mut order = Vec::with_capacity(indeg.len());
        while let Some(n) = ready.pop_first() {
            order.push(n);
            for e in self.g.edges_directed(n, Direction::Outgoing) {
                let d = indeg.get_mut(&e.target()).expect("edge to a live node");
                *d -= 1;
                if *d == 0 {
                    ready.insert(e.target());
                }
            }
        }
        (order.len() == self.g.node_count()).then_some(order)
    }

    /// Remove nodes no output depends on (inputs always stay).
    pub fn remove_dead(&mut self) {
        let mut live = BTreeSet::new();
        let mut stack: Vec<NodeId> = self.outputs.iter().map(|o| o.node).collect();
        while let Some(n) = stack.pop() {
            if live.insert(n) {
                stack.extend(self.g.neighbors_directed(n, Direction::Incoming));
            }
        }
        let dead: Vec<NodeId> =
            self.g.node_indices().filter(|n| !live.contains(n) && !self.inputs.contains(n)).collect();
        for n in dead {
            self.g.remove_node(n);
        }
    }

    /// Position of each node in topological order, for printing `%k` names.
    pub fn numbering(&self) -> HashMap<NodeId, usize> {
        self.topo_order()
            .unwrap_or_else(|| self.g.node_indices().collect())
            .into_iter()
            .enumerate()
            .map(|(i, n)| (n, i))
            .collect()
    }

    /// The constant a node holds, if it is one.
    pub fn const_value(&self, id: NodeId) -> Option<&Tensor> {
        match &self.g[id].op {
            Op::Const(t) => Some(t),
            _ => None,
        }
    }
}
