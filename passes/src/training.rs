//! Encrypted training: one step of stochastic gradient descent for a logistic regression
//! (one-vs-rest for several classes) as an integer graph over encrypted values. Its
//! outputs, the updated weights, are encoded exactly like its weight inputs, so a server
//! chains steps without the client.
//!
//! The integer step, with x ∈ [−Qx, Qx] (features), y ∈ {0, 1}, W, b ∈ [−Qw, Qw]:
//!
//! ```text
//! z  = x·W + Qx·b                      matmul_enc (the backend: external products)
//! z' = saturate(z, ±Zi)                one lookup: logits beyond ±logit_bound saturate
//! e  = round(Qe·σ(z'·sw/Qx)) − Qe·y    one lookup (σ read to the circuit's precision)
//! G  = xᵀ·e,  Gb = Qx·Σ_batch e        matmul_enc (external products), and a clear sum
//! W' = clamp(round((2^j·W − G + D − 2^(j−1)) / 2^j), ±Qw)   one lookup per weight
//! ```
//!
//! With the weight scale sw = lr·2^j / (Qx·Qe·B), `G / 2^j` is exactly the float step
//! lr·xᵀ(p − y)/B in weight units, so any learning rate is exact. D, uniform in
//! [0, 2^j) and drawn by the client per batch, makes the final rounding stochastic: an
//! update of a fraction of a weight step happens with that probability instead of never
//! (Gupta et al., "Deep learning with limited numerical precision", ICML 2015, §3).

use crate::bitwidth::{rounding_for, set_precision};
use crate::error::{PassError, Result};
use ndarray::{Array1, Array2, ArrayD, Axis, IxDyn};
use rand::Rng;
use serde::{Deserialize, Serialize};
use veil_ir::linear::{Linear, LinearKind};
use veil_ir::tlu::{Expr, Tlu};
use veil_ir::{BinaryFn, Elem, Graph, NodeId, Op, Range, Shape, Tensor, TensorType, UnaryFn};

/// Graph inputs, in order.
pub const INPUTS: [&str; 6] = ["x", "y", "w", "b", "dither_w", "dither_b"];
/// Graph outputs, in order.
pub const OUTPUTS: [&str; 2] = ["w_next", "b_next"];
/// (input, output) pairs that carry the model from one step to the next.
pub const STATE: [(usize, usize); 2] = [(2, 0), (3, 1)];

/// What the user asks for.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainSpec {
    pub features: usize,
    /// The class labels, distinct and sorted (at least two).
    pub classes: Vec<i64>,
    /// Samples per step.
    pub batch: usize,
    pub learning_rate: f64,
    /// L2 penalty on the weights (not the bias), as scikit-learn's `alpha`.
    pub l2: f64,
    /// Declared range of every feature; values are mapped linearly onto [−1, 1] and a
    /// value outside it is an error.
    pub feature_range: (f64, f64),
    /// Bound asked for |weight| on the [−1, 1] features (the plan rounds it).
    pub weight_range: f64,
    /// Bits every lookup resolves.
    pub precision: u32,
    /// Features become integers in [−x_levels, x_levels].
    pub x_levels: i64,
    /// σ(z) is read in steps of 1/error_levels.
    pub error_levels: i64,
    /// Logits beyond ±logit_bound saturate before the sigmoid.
    pub logit_bound: f64,
}

impl TrainSpec {
    /// The defaults: batch 8, learning rate 1, no penalty, features in [−1, 1], weights
    /// within ±1, 6-bit lookups, 15 feature levels each side, errors in sixteenths, logits
    /// saturating at ±8 (σ(8) = 0.9997).
    pub fn new(features: usize, classes: Vec<i64>) -> TrainSpec {
        TrainSpec {
            features,
            classes,
            batch: 8,
            learning_rate: 1.0,
            l2: 0.0,
            feature_range: (-1.0, 1.0),
            weight_range: 1.0,
            precision: 6,
            // the products are external products, so finer features and errors cost no
            // lookup width (only ‖x‖² in the noise): over 20 stratified splits of breast
            // cancer, simulated training tracks float SGD within 0.9 point at 15/16 levels,
            // 1.6 points at the 3/4 levels square lookups allowed
            x_levels: 15,
            error_levels: 16,
            logit_bound: 8.0,
        }
    }

    /// Score columns: one for a binary model, one per class otherwise.
    pub fn scores(&self) -> usize {
        if self.classes.len() == 2 {
            1
        } else {
            self.classes.len()
        }
    }

