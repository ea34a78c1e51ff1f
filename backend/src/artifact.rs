//! The compiled-model file: prost messages generated from `proto/veil.proto`.

use crate::circuit::{Circuit, GgswValue, Instruction, KeyswitchInstr, LinearInstr, LookupInstr, ProductInstr};
use crate::error::{BackendError, Result};
use crate::lower::{ClientSpec, DerivedInput, GgswInput, InputEncoding, OutputEncoding};
use crate::params::{Conversion, Params};
use crate::proto;
use ndarray::{ArrayD, IxDyn};
use prost::Message;
use sha2::{Digest, Sha256};
use std::path::Path;
use veil_ir::{Elem, Graph, Range};
use veil_passes::model::{Cut, InputQuant, OutputDecode, QuantizedModel, TailSource};
use veil_passes::training::{TrainSpec, TrainingPlan};

pub const FORMAT_VERSION: u32 = 1;

/// Largest artifact read.
const MAX_BYTES: u64 = 1 << 31;

/// A compiled model.
#[derive(Clone, Debug)]
pub struct Artifact {
    pub model_name: String,
    pub params: Params,
    pub circuit: Circuit,
    pub client: ClientSpec,
    pub report: proto::Report,
    pub stages: proto::Stages,
    /// Set for a training artifact (the circuit is one SGD step).
    pub training: Option<TrainingPlan>,
    pub fingerprint: Vec<u8>,
}

fn bad(path: &str, msg: impl Into<String>) -> BackendError {
    BackendError::Artifact { path: path.into(), msg: msg.into() }
}

impl Artifact {
    pub fn new(
        model_name: String,
        params: Params,
        circuit: Circuit,
        client: ClientSpec,
        report: proto::Report,
        stages: proto::Stages,
    ) -> Artifact {
        let fingerprint = fingerprint(&params, &circuit, None);
        Artifact { model_name, params, circuit, client, report, stages, training: None, fingerprint }
    }

    /// A training artifact: its fingerprint covers the training plan too.
    pub fn with_training(mut self, plan: TrainingPlan) -> Artifact {
        self.fingerprint = fingerprint(&self.params, &self.circuit, Some(&plan));
        self.training = Some(plan);
        self
    }

    pub fn to_proto(&self) -> proto::Artifact {
        proto::Artifact {
            format_version: FORMAT_VERSION,
            veil_version: env!("CARGO_PKG_VERSION").into(),
            model_name: self.model_name.clone(),
            fingerprint: self.fingerprint.clone(),
            params: Some(params_to_proto(&self.params)),
            circuit: Some(circuit_to_proto(&self.circuit)),
            client: Some(client_to_proto(&self.client)),
            report: Some(self.report.clone()),
            stages: Some(self.stages.clone()),
            training: self.training.as_ref().map(training_to_proto),
        }
    }

    pub fn from_proto(p: proto::Artifact, path: &str) -> Result<Artifact> {
        if p.format_version != FORMAT_VERSION {
            return Err(bad(path, format!("artifact format {} is not supported (this veil reads format {FORMAT_VERSION}); recompile the model", p.format_version)));
        }
        let params = params_from_proto(p.params.as_ref().ok_or_else(|| bad(path, "no parameters"))?);
        params.validate().map_err(|e| bad(path, format!("invalid parameters: {e}")))?;
        let circuit = circuit_from_proto(p.circuit.ok_or_else(|| bad(path, "no circuit"))?, path)?;
        params.check_partitions(&circuit).map_err(|e| bad(path, e))?;
        if !circuit.ggsw.is_empty() || params.has_products() {
            params.check_products(&circuit).map_err(|e| bad(path, e))?;
        }
        let client = client_from_proto(p.client.ok_or_else(|| bad(path, "no client section"))?, &circuit, path)?;
        let training = p.training.map(|t| training_from_proto(t, &circuit, path)).transpose()?;
        if fingerprint(&params, &circuit, training.as_ref()) != p.fingerprint {
            return Err(bad(path, "the fingerprint does not match the parameters and circuit: the file was modified"));
        }
        Ok(Artifact {
            model_name: p.model_name,
            params,
            circuit,
            client,
            report: p.report.unwrap_or_default(),
            stages: p.stages.unwrap_or_default(),
            training,
            fingerprint: p.fingerprint,
        })
    }

    /// Write atomically (temporary file, then rename).
    pub fn write(&self, path: &Path) -> Result<()> {
        let bytes = self.to_bytes();
        crate::files::write_atomic(path, |w| std::io::Write::write_all(w, &bytes))
            .map_err(|e| bad(&path.display().to_string(), format!("cannot write: {e}")))
    }

    pub fn read(path: &Path) -> Result<Artifact> {
        let shown = path.display().to_string();
        let len = std::fs::metadata(path).map_err(|e| bad(&shown, format!("cannot read: {e}")))?.len();
        if len > MAX_BYTES {
            return Err(bad(&shown, format!("{len} bytes is over the {MAX_BYTES}-byte limit")));
        }
        let bytes = std::fs::read(path).map_err(|e| bad(&shown, format!("cannot read: {e}")))?;
        Artifact::from_bytes(&bytes, &shown)
    }

