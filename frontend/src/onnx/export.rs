//! ONNX export of the models veil trains: a linear classifier as scikit-learn would write
//! it through skl2onnx, so that onnxruntime runs it and `veil compile` compiles it.

use crate::error::{FrontendError, Result};
use ndarray::{Array1, Array2};
use onnx_protobuf::tensor_shape_proto::{dimension, Dimension};
use onnx_protobuf::{
    attribute_proto::AttributeType, type_proto, AttributeProto, GraphProto, Message, ModelProto, NodeProto,
    OperatorSetIdProto, TensorShapeProto, TypeProto, ValueInfoProto,
};

const FLOAT: i32 = 1;
const INT64: i32 = 7;
const ML: &str = "ai.onnx.ml";

fn value_info(name: &str, elem: i32, dims: &[Option<i64>]) -> ValueInfoProto {
    let mut shape = TensorShapeProto::new();
    for d in dims {
        let mut dim = Dimension::new();
        dim.value = Some(match d {
            Some(n) => dimension::Value::DimValue(*n),
            None => dimension::Value::DimParam("N".into()),
        });
        shape.dim.push(dim);
    }
    let mut t = type_proto::Tensor::new();
    t.elem_type = elem;
    t.shape = Some(shape).into();
    let mut ty = TypeProto::new();
    ty.value = Some(type_proto::Value::TensorType(t));
    let mut v = ValueInfoProto::new();
    v.name = name.into();
    v.type_ = Some(ty).into();
    v
}

fn attr(name: &str) -> AttributeProto {
    let mut a = AttributeProto::new();
    a.name = name.into();
    a
}

fn floats(name: &str, v: Vec<f32>) -> AttributeProto {
    let mut a = attr(name);
    a.type_ = AttributeType::FLOATS.into();
    a.floats = v;
    a
}

fn ints(name: &str, v: Vec<i64>) -> AttributeProto {
    let mut a = attr(name);
    a.type_ = AttributeType::INTS.into();
    a.ints = v;
    a
}

fn int(name: &str, v: i64) -> AttributeProto {
    let mut a = attr(name);
    a.type_ = AttributeType::INT.into();
    a.i = v;
    a
}

fn string(name: &str, v: &str) -> AttributeProto {
    let mut a = attr(name);
    a.type_ = AttributeType::STRING.into();
    a.s = v.as_bytes().to_vec();
    a
}

fn node(op: &str, inputs: &[&str], outputs: &[&str], attributes: Vec<AttributeProto>) -> NodeProto {
    let mut n = NodeProto::new();
    n.op_type = op.into();
    n.domain = ML.into();
    n.name = op.into();
    n.input = inputs.iter().map(|s| s.to_string()).collect();
    n.output = outputs.iter().map(|s| s.to_string()).collect();
    n.attribute = attributes;
    n
}

