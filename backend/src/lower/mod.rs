//! Lowering: the quantized integer graph → a [`Circuit`] over LWE ciphertexts, the client's
//! encodings, and what the parameter optimizer must satisfy.
//!
//! Encodings. Every encrypted value v travels as the plaintext (v − base)·delta mod 2^64,
//! with delta = 2^d a power of two chosen per value ([`deltas`]): a lookup reading a
//! value at `p` bits with `k` low bits dropped needs d = 63 − p − k (slots 2^(63−p) apart
//! with one padding bit); a decrypted output needs its range below 2^(63−d); an affine
//! op's operand may sit at a coarser scale than its result when its weights are even
//! (2^j·w on a value at d + j is the weight w on the same ciphertext). A reader needing a
//! coarser scale than its value has reads a copy multiplied by a power of two. The clear
//! `base` makes every message a bootstrap reads non-negative.
//!
//! Every affine op (linear maps, sums, layout) is lowered the same way: probing it with
//! zero and unit inputs gives its exact matrix and constant. Products of two encrypted
//! matrices become lookups of squares ([`products`]).

mod deltas;
mod emit;
mod keys;
pub use emit::sample_dims;
mod products;
#[cfg(test)]
mod tests;

use crate::circuit::Circuit;
use crate::error::{BackendError, Result};
use crate::params::Requirements;
use ndarray::ArrayD;
use serde::{Deserialize, Serialize};
use veil_ir::{Graph, NodeId, Range, Tensor};
use veil_passes::model::{combine_digits, InputQuant, OutputDecode, QuantizedModel, TailSource};

/// How the client encodes one model input.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct InputEncoding {
    pub quant: InputQuant,
    /// Per-sample shape.
    pub shape: Vec<usize>,
    pub delta_log2: u32,
    pub base: i64,
    pub model_input: usize,
}

/// A circuit input the client computes from another one's integers: for each element,
/// the sum of the squares of the listed elements of input `from` (see [`products`]).
/// Encoded like any input, as (v − base)·2^delta_log2.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DerivedInput {
    /// Which circuit input (position among the graph's inputs) the squares come from.
    pub from: usize,
    /// Per element of this input: the elements of `from`, per sample, whose squares it sums.
    pub groups: Vec<Vec<u32>>,
    pub delta_log2: u32,
    pub base: i64,
}

impl DerivedInput {
    /// The integers of this input for a batch of `from`'s integers `[samples, ...]`.
    pub fn compute(&self, from: &ArrayD<i64>) -> Result<Vec<Vec<i64>>> {
        let samples = from.shape().first().copied().unwrap_or(0);
        let per = from.len() / samples.max(1);
        let flat = from.as_standard_layout();
        let flat = flat.as_slice().expect("standard layout");
        (0..samples)
            .map(|s| {
                let row = &flat[s * per..(s + 1) * per];
                self.groups
                    .iter()
                    .map(|g| {
                        g.iter().map(|&e| row.get(e as usize).map(|v| v * v)).sum::<Option<i64>>().ok_or_else(|| {
                            BackendError::Lower {
                                node: format!("derived input from input {}", self.from),
                                msg: format!("an element index is beyond the {per} elements of a sample"),
                            }
                        })
                    })
                    .collect()
            })
            .collect()
    }
}

/// A circuit input the client encrypts as GGSW ciphertexts: per polynomial, the
/// (element of input `from`, exponent) pairs whose integers are its coefficients (see
/// [`products`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GgswInput {
    pub from: usize,
    pub polys: Vec<Vec<(u32, u32)>>,
}

impl GgswInput {
    /// Coefficients 0..span hold every entry.
    pub fn span(&self) -> usize {
        self.polys.iter().flatten().map(|&(_, x)| x as usize + 1).max().unwrap_or(0)
    }