    fn check(&self) -> Result<()> {
        let bad = |msg: String| Err(PassError::Training(msg));
        let (lo, hi) = self.feature_range;
        if self.features == 0 {
            return bad("the data has no features".into());
        }
        if self.classes.len() < 2 {
            return bad(format!(
                "training needs at least two classes, the labels hold {}",
                match self.classes.first() {
                    Some(c) => format!("only class {c}"),
                    None => "none".into(),
                }
            ));
        }
        if self.classes.windows(2).any(|w| w[0] >= w[1]) {
            return bad("class labels must be distinct and sorted".into());
        }
        if self.batch == 0 {
            return bad("the batch size must be at least 1".into());
        }
        if !(self.learning_rate.is_finite() && self.learning_rate > 0.0) {
            return bad(format!("the learning rate must be positive, got {}", self.learning_rate));
        }
        if !(self.l2.is_finite() && self.l2 >= 0.0 && self.l2 * self.learning_rate < 1.0) {
            return bad(format!(
                "the L2 penalty must be ≥ 0 and below 1/learning rate (each step shrinks the weights by lr·l2), got {}",
                self.l2
            ));
        }
        if !(lo.is_finite() && hi.is_finite() && lo < hi) {
            return bad(format!("the feature range [{lo}, {hi}] is empty"));
        }
        if !(self.weight_range.is_finite() && self.weight_range > 0.0) {
            return bad(format!("the weight range must be positive, got {}", self.weight_range));
        }
        if !(4..=7).contains(&self.precision) {
            return bad(format!("the precision must be 4 to 7 bits, got {}", self.precision));
        }
        if self.x_levels < 1 || self.error_levels < 1 || self.logit_bound.is_nan() || self.logit_bound <= 0.0 {
            return bad("feature levels, error levels and the logit bound must be positive".into());
        }

        Ok(())
    }
}

/// The quantization chosen for a spec: what the client and the report need.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainingPlan {
    pub spec: TrainSpec,
    /// Weights and biases are integers in [−weight_levels, weight_levels] ...
    pub weight_levels: i64,
    /// ... standing for weight_scale × the integer (on features scaled to [−1, 1]).
    pub weight_scale: f64,
    /// The update is rounded stochastically at 2^−dither_bits of a weight step.
    pub dither_bits: u32,
    /// Logits saturate at ±logit_levels (integers).
    pub logit_levels: i64,
}

impl TrainingPlan {
    /// Choose the weight scale and levels: sw = lr·2^j/(Qx·Qe·B) for the j whose weight
    /// range Qw·sw comes closest to the one asked for, with every read within precision.
    pub fn new(spec: TrainSpec) -> Result<TrainingPlan> {
        spec.check()?;
        let (qx, qe, b) = (spec.x_levels, spec.error_levels, spec.batch as i64);
        let p = spec.precision;
        let mut best: Option<(f64, i64, u32, f64)> = None;
        for j in 0..=24u32 {
            let sw = spec.learning_rate * 2f64.powi(j as i32) / (qx * qe * b) as f64;
            let mut qw = ((spec.weight_range / sw).round() as i64).min((1 << (p - 1)) - 1);
            while qw >= 2 && !update_fits(&spec, qw, j) {
                qw -= 1;
            }
            if qw < 2 {
                continue;
            }
            let miss = (qw as f64 * sw / spec.weight_range).ln().abs();
            if best.is_none_or(|(m, ..)| miss < m - 1e-9) {
                best = Some((miss, qw, j, sw));
            }
        }
        let (_, qw, j, sw) = best.ok_or_else(|| {
            PassError::Training(format!(
                "no weight scale fits {p}-bit lookups for learning rate {}, batch {} and weight range {}: a step can move a weight by up to the learning rate, which must fit beside the weights' range (raise the weight range or the precision, or lower the learning rate)",
                spec.learning_rate, spec.batch, spec.weight_range
            ))
        })?;
        let logit_levels = ((spec.logit_bound * qx as f64 / sw).round() as i64).max(1);
        Ok(TrainingPlan { spec, weight_levels: qw, weight_scale: sw, dither_bits: j, logit_levels })
    }

    pub fn scores(&self) -> usize {
        self.spec.scores()
    }

    /// Real weights and bias in the units of the original features: the model on the
    /// [−1, 1] features, x' = (x − mid)/half, is rewritten for x.
    pub fn decode(&self, w: &ArrayD<i64>, b: &ArrayD<i64>) -> Result<(Array2<f32>, Array1<f32>)> {
        let (f, s) = (self.spec.features, self.scores());
        if w.len() != f * s || b.len() != s {
            return Err(PassError::Training(format!(
                "weights hold {} and {} values, the model has {f}×{s} and {s}",
                w.len(),
                b.len()
            )));
        }
        let qw = self.weight_levels;
        if w.iter().chain(b.iter()).any(|v| v.abs() > qw) {
            return Err(PassError::Training(format!(
                "decrypted weights fall outside their range ±{qw}: the weights were not encrypted with this client key, or the file is corrupted"
            )));
        }
        let real = |a: &ArrayD<i64>, dims: &[usize]| {
            ArrayD::from_shape_vec(dims.to_vec(), a.iter().map(|&v| (v as f64 * self.weight_scale) as f32).collect())
                .expect("sizes checked")
        };
        Ok(self.to_original_units(&real(w, &[1, f, s]), &real(b, &[1, 1, s])))
    }

