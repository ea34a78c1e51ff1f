//! veil's intermediate representation.
//!
//! A [`Graph`] of [`Op`]s, each with the [`TensorType`] of its result. The same graph type
//! carries every stage of the pipeline — float ops as imported, integer ops over encrypted
//! values after quantization — so one [`verify`], one printer ([`print::to_text`],
//! [`print::to_dot`], [`print::to_json`]) and one interpreter serve them all.

pub mod enc;
pub mod error;
pub mod graph;
pub mod interp;
pub mod linear;
pub mod op;
pub mod print;
pub mod tensor;
pub mod tlu;
pub mod tree;
pub mod types;
pub mod verify;

pub use error::{IrError, Result};
pub use graph::{Graph, Node, NodeId, Output, Task};
pub use linear::{Linear, LinearKind};
pub use op::{BinaryFn, Op, UnaryFn};
pub use tensor::Tensor;
pub use tlu::{Expr, Tlu};
pub use types::{Dim, Elem, Range, Shape, TensorType};
pub use verify::verify;
