//! A quantized model: the integer graph the server runs on encrypted data, and what the
//! client does around it (quantize inputs, decode outputs, finish in the clear).

use crate::error::{PassError, Result};
use ndarray::ArrayD;
use serde::{Deserialize, Serialize};
use veil_ir::{Graph, Range, Tensor};

/// How the client turns one model input into the integers it encrypts.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct InputQuant {
    pub name: String,
    /// Per element of a sample: real ≈ scale·v + offset.
    pub scale: ArrayD<f64>,
    pub offset: ArrayD<f64>,
    /// The integers' range, [0, 2^bits − 1].
    pub range: Range,
    /// Rank encoding (tree models): per feature of a `[batch, features]` input, the cut
    /// predicates its trees test, ascending; the client sends each feature's rank, the
    /// number of cuts that fail, instead of `scale`/`offset` quantization (see
    /// [`crate::trees`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cuts: Option<Vec<Vec<Cut>>>,
    /// With `cuts`: send every cut's bit (`[batch, Σ cuts]`, feature by feature, 1 when
    /// the cut holds) instead of each feature's rank.
    #[serde(default)]
    pub unary: bool,
}

/// One threshold test of a feature: `x ≤ threshold` (inclusive) or `x < threshold`.
/// Cuts order as the sets they accept: (t, <) ⊂ (t, ≤) ⊂ (t′, <) for t < t′, so over an
/// ascending list the cuts that hold at x are a suffix, and cut j holds iff rank(x) ≤ j.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Cut {
    pub threshold: f32,
    pub inclusive: bool,
}

impl Cut {
    pub fn holds(&self, x: f32) -> bool {
        if self.inclusive {
            x <= self.threshold
        } else {
            x < self.threshold
        }
    }

    /// Total order of the accepted sets (thresholds are never NaN).
    pub fn cmp_sets(&self, o: &Cut) -> std::cmp::Ordering {
        self.threshold.total_cmp(&o.threshold).then(self.inclusive.cmp(&o.inclusive))
    }
}

/// The rank of `x` among ascending `cuts`: how many fail at `x`.
pub fn rank(cuts: &[Cut], x: f32) -> i64 {
    cuts.partition_point(|c| !c.holds(x)) as i64
}

impl InputQuant {
    pub fn bits(&self) -> u32 {
        self.range.bits()
    }

    /// v = clamp(round((x − offset) / scale), lo, hi), element-wise over a batch.
    pub fn quantize(&self, x: &ArrayD<f32>) -> Result<ArrayD<i64>> {
        if let Some(cuts) = &self.cuts {
            return self.ranks(cuts, x);
        }
        let dims = x.shape().to_vec();
        let s = broadcast_sample(&self.scale, &dims, &self.name)?;
        let o = broadcast_sample(&self.offset, &dims, &self.name)?;
        let mut out = ArrayD::zeros(x.raw_dim());
        ndarray::Zip::from(&mut out).and(x).and(&s).and(&o).for_each(|q: &mut i64, &v, &s, &o| {
            *q = (((v as f64) - o) / s).round().clamp(self.range.lo as f64, self.range.hi as f64) as i64;
        });
        Ok(out)
    }
}

impl InputQuant {
    /// Rank-encode a `[batch, features]` batch (see [`InputQuant::cuts`]).
    fn ranks(&self, cuts: &[Vec<Cut>], x: &ArrayD<f32>) -> Result<ArrayD<i64>> {
        let err = |msg: String| PassError::Quantize { node: self.name.clone(), msg };
        if x.ndim() != 2 || x.shape()[1] != cuts.len() {
            return Err(err(format!("expects [batch, {}] features, got {:?}", cuts.len(), x.shape())));
        }
        let mut out = ArrayD::zeros(x.raw_dim());
        for ((idx, &v), o) in x.indexed_iter().zip(out.iter_mut()) {
            if v.is_nan() {
                let msg = format!(
                    "feature {} of sample {} is NaN: encrypted trees need every feature (impute missing values first)",
                    idx[1], idx[0]
                );
                return Err(err(msg));
            }
            *o = rank(&cuts[idx[1]], v);
        }
        if !self.unary {
            return Ok(out);
        }
        // cut j of a feature holds iff its rank ≤ j
        let total: usize = cuts.iter().map(|c| c.len()).sum();
        let mut bits = ndarray::Array2::<i64>::zeros((x.shape()[0], total));
        for (s, mut row) in bits.outer_iter_mut().enumerate() {
            let mut at = 0;
            for (f, c) in cuts.iter().enumerate() {
                let r = out[[s, f]];
                (0..c.len()).for_each(|j| row[at + j] = i64::from(r <= j as i64));
                at += c.len();
            }
        }
        Ok(bits.into_dyn())
    }
}