    /// [`Artifact::read`] on bytes in memory; `path` is only used in messages.
    pub fn from_bytes(bytes: &[u8], path: &str) -> Result<Artifact> {
        let p = proto::Artifact::decode(bytes).map_err(|e| bad(path, format!("not a veil model file ({e})")))?;
        Artifact::from_proto(p, path)
    }

    /// The file's bytes (what [`Artifact::write`] writes).
    pub fn to_bytes(&self) -> Vec<u8> {
        self.to_proto().encode_to_vec()
    }

    /// The final integer graph (what clear execution runs).
    pub fn integer_graph(&self) -> Result<Graph> {
        graph_from_json(&self.stages.fused_json, "fused")
    }

    /// The quantized model clear execution uses, rebuilt from the final integer graph and
    /// the client section.
    pub fn quantized_model(&self) -> Result<QuantizedModel> {
        let c = &self.client;
        let graph = self.integer_graph()?;
        // The client's quantization must produce what the integer graph was built for.
        let fits = graph.inputs().len() == c.inputs.len()
            && graph.inputs().iter().zip(&c.inputs).all(|(&id, i)| graph.node(id).ty.elem == Elem::Enc(i.quant.range));
        if !fits {
            return Err(bad("integer graph", "its inputs do not match the client section's quantization"));
        }
        Ok(QuantizedModel {
            name: self.model_name.clone(),
            graph,
            inputs: c.inputs.iter().map(|i| i.quant.clone()).collect(),
            input_of: c.inputs.iter().map(|i| i.model_input).collect(),
            decode: c.outputs.iter().map(|o| o.decode.clone()).collect(),
            tail: c.tail.clone(),
            tail_inputs: c.tail_inputs.clone(),
            model_inputs: c.model_inputs.clone(),
        })
    }
}

pub fn graph_from_json(json: &str, stage: &str) -> Result<Graph> {
    if json.is_empty() {
        return Err(BackendError::Artifact {
            path: stage.into(),
            msg: "this stage is not stored in the model file".into(),
        });
    }
    let g: Graph = serde_json::from_str(json)
        .map_err(|e| BackendError::Artifact { path: stage.into(), msg: format!("stage graph does not parse: {e}") })?;
    veil_ir::verify(&g)?;
    Ok(g)
}

pub fn graph_to_json(g: &Graph) -> String {
    serde_json::to_string(g).expect("graphs serialize")
}

/// The fingerprint a (possibly edited) model file's parameters, circuit and training plan
/// give, or `None` when they do not decode. The fingerprint guards against accidents
/// (a damaged file, keys of another model), not forgery: tools and tests that craft model
/// files on purpose stamp them with this.
pub fn fingerprint_of(p: &proto::Artifact) -> Option<Vec<u8>> {
    let params = params_from_proto(p.params.as_ref()?);
    let circuit = circuit_from_proto(p.circuit.clone()?, "edited model").ok()?;
    let training = match &p.training {
        Some(t) => Some(training_from_proto(t.clone(), &circuit, "edited model").ok()?),
        None => None,
    };
    Some(fingerprint(&params, &circuit, training.as_ref()))
}

/// SHA-256 over the parameters and the circuit: what keys and ciphertexts must match.
pub fn fingerprint(params: &Params, circuit: &Circuit, training: Option<&TrainingPlan>) -> Vec<u8> {
    let mut h = Sha256::new();
    h.update(b"veil-fingerprint-v1");
    h.update(params_to_proto(params).encode_to_vec());
    h.update(circuit_to_proto(circuit).encode_to_vec());
    if let Some(t) = training {
        h.update(training_to_proto(t).encode_to_vec());
    }
    h.finalize().to_vec()
}

fn training_to_proto(t: &TrainingPlan) -> proto::Training {
    let s = &t.spec;
    proto::Training {
        features: s.features as u32,
        classes: s.classes.clone(),
        batch_size: s.batch as u32,
        learning_rate: s.learning_rate,
        l2: s.l2,
        feature_lo: s.feature_range.0,
        feature_hi: s.feature_range.1,
        weight_range: s.weight_range,
        precision: s.precision,
        x_levels: s.x_levels,
        error_levels: s.error_levels,
        logit_bound: s.logit_bound,
        weight_levels: t.weight_levels,
        weight_scale: t.weight_scale,
        dither_bits: t.dither_bits,
        logit_levels: t.logit_levels,
    }
}

