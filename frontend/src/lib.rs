//! Frontends: turn a model into veil IR.
//!
//! - [`onnx`] imports ONNX files (PyTorch and scikit-learn exports, `ai.onnx` opsets 11–20
//!   and the `ai.onnx.ml` ops skl2onnx writes);
//! - [`dsl`] builds the same IR from Rust code.
//!
//! Both produce a verified float [`veil_ir::Graph`]; nothing downstream sees protobuf.

pub mod dsl;
pub mod error;
pub mod onnx;

pub use error::{FrontendError, Result};