/// Input values beyond the range an input was calibrated for: they are clipped to it.
#[derive(Clone, Debug, PartialEq)]
pub struct InputClip {
    pub input: String,
    pub count: usize,
    /// Which samples (batch rows) had a clipped value.
    pub samples: Vec<usize>,
}

impl InputQuant {
    /// The values of a batch that quantization clips (beyond half a step outside the
    /// calibrated range), if any.
    pub fn clipped(&self, x: &ArrayD<f32>) -> Result<Option<InputClip>> {
        if self.cuts.is_some() {
            return Ok(None); // a rank covers every value
        }
        let dims = x.shape().to_vec();
        let s = broadcast_sample(&self.scale, &dims, &self.name)?;
        let o = broadcast_sample(&self.offset, &dims, &self.name)?;
        let per = x.len() / dims.first().copied().unwrap_or(1).max(1);
        let (lo, hi) = (self.range.lo as f64 - 0.5, self.range.hi as f64 + 0.5);
        let mut clip = InputClip { input: self.name.clone(), count: 0, samples: Vec::new() };
        for (i, ((&v, &s), &o)) in x.iter().zip(s.iter()).zip(o.iter()).enumerate() {
            let q = (v as f64 - o) / s;
            if q < lo || q > hi {
                clip.count += 1;
                if clip.samples.last() != Some(&(i / per.max(1))) {
                    clip.samples.push(i / per.max(1));
                }
            }
        }
        Ok((clip.count > 0).then_some(clip))
    }
}

/// Bits spanned by a range.
pub fn bits_of(r: Range) -> u32 {
    64 - ((r.hi - r.lo).max(0) as u64).leading_zeros()
}

/// How the client decodes one server output: real = scale·v + offset, after reading the
/// decrypted integer to a multiple of 2^rounding.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct OutputDecode {
    pub scale: ArrayD<f64>,
    pub offset: ArrayD<f64>,
    pub rounding: u32,
}

impl OutputDecode {
    /// The integer the client reads: rounded (half up) to a multiple of 2^rounding.
    pub fn read(&self, v: i64) -> i64 {
        if self.rounding == 0 {
            return v;
        }
        let step = 1i64 << self.rounding.min(62);
        v.saturating_add(step / 2).div_euclid(step).saturating_mul(step)
    }

    pub fn decode(&self, v: &ArrayD<i64>, what: &str) -> Result<ArrayD<f32>> {
        let dims = v.shape().to_vec();
        let s = broadcast_sample(&self.scale, &dims, what)?;
        let o = broadcast_sample(&self.offset, &dims, what)?;
        let mut out = ArrayD::zeros(v.raw_dim());
        ndarray::Zip::from(&mut out).and(v).and(&s).and(&o).for_each(|y: &mut f32, &q, &s, &o| {
            *y = (s * self.read(q) as f64 + o) as f32;
        });
        Ok(out)
    }
}

/// Recombine an output sent as digits: Σ_j 2^(shift·j) · (digit j as its decode reads
/// it), read to a multiple of 2^rounding, decoded with the first digit's scale and offset.
pub fn combine_digits(
    parts: &[(&ArrayD<i64>, &OutputDecode)],
    shift: u32,
    rounding: u32,
    what: &str,
) -> Result<ArrayD<f32>> {
    let Some(&(first, d0)) = parts.first() else {
        return Err(PassError::Quantize { node: what.into(), msg: "an output with no digits".into() });
    };
    let mut sum = first.mapv(|v| d0.read(v));
    for (j, &(v, d)) in parts.iter().enumerate().skip(1) {
        if v.shape() != sum.shape() {
            return Err(PassError::Quantize { node: what.into(), msg: format!("digit {j} has another shape") });
        }
        let weight = 1i64.checked_shl(shift * j as u32).unwrap_or(0);
        ndarray::Zip::from(&mut sum).and(v).for_each(|s, &x| *s = s.saturating_add(d.read(x).saturating_mul(weight)));
    }
    OutputDecode { scale: d0.scale.clone(), offset: d0.offset.clone(), rounding }.decode(&sum, what)
}

/// Broadcast per-sample parameters over a batched tensor shape.
fn broadcast_sample(p: &ArrayD<f64>, dims: &[usize], what: &str) -> Result<ArrayD<f64>> {
    p.broadcast(dims.to_vec()).map(|v| v.to_owned()).ok_or_else(|| PassError::Quantize {
        node: what.into(),
        msg: format!(
            "takes samples of shape {:?}, got {:?} (a batch of {:?})",
            p.shape(),
            dims.get(1..).unwrap_or_default(),
            dims
        ),
    })
}

