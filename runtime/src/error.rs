use thiserror::Error;

#[derive(Debug, Error)]
pub enum RuntimeError {
    /// A key or ciphertext made for another compiled model.
    #[error("{what}: made for a different compiled model (fingerprint {found}, this model's is {expected}); make it again with this model (veil keygen, then veil encrypt, or veil train-encrypt for training)")]
    Mismatch { what: String, found: String, expected: String },
    /// A ciphertext encrypted under another key pair than the key given.
    #[error("{what}: made with another key pair than the key given (from another `veil keygen`): use the client.key and server.key of one keygen")]
    KeyPair { what: String },
    #[error("{0}")]
    Invalid(String),
    #[error("{path}: {msg}")]
    File { path: String, msg: String },
}

pub type Result<T> = std::result::Result<T, RuntimeError>;
