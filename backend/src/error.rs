use thiserror::Error;

#[derive(Debug, Error)]
pub enum BackendError {
    #[error("no parameters satisfy the circuit: {0}")]
    NoParameters(String),
    #[error("lowering {node}: {msg}")]
    Lower { node: String, msg: String },
    #[error("{path}: {msg}")]
    Artifact { path: String, msg: String },
    #[error(transparent)]
    Pass(#[from] veil_passes::PassError),
    #[error(transparent)]
    Ir(#[from] veil_ir::IrError),
}

pub type Result<T> = std::result::Result<T, BackendError>;