/// The training plan, re-derived from its spec and checked against what the file says and
/// against the circuit's inputs, so a client never encodes for a step it does not run.
fn training_from_proto(t: proto::Training, circuit: &Circuit, path: &str) -> Result<TrainingPlan> {
    let spec = TrainSpec {
        features: t.features as usize,
        classes: t.classes,
        batch: t.batch_size as usize,
        learning_rate: t.learning_rate,
        l2: t.l2,
        feature_range: (t.feature_lo, t.feature_hi),
        weight_range: t.weight_range,
        precision: t.precision,
        x_levels: t.x_levels,
        error_levels: t.error_levels,
        logit_bound: t.logit_bound,
    };
    let plan = TrainingPlan::new(spec).map_err(|e| bad(path, format!("training section: {e}")))?;
    let same = plan.weight_levels == t.weight_levels
        && plan.weight_scale == t.weight_scale
        && plan.dither_bits == t.dither_bits
        && plan.logit_levels == t.logit_levels;
    let (f, s, b) = (plan.spec.features, plan.scores(), plan.spec.batch);
    let sizes = [b * f, b * s, f * s, s, f * s, s];
    let fits = circuit.inputs.len() >= sizes.len()
        && sizes.iter().zip(&circuit.inputs).all(|(&n, &v)| circuit.value_len[v] == n)
        && circuit.state == veil_passes::training::STATE.to_vec();
    if !same || !fits {
        return Err(bad(path, "the training section does not match the circuit"));
    }
    Ok(plan)
}

fn params_to_proto(p: &Params) -> proto::Params {
    proto::Params {
        lwe_dimension: p.lwe_dimension as u32,
        glwe_dimension: p.glwe_dimension as u32,
        polynomial_size: p.polynomial_size as u32,
        pbs_base_log: p.pbs_base_log,
        pbs_level: p.pbs_level,
        ks_base_log: p.ks_base_log,
        ks_level: p.ks_level,
        lwe_noise_std: p.lwe_noise_std,
        glwe_noise_std: p.glwe_noise_std,
        precision: p.precision,
        p_error: p.p_error,
        global_p_error: p.global_p_error,
        pbs_cost_ms: p.pbs_cost_ms,
        bootstrap_key_bytes: p.bootstrap_key_bytes,
        keyswitch_key_bytes: p.keyswitch_key_bytes,
        partitions: p.partitions.iter().map(params_to_proto).collect(),
        conversions: p
            .conversions
            .iter()
            .map(|c| proto::Conversion { from: c.from, to: c.to, base_log: c.base_log, level: c.level })
            .collect(),
        packing_base_log: p.products.packing_base_log,
        packing_level: p.products.packing_level,
        ggsw_base_log: p.products.ggsw_base_log,
        ggsw_level: p.products.ggsw_level,
    }
}

fn params_from_proto(p: &proto::Params) -> Params {
    Params {
        lwe_dimension: p.lwe_dimension as u64,
        glwe_dimension: p.glwe_dimension as u64,
        polynomial_size: p.polynomial_size as u64,
        pbs_base_log: p.pbs_base_log,
        pbs_level: p.pbs_level,
        ks_base_log: p.ks_base_log,
        ks_level: p.ks_level,
        lwe_noise_std: p.lwe_noise_std,
        glwe_noise_std: p.glwe_noise_std,
        precision: p.precision,
        p_error: p.p_error,
        global_p_error: p.global_p_error,
        pbs_cost_ms: p.pbs_cost_ms,
        bootstrap_key_bytes: p.bootstrap_key_bytes,
        keyswitch_key_bytes: p.keyswitch_key_bytes,
        partitions: p.partitions.iter().map(params_from_proto).collect(),
        conversions: p
            .conversions
            .iter()
            .map(|c| Conversion { from: c.from, to: c.to, base_log: c.base_log, level: c.level })
            .collect(),
        products: crate::params::ProductParams {
            packing_base_log: p.packing_base_log,
            packing_level: p.packing_level,
            ggsw_base_log: p.ggsw_base_log,
            ggsw_level: p.ggsw_level,
        },
    }
}

/// Lists of items from a start-offset encoding (list k: items[start[k]..start[k+1]]);
/// `None` when the offsets are malformed.
fn from_starts<T: Clone>(start: &[u32], items: &[T]) -> Option<Vec<Vec<T>>> {
    let ok = start.first() == Some(&0)
        && start.windows(2).all(|w| w[0] <= w[1])
        && start.last().copied() == Some(items.len() as u32);
    ok.then(|| start.windows(2).map(|w| items[w[0] as usize..w[1] as usize].to_vec()).collect())
}

/// Lists of pairs (a[i], b[i]) from a start-offset encoding over two parallel arrays;
/// `None` when the arrays differ in length or the offsets are malformed.
fn pairs_from_starts<A: Copy, B: Copy>(start: &[u32], a: &[A], b: &[B]) -> Option<Vec<Vec<(A, B)>>> {
    let pairs: Vec<(A, B)> = (a.len() == b.len()).then(|| a.iter().copied().zip(b.iter().copied()).collect())?;
    from_starts(start, &pairs)
}

