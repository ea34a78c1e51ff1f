//! Lowering: the quantized integer graph → a [`Circuit`] over LWE ciphertexts, the client's
//! encodings, and what the parameter optimizer must satisfy.
//!
//! Encodings. Values connected by linear maps (a *cluster*) share one scale `delta`, a
//! power of two, so integer combinations stay exact mod 2^64. A lookup reading a value at
//! `p` bits with `k` low bits dropped needs delta = 2^(63−p−k): slots 2^(63−p) apart with
//! one padding bit, and a rounded read's spare slot on each side (see
//! `veil_ir::tlu::lookup_precision`). A decrypted output needs its range below 2^63/delta.
//! A cluster takes the finest delta its readers need; a reader needing a coarser one
//! reads the value multiplied by a power of two. Each value also has a clear `base`
//! subtracted before encoding, so every message a bootstrap reads is non-negative.
//!
//! Every affine op (linear maps, sums, layout) is lowered the same way: probing it with
//! zero and unit inputs gives its exact matrix and constant.

use crate::circuit::{Circuit, Instruction, LinearInstr, LookupInstr};
use crate::error::{BackendError, Result};
use crate::params::{NoiseCoefs, Requirements};
use ndarray::{ArrayD, Axis, IxDyn};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use veil_ir::{Graph, NodeId, Op, Range, Tensor};
use veil_passes::bitwidth::entries;
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

/// How the client decodes one circuit output.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct OutputEncoding {
    pub name: String,
    pub decode: OutputDecode,
    pub shape: Vec<usize>,
    pub delta_log2: u32,
    pub base: i64,
    pub range: Range,
}

/// Everything the client needs: quantize and encode inputs; decrypt, decode and finish.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ClientSpec {
    pub inputs: Vec<InputEncoding>,
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

/// One output's terms: (operand, element, weight).
type Terms = Vec<(usize, usize, i64)>;

/// Largest probe matrix (inputs × outputs per sample) lowering builds for one op.
const MAX_PROBE: usize = 1 << 26;

fn err(g: &Graph, id: NodeId, msg: impl Into<String>) -> BackendError {
    let n = g.node(id);
    BackendError::Lower { node: format!("{} '{}'", n.op.mnemonic(), n.name), msg: msg.into() }
}

fn sample_len(g: &Graph, id: NodeId) -> usize {
    g.node(id).ty.shape.fixed_volume()
}

fn sample_dims(g: &Graph, id: NodeId) -> Vec<usize> {
    let s = &g.node(id).ty.shape;
    s.dims().iter().skip(1).map(|d| d.fixed().unwrap_or(1)).collect()
}

fn bits(span: i64) -> u32 {
    64 - (span.max(0) as u64).leading_zeros()
}

/// Disjoint-set over nodes.
struct Clusters(HashMap<NodeId, NodeId>);

impl Clusters {
    fn find(&mut self, x: NodeId) -> NodeId {
        let p = *self.0.entry(x).or_insert(x);
        if p == x {
            return x;
        }
        let r = self.find(p);
        self.0.insert(x, r);
        r
    }

    fn union(&mut self, a: NodeId, b: NodeId) {
        let (ra, rb) = (self.find(a), self.find(b));
        if ra != rb {
            self.0.insert(ra, rb);
        }
    }
}

/// How a lookup reads its input: bucket width 2^k, and the integer of slot 0.
struct Read {
    k: u32,
    /// slot s ↔ value base + s·2^k
    base: i64,
}

fn read_of(r: Range, rounding: u32) -> Read {
    if rounding == 0 {
        return Read { k: 0, base: r.lo };
    }
    let step = 1i64 << rounding;
    // one spare slot below the first bucket (see veil_ir::tlu::lookup_precision)
    let first = (r.lo + step / 2).div_euclid(step);
    Read { k: rounding, base: (first - 1) * step }
}

struct Lowerer<'a> {
    g: &'a Graph,
    p: u32,
    circuit: Circuit,
    /// Circuit value of each node.
    value: HashMap<NodeId, usize>,
    /// log2 delta of each cluster root.
    delta: HashMap<NodeId, u32>,
    clusters: Clusters,
    /// Integer subtracted before encoding each value.
    base: HashMap<usize, i64>,
    /// Copies made for lookups, by (value, bits dropped, base): lookups reading the same
    /// value the same way read one copy (and may share a bootstrap).
    copies: HashMap<(usize, u32, i64), usize>,
    /// Slots each lookup instruction's input can reach (spares included), by instruction.
    slots_used: HashMap<usize, usize>,
}

