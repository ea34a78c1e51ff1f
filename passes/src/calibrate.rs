//! Calibration: run the float graph on representative inputs and record each tensor's range.

use crate::error::{PassError, Result};
use ndarray::ArrayD;
use std::collections::HashMap;
use veil_ir::{Graph, NodeId, Tensor};

/// Observed value ranges of a float graph.
#[derive(Clone, Debug, Default)]
pub struct Calibration {
    /// Min and max over all elements of every float tensor.
    pub ranges: HashMap<NodeId, (f64, f64)>,
    /// Per-element min and max of each graph input, over the calibration samples
    /// (shape: the input's per-sample shape).
    pub input_elements: Vec<(ArrayD<f64>, ArrayD<f64>)>,
    /// Per-channel (axis 1) min and max of every float tensor of rank ≥ 2.
    pub channels: HashMap<NodeId, Vec<(f64, f64)>>,
    /// Number of calibration samples.
    pub samples: usize,
}

impl Calibration {
    pub fn range(&self, id: NodeId) -> Option<(f64, f64)> {
        self.ranges.get(&id).copied()
    }
}

/// Run `graph` on the calibration inputs (one tensor per graph input, batched) and record
/// ranges. Non-finite values are an error: the model would have no usable range.
pub fn calibrate(graph: &Graph, inputs: &[Tensor]) -> Result<Calibration> {
    let samples = veil_ir::interp::check_inputs(graph, inputs)?;
    let mut ranges = HashMap::new();
    let mut channels = HashMap::new();
    let mut bad: Option<NodeId> = None;
    veil_ir::interp::run_observed(graph, inputs, &mut |id, t, _| {
        if let Tensor::F32(a) = t {
            let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
            for &v in a.iter() {
                if !v.is_finite() {
                    bad = Some(id);
                }
                lo = lo.min(v as f64);
                hi = hi.max(v as f64);
            }
            ranges.insert(id, (lo, hi));
            if a.ndim() >= 2 {
                let per: Vec<(f64, f64)> = a
                    .axis_iter(ndarray::Axis(1))
                    .map(|c| {
                        c.iter()
                            .fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), &v| (l.min(v as f64), h.max(v as f64)))
                    })
                    .collect();
                channels.insert(id, per);
            }
        }
    })?;
    if let Some(id) = bad {
        let n = graph.node(id);
        return Err(PassError::Calibration(format!(
            "{} '{}' produced NaN or infinity on the calibration data",
            n.op.mnemonic(),
            n.name
        )));
    }
    let input_elements = inputs.iter().map(per_element_range).collect();
    Ok(Calibration { ranges, input_elements, channels, samples })
}

/// Min and max of each element over the batch (axis 0).
fn per_element_range(t: &Tensor) -> (ArrayD<f64>, ArrayD<f64>) {
    let a = t.to_f32().mapv(|v| v as f64);
    if a.ndim() == 0 {
        return (a.clone(), a);
    }
    let lo = a.fold_axis(ndarray::Axis(0), f64::INFINITY, |&m, &v| m.min(v));
    let hi = a.fold_axis(ndarray::Axis(0), f64::NEG_INFINITY, |&m, &v| m.max(v));
    (lo, hi)
}
