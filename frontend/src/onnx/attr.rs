//! Typed access to an ONNX node's attributes and inputs. A missing or ill-typed attribute
//! becomes an error that names the node and the attribute.

use crate::error::FrontendError;
use onnx_protobuf::attribute_proto::AttributeType;
use onnx_protobuf::{AttributeProto, NodeProto, TensorProto};

pub struct NodeView<'a> {
    pub proto: &'a NodeProto,
    /// Opset version of the node's domain.
    pub opset: i64,
    /// Position in the graph, for nodes without a name.
    pub index: usize,
}

impl<'a> NodeView<'a> {
    /// How errors refer to this node: `Gemm node 'fc1'`.
    pub fn label(&self) -> String {
        let name = if self.proto.name.is_empty() {
            self.proto.output.first().cloned().unwrap_or_else(|| format!("#{}", self.index))
        } else {
            self.proto.name.clone()
        };
        format!("{} node '{}'", self.proto.op_type, name)
    }

    pub fn err(&self, msg: impl Into<String>) -> FrontendError {
        FrontendError::Node { node: self.label(), msg: msg.into() }
    }

    /// The name of input `i`, if present (ONNX marks an omitted optional input with "").
    pub fn input(&self, i: usize) -> Option<&'a str> {
        self.proto.input.get(i).map(|s| s.as_str()).filter(|s| !s.is_empty())
    }

    pub fn required_input(&self, i: usize) -> Result<&'a str, FrontendError> {
        self.input(i).ok_or_else(|| self.err(format!("input {i} is required")))
    }

    /// The name of output `i` (the IR node gets it), or a generated one.
    pub fn output_name(&self, i: usize) -> String {
        self.proto.output.get(i).cloned().unwrap_or_else(|| format!("{}_{}", self.label(), i))
    }

    fn attr(&self, name: &str) -> Option<&'a AttributeProto> {
        self.proto.attribute.iter().find(|a| a.name == name)
    }

    pub fn has(&self, name: &str) -> bool {
        self.attr(name).is_some()
    }

    fn typed(&self, name: &str, want: AttributeType) -> Result<Option<&'a AttributeProto>, FrontendError> {
        match self.attr(name) {
            None => Ok(None),
            Some(a) => {
                let ty = a.type_.enum_value_or(AttributeType::UNDEFINED);
                // Old exporters leave the type unset; trust the field then.
                if ty != want && ty != AttributeType::UNDEFINED {
                    return Err(self.err(format!("attribute '{name}' should be {want:?}, found {ty:?}")));
                }
                Ok(Some(a))
            }
        }
    }

    pub fn float(&self, name: &str, default: f32) -> Result<f32, FrontendError> {
        Ok(self.typed(name, AttributeType::FLOAT)?.map_or(default, |a| a.f))
    }

    pub fn int(&self, name: &str, default: i64) -> Result<i64, FrontendError> {
        Ok(self.typed(name, AttributeType::INT)?.map_or(default, |a| a.i))
    }

    pub fn opt_int(&self, name: &str) -> Result<Option<i64>, FrontendError> {
        Ok(self.typed(name, AttributeType::INT)?.map(|a| a.i))
    }

    pub fn string(&self, name: &str, default: &str) -> Result<String, FrontendError> {
        Ok(self
            .typed(name, AttributeType::STRING)?
            .map_or(default.to_string(), |a| String::from_utf8_lossy(&a.s).into_owned()))
    }

    pub fn ints(&self, name: &str) -> Result<Option<Vec<i64>>, FrontendError> {
        Ok(self.typed(name, AttributeType::INTS)?.map(|a| a.ints.clone()))
    }

    pub fn floats(&self, name: &str) -> Result<Option<Vec<f32>>, FrontendError> {
        Ok(self.typed(name, AttributeType::FLOATS)?.map(|a| a.floats.clone()))
    }

    pub fn strings(&self, name: &str) -> Result<Option<Vec<String>>, FrontendError> {
        Ok(self
            .typed(name, AttributeType::STRINGS)?
            .map(|a| a.strings.iter().map(|s| String::from_utf8_lossy(s).into_owned()).collect()))
    }

    pub fn tensor(&self, name: &str) -> Result<Option<&'a TensorProto>, FrontendError> {
        Ok(self.typed(name, AttributeType::TENSOR)?.and_then(|a| a.t.as_ref()))
    }

    pub fn required_ints(&self, name: &str) -> Result<Vec<i64>, FrontendError> {
        self.ints(name)?.ok_or_else(|| self.err(format!("attribute '{name}' is required")))
    }

    pub fn required_floats(&self, name: &str) -> Result<Vec<f32>, FrontendError> {
        self.floats(name)?.ok_or_else(|| self.err(format!("attribute '{name}' is required")))
    }
}
