//! Bad models get clear errors, never panics.

use veil_frontend::onnx::{import_bytes, import_file};
use veil_tests::models_dir;

#[test]
fn truncated_file_is_an_error() {
    let bytes = std::fs::read(models_dir().join("mlp_digits/model.onnx")).unwrap();
    for cut in [1, 10, bytes.len() / 3, bytes.len() - 5] {
        let err = import_bytes(&bytes[..cut], "cut.onnx", "cut").unwrap_err().to_string();
        assert!(err.contains("cut.onnx"), "{err}");
    }
}

#[test]
fn garbage_is_an_error() {
    let err = import_bytes(b"this is not protobuf at all \xff\xfe", "junk.onnx", "junk").unwrap_err().to_string();
    assert!(err.contains("junk.onnx is not a valid ONNX model"), "{err}");
}

#[test]
fn missing_file_names_the_path() {
    let err = import_file("/nonexistent/model.onnx").unwrap_err().to_string();
    assert!(err.contains("/nonexistent/model.onnx"), "{err}");
}

use onnx_protobuf::tensor_shape_proto::{dimension, Dimension};
use onnx_protobuf::type_proto::{Tensor as TensorTy, Value as Ty};
use onnx_protobuf::{Message, ModelProto, NodeProto, OperatorSetIdProto, TensorShapeProto, TypeProto, ValueInfoProto};

fn value_info(name: &str, dims: &[Option<i64>]) -> ValueInfoProto {
    let mut shape = TensorShapeProto::new();
    for d in dims {
        let mut dim = Dimension::new();
        dim.value = Some(match d {
            Some(v) => dimension::Value::DimValue(*v),
            None => dimension::Value::DimParam("batch".into()),
        });
        shape.dim.push(dim);
    }
    let mut tt = TensorTy::new();
    tt.elem_type = 1; // FLOAT
    tt.shape = Some(shape).into();
    let mut ty = TypeProto::new();
    ty.value = Some(Ty::TensorType(tt));
    let mut v = ValueInfoProto::new();
    v.name = name.into();
    v.type_ = Some(ty).into();
    v
}

/// A one-node model: X [N,4] → op → Y.
fn one_node_model(op: &str, opset: i64) -> Vec<u8> {
    let mut node = NodeProto::new();
    node.op_type = op.into();
    node.name = "the_node".into();
    node.input = vec!["X".into()];
    node.output = vec!["Y".into()];
    let mut m = ModelProto::new();
    m.ir_version = 8;
    let mut o = OperatorSetIdProto::new();
    o.version = opset;
    m.opset_import.push(o);
    let g = m.graph.mut_or_insert_default();
    g.name = "g".into();
    g.node.push(node);
    g.input.push(value_info("X", &[None, Some(4)]));
    g.output.push(value_info("Y", &[None, Some(4)]));
    m.write_to_bytes().unwrap()
}

#[test]
fn unsupported_op_names_op_node_opset_and_alternatives() {
    let err = import_bytes(&one_node_model("LSTM", 14), "m.onnx", "m").unwrap_err().to_string();
    assert!(err.starts_with("unsupported op LSTM (node 'the_node', opset 14). Supported ops: "), "{err}");
    for op in ["Conv", "Gemm", "Relu", "ai.onnx.ml.TreeEnsembleClassifier"] {
        assert!(err.contains(op), "{err}");
    }
}

#[test]
fn a_one_node_model_imports_and_unsupported_opset_is_named() {
    let g = import_bytes(&one_node_model("Relu", 14), "m.onnx", "m").unwrap();
    assert_eq!(
        veil_ir::print::to_text(&g),
        "graph \"m\"\n  %0 = input {index=0} : f32[N,4] \"X\"\n  %1 = relu %0 : f32[N,4] \"Y\"\n  output \"Y\" = %1\n"
    );
    let err = import_bytes(&one_node_model("Softmax", 9), "m.onnx", "m").unwrap_err().to_string();
    assert!(err.contains("opset 9; veil supports opsets 11–20"), "{err}");
    // An old opset whose ops all mean what they mean today (tree converters write these).
    assert!(import_bytes(&one_node_model("Relu", 8), "m.onnx", "m").is_ok());
}

/// The diabetes forest with its tree attributes edited by `edit`; the import error.
fn edited_forest(edit: impl Fn(&mut onnx_protobuf::AttributeProto)) -> String {
    let bytes = std::fs::read(models_dir().join("trees/rf_diabetes_10x4/model.onnx")).unwrap();
    let mut m = ModelProto::parse_from_bytes(&bytes).unwrap();
    let node = m.graph.as_mut().unwrap().node.iter_mut().find(|n| n.op_type == "TreeEnsembleRegressor").unwrap();
    node.attribute.iter_mut().for_each(edit);
    let bytes = m.write_to_bytes().unwrap();
    import_bytes(&bytes, "forest.onnx", "forest").unwrap_err().to_string()
}

#[test]
fn malformed_tree_attributes_name_the_node() {
    // a cycle: the root's second node points back at the root
    let err = edited_forest(|a| {
        if a.name == "nodes_truenodeids" {
            a.ints[1] = 0;
        }
    });
    assert!(err.contains("tree 0 node 0") && err.contains("reached twice"), "{err}");
    // a child id that does not exist
    let err = edited_forest(|a| {
        if a.name == "nodes_falsenodeids" {
            a.ints[0] = 999;
        }
    });
    assert!(err.contains("has no node 999"), "{err}");
    // node arrays of different lengths
    let err = edited_forest(|a| {
        if a.name == "nodes_values" {
            a.floats.pop();
        }
    });
    assert!(err.contains("different lengths"), "{err}");
    // one node listed twice
    let err = edited_forest(|a| {
        if a.name == "nodes_nodeids" {
            a.ints[1] = a.ints[0];
        }
    });
    assert!(err.contains("twice"), "{err}");
}