    /// Real weights `[1, F, S]` and bias `[1, 1, S]` on the [−1, 1] features (the float
    /// step's state) in the units of the original features.
    pub fn to_original_units(&self, w: &ArrayD<f32>, b: &ArrayD<f32>) -> (Array2<f32>, Array1<f32>) {
        let (f, s) = (self.spec.features, self.scores());
        let (lo, hi) = self.spec.feature_range;
        let (mid, half) = ((lo + hi) / 2.0, (hi - lo) / 2.0);
        let wo = Array2::from_shape_fn((f, s), |(i, c)| (w[[0, i, c]] as f64 / half) as f32);
        let bo = Array1::from_shape_fn(s, |c| {
            (b[[0, 0, c]] as f64 - (0..f).map(|i| w[[0, i, c]] as f64 * mid / half).sum::<f64>()) as f32
        });
        (wo, bo)
    }

    /// Features mapped onto [−1, 1] as the step sees them, without quantization (for the
    /// float reference).
    pub fn normalize_features(&self, x: &Array2<f32>) -> Array2<f32> {
        let (lo, hi) = self.spec.feature_range;
        let (mid, half) = ((lo + hi) / 2.0, (hi - lo) / 2.0);
        x.mapv(|v| ((v as f64 - mid) / half).clamp(-1.0, 1.0) as f32)
    }

    /// Integer weights for real ones (on the original features): the inverse of
    /// [`TrainingPlan::decode`], clamped to the levels. Starting weights other than zero.
    pub fn encode_weights(&self, w: &Array2<f32>, b: &Array1<f32>) -> Result<[ArrayD<i64>; 2]> {
        let (f, s) = (self.spec.features, self.scores());
        if w.dim() != (f, s) || b.len() != s {
            return Err(PassError::Training(format!(
                "starting weights are {:?} and {}, the model needs {f}×{s} and {s}",
                w.dim(),
                b.len()
            )));
        }
        let (lo, hi) = self.spec.feature_range;
        let (mid, half) = ((lo + hi) / 2.0, (hi - lo) / 2.0);
        let q = |v: f64| {
            (v / self.weight_scale).round().clamp(-(self.weight_levels as f64), self.weight_levels as f64) as i64
        };
        let wi = ArrayD::from_shape_fn(IxDyn(&[1, f, s]), |ix| q(w[[ix[1], ix[2]]] as f64 * half));
        let bi = ArrayD::from_shape_fn(IxDyn(&[1, 1, s]), |ix| {
            q(b[ix[2]] as f64 + (0..f).map(|i| w[[i, ix[2]]] as f64 * mid).sum::<f64>())
        });
        Ok([wi, bi])
    }

    /// Zero weights and bias: the usual start.
    pub fn initial_state(&self) -> [ArrayD<i64>; 2] {
        let (f, s) = (self.spec.features, self.scores());
        [ArrayD::zeros(IxDyn(&[1, f, s])), ArrayD::zeros(IxDyn(&[1, 1, s]))]
    }

    /// Features as the integers the circuit takes, `[n, F]`. A NaN, an infinity or a value
    /// outside the declared range is an error naming the sample and the feature.
    pub fn quantize_features(&self, x: &Array2<f32>, what: &str) -> Result<Array2<i64>> {
        let (lo, hi) = self.spec.feature_range;
        let (mid, half) = ((lo + hi) / 2.0, (hi - lo) / 2.0);
        if x.ncols() != self.spec.features {
            return Err(PassError::Training(format!(
                "{what} has {} features per sample, the model was compiled for {}",
                x.ncols(),
                self.spec.features
            )));
        }
        let qx = self.spec.x_levels as f64;
        let mut out = Array2::zeros(x.dim());
        for ((s, f), &v) in x.indexed_iter() {
            let v = v as f64;
            if !v.is_finite() {
                return Err(PassError::Training(format!("{what}: sample {s}, feature {f} is {v}")));
            }
            // a value a rounding error outside the range is its bound
            let tol = 1e-6 * half;
            if v < lo - tol || v > hi + tol {
                return Err(PassError::Training(format!(
                    "{what}: sample {s}, feature {f} is {v}, outside the declared feature range [{lo}, {hi}] (scale the data into it, or declare a wider range)"
                )));
            }
            out[[s, f]] = (((v - mid) / half).clamp(-1.0, 1.0) * qx).round() as i64;
        }
        Ok(out)
    }

