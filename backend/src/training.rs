//! Compiling encrypted training: a [`TrainSpec`] → the SGD step circuit, its crypto
//! parameters and the client's encodings, as an artifact (see `veil_passes::training`).

use crate::artifact::{graph_to_json, Artifact};
use crate::error::Result;
use crate::lower::{lower_graph_external, ClientSpec, InputEncoding, LoweredGraph, OutputEncoding};
use crate::params::optimize;
use crate::proto;
use ndarray::ArrayD;
use std::time::Instant;
use veil_ir::{Graph, Range};
use veil_passes::bitwidth::max_precision_of;
use veil_passes::model::{InputQuant, OutputDecode};
use veil_passes::training::{TrainSpec, TrainingModel, TrainingPlan, INPUTS, OUTPUTS, STATE};

/// Failure probability per lookup for training. Rare wrong lookups perturb one product or
/// one weight update by a step, which SGD averages out: simulated breast-cancer and wine
/// training at 2^-5 per lookup ends within a sample of the noiseless accuracy, so 2^-7
/// keeps a margin. It buys 1-level bootstraps at N = 2048 for 6-bit lookups, where 2^-40
/// needs N = 8192 and two levels (about 7× the time).
pub const TRAINING_P_ERROR: f64 = 1.0 / 128.0;

/// Compile the SGD step for `spec` with `p_error` per lookup.
pub fn compile_training(spec: TrainSpec, p_error: f64) -> Result<(Artifact, TrainingModel)> {
    let start = Instant::now();
    let plan = TrainingPlan::new(spec)?;
    let model = TrainingModel::new(plan.clone())?;
    let low = lower_graph_external(&model.graph, plan.spec.precision, &STATE)?;
    let mut req = low.requirements.clone();
    req.p_error = p_error;
    let params = optimize(&req)?;
    let client = client_spec(&plan, &model.graph, &low);
    let report = report(&model, &low, start.elapsed().as_secs_f64());
    let stages = proto::Stages {
        float_json: graph_to_json(&model.float),
        quantized_json: graph_to_json(&model.quantized),
        fused_json: graph_to_json(&model.graph),
    };
    let name = format!("logistic_sgd_{}x{}", plan.spec.features, plan.spec.classes.len());
    let artifact = Artifact::new(name, params, low.circuit, client, report, stages).with_training(plan);
    Ok((artifact, model))
}

/// The client side of a training artifact: plaintexts of steps and states, and decoding.
pub struct TrainingClient<'a> {
    pub plan: &'a TrainingPlan,
    pub client: &'a ClientSpec,
    pub circuit: &'a crate::circuit::Circuit,
}