/// The start offsets of `lists`, for [`from_starts`].
fn starts<T>(lists: &[Vec<T>]) -> Vec<u32> {
    std::iter::once(0)
        .chain(lists.iter().scan(0u32, |n, l| {
            *n += l.len() as u32;
            Some(*n)
        }))
        .collect()
}

fn circuit_to_proto(c: &Circuit) -> proto::Circuit {
    let instructions = c
        .instructions
        .iter()
        .map(|i| proto::Instruction {
            kind: Some(match i {
                Instruction::Linear(l) => proto::instruction::Kind::Linear(proto::Linear {
                    output: l.output as u32,
                    inputs: l.inputs.iter().map(|&v| v as u32).collect(),
                    row_start: l.row_start.clone(),
                    term_input: l.term_input.clone(),
                    term_index: l.term_index.clone(),
                    term_weight: l.term_weight.clone(),
                    constant: l.constant.clone(),
                }),
                Instruction::Lookup(l) => proto::instruction::Kind::Lookup(proto::Lookup {
                    output: l.output as u32,
                    input: l.input as u32,
                    table: l.table.clone(),
                    second_output: l.second.map(|v| v as u32),
                    partition: l.partition as u32,
                }),
                Instruction::Keyswitch(k) => proto::instruction::Kind::Keyswitch(proto::Keyswitch {
                    output: k.output as u32,
                    input: k.input as u32,
                }),
                Instruction::Product(p) => proto::instruction::Kind::Product(proto::Product {
                    output: p.output as u32,
                    ggsw: p.ggsw as u32,
                    input: p.input as u32,
                    pack_start: starts(&p.packs),
                    pack_element: p.packs.iter().flatten().map(|e| e.0).collect(),
                    pack_exponent: p.packs.iter().flatten().map(|e| e.1).collect(),
                    sum_start: starts(&p.sums),
                    sum_ggsw: p.sums.iter().flatten().map(|e| e.0).collect(),
                    sum_pack: p.sums.iter().flatten().map(|e| e.1).collect(),
                    extract_sum: p.extract.iter().map(|e| e.0).collect(),
                    extract_coefficient: p.extract.iter().map(|e| e.1).collect(),
                }),
            }),
        })
        .collect();
    proto::Circuit {
        value_len: c.value_len.iter().map(|&v| v as u32).collect(),
        inputs: c.inputs.iter().map(|&v| v as u32).collect(),
        outputs: c.outputs.iter().map(|&v| v as u32).collect(),
        instructions,
        tables: c.tables.iter().map(|t| proto::Table { slots: t.clone() }).collect(),
        state: c.state.iter().map(|&(i, o)| proto::StatePair { input: i as u32, output: o as u32 }).collect(),
        small_values: (0..c.value_len.len()).filter(|&v| c.is_small(v)).map(|v| v as u32).collect(),
        partition_precisions: c.partition_precisions.clone(),
        value_keys: c.keys.iter().map(|&k| k as u32).collect(),
        ggsw: c.ggsw.iter().map(|g| proto::GgswValue { value: g.value as u32, span: g.span, norm2: g.norm2 }).collect(),
    }
}

/// Mark value `v` computed; every value is written once (inputs included).
fn define(defined: &mut [bool], v: usize, path: &str) -> Result<()> {
    if defined[v] {
        return Err(bad(path, format!("circuit value {v} is written twice")));
    }
    defined[v] = true;
    Ok(())
}

