//! One converter per ONNX op, registered by (domain, op type).

mod array;
mod math;
mod ml;
mod nn;

use super::attr::NodeView;
use super::{Ctx, Value};
use crate::error::Result;
use std::collections::HashMap;

pub(crate) type Converter = fn(&mut Ctx, &NodeView) -> Result<Vec<Value>>;
pub(crate) type Registry = HashMap<(&'static str, &'static str), Converter>;

pub(crate) fn registry() -> Registry {
    let mut r = Registry::new();
    math::register(&mut r);
    nn::register(&mut r);
    array::register(&mut r);
    ml::register(&mut r);
    r
}

/// Wrap a single result.
pub(crate) fn one(v: Value) -> Result<Vec<Value>> {
    Ok(vec![v])
}
