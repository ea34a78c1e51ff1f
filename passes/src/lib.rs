//! Passes from the float graph to the integer graph that runs on encrypted data:
//! [`calibrate`] → [`quantize`] → [`fuse`] → [`bitwidth`]; [`training`] builds the
//! integer SGD step for encrypted training.

pub mod bitwidth;
pub mod boundary;
pub mod calibrate;
pub mod digits;
pub mod error;
pub mod fuse;
pub mod model;
pub mod precision;
pub mod quantize;
pub mod ranges;
pub mod slot_fill;
pub mod training;
pub mod tree_search;
pub mod trees;

pub use bitwidth::{compile, Compiled, SearchOptions};
pub use calibrate::{calibrate, Calibration};
pub use error::{PassError, Result};
pub use fuse::fuse;
pub use model::QuantizedModel;
pub use quantize::{quantize, QuantConfig};