/// Decode a circuit, checking every index, so a malformed file fails here rather than
/// in the evaluator.
fn circuit_from_proto(p: proto::Circuit, path: &str) -> Result<Circuit> {
    let values = p.value_len.len();
    let val = |v: u32| -> Result<usize> {
        ((v as usize) < values)
            .then_some(v as usize)
            .ok_or_else(|| bad(path, format!("circuit refers to missing value {v}")))
    };
    let tables: Vec<Vec<u64>> = p.tables.into_iter().map(|t| t.slots).collect();
    let parts = p.partition_precisions.len().max(1);
    if parts > 8 || p.partition_precisions.iter().any(|&b| !(1..=16).contains(&b)) {
        return Err(bad(path, "the circuit's partitions are malformed"));
    }
    let precision = match (tables.first(), p.partition_precisions.iter().max()) {
        (_, Some(&m)) => m,
        (Some(t), None) if t.len().is_power_of_two() => t.len().trailing_zeros(),
        (Some(_), None) => return Err(bad(path, "a lookup table's size is not a power of two")),
        (None, None) => 0,
    };
    let part_precision = |q: usize| p.partition_precisions.get(q).copied().unwrap_or(precision);
    if p.partition_precisions.is_empty() && tables.iter().any(|t| t.len() != 1 << precision) {
        return Err(bad(path, "lookup tables of different sizes"));
    }
    if !(p.value_keys.is_empty() || p.value_keys.len() == values) || p.value_keys.iter().any(|&k| k as usize >= parts) {
        return Err(bad(path, "the circuit's value keys are malformed"));
    }
    let key = |v: usize| p.value_keys.get(v).copied().unwrap_or(0);
    if parts > 1 && !p.small_values.is_empty() {
        return Err(bad(path, "a circuit with several parameter sets has small-key values"));
    }
    let mut defined = vec![false; values];
    for &i in &p.inputs {
        defined[val(i)?] = true;
    }
    let mut small = vec![false; values];
    for &v in &p.small_values {
        small[val(v)?] = true;
    }
    let mut ggsw = Vec::with_capacity(p.ggsw.len());
    // the GGSW inputs are the circuit's last inputs, in order
    let first_ggsw =
        p.inputs.len().checked_sub(p.ggsw.len()).ok_or_else(|| bad(path, "more GGSW inputs than inputs"))?;
    for (i, g) in p.ggsw.iter().enumerate() {
        let v = val(g.value)?;
        let ok = p.inputs[first_ggsw + i] == g.value && g.span <= 1 << 16 && g.norm2.is_finite() && g.norm2 >= 0.0;
        if !ok || small[v] || parts > 1 {
            return Err(bad(path, "a GGSW input is malformed"));
        }
        ggsw.push(GgswValue { value: v, span: g.span, norm2: g.norm2 });
    }
    let is_ggsw = |v: usize| ggsw.iter().any(|g| g.value == v);
    let mut instructions = Vec::with_capacity(p.instructions.len());
    for ins in p.instructions {
        let i = match ins.kind.ok_or_else(|| bad(path, "empty instruction"))? {
            proto::instruction::Kind::Linear(l) => {
                let out = val(l.output)?;
                let inputs = l.inputs.iter().map(|&v| val(v)).collect::<Result<Vec<_>>>()?;
                let rows = p.value_len[out] as usize;
                let terms = l.term_weight.len();
                let ok = l.row_start.len() == rows + 1
                    && l.constant.len() == rows
                    && l.term_input.len() == terms
                    && l.term_index.len() == terms
                    && l.row_start.windows(2).all(|w| w[0] <= w[1])
                    && l.row_start.last().copied() == Some(terms as u32)
                    && l.term_input
                        .iter()
                        .zip(&l.term_index)
                        .all(|(&k, &e)| (k as usize) < inputs.len() && e < p.value_len[inputs[k as usize]]);
                if !ok
                    || inputs.iter().any(|&v| !defined[v] || small[v] != small[out] || key(v) != key(out) || is_ggsw(v))
                {
                    return Err(bad(path, "a linear instruction is malformed"));
                }
                define(&mut defined, out, path)?;
                Instruction::Linear(LinearInstr {
                    output: out,
                    inputs,
                    row_start: l.row_start,
                    term_input: l.term_input,
                    term_index: l.term_index,
                    term_weight: l.term_weight,
                    constant: l.constant,
                })
            }
            proto::instruction::Kind::Lookup(l) => {
                let (out, input) = (val(l.output)?, val(l.input)?);
                let second = l.second_output.map(val).transpose()?;
                let n = p.value_len[out] as usize;
                let q = l.partition as usize;
                if q >= parts
                    || key(out) as usize != q
                    || second.is_some_and(|v| key(v) as usize != q)
                    || l.table
                        .iter()
                        .any(|&t| tables.get(t as usize).is_some_and(|t| t.len() != 1 << part_precision(q)))
                    || !defined[input]
                    || is_ggsw(input)
                    || l.table.len() != n
                    || p.value_len[input] as usize != n
                    || small[out]
                    || second.is_some_and(|v| p.value_len[v] as usize != n || v == out || small[v])
                    || l.table.iter().any(|&t| t as usize >= tables.len())
                {
                    return Err(bad(path, "a lookup instruction is malformed"));
                }
                define(&mut defined, out, path)?;
                if let Some(v) = second {
                    define(&mut defined, v, path)?;
                }
                Instruction::Lookup(LookupInstr { output: out, input, table: l.table, second, partition: q as u8 })
            }
            proto::instruction::Kind::Keyswitch(k) => {
                let (out, input) = (val(k.output)?, val(k.input)?);
                if !defined[input]
                    || small[input]
                    || !small[out]
                    || p.value_len[input] != p.value_len[out]
                    || is_ggsw(input)
                {
                    return Err(bad(path, "a keyswitch instruction is malformed"));
                }
                define(&mut defined, out, path)?;
                Instruction::Keyswitch(KeyswitchInstr { output: out, input })
            }
            proto::instruction::Kind::Product(q) => {
                let (out, g, input) = (val(q.output)?, val(q.ggsw)?, val(q.input)?);
                let malformed = || bad(path, "a product instruction is malformed");
                let packs =
                    pairs_from_starts(&q.pack_start, &q.pack_element, &q.pack_exponent).ok_or_else(malformed)?;
                let sums = pairs_from_starts(&q.sum_start, &q.sum_ggsw, &q.sum_pack).ok_or_else(malformed)?;
                let extract: Vec<(u32, u32)> =
                    q.extract_sum.iter().copied().zip(q.extract_coefficient.iter().copied()).collect();
                let ok = is_ggsw(g)
                    && defined[input]
                    && !small[input]
                    && !small[out]
                    && !is_ggsw(input)
                    && q.extract_sum.len() == q.extract_coefficient.len()
                    && extract.len() == p.value_len[out] as usize
                    && packs.iter().flatten().all(|&(e, x)| e < p.value_len[input] && x.unsigned_abs() < 1 << 16)
                    && sums.iter().flatten().all(|&(m, k)| m < p.value_len[g] && (k as usize) < packs.len())
                    && extract.iter().all(|&(k, c)| (k as usize) < sums.len() && c < 1 << 16);
                if !ok {
                    return Err(malformed());
                }
                define(&mut defined, out, path)?;
                Instruction::Product(ProductInstr { output: out, ggsw: g, input, packs, sums, extract })
            }
        };
        instructions.push(i);
    }
    let outputs = p.outputs.iter().map(|&v| val(v)).collect::<Result<Vec<_>>>()?;
    if outputs.iter().any(|&v| !defined[v] || small[v] || is_ggsw(v)) {
        return Err(bad(path, "an output is never computed, or is under the small key"));
    }
    let mut state = Vec::with_capacity(p.state.len());
    for s in &p.state {
        let (i, o) = (s.input as usize, s.output as usize);
        let ok =
            i < p.inputs.len() && o < outputs.len() && p.value_len[p.inputs[i] as usize] == p.value_len[outputs[o]];
        if !ok {
            return Err(bad(path, "a state pair refers to no input or output of its size"));
        }
        state.push((i, o));
    }
    Ok(Circuit {
        value_len: p.value_len.iter().map(|&v| v as usize).collect(),
        inputs: p.inputs.iter().map(|&v| v as usize).collect(),
        outputs,
        instructions,
        tables,
        precision,
        state,
        small,
        partition_precisions: p.partition_precisions,
        keys: p.value_keys.iter().map(|&k| k as u8).collect(),
        ggsw,
    })
}

