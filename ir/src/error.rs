use thiserror::Error;

#[derive(Debug, Error)]
pub enum IrError {
    /// An op got operands whose types it cannot take; `node` names where.
    #[error("{node}: {msg}")]
    Type { node: String, msg: String },
    #[error("graph verification failed at {node}: {msg}")]
    Verify { node: String, msg: String },
    #[error("input {name}: {msg}")]
    Input { name: String, msg: String },
    #[error("evaluating {node}: {msg}")]
    Eval { node: String, msg: String },
    #[error("JSON export: {0}")]
    Json(#[from] serde_json::Error),
}

pub type Result<T> = std::result::Result<T, IrError>;
