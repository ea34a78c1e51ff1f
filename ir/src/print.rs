//! Dumps of a graph: stable text (one line per node, what tests compare against),
//! Graphviz DOT, and JSON.

use crate::error::Result;
use crate::graph::{Graph, NodeId};
use crate::op::Op;
use crate::tensor::Tensor;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::fmt::Write;

/// Constants with at most this many elements are printed in full.
const SHOW_VALUES: usize = 8;

/// The text form: a header, one line per node in topological order, then the outputs.
/// `%k` numbers follow topological order, so the text does not depend on how the graph
/// was built or edited.
pub fn to_text(g: &Graph) -> String {
    let num = g.numbering();
    let mut out = format!("graph \"{}\"\n", g.name);
    for id in order(g) {
        out.push_str("  ");
        out.push_str(&node_line(g, &num, id));
        out.push('\n');
    }
    for o in g.outputs() {
        let _ = writeln!(out, "  output \"{}\" = %{}", o.name, num[&o.node]);
    }
    out
}

fn order(g: &Graph) -> Vec<NodeId> {
    g.topo_order().unwrap_or_else(|| g.node_ids().collect())
}

/// One node: `%k = op %a, %b {attrs} : type "name"`.
pub fn node_line(g: &Graph, num: &HashMap<NodeId, usize>, id: NodeId) -> String {
    let node = g.node(id);
    let mut s = format!("%{} = {}", num[&id], node.op.mnemonic());
    let operands: Vec<String> = g.operands(id).iter().map(|o| format!("%{}", num[o])).collect();
    if !operands.is_empty() {
        let _ = write!(s, " {}", operands.join(", "));
    }
    let attrs = attrs_text(&node.op);
    if !attrs.is_empty() {
        let _ = write!(s, " {{{attrs}}}");
    }
    let _ = write!(s, " : {}", node.ty);
    if !node.name.is_empty() {
        let _ = write!(s, " \"{}\"", node.name);
    }
    s
}

/// The op's attributes as `key=value` words.
pub fn attrs_text(op: &Op) -> String {
    match op {
        Op::Input { index } => format!("index={index}"),
        Op::Const(t) => const_text(t),
        Op::Gemm { alpha, beta, trans_a, trans_b } => {
            let mut v = Vec::new();
            if *alpha != 1.0 {
                v.push(format!("alpha={alpha}"));
            }
            if *beta != 1.0 {
                v.push(format!("beta={beta}"));
            }
            if *trans_a {
                v.push("trans_a".into());
            }
            if *trans_b {
                v.push("trans_b".into());
            }
            v.join(" ")
        }
        Op::Conv(c) => {
            format!("strides={:?} pads={:?} dilations={:?} group={}", c.strides, c.pads, c.dilations, c.group)
        }
        Op::AvgPool(p) | Op::MaxPool(p) => {
            let mut s = format!("kernel={:?} strides={:?} pads={:?}", p.kernel, p.strides, p.pads);
            if p.dilations != [1, 1] {
                let _ = write!(s, " dilations={:?}", p.dilations);
            }
            if p.ceil_mode {
                s.push_str(" ceil_mode");
            }
            if matches!(op, Op::AvgPool(_)) && p.count_include_pad {
                s.push_str(" count_include_pad");
            }
            s
        }
        Op::Unary(f) => f.attrs(),
        Op::BatchNorm { epsilon } => format!("epsilon={epsilon}"),
        Op::Reduce { axes, keepdims, .. } => {
            format!("axes={axes:?}{}", if *keepdims { " keepdims" } else { "" })
        }
        Op::Reshape { shape } => format!("shape={shape}"),
        Op::Transpose { perm } => format!("perm={perm:?}"),
        Op::Concat { axis } | Op::Softmax { axis } => format!("axis={axis}"),
        Op::Gather { axis, indices } => format!("axis={axis} indices={}", indices_text(indices)),
        Op::Pad { pads, value } => format!("pads={pads:?} value={value}"),
        Op::Cast { to } => format!("to={to}"),
        Op::ArgMax { axis, keepdims, select_last } => format!(
            "axis={axis}{}{}",
            if *keepdims { " keepdims" } else { "" },
            if *select_last { " select_last" } else { "" }
        ),
        Op::ClassLabel { labels } => format!("labels={labels:?}"),
        Op::Normalize { norm } => format!("norm={norm:?}"),
        Op::TreeEnsemble(e) => format!(
            "trees={} nodes={} targets={} aggregate={:?}",
            e.trees.len(),
            e.trees.iter().map(|t| t.len()).sum::<usize>(),
            e.n_targets,
            e.aggregate
        ),
        Op::Linear(l) => linear_text(l),
        Op::Tlu(t) => {
            let mut s = format!("#{} on {}", t.label, t.input);
            if t.rounding > 0 {
                let _ = write!(s, " round={}", t.rounding);
            }
            let _ = write!(s, " bits={} fn={}", t.input_bits(), t.expr);
            s
        }
        Op::MaxEnc { rounding, diff } if *rounding > 0 || diff.is_some() => {
            let mut s = diff.map(|d| format!("diff={d}")).unwrap_or_default();
            if *rounding > 0 {
                let _ = write!(s, "{}round={rounding}", if s.is_empty() { "" } else { " " });
            }
            s
        }
        Op::Assume { range } => format!("range={range}"),
        Op::SatEnc { lo, hi, rounding } => format!("bounds={lo}..{hi} round={rounding}"),
        Op::AbsEnc { rounding, shift } => format!("round={rounding} shift={shift}"),
        Op::MatMulEnc => String::new(),
        Op::MatMul | Op::Binary(_) | Op::GlobalAvgPool | Op::AddEnc | Op::SubEnc | Op::MaxEnc { .. } => String::new(),
    }
}

