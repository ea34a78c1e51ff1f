use thiserror::Error;

#[derive(Debug, Error)]
pub enum FrontendError {
    #[error("cannot read {path}")]
    Io { path: String, source: std::io::Error },
    #[error("{path} is not a valid ONNX model ({msg}); is the file complete?")]
    Parse { path: String, msg: String },
    #[error("{0}")]
    Model(String),
    #[error("unsupported op {domain}{op} (node '{node}', opset {opset}). Supported ops: {supported}")]
    Unsupported { op: String, domain: String, node: String, opset: i64, supported: String },
    #[error("{node}: {msg}")]
    Node { node: String, msg: String },
    #[error(transparent)]
    Ir(#[from] veil_ir::IrError),
}

pub type Result<T> = std::result::Result<T, FrontendError>;