/// Lower a quantized model whose lookups read at most `precision` bits.
pub fn lower(model: &QuantizedModel, precision: u32) -> Result<Lowered> {
    let g = &model.graph;
    let order = g.topo_order().ok_or_else(|| BackendError::Lower { node: g.name.clone(), msg: "cycle".into() })?;
    let mut l = Lowerer {
        g,
        p: precision,
        circuit: Circuit {
            value_len: Vec::new(),
            inputs: Vec::new(),
            outputs: Vec::new(),
            instructions: Vec::new(),
            tables: Vec::new(),
            precision,
        },
        value: HashMap::new(),
        delta: HashMap::new(),
        clusters: Clusters(HashMap::new()),
        base: HashMap::new(),
        copies: HashMap::new(),
        slots_used: HashMap::new(),
    };
    l.cluster(&order);
    l.deltas(&order)?;
    for &id in &order {
        l.node(id)?;
    }
    l.share_bootstraps();
    let outputs: Vec<NodeId> = g.outputs().iter().map(|o| o.node).collect();
    let mut client_out = Vec::new();
    for (i, &o) in outputs.iter().enumerate() {
        let v = l.value[&o];
        l.circuit.outputs.push(v);
        let d = l.delta_of(o);
        client_out.push(OutputEncoding {
            name: g.outputs()[i].name.clone(),
            decode: model.decode[i].clone(),
            shape: sample_dims(g, o),
            delta_log2: d,
            base: l.base[&v],
            range: g.enc_range(o),
        });
    }
    let inputs = g
        .inputs()
        .iter()
        .enumerate()
        .map(|(i, &id)| InputEncoding {
            quant: model.inputs[i].clone(),
            shape: sample_dims(g, id),
            delta_log2: l.delta_of(id),
            base: l.base[&l.value[&id]],
            model_input: model.input_of[i],
        })
        .collect();
    let requirements = l.requirements(&client_out, precision);
    let client = ClientSpec {
        inputs,
        outputs: client_out,
        tail: model.tail.clone(),
        tail_inputs: model.tail_inputs.clone(),
        model_inputs: model.model_inputs.clone(),
        model_outputs: model.tail.outputs().iter().map(|o| o.name.clone()).collect(),
    };
    Ok(Lowered { circuit: l.circuit, client, requirements })
}

