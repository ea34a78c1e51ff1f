//! The verifier: run after every pass, it checks that the graph is well formed.

use crate::error::{IrError, Result};
use crate::graph::Graph;
use crate::op::Op;
use std::collections::HashSet;

/// Check the graph: acyclic, operand positions contiguous, operand counts and types as each
/// op infers them, inputs and outputs well formed.
/// Largest magnitude an encrypted integer's range may reach: values within it, and the
/// sums and products the ops form of them within their own checked ranges, stay far from
/// i64 overflow.
pub const MAX_ENC_MAGNITUDE: u64 = 1 << 62;

pub fn verify(g: &Graph) -> Result<()> {
    let num = g.numbering();
    let at = |id| format!("%{} '{}'", num.get(&id).copied().unwrap_or(usize::MAX), g.node(id).name);
    let order =
        g.topo_order().ok_or_else(|| IrError::Verify { node: g.name.clone(), msg: "the graph has a cycle".into() })?;
    for &id in &order {
        let node = g.node(id);
        let positions = g.operand_positions(id);
        if positions.iter().enumerate().any(|(i, &p)| i != p) {
            return Err(IrError::Verify {
                node: at(id),
                msg: format!("operand positions {positions:?} are not 0..{}", positions.len()),
            });
        }
        let operands = g.operands(id);
        if let Op::Input { index } = node.op {
            if g.inputs().get(index) != Some(&id) || !operands.is_empty() {
                return Err(IrError::Verify {
                    node: at(id),
                    msg: format!("input {index} is not registered as graph input {index}"),
                });
            }
            continue;
        }
        if let crate::types::Elem::Enc(r) = node.ty.elem {
            if r.lo.unsigned_abs().max(r.hi.unsigned_abs()) > MAX_ENC_MAGNITUDE {
                return Err(IrError::Verify {
                    node: at(id),
                    msg: format!(
                        "its range {r} exceeds ±2^62: no encoding holds it (and its arithmetic could overflow)"
                    ),
                });
            }
        }
        let tys: Vec<_> = operands.iter().map(|&o| &g.node(o).ty).collect();
        let ty = node.op.infer(&tys).map_err(|msg| IrError::Verify { node: at(id), msg })?;
        if ty != node.ty {
            return Err(IrError::Verify {
                node: at(id),
                msg: format!("records type {} but its operands give {}", node.ty, ty),
            });
        }
    }
    for (i, &id) in g.inputs().iter().enumerate() {
        if !g.contains(id) || g.node(id).op != (Op::Input { index: i }) {
            return Err(IrError::Verify { node: g.name.clone(), msg: format!("graph input {i} is not an input node") });
        }
    }
    if g.outputs().is_empty() {
        return Err(IrError::Verify { node: g.name.clone(), msg: "the graph has no outputs".into() });
    }
    let mut names = HashSet::new();
    for o in g.outputs() {
        if !g.contains(o.node) {
            return Err(IrError::Verify {
                node: g.name.clone(),
                msg: format!("output '{}' refers to a removed node", o.name),
            });
        }
        if !names.insert(&o.name) {
            return Err(IrError::Verify { node: g.name.clone(), msg: format!("two outputs are named '{}'", o.name) });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::op::UnaryFn;
    use crate::types::{Shape, TensorType};

    #[test]
    fn accepts_a_well_formed_graph() {
        let mut g = Graph::new("t");
        let x = g.add_input("x", TensorType::f32(Shape::batched(&[4])));
        let y = g.add(Op::Unary(UnaryFn::Relu), &[x], "y").unwrap();
        g.set_output("y", y);
        verify(&g).unwrap();
    }

    #[test]
    fn rejects_a_wrong_recorded_type() {
        let mut g = Graph::new("t");
        let x = g.add_input("x", TensorType::f32(Shape::batched(&[4])));
        let y = g.add_typed(Op::Unary(UnaryFn::Relu), TensorType::f32(Shape::batched(&[5])), &[x], "y");
        g.set_output("y", y);
        let err = verify(&g).unwrap_err().to_string();
        assert!(err.contains("records type f32[N,5] but its operands give f32[N,4]"), "{err}");
    }

    #[test]
    fn rejects_missing_operands() {
        let mut g = Graph::new("t");
        let x = g.add_input("x", TensorType::f32(Shape::batched(&[4])));
        let y = g.add_typed(Op::MatMul, TensorType::f32(Shape::batched(&[4])), &[x], "y");
        g.set_output("y", y);
        assert!(verify(&g).unwrap_err().to_string().contains("takes 2 operand(s), got 1"));
    }

    #[test]
    fn rejects_graph_without_outputs() {
        let mut g = Graph::new("t");
        g.add_input("x", TensorType::f32(Shape::batched(&[4])));
        assert!(verify(&g).is_err());
    }
}