    /// Per sample, the polynomials' coefficients 0..span back to back (signed integers as
    /// u64), from `from`'s integers `[samples, ...]`: what the client encrypts, and what
    /// the plaintext simulation multiplies by.
    pub fn compute(&self, from: &ArrayD<i64>) -> Result<Vec<Vec<u64>>> {
        let samples = from.shape().first().copied().unwrap_or(0);
        let per = from.len() / samples.max(1);
        let flat = from.as_standard_layout();
        let flat = flat.as_slice().expect("standard layout");
        let span = self.span();
        (0..samples)
            .map(|s| {
                let row = &flat[s * per..(s + 1) * per];
                let mut out = vec![0u64; self.polys.len() * span];
                for (k, poly) in self.polys.iter().enumerate() {
                    for &(e, x) in poly {
                        let v = row.get(e as usize).ok_or_else(|| BackendError::Lower {
                            node: format!("GGSW input from input {}", self.from),
                            msg: format!("an element index is beyond the {per} elements of a sample"),
                        })?;
                        out[k * span + x as usize] = *v as u64;
                    }
                }
                Ok(out)
            })
            .collect()
    }
}

/// How the client decodes one circuit output.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct OutputEncoding {
    pub name: String,
    pub decode: OutputDecode,
    pub shape: Vec<usize>,
    pub delta_log2: u32,
    pub base: i64,
    pub range: Range,
    /// An exact output (tree scores) on the whole torus, decoded around the middle of the
    /// gap above its range (see `deltas`); otherwise below the padding bit, decoded signed.
    #[serde(default)]
    pub whole_torus: bool,
}

/// Everything the client needs: quantize and encode inputs; decrypt, decode and finish.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ClientSpec {
    pub inputs: Vec<InputEncoding>,
    /// Circuit inputs after `inputs`, computed by the client from them.
    #[serde(default)]
    pub derived: Vec<DerivedInput>,
    /// Circuit inputs after `derived`, encrypted as GGSW ciphertexts.
    #[serde(default)]
    pub ggsw: Vec<GgswInput>,
    pub outputs: Vec<OutputEncoding>,
    pub tail: Graph,
    pub tail_inputs: Vec<TailSource>,
    pub model_inputs: Vec<String>,
    pub model_outputs: Vec<String>,
}

/// The lowered circuit with its client side and parameter requirements.
pub struct Lowered {
    pub circuit: Circuit,
    pub client: ClientSpec,
    pub requirements: Requirements,
}

/// One encrypted value's encoding: plaintext = (v − base)·2^delta_log2.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Encoding {
    pub delta_log2: u32,
    pub base: i64,
}

/// A graph lowered on its own, without a model around it: the circuit, the encoding of
/// every graph input and output, and the inputs the client derives.
pub struct LoweredGraph {
    pub circuit: Circuit,
    pub inputs: Vec<Encoding>,
    pub derived: Vec<DerivedInput>,
    pub ggsw: Vec<GgswInput>,
    pub outputs: Vec<Encoding>,
    pub requirements: Requirements,
    /// Bootstraps per sample each graph node lowered to.
    pub node_lookups: std::collections::HashMap<NodeId, usize>,
}

impl LoweredGraph {
    /// Plaintexts `[circuit input][sample][element]` for the integers of every graph input
    /// (each `[samples, ...]`), derived inputs included.
    pub fn encode_integers(&self, ints: &[ArrayD<i64>]) -> Result<Vec<Vec<Vec<u64>>>> {
        encode_all(&self.inputs, &self.derived, &self.ggsw, ints)
    }
}

/// Lower a graph whose lookups read at most `precision` bits. `state` pairs graph inputs
/// with graph outputs (by position) that must be encoded identically, so that the output
/// of one run can be the input of the next.
pub fn lower_graph(g: &Graph, precision: u32, state: &[(usize, usize)]) -> Result<LoweredGraph> {
    emit::lower_partitioned(g, &|_| 0, &[precision], state, false, &[])
}