    /// Per-sample 0/1 targets `[n, S]` for class labels: the positive class for a binary
    /// model, one-hot otherwise. An unknown label is an error naming the sample.
    pub fn targets(&self, labels: &[i64], what: &str) -> Result<Array2<i64>> {
        let classes = &self.spec.classes;
        let s = self.scores();
        let mut out = Array2::zeros((labels.len(), s));
        for (i, &l) in labels.iter().enumerate() {
            let c = classes.iter().position(|&c| c == l).ok_or_else(|| {
                PassError::Training(format!("{what}: sample {i} has label {l}, not one of the classes {classes:?}"))
            })?;
            if s == 1 {
                out[[i, 0]] = (c == 1) as i64;
            } else {
                out[[i, c]] = 1;
            }
        }
        Ok(out)
    }

    /// The non-state inputs of one step: features and targets of `rows`, and fresh dither.
    pub fn step_inputs(
        &self,
        xq: &Array2<i64>,
        targets: &Array2<i64>,
        rows: &[usize],
        rng: &mut impl Rng,
    ) -> [ArrayD<i64>; 4] {
        let (f, s, bsz) = (self.spec.features, self.scores(), self.spec.batch);
        let x = ArrayD::from_shape_fn(IxDyn(&[1, bsz, f]), |ix| xq[[rows[ix[1]], ix[2]]]);
        let y = ArrayD::from_shape_fn(IxDyn(&[1, bsz, s]), |ix| targets[[rows[ix[1]], ix[2]]]);
        let top = (1i64 << self.dither_bits) - 1;
        let dw = ArrayD::from_shape_simple_fn(IxDyn(&[1, f, s]), || rng.random_range(0..=top));
        let db = ArrayD::from_shape_simple_fn(IxDyn(&[1, 1, s]), || rng.random_range(0..=top));
        [x, y, dw, db]
    }
}

/// Does the update read of 2^j·W − G + D − 2^(j−1) (minus the L2 decay) fit the
/// precision with at most j bits dropped?
fn update_fits(spec: &TrainSpec, qw: i64, j: u32) -> bool {
    let g = (spec.batch as i64).saturating_mul(spec.x_levels).saturating_mul(spec.error_levels);
    let step = 1i64 << j;
    let offset = step / 2;
    // lr·l2 < 1 (checked), so the decay is below one weight step per weight level
    let decay = (spec.learning_rate * spec.l2 * step as f64 * qw as f64).round() as i64;
    let reach = step.saturating_mul(qw).saturating_add(offset).saturating_add(g).saturating_add(decay);
    if reach > 1 << 40 {
        return false;
    }
    let v = Range::new(-reach, step * qw - offset + g + decay + step - 1);
    rounding_for(v, spec.precision).is_some_and(|r| r <= j)
}

/// Rows of each step, in order: consecutive batches over the samples, the last one
/// completed from the first samples so every sample is used.
pub fn batches(samples: usize, batch: usize) -> Vec<Vec<usize>> {
    if samples == 0 || batch == 0 {
        return Vec::new();
    }
    let steps = samples.div_ceil(batch);
    (0..steps).map(|s| (0..batch).map(|i| (s * batch + i) % samples).collect()).collect()
}

/// The step graphs of one plan.
#[derive(Clone, Debug)]
pub struct TrainingModel {
    pub plan: TrainingPlan,
    /// The float step (see `veil_frontend::dsl::logistic_sgd_step`).
    pub float: Graph,
    /// The integer step with every lookup reading exactly.
    pub quantized: Graph,
    /// The integer step with lookups read to the plan's precision: what runs encrypted.
    pub graph: Graph,
}

impl TrainingModel {
    pub fn new(plan: TrainingPlan) -> Result<TrainingModel> {
        let spec = &plan.spec;
        let float = veil_frontend::dsl::logistic_sgd_step(
            spec.features,
            plan.scores(),
            spec.batch,
            spec.learning_rate as f32,
            spec.l2 as f32,
        )
        .map_err(|e| PassError::Training(format!("building the float step: {e}")))?;
        let quantized = integer_step(&plan)?;
        veil_ir::verify(&quantized)?;
        let graph = set_precision(&quantized, plan.spec.precision)?;
        veil_ir::verify(&graph)?;
        Ok(TrainingModel { plan, float, quantized, graph })
    }

