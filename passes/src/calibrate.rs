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
    /// Min and max per index of the last axis of every float tensor of rank ≥ 2: the output
    /// features of a dense layer, whatever the rank ([N, M] or [N, 1, M]).
    pub features: HashMap<NodeId, Vec<(f64, f64)>>,
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
    check_values(graph, inputs)?;
    let samples = veil_ir::interp::check_inputs(graph, inputs)?;
    let mut ranges = HashMap::new();
    let mut channels = HashMap::new();
    let mut features = HashMap::new();
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
                let per_index = |axis: usize| -> Vec<(f64, f64)> {
                    a.axis_iter(ndarray::Axis(axis))
                        .map(|c| {
                            c.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), &v| {
                                (l.min(v as f64), h.max(v as f64))
                            })
                        })
                        .collect()
                };
                channels.insert(id, per_index(1));
                features.insert(id, per_index(a.ndim() - 1));
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
    Ok(Calibration { ranges, input_elements, channels, features, samples })
}

/// Calibration data must hold samples, all finite: a NaN would poison every range, and an
/// empty batch has none. Name the input, sample and element so the user can fix the data.
fn check_values(graph: &Graph, inputs: &[Tensor]) -> Result<()> {
    for (&id, t) in graph.inputs().iter().zip(inputs) {
        let name = &graph.node(id).name;
        if t.shape().contains(&0) {
            return Err(PassError::Calibration(format!(
                "input '{name}' has no calibration samples (shape {:?}); give a few hundred representative ones",
                t.shape()
            )));
        }
        if let Tensor::F32(a) = t {
            if let Some((idx, v)) = a.indexed_iter().find(|(_, v)| !v.is_finite()) {
                let at = ndarray::Dimension::slice(&idx).to_vec();
                return Err(PassError::Calibration(format!(
                    "input '{name}': sample {} has {v} at element {:?}; calibration data must be finite",
                    at[0],
                    &at[1..]
                )));
            }
        }
    }
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;
    use veil_ir::{Shape, TensorType, UnaryFn};

    fn model() -> Graph {
        let mut g = Graph::new("m");
        let x = g.add_input("x", TensorType::f32(Shape::batched(&[3])));
        let y = g.add(veil_ir::Op::Unary(UnaryFn::Relu), &[x], "y").unwrap();
        g.set_output("y", y);
        g
    }

    fn err(data: ArrayD<f32>) -> String {
        calibrate(&model(), &[Tensor::F32(data)]).unwrap_err().to_string()
    }

    #[test]
    fn nan_and_infinity_name_the_sample_and_element() {
        let mut a = ArrayD::<f32>::zeros(vec![4, 3]);
        a[[2, 1]] = f32::NAN;
        let e = err(a.clone());
        assert!(e.contains("input 'x'") && e.contains("sample 2") && e.contains("[1]") && e.contains("NaN"), "{e}");
        a[[2, 1]] = f32::NEG_INFINITY;
        assert!(err(a).contains("-inf"));
    }

    #[test]
    fn empty_and_misshapen_data_are_errors() {
        let e = err(ArrayD::zeros(vec![0, 3]));
        assert!(e.contains("no calibration samples"), "{e}");
        let e = err(ArrayD::zeros(vec![5, 4]));
        assert!(e.contains("expects shape") && e.contains("[5, 4]"), "{e}");
    }

    #[test]
    fn ranges_cover_the_data() {
        let a = ArrayD::from_shape_vec(vec![2, 3], vec![-1.0f32, 0.5, 2.0, 3.0, -4.0, 0.0]).unwrap();
        let c = calibrate(&model(), &[Tensor::F32(a)]).unwrap();
        let x = model().inputs()[0];
        assert_eq!(c.range(x), Some((-4.0, 3.0)));
        assert_eq!(c.samples, 2);
    }
}
