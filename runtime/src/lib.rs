//! veil's runtime: key generation, encryption, decryption (client side) and the evaluator
//! (server side, which holds no secret key), over `tfhe::core_crypto`.

pub mod bootstrap;
pub mod crypto;
pub mod error;
pub mod evaluator;
pub mod files;
pub mod keys;
mod products;
pub mod training;
pub mod validate;

#[cfg(test)]
mod noise_tests;

pub use crypto::{EncryptedInputs, EncryptedOutputs};
pub use error::{Result, RuntimeError};
pub use evaluator::Evaluator;
pub use keys::{keygen, ClientKey, ServerKey};
pub use training::{EncryptedBatches, EncryptedState, StepDone};