    /// One step in the clear, with the circuit's exact integer semantics: the next state.
    pub fn step_clear(&self, inputs: &[ArrayD<i64>; 4], state: &[ArrayD<i64>; 2]) -> Result<[ArrayD<i64>; 2]> {
        let args = self.arguments(inputs, state);
        let out = veil_ir::interp::run(&self.graph, &args)?;
        let int = |t: &Tensor| t.as_i64().cloned().expect("integer outputs");
        Ok([int(&out[0]), int(&out[1])])
    }

    /// Graph inputs in order from a step's inputs and the state.
    pub fn arguments(&self, inputs: &[ArrayD<i64>; 4], state: &[ArrayD<i64>; 2]) -> Vec<Tensor> {
        let [x, y, dw, db] = inputs.clone();
        let [w, b] = state.clone();
        [x, y, w, b, dw, db].into_iter().map(Tensor::I64).collect()
    }
}

/// Float SGD with the step's float graph, on the same batches: the reference curve
/// encrypted training is compared with. Features mapped to [−1, 1] as the encrypted step
/// sees them, without their quantization.
pub struct FloatSgd<'a> {
    model: &'a TrainingModel,
    x: ArrayD<f32>,
    y: ArrayD<f32>,
    w: ArrayD<f32>,
    b: ArrayD<f32>,
}