/// A logistic-regression classifier as ONNX bytes: `ai.onnx.ml` LinearClassifier with a
/// logistic post-transform, input `X [N, F]`, outputs `label [N]` (one of `classes`) and
/// `probabilities [N, C]`. `w [F, S]` and `b [S]` hold one score column for two classes
/// (written as the pair −z, z, as skl2onnx writes a binary model) or one per class
/// (one-vs-rest, probabilities normalized to sum 1 as scikit-learn does).
pub fn linear_classifier(w: &Array2<f32>, b: &Array1<f32>, classes: &[i64], name: &str) -> Result<Vec<u8>> {
    let (f, s) = w.dim();
    let binary = classes.len() == 2 && s == 1;
    if b.len() != s || !(binary || classes.len() == s) || classes.len() < 2 {
        return Err(FrontendError::Model(format!(
            "a linear classifier with weights {f}×{s}, {} biases and {} classes",
            b.len(),
            classes.len()
        )));
    }
    if w.iter().chain(b.iter()).any(|v| !v.is_finite()) {
        return Err(FrontendError::Model("the weights hold a NaN or an infinity".into()));
    }
    // coefficients are row-major per class
    let (coefficients, intercepts): (Vec<f32>, Vec<f32>) = if binary {
        let col: Vec<f32> = w.column(0).to_vec();
        (col.iter().map(|v| -v).chain(col.iter().copied()).collect(), vec![-b[0], b[0]])
    } else {
        ((0..s).flat_map(|c| w.column(c).to_vec()).collect(), b.to_vec())
    };
    let scores = if binary { "probabilities" } else { "scores" };
    let mut nodes = vec![node(
        "LinearClassifier",
        &["X"],
        &["label", scores],
        vec![
            ints("classlabels_ints", classes.to_vec()),
            floats("coefficients", coefficients),
            floats("intercepts", intercepts),
            int("multi_class", 0),
            string("post_transform", "LOGISTIC"),
        ],
    )];
    if !binary {
        nodes.push(node("Normalizer", &["scores"], &["probabilities"], vec![string("norm", "L1")]));
    }
    let mut g = GraphProto::new();
    g.name = name.into();
    g.node = nodes;
    g.input = vec![value_info("X", FLOAT, &[None, Some(f as i64)])];
    g.output = vec![
        value_info("label", INT64, &[None]),
        value_info("probabilities", FLOAT, &[None, Some(classes.len() as i64)]),
    ];
    let mut m = ModelProto::new();
    m.ir_version = 8;
    m.producer_name = "veil".into();
    m.producer_version = env!("CARGO_PKG_VERSION").into();
    for (domain, version) in [("", 17), (ML, 1)] {
        let mut o = OperatorSetIdProto::new();
        o.domain = domain.into();
        o.version = version;
        m.opset_import.push(o);
    }
    m.graph = Some(g).into();
    m.write_to_bytes().map_err(|e| FrontendError::Model(format!("encoding the ONNX model: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use veil_ir::Tensor;

    #[test]
    fn exported_classifiers_import_and_predict() {
        let x = ndarray::ArrayD::from_shape_vec(vec![2, 2], vec![1.0f32, 0.0, -1.0, 0.5]).unwrap();
        // binary: score z = 2·x0 − x1 + 0.5
        let w = Array2::from_shape_vec((2, 1), vec![2.0, -1.0]).unwrap();
        let bytes = linear_classifier(&w, &Array1::from_vec(vec![0.5]), &[3, 7], "m").unwrap();
        let g = super::super::import_bytes(&bytes, "mem", "m").unwrap();
        let out = veil_ir::interp::run(&g, &[Tensor::F32(x.clone())]).unwrap();
        assert_eq!(out[0].as_i64().unwrap().iter().copied().collect::<Vec<_>>(), vec![7, 3]);
        let p = out[1].as_f32().unwrap();
        let z0 = 2.5f32;
        assert!((p[[0, 1]] - 1.0 / (1.0 + (-z0).exp())).abs() < 1e-6 && (p[[0, 0]] + p[[0, 1]] - 1.0).abs() < 1e-6);
        // three classes, one-vs-rest
        let w = Array2::from_shape_vec((2, 3), vec![1.0, -1.0, 0.0, 0.0, 0.0, 2.0]).unwrap();
        let bytes = linear_classifier(&w, &Array1::from_vec(vec![0.0, 0.0, -0.5]), &[0, 1, 2], "m").unwrap();
        let g = super::super::import_bytes(&bytes, "mem", "m").unwrap();
        let out = veil_ir::interp::run(&g, &[Tensor::F32(x)]).unwrap();
        assert_eq!(out[0].as_i64().unwrap().iter().copied().collect::<Vec<_>>(), vec![0, 1]);
        let p = out[1].as_f32().unwrap();
        assert!((p[[0, 0]] + p[[0, 1]] + p[[0, 2]] - 1.0).abs() < 1e-5);
    }

    #[test]
    fn mismatched_shapes_are_errors() {
        let w = Array2::zeros((2, 2));
        assert!(linear_classifier(&w, &Array1::zeros(2), &[0, 1, 2], "m").is_err());
        let w = Array2::from_elem((2, 1), f32::NAN);
        assert!(linear_classifier(&w, &Array1::zeros(1), &[0, 1], "m").is_err());
    }
}