/// [`lower_graph`] with products whose operand is a client input computed as external
/// products with the client's GGSW encryptions of that input ([`products`]).
pub fn lower_graph_external(g: &Graph, precision: u32, state: &[(usize, usize)]) -> Result<LoweredGraph> {
    emit::lower_partitioned(g, &|_| 0, &[precision], state, true, &[])
}

/// [`lower_graph`] with each lookup node in partition `part_of(node)`, read at
/// `precisions[partition]` bits (see [`crate::partitions`]).
pub fn lower_graph_partitioned(
    g: &Graph,
    part_of: &dyn Fn(NodeId) -> usize,
    precisions: &[u32],
    state: &[(usize, usize)],
) -> Result<LoweredGraph> {
    emit::lower_partitioned(g, part_of, precisions, state, false, &[])
}

/// Lower a quantized model whose lookups read at most `precision` bits.
pub fn lower(model: &QuantizedModel, precision: u32) -> Result<Lowered> {
    lower_partitioned(model, &|_| 0, &[precision])
}

/// Lower a quantized model with each lookup node in partition `part_of(node)`, read at
/// `precisions[partition]` bits (see [`crate::partitions`]). Errors when a linear map
/// would mix values of two partitions.
pub fn lower_partitioned(
    model: &QuantizedModel,
    part_of: &dyn Fn(NodeId) -> usize,
    precisions: &[u32],
) -> Result<Lowered> {
    let g = &model.graph;
    let rounding: Vec<u32> = model.decode.iter().map(|d| d.rounding).collect();
    let low = emit::lower_partitioned(g, part_of, precisions, &[], false, &rounding)?;
    let inputs = g
        .inputs()
        .iter()
        .enumerate()
        .map(|(i, &id)| InputEncoding {
            quant: model.inputs[i].clone(),
            shape: emit::sample_dims(g, id),
            delta_log2: low.inputs[i].delta_log2,
            base: low.inputs[i].base,
            model_input: model.input_of[i],
        })
        .collect();
    let outputs = g
        .outputs()
        .iter()
        .enumerate()
        .map(|(i, o)| OutputEncoding {
            name: o.name.clone(),
            decode: model.decode[i].clone(),
            shape: emit::sample_dims(g, o.node),
            delta_log2: low.outputs[i].delta_log2,
            base: low.outputs[i].base,
            range: g.enc_range(o.node),
            whole_torus: deltas::exact_output(g, o.node),
        })
        .collect::<Vec<_>>();
    let mut requirements = low.requirements;
    // the client reads outputs to a multiple of 2^rounding: noise must stay under half of that
    for (req, o) in requirements.outputs.iter_mut().zip(&outputs) {
        req.1 = 2f64.powi(o.delta_log2 as i32 + o.decode.rounding as i32 - 1 - 64);
    }
    let client = ClientSpec {
        inputs,
        derived: low.derived,
        ggsw: low.ggsw,
        outputs,
        tail: model.tail.clone(),
        tail_inputs: model.tail_inputs.clone(),
        model_inputs: model.model_inputs.clone(),
        model_outputs: model.tail.outputs().iter().map(|o| o.name.clone()).collect(),
    };
    Ok(Lowered { circuit: low.circuit, client, requirements })
}

/// The plaintext of integer message `m` at scale 2^delta_log2, mod 2^64.
pub fn encode(m: i128, delta_log2: u32) -> u64 {
    (m as u64).wrapping_mul(1u64 << delta_log2)
}