impl<'a> FloatSgd<'a> {
    pub fn new(model: &'a TrainingModel, x: &Array2<f32>, labels: &[i64]) -> Result<FloatSgd<'a>> {
        let plan = &model.plan;
        let x = plan.normalize_features(x).into_dyn();
        let y = plan.targets(labels, "labels")?.mapv(|v| v as f32).into_dyn();
        let (f, s) = (plan.spec.features, plan.scores());
        Ok(FloatSgd { model, x, y, w: ArrayD::zeros(vec![1, f, s]), b: ArrayD::zeros(vec![1, 1, s]) })
    }

    /// One float step on `rows`.
    pub fn step(&mut self, rows: &[usize]) -> Result<()> {
        let take = |a: &ArrayD<f32>| {
            let cols = a.shape()[1];
            ArrayD::from_shape_fn(vec![1, rows.len(), cols], |ix| a[[rows[ix[1]], ix[2]]])
        };
        let args = [take(&self.x), take(&self.y), self.w.clone(), self.b.clone()].map(Tensor::F32);
        let out = veil_ir::interp::run(&self.model.float, &args)?;
        self.w = out[0].to_f32();
        self.b = out[1].to_f32();
        Ok(())
    }

    /// The current weights and bias in the original feature units.
    pub fn weights(&self) -> (Array2<f32>, Array1<f32>) {
        self.model.plan.to_original_units(&self.w, &self.b)
    }
}

/// Accuracy of a linear classifier (weights `[F, S]`, bias `[S]`, on the original
/// features) on `x [n, F]` with class labels.
pub fn accuracy(classes: &[i64], w: &Array2<f32>, b: &Array1<f32>, x: &Array2<f32>, labels: &[i64]) -> f64 {
    let pred = predict(classes, w, b, x);
    let right = pred.iter().zip(labels).filter(|(p, l)| p == l).count();
    right as f64 / labels.len().max(1) as f64
}

/// Class labels a linear classifier predicts: the sign of the score for one column, the
/// largest score otherwise.
pub fn predict(classes: &[i64], w: &Array2<f32>, b: &Array1<f32>, x: &Array2<f32>) -> Vec<i64> {
    let z = x.dot(w) + b;
    z.axis_iter(Axis(0))
        .map(|row| {
            if row.len() == 1 {
                classes[(row[0] > 0.0) as usize]
            } else {
                let best = row.iter().enumerate().fold((0, f32::MIN), |m, (i, &v)| if v > m.1 { (i, v) } else { m });
                classes[best.0]
            }
        })
        .collect()
}

fn enc(lo: i64, hi: i64, dims: &[usize]) -> TensorType {
    TensorType::new(Elem::Enc(Range::new(lo, hi)), Shape::batched(dims))
}

fn linear(g: &mut Graph, x: NodeId, kind: LinearKind, bias: i64, label: &str) -> Result<NodeId> {
    let l = Linear::new(kind, ArrayD::from_elem(vec![], bias), label);
    Ok(g.add(Op::Linear(Box::new(l)), &[x], label)?)
}

fn lookup(g: &mut Graph, x: NodeId, expr: Expr, label: &str) -> Result<NodeId> {
    let t = Tlu { expr, input: g.enc_range(x), params: vec![], rounding: 0, label: label.into() };
    Ok(g.add(Op::Tlu(Box::new(t)), &[x], label)?)
}

/// Broadcast a `[1, S]` row to `[B, S]` times `factor` (a matrix on the flattened sample).
fn broadcast_rows(g: &mut Graph, x: NodeId, rows: usize, s: usize, factor: i64, label: &str) -> Result<NodeId> {
    let w = Array2::from_shape_fn((rows * s, s), |(o, i)| if o % s == i { factor } else { 0 });
    linear(g, x, LinearKind::Matrix { weights: w, out_dims: vec![rows, s] }, 0, label)
}

/// Sum `[B, S]` over the batch rows into `[1, S]`, times `factor`.
fn sum_rows(g: &mut Graph, x: NodeId, rows: usize, s: usize, factor: i64, label: &str) -> Result<NodeId> {
    let w = Array2::from_shape_fn((s, rows * s), |(o, i)| if i % s == o { factor } else { 0 });
    linear(g, x, LinearKind::Matrix { weights: w, out_dims: vec![1, s] }, 0, label)
}

/// The update of one state tensor: clamp(round((2^j·w − grad + dither − 2^(j−1)) / 2^j)).
fn update(
    plan: &TrainingPlan,
    g: &mut Graph,
    w: NodeId,
    grad: NodeId,
    dither: NodeId,
    decay: bool,
    name: &str,
) -> Result<NodeId> {
    let j = plan.dither_bits;
    let step = 1i64 << j;
    let qw = plan.weight_levels;
    let scaled = linear(
        g,
        w,
        LinearKind::Scale { factor: ArrayD::from_elem(vec![], step) },
        -(step / 2),
        &format!("{name}_scaled"),
    )?;
    let v = g.add(Op::SubEnc, &[scaled, grad], format!("{name}_minus_gradient"))?;
    let mut v = g.add(Op::AddEnc, &[v, dither], format!("{name}_dithered"))?;
    let k = plan.spec.learning_rate * plan.spec.l2 * step as f64;
    if decay && k > 0.0 {
        // lr·λ·w in units of 2^−j weight steps
        let e = Expr::Round(Box::new(Expr::binary(BinaryFn::Mul, Expr::Input, Expr::Const(k))));
        let d = lookup(g, w, e, &format!("{name}_decay"))?;
        v = g.add(Op::SubEnc, &[v, d], format!("{name}_decayed"))?;
    }
    let e = Expr::Clamp(
        Box::new(Expr::Round(Box::new(Expr::binary(BinaryFn::Div, Expr::Input, Expr::Const(step as f64))))),
        -qw as f64,
        qw as f64,
    );
    lookup(g, v, e, name)
}

/// The integer step graph (every lookup exact; `set_precision` rounds them).
fn integer_step(plan: &TrainingPlan) -> Result<Graph> {
    let spec = &plan.spec;
    let (f, s, bsz) = (spec.features, plan.scores(), spec.batch);
    let (qx, qe, qw) = (spec.x_levels, spec.error_levels, plan.weight_levels);
    let top = (1i64 << plan.dither_bits) - 1;
    let mut g = Graph::new("sgd_step");
    let x = g.add_input(INPUTS[0], enc(-qx, qx, &[bsz, f]));
    let y = g.add_input(INPUTS[1], enc(0, 1, &[bsz, s]));
    let w = g.add_input(INPUTS[2], enc(-qw, qw, &[f, s]));
    let b = g.add_input(INPUTS[3], enc(-qw, qw, &[1, s]));
    let dw = g.add_input(INPUTS[4], enc(0, top, &[f, s]));
    let db = g.add_input(INPUTS[5], enc(0, top, &[1, s]));
    // forward: z = x·W + Qx·b, saturated, through the sigmoid. The bias enters the logits
    // through a lookup: added linearly, it would have to share the logits' fine scale
    // (their low bits are dropped when read), and its noise would be amplified 2^6-fold
    // where the update reads it.
    let xw = g.add(Op::MatMulEnc, &[x, w], "x_times_w")?;
    let b_scaled =
        lookup(&mut g, b, Expr::binary(BinaryFn::Mul, Expr::Input, Expr::Const(qx as f64)), "bias_times_qx")?;
    let bias = broadcast_rows(&mut g, b_scaled, bsz, s, 1, "bias")?;
    let z = g.add(Op::AddEnc, &[xw, bias], "logits")?;
    let zi = plan.logit_levels;
    let zs = g.add(Op::SatEnc { lo: -zi, hi: zi, rounding: 0 }, &[z], "logits_saturated")?;
    let sigmoid = |factor: f64| {
        let q = Expr::Clamp(
            Box::new(Expr::Round(Box::new(Expr::binary(
                BinaryFn::Mul,
                Expr::Const(qe as f64),
                Expr::unary(
                    UnaryFn::Sigmoid,
                    Expr::binary(BinaryFn::Mul, Expr::Input, Expr::Const(plan.weight_scale / qx as f64)),
                ),
            )))),
            0.0,
            qe as f64,
        );
        Expr::binary(BinaryFn::Mul, q, Expr::Const(factor))
    };
    let p = lookup(&mut g, zs, sigmoid(1.0), "sigmoid")?;
    let yq = linear(&mut g, y, LinearKind::Scale { factor: ArrayD::from_elem(vec![], qe) }, 0, "targets")?;
    let e = g.add(Op::SubEnc, &[p, yq], "error")?;
    // backward: G = xᵀ·e (products), Gb = Qx·Σ e. The bias gradient takes Qx·σ from its
    // own lookup, so that e keeps the coarse scale its exact reads want.
    let xt = g.add(Op::Transpose { perm: vec![0, 2, 1] }, &[x], "x_transposed")?;
    let grad = g.add(Op::MatMulEnc, &[xt, e], "gradient")?;
    let p_qx = lookup(&mut g, zs, sigmoid(qx as f64), "sigmoid_times_qx")?;
    let y_qx =
        linear(&mut g, y, LinearKind::Scale { factor: ArrayD::from_elem(vec![], qe * qx) }, 0, "targets_times_qx")?;
    let e_qx = g.add(Op::SubEnc, &[p_qx, y_qx], "error_times_qx")?;
    let grad_b = sum_rows(&mut g, e_qx, bsz, s, 1, "bias_gradient")?;
    let w_next = update(plan, &mut g, w, grad, dw, true, OUTPUTS[0])?;
    let b_next = update(plan, &mut g, b, grad_b, db, false, OUTPUTS[1])?;
    g.set_output(OUTPUTS[0], w_next);
    g.set_output(OUTPUTS[1], b_next);
    Ok(g)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn plan(features: usize, classes: Vec<i64>) -> TrainingPlan {
        TrainingPlan::new(TrainSpec::new(features, classes)).unwrap()
    }

    #[test]
    fn plans_fit_the_precision_and_make_the_learning_rate_exact() {
        for lr in [0.01, 0.1, 0.5, 1.0, 3.0] {
            for batch in [2, 8, 32] {
                let mut spec = TrainSpec::new(30, vec![0, 1]);
                spec.learning_rate = lr;
                spec.batch = batch;
                let p = TrainingPlan::new(spec).unwrap();
                let (qx, qe) = (p.spec.x_levels as f64, p.spec.error_levels as f64);
                let k = lr / (qx * qe * batch as f64 * p.weight_scale);
                assert!((k * 2f64.powi(p.dither_bits as i32) - 1.0).abs() < 1e-12, "lr {lr} batch {batch}: {p:?}");
                let m = TrainingModel::new(p.clone()).unwrap();
                // every lookup fits 6 bits (the products are external products, no lookups)
                let widest = m
                    .graph
                    .node_ids()
                    .filter(|&id| !matches!(m.graph.node(id).op, Op::MatMulEnc))
                    .map(|id| crate::bitwidth::max_precision_of(&m.graph, id))
                    .max()
                    .unwrap_or(0);
                assert!(widest <= 6, "lr {lr} batch {batch}: {widest} bits");
                // a step can move a weight by lr·max|g| = lr: large rates leave fewer levels
                assert!(p.weight_levels >= if lr <= 1.0 { 8 } else { 4 }, "{p:?}");
            }
        }
    }

    #[test]
    fn bad_specs_are_errors_that_say_why() {
        let one = TrainingPlan::new(TrainSpec::new(3, vec![4])).unwrap_err().to_string();
        assert!(one.contains("two classes") && one.contains("class 4"), "{one}");
        let mut s = TrainSpec::new(3, vec![0, 1]);
        s.learning_rate = -1.0;
        assert!(TrainingPlan::new(s).unwrap_err().to_string().contains("learning rate"));
        let mut s = TrainSpec::new(3, vec![0, 1]);
        s.feature_range = (1.0, 1.0);
        assert!(TrainingPlan::new(s).unwrap_err().to_string().contains("feature range"));
    }

    #[test]
    fn features_outside_the_range_or_not_finite_name_sample_and_feature() {
        let p = plan(2, vec![0, 1]);
        let x = Array2::from_shape_vec((2, 2), vec![0.5, -1.0, 0.2, 1.5]).unwrap();
        let e = p.quantize_features(&x, "X.npy").unwrap_err().to_string();
        assert!(e.contains("sample 1, feature 1") && e.contains("1.5") && e.contains("X.npy"), "{e}");
        let x = Array2::from_shape_vec((1, 2), vec![f32::NAN, 0.0]).unwrap();
        assert!(p.quantize_features(&x, "X").unwrap_err().to_string().contains("sample 0, feature 0 is NaN"));
        let ok = Array2::from_shape_vec((1, 2), vec![1.0, -0.34]).unwrap();
        // ±15 levels: 1.0 → 15, −0.34 → round(−5.1) = −5
        assert_eq!(p.quantize_features(&ok, "X").unwrap(), Array2::from_shape_vec((1, 2), vec![15, -5]).unwrap());
        let e = p.targets(&[0, 1, 7], "y.npy").unwrap_err().to_string();
        assert!(e.contains("sample 2 has label 7"), "{e}");
    }

    #[test]
    fn weights_decode_to_the_original_feature_units() {
        let mut spec = TrainSpec::new(2, vec![0, 1]);
        spec.feature_range = (0.0, 10.0);
        let p = TrainingPlan::new(spec).unwrap();
        let w = ArrayD::from_shape_vec(vec![1, 2, 1], vec![4i64, -2]).unwrap();
        let b = ArrayD::from_shape_vec(vec![1, 1, 1], vec![1i64]).unwrap();
        let (wo, bo) = p.decode(&w, &b).unwrap();
        // the score on x must equal the score of the integer model on x' = (x − 5)/5
        let x = [7.0f64, 1.0];
        let xs = [(x[0] - 5.0) / 5.0, (x[1] - 5.0) / 5.0];
        let sw = p.weight_scale;
        let want = (4.0 * xs[0] - 2.0 * xs[1] + 1.0) * sw;
        let got = wo[[0, 0]] as f64 * x[0] + wo[[1, 0]] as f64 * x[1] + bo[0] as f64;
        assert!((want - got).abs() < 1e-5, "{want} vs {got}");
        let back = p.encode_weights(&wo, &bo).unwrap();
        assert_eq!(back[0], w);
        assert_eq!(back[1], b);
    }

    #[test]
    fn the_integer_step_follows_the_float_step() {
        // Same data through the float step and the integer one: the weights move the same
        // way (the integer step rounds stochastically, so compare over many steps).
        let spec = TrainSpec::new(4, vec![0, 1]);
        let p = TrainingPlan::new(spec).unwrap();
        let m = TrainingModel::new(p.clone()).unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let n = 64;
        let x = Array2::from_shape_fn((n, 4), |(i, f)| (((i * 7 + f * 3) % 11) as f32 / 5.0 - 1.0).clamp(-1.0, 1.0));
        let labels: Vec<i64> = (0..n).map(|i| (x[[i, 0]] + 0.5 * x[[i, 1]] > 0.0) as i64).collect();
        let xq = p.quantize_features(&x, "x").unwrap();
        let t = p.targets(&labels, "y").unwrap();
        let mut state = p.initial_state();
        for _ in 0..3 {
            for rows in batches(n, p.spec.batch) {
                let inputs = p.step_inputs(&xq, &t, &rows, &mut rng);
                state = m.step_clear(&inputs, &state).unwrap();
            }
        }
        let (w, b) = p.decode(&state[0], &state[1]).unwrap();
        let acc = accuracy(&[0, 1], &w, &b, &x, &labels);
        assert!(acc >= 0.9, "accuracy {acc}, weights {w:?} {b:?}");
        assert!(w[[0, 0]] > 0.0 && w[[1, 0]] > 0.0, "{w:?}");
    }

    #[test]
    fn an_l2_penalty_shrinks_the_weights() {
        let run = |l2: f64| {
            let mut spec = TrainSpec::new(4, vec![0, 1]);
            spec.l2 = l2;
            let p = TrainingPlan::new(spec).unwrap();
            let m = TrainingModel::new(p.clone()).unwrap();
            let n = 64;
            let x =
                Array2::from_shape_fn((n, 4), |(i, f)| (((i * 7 + f * 3) % 11) as f32 / 5.0 - 1.0).clamp(-1.0, 1.0));
            let labels: Vec<i64> = (0..n).map(|i| (x[[i, 0]] + 0.5 * x[[i, 1]] > 0.0) as i64).collect();
            let (xq, t) = (p.quantize_features(&x, "x").unwrap(), p.targets(&labels, "y").unwrap());
            let mut rng = rand::rngs::StdRng::seed_from_u64(5);
            let mut state = p.initial_state();
            for _ in 0..4 {
                for rows in batches(n, p.spec.batch) {
                    state = m.step_clear(&p.step_inputs(&xq, &t, &rows, &mut rng), &state).unwrap();
                }
            }
            state[0].iter().map(|&v| (v * v) as f64).sum::<f64>()
        };
        let (free, penalised) = (run(0.0), run(0.2));
        assert!(penalised < 0.8 * free, "Σw² {penalised} with L2 vs {free} without");
    }

    #[test]
    fn batches_wrap_around() {
        assert_eq!(batches(5, 2), vec![vec![0, 1], vec![2, 3], vec![4, 0]]);
        assert_eq!(batches(4, 2).len(), 2);
    }
}