/// Per-element parameters, flattened over the per-sample shape.
fn flat(a: &ArrayD<f64>, shape: &[usize]) -> Vec<f64> {
    a.broadcast(IxDyn(shape)).map(|v| v.iter().copied().collect()).unwrap_or_else(|| a.iter().copied().collect())
}

fn unflat(v: Vec<f64>, shape: &[usize], path: &str) -> Result<ArrayD<f64>> {
    ArrayD::from_shape_vec(IxDyn(shape), v).map_err(|_| bad(path, "client parameters do not fit their shape"))
}

fn client_to_proto(c: &ClientSpec) -> proto::Client {
    proto::Client {
        inputs: c
            .inputs
            .iter()
            .map(|i| proto::Input {
                name: i.quant.name.clone(),
                shape: i.shape.iter().map(|&d| d as u32).collect(),
                scale: flat(&i.quant.scale, &i.shape),
                offset: flat(&i.quant.offset, &i.shape),
                lo: i.quant.range.lo,
                hi: i.quant.range.hi,
                delta: 1u64.checked_shl(i.delta_log2).unwrap_or(0),
                base: i.base,
                model_input: i.model_input as u32,
                cut_count: i.quant.cuts.iter().flatten().map(|c| c.len() as u32).collect(),
                cut_threshold: i.quant.cuts.iter().flatten().flatten().map(|c| c.threshold).collect(),
                cut_inclusive: i.quant.cuts.iter().flatten().flatten().map(|c| c.inclusive).collect(),
                cut_unary: i.quant.unary,
            })
            .collect(),
        outputs: c
            .outputs
            .iter()
            .map(|o| proto::Output {
                name: o.name.clone(),
                shape: o.shape.iter().map(|&d| d as u32).collect(),
                scale: flat(&o.decode.scale, &o.shape),
                offset: flat(&o.decode.offset, &o.shape),
                delta: 1u64.checked_shl(o.delta_log2).unwrap_or(0),
                base: o.base,
                rounding: o.decode.rounding,
                lo: o.range.lo,
                hi: o.range.hi,
                whole_torus: o.whole_torus,
            })
            .collect(),
        tail_graph_json: graph_to_json(&c.tail),
        tail_inputs: c
            .tail_inputs
            .iter()
            .map(|s| proto::TailSource {
                source: Some(match *s {
                    TailSource::Server(i) => proto::tail_source::Source::ServerOutput(i as u32),
                    TailSource::Model(i) => proto::tail_source::Source::ModelInput(i as u32),
                    TailSource::Digits { first, count, shift, rounding } => {
                        proto::tail_source::Source::ServerDigits(proto::Digits {
                            first: first as u32,
                            count: count as u32,
                            shift,
                            rounding,
                        })
                    }
                }),
            })
            .collect(),
        model_inputs: c.model_inputs.clone(),
        model_outputs: c.model_outputs.clone(),
        derived_inputs: c
            .derived
            .iter()
            .map(|d| proto::DerivedInput {
                from: d.from as u32,
                group_start: starts(&d.groups),
                elements: d.groups.iter().flatten().copied().collect(),
                delta: 1u64.checked_shl(d.delta_log2).unwrap_or(0),
                base: d.base,
            })
            .collect(),
        ggsw_inputs: c
            .ggsw
            .iter()
            .map(|g| proto::GgswInput {
                from: g.from as u32,
                poly_start: starts(&g.polys),
                elements: g.polys.iter().flatten().map(|e| e.0).collect(),
                exponents: g.polys.iter().flatten().map(|e| e.1).collect(),
            })
            .collect(),
    }
}