impl<'a> TrainingClient<'a> {
    /// The training side of an artifact; an error if it is an inference model.
    pub fn new(a: &'a Artifact) -> Result<TrainingClient<'a>> {
        let plan = a.training.as_ref().ok_or_else(|| crate::error::BackendError::Artifact {
            path: a.model_name.clone(),
            msg: "this is an inference model, not a training model (compile one with `veil train-compile`)".into(),
        })?;
        Ok(TrainingClient { plan, client: &a.client, circuit: &a.circuit })
    }

    /// Plaintexts `[circuit input][element]` of one step's inputs (features, targets,
    /// dither, and the square sums derived from them); state inputs are left empty.
    pub fn step_plaintexts(&self, inputs: &[ArrayD<i64>; 4]) -> Result<Vec<Vec<u64>>> {
        let [x, y, dw, db] = inputs.clone();
        let s = self.plan.scores();
        let w = ArrayD::zeros(vec![1, self.plan.spec.features, s]);
        let b = ArrayD::zeros(vec![1, 1, s]);
        let mut plain = self.client.encode_integers(&[x, y, w, b, dw, db])?;
        for &(i, _) in &self.circuit.state {
            plain[i] = vec![Vec::new()];
        }
        Ok(plain.into_iter().map(|mut per_sample| per_sample.remove(0)).collect())
    }

    /// Plaintexts of a state (weights and bias as integers `[1, F, S]`, `[1, 1, S]`).
    pub fn state_plaintexts(&self, state: &[ArrayD<i64>; 2]) -> Vec<Vec<u64>> {
        self.circuit
            .state
            .iter()
            .zip(state)
            .map(|(&(i, _), v)| {
                let e = &self.client.inputs[i];
                v.iter().map(|&m| crate::lower::encode(m as i128 - e.base as i128, e.delta_log2)).collect()
            })
            .collect()
    }

    /// Integers of a decrypted (or simulated) state.
    pub fn decode_state(&self, plain: &[Vec<u64>]) -> [ArrayD<i64>; 2] {
        let one = |k: usize| {
            let (i, _) = self.circuit.state[k];
            let e = &self.client.inputs[i];
            crate::lower::decode_rows(&plain[k..k + 1], e.delta_log2, e.base, &e.shape)
        };
        [one(0), one(1)]
    }

    /// One step on plaintexts, as the encrypted circuit behaves: with `noise`, lookups
    /// read with the noise the parameters imply (approximate rounding, failures).
    pub fn simulate_step(
        &self,
        step: &[Vec<u64>],
        state: &[Vec<u64>],
        noise: Option<&crate::params::Params>,
        rng: &mut impl rand::Rng,
    ) -> Vec<Vec<u64>> {
        let mut inputs: Vec<Vec<Vec<u64>>> = step.iter().map(|p| vec![p.clone()]).collect();
        for (k, &(i, _)) in self.circuit.state.iter().enumerate() {
            inputs[i] = vec![state[k].clone()];
        }
        let out = self.circuit.simulate(&inputs, noise, rng);
        self.circuit.state.iter().map(|&(_, o)| out[o][0].clone()).collect()
    }
}

/// What the client encodes for each step input and decodes from each output. The
/// integers come from `TrainingPlan` (features, targets, dither); the quantizers recorded
/// here describe them for readers of the artifact.
fn client_spec(plan: &TrainingPlan, g: &Graph, low: &LoweredGraph) -> ClientSpec {
    let (lo, hi) = plan.spec.feature_range;
    let sw = plan.weight_scale;
    let quant = |i: usize| -> (f64, f64) {
        match i {
            0 => ((hi - lo) / 2.0 / plan.spec.x_levels as f64, (lo + hi) / 2.0),
            2 | 3 => (sw, 0.0),
            _ => (1.0, 0.0),
        }
    };
    let dims = |id| crate::lower::sample_dims(g, id);
    let inputs = g
        .inputs()
        .iter()
        .enumerate()
        .map(|(i, &id)| {
            let (scale, offset) = quant(i);
            InputEncoding {
                quant: InputQuant {
                    name: INPUTS[i].into(),
                    scale: ArrayD::from_elem(vec![], scale),
                    offset: ArrayD::from_elem(vec![], offset),
                    range: g.enc_range(id),
                    cuts: None,
                    unary: false,
                },
                shape: dims(id),
                delta_log2: low.inputs[i].delta_log2,
                base: low.inputs[i].base,
                model_input: i,
            }
        })
        .collect();
    let outputs = g
        .outputs()
        .iter()
        .enumerate()
        .map(|(i, o)| OutputEncoding {
            name: OUTPUTS[i].into(),
            decode: OutputDecode {
                scale: ArrayD::from_elem(vec![], sw),
                offset: ArrayD::from_elem(vec![], 0.0),
                rounding: 0,
            },
            shape: dims(o.node),
            delta_log2: low.outputs[i].delta_log2,
            base: low.outputs[i].base,
            range: g.enc_range(o.node),
            whole_torus: false,
        })
        .collect();
    // after decryption the weights are the outputs (on the [−1, 1] features)
    let mut tail = Graph::new("weights");
    for (i, o) in g.outputs().iter().enumerate() {
        let n = tail.add_input(OUTPUTS[i], veil_ir::TensorType::f32(g.node(o.node).ty.shape.clone()));
        tail.set_output(OUTPUTS[i], n);
    }
    ClientSpec {
        inputs,
        derived: low.derived.clone(),
        ggsw: low.ggsw.clone(),
        outputs,
        tail,
        tail_inputs: (0..OUTPUTS.len()).map(veil_passes::model::TailSource::Server).collect(),
        model_inputs: INPUTS.iter().map(|s| s.to_string()).collect(),
        model_outputs: OUTPUTS.iter().map(|s| s.to_string()).collect(),
    }
}

/// The compile report of a step: per node its range, lookups and read precision.
fn report(model: &TrainingModel, low: &LoweredGraph, seconds: f64) -> proto::Report {
    let g = &model.graph;
    let mut layers = Vec::new();
    for id in g.topo_order().unwrap_or_default() {
        let node = g.node(id);
        let r = match node.ty.elem {
            veil_ir::Elem::Enc(r) => r,
            _ => Range::new(0, 0),
        };
        let rounding = match &node.op {
            veil_ir::Op::Tlu(t) => t.rounding,
            veil_ir::Op::SatEnc { rounding, .. } | veil_ir::Op::AbsEnc { rounding, .. } => *rounding,
            _ => 0,
        };
        layers.push(proto::Layer {
            name: node.name.clone(),
            op: node.op.mnemonic().into(),
            lo: r.lo,
            hi: r.hi,
            lookups: low.node_lookups.get(&id).copied().unwrap_or(0) as u32,
            // external products read nothing through a lookup
            precision: if matches!(node.op, veil_ir::Op::MatMulEnc) { 0 } else { max_precision_of(g, id) },
            rounding,
        });
    }
    let plan = &model.plan;
    proto::Report {
        input_bits: veil_passes::model::bits_of(Range::new(-plan.spec.x_levels, plan.spec.x_levels)),
        weight_bits: veil_passes::model::bits_of(Range::new(-plan.weight_levels, plan.weight_levels)),
        act_bits: veil_passes::model::bits_of(Range::new(-plan.spec.error_levels, plan.spec.error_levels)),
        max_precision: plan.spec.precision,
        lookups_per_sample: low.circuit.lookups_per_sample() as u32,
        metric: "encrypted training: one SGD step per run".into(),
        calibration_score: 0.0,
        compile_seconds: seconds,
        layers,
        lookups_before_fusion: low.circuit.lookups_per_sample() as u32,
        output_bits: 0,
        output_digits: 1,
        score_parts: 1,
        trials: Vec::new(),
        accuracy_warning: String::new(),
        near_boundary_score: None,
        scored_near_boundary: false,
        near_boundary_short: false,
        calibration_agreement: None,
        accuracy_tolerance: 0.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn the_compiled_step_computes_the_integer_step() {
        // The lowered step, simulated without noise, gives the interpreter's weights, and
        // its outputs feed its inputs for the next step.
        let mut spec = TrainSpec::new(5, vec![0, 1, 2]);
        spec.batch = 4;
        let (a, m) = compile_training(spec, TRAINING_P_ERROR).unwrap();
        let plan = a.training.clone().unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(4);
        let x = ndarray::Array2::from_shape_fn((12, 5), |(i, f)| ((i * 3 + f * 5) % 9) as f32 / 4.0 - 1.0);
        let labels: Vec<i64> = (0..12).map(|i| (i % 3) as i64).collect();
        let xq = plan.quantize_features(&x, "x").unwrap();
        let t = plan.targets(&labels, "y").unwrap();
        let tc = TrainingClient::new(&a).unwrap();
        let mut state = plan.initial_state();
        // the simulated state is carried as plaintexts, each step's output used as they are
        let mut plain_state = tc.state_plaintexts(&state);
        for rows in veil_passes::training::batches(12, 4) {
            let inputs = plan.step_inputs(&xq, &t, &rows, &mut rng);
            let step = tc.step_plaintexts(&inputs).unwrap();
            plain_state = tc.simulate_step(&step, &plain_state, None, &mut rng);
            state = m.step_clear(&inputs, &state).unwrap();
            assert_eq!(tc.decode_state(&plain_state), state);
        }
        assert!(state[0].iter().any(|&v| v != 0), "the weights moved");
        // an artifact round trip keeps the plan
        let back = Artifact::from_proto(a.to_proto(), "mem").unwrap();
        assert_eq!(back.training, a.training);
        assert_eq!(back.fingerprint, a.fingerprint);
    }
}
