//! What the client finishes after decryption (the tail), and assembling the quantized
//! model: server outputs, the client's ops, the inputs' encodings.

use super::*;

impl Quantizer<'_> {
    /// Register server outputs, build the client tail and the model.
    pub(super) fn finish(mut self, order: &[NodeId], tail: &HashSet<NodeId>) -> Result<QuantizedModel> {
        let g = self.g;
        let mut tail_graph = Graph::new(format!("{}_client", g.name));
        let mut tail_inputs = Vec::new();
        let mut decode = Vec::new();
        let mut map: HashMap<NodeId, NodeId> = HashMap::new();
        // server node → its tail input and server output (the first value sent from it)
        let mut sent: HashMap<NodeId, (NodeId, usize)> = HashMap::new();
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
                            let first = sent.get(&e.node).map(|&(t, i)| (t, &decode[i]));
                            match q.shared_output(id, &e, first, tail_graph)? {
                                // the same ciphertexts are sent already (a binary classifier's
                                // two probabilities are affine in one score): map their value
                                Some(t) => t,
                                None => {
                                    let (server_node, output) = (e.node, decode.len());
                                    tail_inputs.push(q.server_output(id, e, &mut decode));
                                    let t = tail_graph.add_input(node.name.clone(), node.ty.clone());
                                    sent.entry(server_node).or_insert((t, output));
                                    t
                                }
                            }
                        }
                        QVal::Fn(p) => {
                            let e = q.table_lookup(id, p)?;
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

    /// When the server already sends `e`'s ciphertexts (`first`: the tail input of another
    /// value of the same node, and its decoding), the tail nodes computing `e`'s real value
    /// from that one's: e = (s_e / s)·x + (o_e − (s_e / s)·o). `None` otherwise (another
    /// shape, or a scale of 0).
    fn shared_output(
        &self,
        id: NodeId,
        e: &Quantized,
        first: Option<(NodeId, &OutputDecode)>,
        tail_graph: &mut Graph,
    ) -> Result<Option<NodeId>> {
        let Some((t, OutputDecode { scale: s, offset: o, .. })) = first else { return Ok(None) };
        let dims = self.sample_dims(id);
        let (Some(se), Some(oe)) = (e.scale.broadcast(IxDyn(&dims)), e.offset.broadcast(IxDyn(&dims))) else {
            return Ok(None);
        };
        let fits = s.shape() == dims.as_slice() && o.shape() == dims.as_slice();
        if !fits || s.iter().any(|&v| v == 0.0 || !v.is_finite()) {
            return Ok(None);
        }
        let a = &se / s;
        let b = &oe - &(&a * o);
        let name = self.g.node(id).name.clone();
        let f32s = |x: ArrayD<f64>| Tensor::F32(x.mapv(|v| v as f32));
        let ka = tail_graph.add_const(f32s(a), format!("{name}_shared_scale"));
        let kb = tail_graph.add_const(f32s(b), format!("{name}_shared_offset"));
        let m = tail_graph.add(Op::Binary(BinaryFn::Mul), &[t, ka], format!("{name}_shared_scaled"))?;
        Ok(Some(tail_graph.add(Op::Binary(BinaryFn::Add), &[m, kb], name)?))
    }

    pub(super) fn server_output(&mut self, id: NodeId, e: Quantized, decode: &mut Vec<OutputDecode>) -> TailSource {
        let i = self.out.outputs().len();
        self.out.set_output(self.g.node(id).name.clone(), e.node);
        let dims = self.sample_dims(id);
        let b = |a: &ArrayD<f64>| a.broadcast(IxDyn(&dims)).map(|v| v.to_owned()).unwrap_or_else(|| a.clone());
        decode.push(OutputDecode { scale: b(&e.scale), offset: b(&e.offset), rounding: 0 });
        TailSource::Server(i)
    }
}

/// Nodes the client computes after decryption: everything downstream of an op that only
/// the client can run (softmax, argmax, …), plus (unless `server_tail`) trailing
/// non-linear ops whose users are all client-side. Linear ops otherwise stay on the server
/// (they are free there and shrink what is decrypted). A non-linear op reading a model
/// input directly stays on the server (as lookups): the client finishing it would compute
/// the whole model in the clear.
pub(super) fn client_tail(g: &Graph, server_tail: bool) -> Result<HashSet<NodeId>> {
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

pub(super) fn client_only(op: &Op) -> bool {
    matches!(
        op,
        Op::Softmax { .. } | Op::ArgMax { .. } | Op::ClassLabel { .. } | Op::Normalize { .. } | Op::Cast { .. }
    )
}

/// Ops that are exact integer maps on an encrypted tensor (given constant weights).
pub(super) fn is_linear(g: &Graph, id: NodeId) -> bool {
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

/// A model input that only the client tail reads stays in the clear on the client.
pub(super) fn tail_only_input(g: &Graph, id: NodeId, tail: &HashSet<NodeId>) -> bool {
    matches!(g.node(id).op, Op::Input { .. })
        && g.users(id).iter().all(|u| tail.contains(u))
        && !g.outputs().iter().any(|o| o.node == id)
}