impl Lowerer<'_> {
    /// The range a node's value is encoded for: its own, or the compiled range an
    /// `assume` right after it declares (the assume reuses its ciphertexts).
    fn encoded_range(&self, id: NodeId) -> Range {
        let users = self.g.users(id);
        match users.as_slice() {
            [u] if matches!(self.g.node(*u).op, Op::Assume { .. }) => self.g.enc_range(*u),
            _ => self.g.enc_range(id),
        }
    }

    /// Values joined by linear maps share an encoding.
    fn cluster(&mut self, order: &[NodeId]) {
        for &id in order {
            self.clusters.find(id);
            let linear = !matches!(self.g.node(id).op, Op::Tlu(_) | Op::Input { .. });
            if linear {
                for o in self.g.operands(id) {
                    self.clusters.union(id, o);
                }
            }
        }
    }

    fn delta_of(&mut self, id: NodeId) -> u32 {
        let root = self.clusters.find(id);
        self.delta[&root]
    }

    /// Each cluster's delta: the finest any of its readers needs.
    fn deltas(&mut self, order: &[NodeId]) -> Result<()> {
        let mut need: HashMap<NodeId, u32> = HashMap::new();
        let mut want = |c: &mut Clusters, id: NodeId, log2: u32| {
            let root = c.find(id);
            let e = need.entry(root).or_insert(log2);
            *e = (*e).min(log2);
        };
        for &id in order {
            match &self.g.node(id).op {
                Op::Tlu(t) => {
                    let src = self.g.operands(id)[0];
                    want(&mut self.clusters, src, 63 - self.p - t.rounding);
                }
                Op::MaxEnc { rounding, .. } => want(&mut self.clusters, id, 63 - self.p - rounding),
                _ => {}
            }
        }
        for o in self.g.outputs() {
            let r = self.g.enc_range(o.node);
            let b = bits(r.hi - r.lo);
            if b > 62 {
                return Err(err(self.g, o.node, format!("output range {r} is too wide to decrypt")));
            }
            want(&mut self.clusters, o.node, 63 - b);
        }
        // A cluster nothing reads (all its values are dead) keeps a harmless default.
        for &id in order {
            let root = self.clusters.find(id);
            let d = need.get(&root).copied().unwrap_or(32);
            self.delta.insert(root, d);
        }
        Ok(())
    }

    fn new_value(&mut self, len: usize, base: i64) -> usize {
        self.circuit.value_len.push(len);
        let v = self.circuit.value_len.len() - 1;
        self.base.insert(v, base);
        v
    }

    fn node(&mut self, id: NodeId) -> Result<()> {
        let op = self.g.node(id).op.clone();
        let ops = self.g.operands(id);
        let v = match &op {
            Op::Input { .. } => {
                let v = self.new_value(sample_len(self.g, id), self.g.enc_range(id).lo);
                self.circuit.inputs.push(v);
                v
            }
            // A narrower compiled range changes no ciphertext.
            Op::Assume { .. } => self.value[&ops[0]],
            Op::Tlu(t) => self.lookup(id, ops[0], t)?,
            Op::MaxEnc { rounding, diff } => self.max(id, ops[0], ops[1], *rounding, *diff)?,
            Op::Linear(_)
            | Op::AddEnc
            | Op::SubEnc
            | Op::Reshape { .. }
            | Op::Transpose { .. }
            | Op::Gather { .. }
            | Op::Concat { .. }
            | Op::Pad { .. } => self.affine(id, &op, &ops)?,
            other => return Err(err(self.g, id, format!("{} cannot run on encrypted data", other.mnemonic()))),
        };
        self.value.insert(id, v);
        Ok(())
    }

    /// Probe an affine op: its matrix (per output, terms (operand, element, weight)) and
    /// its constant, per sample.
    fn probe(&self, id: NodeId, op: &Op, ops: &[NodeId]) -> Result<(Vec<Terms>, Vec<i64>)> {
        let out_len = sample_len(self.g, id);
        let eval = |args: Vec<ArrayD<i64>>| -> Result<ArrayD<i64>> {
            let ts: Vec<Tensor> = args.into_iter().map(Tensor::I64).collect();
            let refs: Vec<&Tensor> = ts.iter().collect();
            let t = veil_ir::interp::eval_op(op, &refs).map_err(|e| err(self.g, id, e))?;
            t.as_i64().cloned().ok_or_else(|| err(self.g, id, "not an integer op"))
        };
        let zeros = |o: NodeId, batch: usize| {
            let mut d = vec![batch];
            d.extend(sample_dims(self.g, o));
            ArrayD::<i64>::zeros(IxDyn(&d))
        };
        let base_out = eval(ops.iter().map(|&o| zeros(o, 1)).collect())?;
        let constant: Vec<i64> = base_out.iter().copied().collect();
        // rows[j] = terms (operand, element, weight) of output j
        let mut rows: Vec<Terms> = vec![Vec::new(); out_len];
        for (k, &o) in ops.iter().enumerate() {
            let n = sample_len(self.g, o);
            if n * out_len > MAX_PROBE {
                return Err(err(self.g, id, format!("a {n}×{out_len} map is too large to lower")));
            }
            let mut args: Vec<ArrayD<i64>> = ops.iter().map(|&x| zeros(x, n)).collect();
            for (e, mut row) in args[k].outer_iter_mut().enumerate() {
                row.as_slice_mut().expect("contiguous")[e] = 1;
            }
            let y = eval(args)?;
            for (e, row) in y.axis_iter(Axis(0)).enumerate() {
                for (j, (&v, &c)) in row.iter().zip(&constant).enumerate() {
                    if v != c {
                        rows[j].push((k, e, v - c));
                    }
                }
            }
        }
        Ok((rows, constant))
    }

    /// Lower an affine op: out_j = Σ w·in + f(0)_j, re-based.
    fn affine(&mut self, id: NodeId, op: &Op, ops: &[NodeId]) -> Result<usize> {
        let (rows, f0) = self.probe(id, op, ops)?;
        let d = self.delta_of(id);
        let inputs: Vec<usize> = ops.iter().map(|o| self.value[o]).collect();
        let base_out = self.encoded_range(id).lo;
        let out = self.new_value(rows.len(), base_out);
        let mut li = LinearInstr {
            output: out,
            inputs: inputs.clone(),
            row_start: vec![0],
            term_input: vec![],
            term_index: vec![],
            term_weight: vec![],
            constant: vec![],
        };
        for (j, terms) in rows.iter().enumerate() {
            // message_out = Σ w·(message_in + base_in) + f(0) − base_out
            let mut c = f0[j] as i128 - base_out as i128;
            for &(k, e, w) in terms {
                li.term_input.push(k as u32);
                li.term_index.push(e as u32);
                li.term_weight.push(w);
                c += w as i128 * self.base[&inputs[k]] as i128;
            }
            li.row_start.push(li.term_weight.len() as u32);
            li.constant.push(encode(c, d));
        }
        self.circuit.instructions.push(Instruction::Linear(li));
        Ok(out)
    }

    /// A copy of value `v` (cluster delta 2^d) ready for a lookup reading 2^(63−p−k)-wide
    /// slots from `read.base`: scaled by 2^(63−p−k−d) and re-based.
    fn read_copy(&mut self, v: usize, d: u32, read: &Read, combine: Option<(usize, i64)>) -> Result<usize> {
        let target = 63 - self.p - read.k;
        let j = target.checked_sub(d).ok_or_else(|| BackendError::Lower {
            node: format!("value {v}"),
            msg: "read is finer than its cluster".into(),
        })?;
        let scale = 1i64 << j;
        let n = self.circuit.value_len[v];
        let out = self.new_value(n, read.base);
        let mut li = LinearInstr {
            output: out,
            inputs: vec![v],
            row_start: vec![0],
            term_input: vec![],
            term_index: vec![],
            term_weight: vec![],
            constant: vec![],
        };
        if let Some((w, _)) = combine {
            li.inputs.push(w);
        }
        for e in 0..n {
            li.term_input.push(0);
            li.term_index.push(e as u32);
            li.term_weight.push(scale);
            // (x − read.base)·Δr = 2^j·(x − base_v)·Δ + (base_v − read.base)·Δr
            let mut c = self.base[&v] as i128 - read.base as i128;
            if let Some((_, wbase)) = combine {
                // a − b: subtract the second value too
                li.term_input.push(1);
                li.term_index.push(e as u32);
                li.term_weight.push(-scale);
                c -= wbase as i128;
            }
            li.row_start.push(li.term_weight.len() as u32);
            li.constant.push(encode(c, target));
        }
        self.circuit.instructions.push(Instruction::Linear(li));
        Ok(out)
    }

    fn lookup(&mut self, id: NodeId, src: NodeId, t: &veil_ir::Tlu) -> Result<usize> {
        let d_in = self.delta_of(src);
        let read = read_of(t.input, t.rounding);
        let key = (self.value[&src], read.k, read.base);
        let copy = match self.copies.get(&key) {
            Some(&c) => c,
            None => {
                let c = self.read_copy(self.value[&src], d_in, &read, None)?;
                self.copies.insert(key, c);
                c
            }
        };
        let d_out = self.delta_of(id);
        let base_out = self.encoded_range(id).lo;
        let n = sample_len(self.g, id);
        let params = t.element_params(&sample_dims(self.g, id)).map_err(|e| err(self.g, id, e))?;
        let slots = 1usize << self.p;
        let step = 1i64 << read.k;
        let mut groups: HashMap<Vec<u64>, u32> = HashMap::new();
        let mut table_of = Vec::with_capacity(n);
        for p in &params {
            let key: Vec<u64> = p.iter().map(|v| v.to_bits()).collect();
            let idx = match groups.get(&key) {
                Some(&i) => i,
                None => {
                    let table = (0..slots)
                        .map(|s| {
                            let v = (read.base + s as i64 * step).clamp(t.input.lo, t.input.hi);
                            encode(t.apply(v, p) as i128 - base_out as i128, d_out)
                        })
                        .collect();
                    self.circuit.tables.push(table);
                    let i = (self.circuit.tables.len() - 1) as u32;
                    groups.insert(key, i);
                    i
                }
            };
            table_of.push(idx);
        }
        let out = self.new_value(n, base_out);
        // a rounded read keeps a spare slot on each side (see `read_of`)
        let entries = entries(t.input, t.rounding) as usize;
        let used = if t.rounding == 0 { entries } else { entries + 2 };
        self.slots_used.insert(self.circuit.instructions.len(), used);
        self.circuit.instructions.push(Instruction::Lookup(LookupInstr {
            output: out,
            input: copy,
            table: table_of,
            second: None,
        }));
        Ok(out)
    }

    /// Pair lookups that read the same copy and reach only the lower half of the slots:
    /// one bootstrap serves both, the second function living in the tables' upper half.
    fn share_bootstraps(&mut self) {
        if self.p < 2 {
            return;
        }
        let half = 1usize << (self.p - 1);
        let fits = |i: usize, s: &HashMap<usize, usize>| s.get(&i).is_some_and(|&u| u <= half);
        let mut waiting: HashMap<usize, usize> = HashMap::new(); // input value → instruction
        let mut merged: Vec<(usize, usize)> = Vec::new();
        for (i, ins) in self.circuit.instructions.iter().enumerate() {
            let Instruction::Lookup(l) = ins else { continue };
            if !fits(i, &self.slots_used) {
                continue;
            }
            match waiting.remove(&l.input) {
                Some(first) => merged.push((first, i)),
                None => {
                    waiting.insert(l.input, i);
                }
            }
        }
        let mut combined: HashMap<(u32, u32), u32> = HashMap::new();
        for &(a, b) in &merged {
            let Instruction::Lookup(second) = self.circuit.instructions[b].clone() else { continue };
            let Instruction::Lookup(first) = &self.circuit.instructions[a] else { continue };
            let tables: Vec<u32> = first
                .table
                .iter()
                .zip(&second.table)
                .map(|(&f, &g)| {
                    *combined.entry((f, g)).or_insert_with(|| {
                        let (tf, tg) = (&self.circuit.tables[f as usize], &self.circuit.tables[g as usize]);
                        self.circuit.tables.push(tf[..half].iter().chain(&tg[..half]).copied().collect());
                        (self.circuit.tables.len() - 1) as u32
                    })
                })
                .collect();
            if let Instruction::Lookup(first) = &mut self.circuit.instructions[a] {
                first.table = tables;
                first.second = Some(second.output);
            }
        }
        // the second lookups now happen with the first ones (whose input is ready earlier)
        let gone: std::collections::HashSet<usize> = merged.iter().map(|&(_, b)| b).collect();
        let mut i = 0;
        self.circuit.instructions.retain(|_| {
            i += 1;
            !gone.contains(&(i - 1))
        });
    }

    /// max(a, b) = b + relu(a − b): one lookup on the difference, then a sum.
    fn max(&mut self, id: NodeId, a: NodeId, b: NodeId, rounding: u32, diff: Option<Range>) -> Result<usize> {
        let d = self.delta_of(id);
        let (ra, rb) = (self.g.enc_range(a), self.g.enc_range(b));
        let dr = diff.unwrap_or(ra.minus(&rb));
        let read = read_of(dr, rounding);
        let (va, vb) = (self.value[&a], self.value[&b]);
        let diff_v = self.read_copy(va, d, &read, Some((vb, self.base[&vb])))?;
        let slots = 1usize << self.p;
        let step = 1i64 << read.k;
        // the relu of each slot's difference (clamped to the compiled range, then rounded,
        // as the interpreter does), encoded with base 0 in the cluster's delta
        let table: Vec<u64> = (0..slots)
            .map(|s| {
                let v = (read.base + s as i64 * step).clamp(dr.lo, dr.hi);
                encode(veil_ir::interp::max_enc(v, 0, rounding, None) as i128, d)
            })
            .collect();
        self.circuit.tables.push(table);
        let t = (self.circuit.tables.len() - 1) as u32;
        let n = sample_len(self.g, id);
        let relu = self.new_value(n, 0);
        self.circuit.instructions.push(Instruction::Lookup(LookupInstr {
            output: relu,
            input: diff_v,
            table: vec![t; n],
            second: None,
        }));
        // out = b + relu, re-based to the output's range
        let base_out = self.encoded_range(id).lo;
        let out = self.new_value(n, base_out);
        let mut li = LinearInstr {
            output: out,
            inputs: vec![vb, relu],
            row_start: vec![0],
            term_input: vec![],
            term_index: vec![],
            term_weight: vec![],
            constant: vec![],
        };
        for e in 0..n {
            li.term_input.extend([0, 1]);
            li.term_index.extend([e as u32, e as u32]);
            li.term_weight.extend([1, 1]);
            li.row_start.push(li.term_weight.len() as u32);
            li.constant.push(encode(self.base[&vb] as i128 - base_out as i128, d));
        }
        self.circuit.instructions.push(Instruction::Linear(li));
        Ok(out)
    }

    /// What the parameters must satisfy: the noise at every lookup input, and exact
    /// decryption of every output.
    fn requirements(&self, outputs: &[OutputEncoding], precision: u32) -> Requirements {
        let coefs = self.circuit.noise_coefs();
        let mut lookup_noise: Vec<NoiseCoefs> = Vec::new();
        for ins in &self.circuit.instructions {
            if let Instruction::Lookup(l) = ins {
                for c in &coefs[l.input] {
                    // keep only inputs no other one dominates
                    if !lookup_noise.iter().any(|o| o.bootstrapped >= c.bootstrapped && o.fresh >= c.fresh) {
                        lookup_noise.retain(|o| !(c.bootstrapped >= o.bootstrapped && c.fresh >= o.fresh));
                        lookup_noise.push(*c);
                    }
                }
            }
        }
        let outs = outputs
            .iter()
            .zip(&self.circuit.outputs)
            .map(|(o, &v)| {
                let worst = coefs[v].iter().fold(NoiseCoefs::default(), |a, c| NoiseCoefs {
                    bootstrapped: a.bootstrapped.max(c.bootstrapped),
                    fresh: a.fresh.max(c.fresh),
                });
                // the client reads multiples of 2^rounding: noise must stay under half of that
                let half = 2f64.powi(o.delta_log2 as i32 + o.decode.rounding as i32 - 1 - 64);
                (worst, half)
            })
            .collect();
        Requirements {
            precision: if self.circuit.lookups_per_sample() > 0 { precision } else { 0 },
            lookups: self.circuit.lookups_per_sample(),
            lookup_noise,
            outputs: outs,
            p_error: 2f64.powi(-40),
        }
    }
}