fn linear_text(l: &crate::linear::Linear) -> String {
    use crate::linear::LinearKind::*;
    let body = match &l.kind {
        Dense { weights } => format!("dense {}x{} |w|<={}", weights.nrows(), weights.ncols(), max_abs(weights.iter())),
        Conv { weights, conv } => format!(
            "conv {:?} strides={:?} pads={:?} group={} |w|<={}",
            weights.shape(),
            conv.strides,
            conv.pads,
            conv.group,
            max_abs(weights.iter())
        ),
        SumPool { pool } => {
            format!("sum_pool kernel={:?} strides={:?} pads={:?}", pool.kernel, pool.strides, pool.pads)
        }
        Sum { axes, keepdims } => format!("sum axes={axes:?}{}", if *keepdims { " keepdims" } else { "" }),
        Scale { factor } => format!("scale {}", const_text(&Tensor::I64(factor.clone()))),
        Matrix { weights, out_dims } => format!("matrix {}x{} -> {:?}", weights.nrows(), weights.ncols(), out_dims),
    };
    let bias = if l.bias.iter().all(|&b| b == 0) {
        String::new()
    } else {
        format!(" bias={{{}}}", const_text(&Tensor::I64(l.bias.clone())))
    };
    format!("#{} {body}{bias}", l.label)
}

fn max_abs<'a>(it: impl Iterator<Item = &'a i64>) -> i64 {
    it.map(|v| v.abs()).max().unwrap_or(0)
}

/// Small constants in full; large ones as a summary.
fn const_text(t: &Tensor) -> String {
    let v = t.values_f64();
    if v.len() <= SHOW_VALUES {
        let items: Vec<String> = v.iter().map(|x| format!("{}", *x as f32)).collect();
        return format!("[{}]", items.join(", "));
    }
    let min = v.iter().cloned().fold(f64::INFINITY, f64::min);
    let max = v.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    format!("min={} max={}", min as f32, max as f32)
}

/// An index list, compressed to `start..end` or `start..end;step` when it is a progression.
fn indices_text(ix: &ndarray::ArrayD<i64>) -> String {
    let v: Vec<i64> = ix.iter().copied().collect();
    if ix.ndim() == 1 && v.len() >= 2 {
        let step = v[1] - v[0];
        if step != 0 && v.windows(2).all(|w| w[1] - w[0] == step) {
            let end = v[v.len() - 1] + step;
            return if step == 1 { format!("{}..{}", v[0], end) } else { format!("{}..{};{}", v[0], end, step) };
        }
    }
    if ix.ndim() == 0 {
        return format!("{}", v[0]);
    }
    format!("{v:?}")
}

/// Graphviz DOT: one box per node labelled `%k op` and its type, edges operand → user.
pub fn to_dot(g: &Graph) -> String {
    let num = g.numbering();
    let mut out =
        format!("digraph \"{}\" {{\n  rankdir=TB;\n  node [shape=box, fontname=\"monospace\"];\n", esc(&g.name));
    for id in order(g) {
        let node = g.node(id);
        let attrs = attrs_text(&node.op);
        let mut label = format!("%{} {}", num[&id], node.op.mnemonic());
        if !attrs.is_empty() {
            let _ = write!(label, "\\n{}", esc(&attrs));
        }
        let _ = write!(label, "\\n{}", node.ty);
        let style = match node.op {
            Op::Input { .. } => ", style=filled, fillcolor=lightblue",
            Op::Const(_) => ", style=filled, fillcolor=lightgrey",
            _ => "",
        };
        let _ = writeln!(out, "  n{} [label=\"{}\"{}];", num[&id], label, style);
        let operands = g.operands(id);
        for (pos, o) in operands.iter().enumerate() {
            let elabel = if operands.len() > 1 { format!(" [label=\"{pos}\"]") } else { String::new() };
            let _ = writeln!(out, "  n{} -> n{}{};", num[o], num[&id], elabel);
        }
    }
    for (i, o) in g.outputs().iter().enumerate() {
        let _ = writeln!(out, "  out{i} [label=\"{}\", shape=ellipse];\n  n{} -> out{i};", esc(&o.name), num[&o.node]);
    }
    out.push_str("}\n");
    out
}