/// Where a tail input comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum TailSource {
    /// The decoded `i`-th output of the server graph.
    Server(usize),
    /// The `i`-th model input, which the client holds in the clear.
    Model(usize),
    /// One wide output sent as digits (see [`crate::digits`]): server outputs
    /// `first..first + count`, digit j weighing 2^(shift·j), recombined and read to a
    /// multiple of 2^rounding, then decoded with the first digit's scale and offset.
    Digits { first: usize, count: usize, shift: u32, rounding: u32 },
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct QuantizedModel {
    pub name: String,
    /// The integer graph run on encrypted data. Its inputs are the quantized model inputs
    /// listed in `inputs`; its outputs are decoded by `decode`.
    pub graph: Graph,
    pub inputs: Vec<InputQuant>,
    /// For each server-graph input, which model input it quantizes.
    pub input_of: Vec<usize>,
    pub decode: Vec<OutputDecode>,
    /// The float computation the client finishes after decryption (e.g. sigmoid, argmax).
    pub tail: Graph,
    pub tail_inputs: Vec<TailSource>,
    /// The float model's input names.
    pub model_inputs: Vec<String>,
}

impl QuantizedModel {
    /// Quantize float model inputs into the server graph's integer inputs.
    pub fn encode_inputs(&self, xs: &[Tensor]) -> Result<Vec<Tensor>> {
        if xs.len() != self.model_inputs.len() {
            return Err(PassError::Quantize {
                node: self.name.clone(),
                msg: format!("the model takes {} input(s), got {}", self.model_inputs.len(), xs.len()),
            });
        }
        self.input_of
            .iter()
            .zip(&self.inputs)
            .map(|(&m, q)| {
                let x = xs[m].to_f32();
                Ok(Tensor::I64(q.quantize(&x)?))
            })
            .collect()
    }

    /// Decode server outputs and run the client tail: the model's outputs.
    pub fn decode_outputs(&self, server: &[Tensor], xs: &[Tensor]) -> Result<Vec<Tensor>> {
        let mut tail_in = Vec::with_capacity(self.tail_inputs.len());
        let ints = |i: usize| -> Result<&ArrayD<i64>> {
            server[i].as_i64().ok_or_else(|| PassError::Quantize {
                node: self.name.clone(),
                msg: format!("server output {i} is not an integer tensor"),
            })
        };
        for src in &self.tail_inputs {
            tail_in.push(match *src {
                TailSource::Server(i) => Tensor::F32(self.decode[i].decode(ints(i)?, &format!("server output {i}"))?),
                TailSource::Model(i) => xs[i].clone(),
                TailSource::Digits { first, count, shift, rounding } => {
                    let parts =
                        (first..first + count).map(|i| Ok((ints(i)?, &self.decode[i]))).collect::<Result<Vec<_>>>()?;
                    Tensor::F32(combine_digits(&parts, shift, rounding, &format!("server output {first}"))?)
                }
            });
        }
        Ok(veil_ir::interp::run(&self.tail, &tail_in)?)
    }

    /// Run in the clear with exactly the circuit's integer semantics.
    pub fn run_clear(&self, xs: &[Tensor]) -> Result<Vec<Tensor>> {
        Ok(self.run_clear_checked(xs)?.0)
    }

    /// Run as the encrypted circuit behaves: rounded lookups read their inputs with the
    /// noise a bootstrap sees (`slot_std` slots), so approximate rounding sometimes goes
    /// the other way, as it does encrypted.
    pub fn run_noisy(&self, xs: &[Tensor], slot_std: f64, seed: u64) -> Result<Vec<Tensor>> {
        let enc = self.encode_inputs(xs)?;
        let server = veil_ir::interp::run_noisy(&self.graph, &enc, slot_std, seed)?;
        self.decode_outputs(&server, xs)
    }

    /// As [`QuantizedModel::run_clear`], also reporting values beyond the compiled ranges
    /// (where the encrypted circuit would overflow, or a lookup saturates).
    pub fn run_clear_checked(&self, xs: &[Tensor]) -> Result<(Vec<Tensor>, Vec<veil_ir::interp::Overflow>)> {
        let enc = self.encode_inputs(xs)?;
        let (server, overflows) = veil_ir::interp::run_checked(&self.graph, &enc)?;
        Ok((self.decode_outputs(&server, xs)?, overflows))
    }

    /// Inputs whose values lie beyond the calibrated ranges (quantization clips them).
    pub fn input_clips(&self, xs: &[Tensor]) -> Result<Vec<InputClip>> {
        let mut out = Vec::new();
        for (q, &m) in self.inputs.iter().zip(&self.input_of) {
            if let Some(x) = xs.get(m) {
                out.extend(q.clipped(&x.to_f32())?);
            }
        }
        Ok(out)
    }
}