/// Plaintexts of graph inputs given as integers, then of the inputs derived from them,
/// then the GGSW inputs' polynomial coefficients.
fn encode_all(
    inputs: &[Encoding],
    derived: &[DerivedInput],
    ggsw: &[GgswInput],
    ints: &[ArrayD<i64>],
) -> Result<Vec<Vec<Vec<u64>>>> {
    let rows = |a: &ArrayD<i64>, e: &Encoding| -> Vec<Vec<u64>> {
        let samples = a.shape().first().copied().unwrap_or(0);
        let per = a.len() / samples.max(1);
        let a = a.as_standard_layout();
        let flat = a.as_slice().expect("standard layout");
        flat.chunks(per.max(1))
            .map(|row| row.iter().map(|&v| encode(v as i128 - e.base as i128, e.delta_log2)).collect())
            .collect()
    };
    if ints.len() != inputs.len() {
        return Err(BackendError::Lower {
            node: "inputs".into(),
            msg: format!("{} integer inputs for {} circuit inputs", ints.len(), inputs.len()),
        });
    }
    let mut out: Vec<Vec<Vec<u64>>> = ints.iter().zip(inputs).map(|(a, e)| rows(a, e)).collect();
    for d in derived {
        let src = ints.get(d.from).ok_or_else(|| BackendError::Lower {
            node: "derived input".into(),
            msg: format!("derived from input {}, which does not exist", d.from),
        })?;
        let vals = d.compute(src)?;
        out.push(
            vals.iter()
                .map(|row| row.iter().map(|&v| encode(v as i128 - d.base as i128, d.delta_log2)).collect())
                .collect(),
        );
    }
    for g in ggsw {
        let src = ints.get(g.from).ok_or_else(|| BackendError::Lower {
            node: "GGSW input".into(),
            msg: format!("built from input {}, which does not exist", g.from),
        })?;
        out.push(g.compute(src)?);
    }
    Ok(out)
}

impl ClientSpec {
    /// Quantize and encode model inputs: plaintexts per circuit input, per sample.
    pub fn encode(&self, xs: &[Tensor]) -> Result<Vec<Vec<Vec<u64>>>> {
        let ints = self
            .inputs
            .iter()
            .map(|inp| {
                let x = xs
                    .get(inp.model_input)
                    .ok_or_else(|| BackendError::Lower { node: inp.quant.name.clone(), msg: "missing input".into() })?;
                Ok(inp.quant.quantize(&x.to_f32())?)
            })
            .collect::<Result<Vec<_>>>()?;
        let encodings: Vec<Encoding> =
            self.inputs.iter().map(|i| Encoding { delta_log2: i.delta_log2, base: i.base }).collect();
        encode_all(&encodings, &self.derived, &self.ggsw, &ints)
    }

    /// Encode integers already quantized, one per input `[samples, ...]`: plaintexts per
    /// circuit input (derived inputs included), per sample.
    pub fn encode_integers(&self, ints: &[ArrayD<i64>]) -> Result<Vec<Vec<Vec<u64>>>> {
        let encodings: Vec<Encoding> =
            self.inputs.iter().map(|i| Encoding { delta_log2: i.delta_log2, base: i.base }).collect();
        encode_all(&encodings, &self.derived, &self.ggsw, ints)
    }

    /// Decode decrypted plaintexts (per output, per sample) to integers; `Err` when they
    /// are not one list per output of its element count.
    pub fn decode_integers(&self, plain: &[Vec<Vec<u64>>]) -> Result<Vec<Tensor>> {
        if plain.len() != self.outputs.len() {
            return Err(BackendError::Lower {
                node: "outputs".into(),
                msg: format!("{} encrypted outputs, the model has {}", plain.len(), self.outputs.len()),
            });
        }
        self.outputs
            .iter()
            .zip(plain)
            .map(|(o, rows)| {
                let per: usize = o.shape.iter().product();
                if let Some(r) = rows.iter().find(|r| r.len() != per) {
                    return Err(BackendError::Lower {
                        node: o.name.clone(),
                        msg: format!("{} elements per sample, the model's output has {per}", r.len()),
                    });
                }
                Ok(Tensor::I64(o.decode_rows(rows)))
            })
            .collect()
    }