fn delta_log2(d: u64, path: &str) -> Result<u32> {
    if !d.is_power_of_two() {
        return Err(bad(path, format!("encoding scale {d} is not a power of two")));
    }
    Ok(d.trailing_zeros())
}

fn client_from_proto(p: proto::Client, circuit: &Circuit, path: &str) -> Result<ClientSpec> {
    let own = p.inputs.len() + p.derived_inputs.len();
    if own + p.ggsw_inputs.len() != circuit.inputs.len() || p.outputs.len() != circuit.outputs.len() {
        return Err(bad(path, "the client section does not match the circuit's inputs and outputs"));
    }
    let ggsw = p
        .ggsw_inputs
        .iter()
        .enumerate()
        .map(|(k, g)| {
            let from = g.from as usize;
            let value = circuit.inputs[own + k];
            let polys = pairs_from_starts(&g.poly_start, &g.elements, &g.exponents);
            let per = circuit.inputs.get(from).map_or(0, |&v| circuit.value_len[v]) as u32;
            let input = polys.map(|polys| GgswInput { from, polys }).filter(|gi| {
                from < p.inputs.len()
                    && gi.polys.len() == circuit.value_len[value]
                    && gi.polys.iter().flatten().all(|&(e, _)| e < per)
                    && circuit.ggsw_of(value).is_some_and(|c| c.span as usize == gi.span())
            });
            input.ok_or_else(|| bad(path, "a GGSW input is malformed"))
        })
        .collect::<Result<Vec<_>>>()?;
    let derived = p
        .derived_inputs
        .iter()
        .enumerate()
        .map(|(k, d)| {
            let from = d.from as usize;
            let count = circuit.value_len[circuit.inputs[p.inputs.len() + k]];
            let per = circuit.value_len.get(circuit.inputs[from.min(circuit.inputs.len() - 1)]).copied().unwrap_or(0);
            let groups = from_starts(&d.group_start, &d.elements).filter(|groups| {
                from < p.inputs.len() && groups.len() == count && d.elements.iter().all(|&e| (e as usize) < per)
            });
            let groups = groups.ok_or_else(|| bad(path, "a derived input is malformed"))?;
            Ok(DerivedInput { from, groups, delta_log2: delta_log2(d.delta, path)?, base: d.base })
        })
        .collect::<Result<Vec<_>>>()?;
    let inputs = p
        .inputs
        .into_iter()
        .map(|i| {
            let shape: Vec<usize> = i.shape.iter().map(|&d| d as usize).collect();
            let cuts = cuts_from_proto(&i, &shape).map_err(|e| bad(path, format!("input '{}': {e}", i.name)))?;
            let unary = i.cut_unary;
            Ok(InputEncoding {
                quant: InputQuant {
                    scale: unflat(i.scale, &shape, path)?,
                    offset: unflat(i.offset, &shape, path)?,
                    range: Range::new(i.lo, i.hi.max(i.lo)),
                    cuts,
                    unary,
                    name: i.name,
                },
                shape,
                delta_log2: delta_log2(i.delta, path)?,
                base: i.base,
                model_input: i.model_input as usize,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let outputs = p
        .outputs
        .into_iter()
        .map(|o| {
            let shape: Vec<usize> = o.shape.iter().map(|&d| d as usize).collect();
            Ok(OutputEncoding {
                name: o.name,
                decode: OutputDecode {
                    scale: unflat(o.scale, &shape, path)?,
                    offset: unflat(o.offset, &shape, path)?,
                    rounding: o.rounding,
                },
                shape,
                delta_log2: delta_log2(o.delta, path)?,
                base: o.base,
                range: Range::new(o.lo, o.hi.max(o.lo)),
                whole_torus: o.whole_torus,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let tail = graph_from_json(&p.tail_graph_json, "client tail")?;
    let tail_inputs = p
        .tail_inputs
        .into_iter()
        .map(|s| match s.source {
            Some(proto::tail_source::Source::ServerOutput(i)) if (i as usize) < outputs.len() => {
                Ok(TailSource::Server(i as usize))
            }
            Some(proto::tail_source::Source::ModelInput(i)) if (i as usize) < p.model_inputs.len() => {
                Ok(TailSource::Model(i as usize))
            }
            Some(proto::tail_source::Source::ServerDigits(d))
                if d.count >= 1
                    && d.count <= 1024
                    && d.shift.saturating_mul(d.count) <= 48
                    && d.rounding < 48
                    && (d.first as usize).saturating_add(d.count as usize) <= outputs.len() =>
            {
                Ok(TailSource::Digits {
                    first: d.first as usize,
                    count: d.count as usize,
                    shift: d.shift,
                    rounding: d.rounding,
                })
            }
            _ => Err(bad(path, "a client tail input refers to nothing")),
        })
        .collect::<Result<Vec<_>>>()?;
    for (k, i) in inputs.iter().enumerate() {
        let fits = i.model_input < p.model_inputs.len()
            && i.shape.iter().product::<usize>() == circuit.value_len[circuit.inputs[k]]
            && encodes(i.quant.range, i.base, i.delta_log2);
        if !fits {
            return Err(bad(path, format!("client input {k} does not fit the circuit (shape, range or encoding)")));
        }
    }
    for (k, o) in outputs.iter().enumerate() {
        let fits = o.shape.iter().product::<usize>() == circuit.value_len[circuit.outputs[k]]
            && if o.whole_torus {
                encodes_whole_torus(o.range, o.base, o.delta_log2, o.decode.rounding)
            } else {
                encodes(o.range, o.base, o.delta_log2)
            }
            && o.decode.rounding < 48
            && o.decode.scale.iter().chain(o.decode.offset.iter()).all(|v| v.is_finite());
        if !fits {
            return Err(bad(path, format!("client output {k} does not fit the circuit (shape, range or encoding)")));
        }
    }
    Ok(ClientSpec {
        inputs,
        derived,
        ggsw,
        outputs,
        tail,
        tail_inputs,
        model_inputs: p.model_inputs,
        model_outputs: p.model_outputs,
    })
}

/// Integers in `range`, shifted by `base` and scaled by 2^delta_log2, fit a 64-bit
/// plaintext with its top bit spare (what encoding and decoding assume), and span at
/// most 2^32 values.
/// An input's rank-encoding cuts, checked: one count per feature of a `[F]` sample, the
/// lists ascending, thresholds numbers, the range exactly the ranks `0..=max count`.
fn cuts_from_proto(i: &proto::Input, shape: &[usize]) -> std::result::Result<Option<Vec<Vec<Cut>>>, String> {
    if i.cut_count.is_empty() && i.cut_threshold.is_empty() && i.cut_inclusive.is_empty() {
        return Ok(None);
    }
    let total: u64 = i.cut_count.iter().map(|&c| c as u64).sum();
    let elements = if i.cut_unary { total } else { i.cut_count.len() as u64 };
    if shape.len() != 1
        || elements != shape[0] as u64
        || total != i.cut_threshold.len() as u64
        || total != i.cut_inclusive.len() as u64
    {
        return Err("its rank-encoding cuts do not match its features".into());
    }
    let mut at = 0;
    let mut cuts = Vec::with_capacity(shape[0]);
    for &count in &i.cut_count {
        let list: Vec<Cut> = (at..at + count as usize)
            .map(|k| Cut { threshold: i.cut_threshold[k], inclusive: i.cut_inclusive[k] })
            .collect();
        at += count as usize;
        if list.iter().any(|c| c.threshold.is_nan())
            || list.windows(2).any(|w| w[0].cmp_sets(&w[1]) != std::cmp::Ordering::Less)
        {
            return Err("its rank-encoding cuts are not ascending numbers".into());
        }
        cuts.push(list);
    }
    let max = if i.cut_unary { 1 } else { i.cut_count.iter().copied().max().unwrap_or(0) as i64 };
    if i.lo != 0 || i.hi != max {
        return Err(format!("the encoding spans 0..={max} but the input is declared {}..={}", i.lo, i.hi));
    }
    Ok(Some(cuts))
}

/// An exact output on the whole torus (see `lower::OutputEncoding::whole_torus`): its
/// range from the base, plus a read step of gap, fits 2^(64 − delta_log2).
fn encodes_whole_torus(range: Range, base: i64, delta_log2: u32, rounding: u32) -> bool {
    let (lo, hi) = (range.lo as i128 - base as i128, range.hi as i128 - base as i128);
    lo >= 0
        && lo <= hi
        && hi - lo < 1 << 32
        && (1..63).contains(&delta_log2)
        && rounding < 48
        && hi + (1i128 << rounding) < 1i128 << (64 - delta_log2)
}

fn encodes(range: Range, base: i64, delta_log2: u32) -> bool {
    let (lo, hi) = (range.lo as i128 - base as i128, range.hi as i128 - base as i128);
    range.lo <= range.hi
        && (range.hi as i128 - range.lo as i128) < 1 << 32
        && delta_log2 < 63
        && lo.abs().max(hi.abs()) < 1i128 << (63 - delta_log2)
}