/// The plaintext of integer message `m` at scale 2^delta_log2, mod 2^64.
pub fn encode(m: i128, delta_log2: u32) -> u64 {
    (m as u64).wrapping_mul(1u64 << delta_log2)
}

impl ClientSpec {
    /// Quantize and encode model inputs: plaintexts per circuit input, per sample.
    pub fn encode(&self, xs: &[Tensor]) -> Result<Vec<Vec<Vec<u64>>>> {
        self.inputs
            .iter()
            .map(|inp| {
                let x = xs
                    .get(inp.model_input)
                    .ok_or_else(|| BackendError::Lower { node: inp.quant.name.clone(), msg: "missing input".into() })?;
                let q = inp.quant.quantize(&x.to_f32())?;
                let per = inp.shape.iter().product::<usize>().max(1);
                Ok(q.as_slice()
                    .expect("standard layout")
                    .chunks(per)
                    .map(|row| row.iter().map(|&v| encode(v as i128 - inp.base as i128, inp.delta_log2)).collect())
                    .collect())
            })
            .collect()
    }

    /// Decode decrypted plaintexts (per output, per sample) to integers.
    pub fn decode_integers(&self, plain: &[Vec<Vec<u64>>]) -> Vec<Tensor> {
        self.outputs
            .iter()
            .zip(plain)
            .map(|(o, rows)| {
                let vals: Vec<i64> =
                    rows.iter().flat_map(|r| r.iter().map(|&m| decode_plain(m, o.delta_log2) + o.base)).collect();
                let mut shape = vec![rows.len()];
                shape.extend(&o.shape);
                Tensor::I64(ArrayD::from_shape_vec(shape, vals).expect("sizes match"))
            })
            .collect()
    }

    /// Decode integers and run the client tail: the model's outputs.
    pub fn finish(&self, integers: &[Tensor], xs: &[Tensor]) -> Result<Vec<Tensor>> {
        let mut tail_in = Vec::with_capacity(self.tail_inputs.len());
        let ints = |i: usize| integers[i].as_i64().expect("integers");
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

/// round(m / 2^delta_log2) with m read as signed (outputs keep their top bit clear, so a
/// small negative noise around 0 decodes to 0).
pub fn decode_plain(m: u64, delta_log2: u32) -> i64 {
    let half = if delta_log2 == 0 { 0 } else { 1i64 << (delta_log2 - 1) };
    (m as i64).wrapping_add(half) >> delta_log2
}
