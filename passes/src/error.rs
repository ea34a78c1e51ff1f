use thiserror::Error;

#[derive(Debug, Error)]
pub enum PassError {
    #[error("calibration: {0}")]
    Calibration(String),
    /// A node the quantizer cannot express over encrypted integers.
    #[error("cannot run {node} on encrypted data: {msg}")]
    Unsupported { node: String, msg: String },
    #[error("quantizing {node}: {msg}")]
    Quantize { node: String, msg: String },
    #[error("fusion: {0}")]
    Fuse(String),
    #[error("bit-width search: {0}")]
    Search(String),
    #[error("training: {0}")]
    Training(String),
    #[error(transparent)]
    Ir(#[from] veil_ir::IrError),
}

pub type Result<T> = std::result::Result<T, PassError>;
