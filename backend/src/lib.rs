//! veil's backend: from a quantized integer graph to a TFHE circuit and its parameters.
//!
//! [`security`] and [`noise`] model the cryptography; [`params`] chooses parameters per
//! circuit; [`lower`] turns the integer graph into a [`circuit::Circuit`] (a flat program
//! over LWE ciphertexts) plus what the client needs; [`artifact`] reads and writes the
//! compiled-model file.

pub mod artifact;
pub mod circuit;
pub mod error;
pub mod files;
pub mod lower;
pub mod noise;
pub mod params;
pub mod partitions;
pub mod pipeline;
pub mod security;
pub mod training;

pub use error::{BackendError, Result};

/// The artifact schema, generated from `proto/veil.proto`.
pub mod proto {
    include!(concat!(env!("OUT_DIR"), "/veil.artifact.v1.rs"));
}