    /// Decode integers and run the client tail: the model's outputs.
    pub fn finish(&self, integers: &[Tensor], xs: &[Tensor]) -> Result<Vec<Tensor>> {
        let mut tail_in = Vec::with_capacity(self.tail_inputs.len());
        if integers.len() != self.outputs.len() || integers.iter().any(|t| t.as_i64().is_none()) {
            return Err(BackendError::Lower {
                node: "outputs".into(),
                msg: format!("{} integer outputs expected, got {}", self.outputs.len(), integers.len()),
            });
        }
        let ints = |i: usize| integers[i].as_i64().expect("checked above");
        for src in &self.tail_inputs {
            tail_in.push(match *src {
                TailSource::Server(i) => Tensor::F32(self.outputs[i].decode.decode(ints(i), &self.outputs[i].name)?),
                TailSource::Model(i) => xs[i].clone(),
                TailSource::Digits { first, count, shift, rounding } => {
                    let parts: Vec<_> = (first..first + count).map(|i| (ints(i), &self.outputs[i].decode)).collect();
                    Tensor::F32(combine_digits(&parts, shift, rounding, &self.outputs[first].name)?)
                }
            });
        }
        Ok(veil_ir::interp::run(&self.tail, &tail_in)?)
    }
}

/// Integers `[samples, shape...]` from decrypted plaintexts per sample.
/// Outputs below the padding bit only (an exact output on the whole torus decodes with
/// [`OutputEncoding::decode_rows`]).
pub fn decode_rows(rows: &[Vec<u64>], delta_log2: u32, base: i64, shape: &[usize]) -> ArrayD<i64> {
    decode_each(rows, shape, |m| decode_plain(m, delta_log2).saturating_add(base))
}

fn decode_each(rows: &[Vec<u64>], shape: &[usize], f: impl Fn(u64) -> i64) -> ArrayD<i64> {
    let vals: Vec<i64> = rows.iter().flat_map(|r| r.iter().map(|&m| f(m))).collect();
    let mut dims = vec![rows.len()];
    dims.extend(shape);
    ArrayD::from_shape_vec(dims, vals).expect("sizes match")
}

impl OutputEncoding {
    /// Integers `[samples, shape...]` from this output's decrypted plaintexts per sample.
    /// A whole-torus output's value u = round(m / 2^d) mod 2^(64−d) is read as u, or as
    /// u − 2^(64−d) when it lies past the middle of the gap above its range (noise took it
    /// below its base). Values that do not fit an i64 saturate (a crafted file only).
    pub fn decode_rows(&self, rows: &[Vec<u64>]) -> ArrayD<i64> {
        if !self.whole_torus {
            return decode_rows(rows, self.delta_log2, self.base, &self.shape);
        }
        let d = self.delta_log2.min(63);
        let half = if d == 0 { 0 } else { 1u64 << (d - 1) };
        let modulus = 1i128 << (64 - d);
        let span = self.range.hi as i128 - self.base as i128;
        let wrap = span + (modulus - span) / 2;
        decode_each(rows, &self.shape, |m| {
            let u = (m.wrapping_add(half) >> d) as i128;
            let v = if u > wrap { u - modulus } else { u };
            (v + self.base as i128).clamp(i64::MIN as i128, i64::MAX as i128) as i64
        })
    }
}

/// round(m / 2^delta_log2) with m read as signed (outputs keep their top bit clear, so a
/// small negative noise around 0 decodes to 0).
pub fn decode_plain(m: u64, delta_log2: u32) -> i64 {
    let half = if delta_log2 == 0 { 0 } else { 1i64 << (delta_log2 - 1) };
    (m as i64).wrapping_add(half) >> delta_log2
}

fn err(g: &Graph, id: NodeId, msg: impl Into<String>) -> BackendError {
    let n = g.node(id);
    BackendError::Lower { node: format!("{} '{}'", n.op.mnemonic(), n.name), msg: msg.into() }
}