fn esc(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"")
}

/// JSON: nodes in topological order with op, attributes, operands, type and name.
/// Large constants are summarised, as in the text form.
pub fn to_json(g: &Graph) -> Result<String> {
    let num = g.numbering();
    let mut nodes = Vec::new();
    for id in order(g) {
        let node = g.node(id);
        let attrs = match &node.op {
            Op::Const(t) if t.len() > SHOW_VALUES => json!({ "summary": const_text(t) }),
            Op::Const(t) => json!({ "values": t.values_f64() }),
            other => op_attrs_json(other)?,
        };
        nodes.push(json!({
            "id": num[&id],
            "op": node.op.mnemonic(),
            "name": node.name,
            "operands": g.operands(id).iter().map(|o| num[o]).collect::<Vec<_>>(),
            "type": node.ty.to_string(),
            "elem": node.ty.elem,
            "shape": node.ty.shape,
            "attrs": attrs,
        }));
    }
    let outputs: Vec<Value> = g.outputs().iter().map(|o| json!({ "name": o.name, "node": num[&o.node] })).collect();
    let inputs: Vec<usize> = g.inputs().iter().map(|i| num[i]).collect();
    Ok(serde_json::to_string_pretty(&json!({
        "graph": g.name,
        "inputs": inputs,
        "nodes": nodes,
        "outputs": outputs,
    }))?)
}

/// The op's fields as JSON (the enum's serde form, without the variant wrapper).
fn op_attrs_json(op: &Op) -> Result<Value> {
    Ok(match serde_json::to_value(op)? {
        Value::Object(m) if m.len() == 1 => m.into_iter().next().map(|(_, v)| v).unwrap_or(Value::Null),
        _ => Value::Null,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::op::UnaryFn;
    use crate::types::{Shape, TensorType};
    use ndarray::{arr1, ArrayD};

    fn tiny() -> Graph {
        let mut g = Graph::new("tiny");
        let x = g.add_input("x", TensorType::f32(Shape::batched(&[2])));
        let w =
            g.add_const(Tensor::F32(arr1(&[1.0f32, -2.0, 0.5, 3.0]).into_shape_with_order(vec![2, 2]).unwrap()), "w");
        let y = g.add(Op::Gemm { alpha: 1.0, beta: 1.0, trans_a: false, trans_b: true }, &[x, w], "h").unwrap();
        let z = g.add(Op::Unary(UnaryFn::Relu), &[y], "z").unwrap();
        g.set_output("z", z);
        g
    }

    #[test]
    fn text_is_one_line_per_node() {
        let expected = "graph \"tiny\"\n  %0 = input {index=0} : f32[N,2] \"x\"\n  %1 = const {[1, -2, 0.5, 3]} : f32[2,2] \"w\"\n  %2 = gemm %0, %1 {trans_b} : f32[N,2] \"h\"\n  %3 = relu %2 : f32[N,2] \"z\"\n  output \"z\" = %3\n";
        assert_eq!(to_text(&tiny()), expected);
    }

    #[test]
    fn dot_and_json_name_every_node() {
        let g = tiny();
        let dot = to_dot(&g);
        assert!(dot.contains("n2 [label=\"%2 gemm\\ntrans_b\\nf32[N,2]\"]"), "{dot}");
        assert!(dot.contains("n0 -> n2 [label=\"0\"]"));
        let v: Value = serde_json::from_str(&to_json(&g).unwrap()).unwrap();
        assert_eq!(v["nodes"].as_array().unwrap().len(), 4);
        assert_eq!(v["nodes"][2]["attrs"]["trans_b"], true);
        assert_eq!(v["nodes"][2]["operands"], json!([0, 1]));
    }

    #[test]
    fn progressions_print_as_ranges() {
        let ix = ArrayD::from_shape_vec(vec![3], vec![2i64, 4, 6]).unwrap();
        assert_eq!(indices_text(&ix), "2..8;2");
    }
}
