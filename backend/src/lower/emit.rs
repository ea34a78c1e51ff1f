//! Emitting the circuit node by node: affine maps, read copies, lookups, maxima,
//! saturations (products are in `products`), then bootstrap sharing and requirements.

use super::deltas::{self, Demand};
use super::{encode, err, DerivedInput, Encoding, LoweredGraph};
use crate::circuit::{Circuit, Instruction, LinearInstr, LookupInstr};
use crate::error::{BackendError, Result};
use crate::params::{NoiseCoefs, PartitionRequirements, Requirements};
use ndarray::{ArrayD, Axis, IxDyn};
use std::collections::HashMap;
use veil_ir::{Graph, NodeId, Op, Range, Tensor};
use veil_passes::bitwidth::entries;

/// One output's terms: (operand, element, weight).
pub(super) type Terms = Vec<(usize, usize, i64)>;

/// An affine op as probed: per output element its terms, and its value at zero.
pub(super) struct Probe {
    rows: Vec<Terms>,
    constant: Vec<i64>,
}

/// Largest probe matrix (inputs × outputs per sample) lowering builds for one op.
const MAX_PROBE: usize = 1 << 26;

pub(super) fn sample_len(g: &Graph, id: NodeId) -> usize {
    g.node(id).ty.shape.fixed_volume()
}

/// Per-sample dimensions of a node's value (the batch axis dropped).
pub fn sample_dims(g: &Graph, id: NodeId) -> Vec<usize> {
    let s = &g.node(id).ty.shape;
    s.dims().iter().skip(1).map(|d| d.fixed().unwrap_or(1)).collect()
}

/// How a lookup reads its input: bucket width 2^k, and the integer of slot 0.
pub(super) struct Read {
    pub k: u32,
    /// slot s ↔ value base + s·2^k
    pub base: i64,
}

/// The read of a range with `rounding` low bits dropped. A rounded read keeps a spare slot
/// on each side (see `veil_ir::tlu::lookup_precision`); an exact read gets them too when
/// `spare_if_fits` and they fit in `slots`, so that noise at an extreme value reads a
/// neighbour rather than wrapping through the padding bit.
pub(super) fn read_of(r: Range, rounding: u32, slots: u64, spare_if_fits: bool) -> Read {
    if rounding == 0 {
        let spare = spare_if_fits && entries(r, 0) + 2 <= slots;
        return Read { k: 0, base: r.lo - spare as i64 };
    }
    let step = 1i64 << rounding;
    let first = (r.lo + step / 2).div_euclid(step);
    Read { k: rounding, base: (first - 1) * step }
}

/// Is node `id` an affine op (lowered by probing)?
fn is_affine(op: &Op) -> bool {
    matches!(
        op,
        Op::Linear(_)
            | Op::AddEnc
            | Op::SubEnc
            | Op::Reshape { .. }
            | Op::Transpose { .. }
            | Op::Gather { .. }
            | Op::Concat { .. }
            | Op::Pad { .. }
    )
}

pub(super) struct Emitter<'a> {
    pub g: &'a Graph,
    /// Precision of the partition of the node being emitted.
    pub p: u32,
    /// The partition of the node being emitted.
    part: usize,
    /// Table precision of each partition.
    precisions: Vec<u32>,
    /// The partition of each lookup node.
    part_of: &'a dyn Fn(NodeId) -> usize,
    pub circuit: Circuit,
    /// Circuit value of each node.
    pub value: HashMap<NodeId, usize>,
    /// log2 delta of each node's value.
    pub d: HashMap<NodeId, u32>,
    probes: HashMap<NodeId, Probe>,
    /// Integer subtracted before encoding each circuit value.
    pub base: HashMap<usize, i64>,
    /// Scale of each circuit value (log2 delta).
    pub scale: HashMap<usize, u32>,
    /// Copies made for lookups, by (value, bits dropped, base, precision): lookups reading
    /// the same value the same way read one copy (and may share a bootstrap).
    copies: HashMap<(usize, u32, i64, u32), usize>,
    /// Slots each lookup instruction's input can reach (spares included), by instruction.
    pub slots_used: HashMap<usize, usize>,
    pub derived: Vec<DerivedInput>,
    /// Circuit values of the derived inputs, which follow the graph's inputs.
    pub derived_values: Vec<usize>,
    /// Graph inputs only products read (through layout ops): the client encrypts them
    /// under the small key, so their sums need no keyswitch.
    small_inputs: std::collections::HashSet<NodeId>,
    /// Small-key copies of large-key values, read exactly at the products' scale.
    pub small_copies: HashMap<usize, usize>,
    /// Compute products with a client-input operand as external products with the
    /// client's GGSW ciphertexts (else as lookups of squares).
    pub external_products: bool,
    /// The GGSW inputs made so far, with their circuit values.
    pub ggsw: Vec<(super::GgswInput, usize)>,
}

/// Lower with each lookup node in partition `part_of(node)`, read at that partition's
/// precision `precisions[part]`. With one partition the circuit is the plain single-set
/// one; with several, each value is assigned the large key of its partition, and a linear
/// map mixing values of two partitions is an error (the caller then uses one set).
/// With `external_products`, products with a client-input operand become external
/// products (see [`super::products`]). `output_rounding` gives the low bits the client
/// drops from each output (none when empty).
pub(super) fn lower_partitioned(
    g: &Graph,
    part_of: &dyn Fn(NodeId) -> usize,
    precisions: &[u32],
    state: &[(usize, usize)],
    external_products: bool,
    output_rounding: &[u32],
) -> Result<LoweredGraph> {
    let precision = precisions.iter().copied().max().unwrap_or(0);
    let order = g.topo_order().ok_or_else(|| BackendError::Lower { node: g.name.clone(), msg: "cycle".into() })?;
    let mut state_nodes = Vec::new();
    for &(i, o) in state {
        let (Some(&input), Some(output)) = (g.inputs().get(i), g.outputs().get(o)) else {
            return Err(BackendError::Lower {
                node: g.name.clone(),
                msg: format!("state pair ({i}, {o}) is out of range"),
            });
        };
        if g.enc_range(input) != g.enc_range(output.node) || sample_dims(g, input) != sample_dims(g, output.node) {
            return Err(err(g, output.node, "a state output must have its input's range and shape"));
        }
        state_nodes.push((input, output.node));
    }
    let mut e = Emitter {
        g,
        p: precision,
        part: 0,
        precisions: precisions.to_vec(),
        part_of,
        circuit: Circuit {
            value_len: Vec::new(),
            inputs: Vec::new(),
            outputs: Vec::new(),
            instructions: Vec::new(),
            tables: Vec::new(),
            precision,
            state: state.to_vec(),
            small: Vec::new(),
            partition_precisions: if precisions.len() > 1 { precisions.to_vec() } else { Vec::new() },
            keys: Vec::new(),
            ggsw: Vec::new(),
        },
        value: HashMap::new(),
        d: HashMap::new(),
        probes: HashMap::new(),
        base: HashMap::new(),
        scale: HashMap::new(),
        copies: HashMap::new(),
        slots_used: HashMap::new(),
        derived: Vec::new(),
        derived_values: Vec::new(),
        small_inputs: if external_products {
            Default::default()
        } else {
            super::products::product_only_inputs(g, state)
        },
        small_copies: HashMap::new(),
        external_products,
        ggsw: Vec::new(),
    };
    for &id in &order {
        let node = g.node(id);
        if is_affine(&node.op) {
            let probe = e.probe(id, &node.op, &g.operands(id))?;
            e.probes.insert(id, probe);
        }
    }
    let scales = deltas::assign(g, &order, &|id| e.demands(id), &state_nodes, output_rounding)?;
    e.d = scales;
    let mut node_lookups = HashMap::new();
    for &id in &order {
        let before = e.circuit.lookups_per_sample();
        e.node(id)?;
        node_lookups.insert(id, e.circuit.lookups_per_sample() - before);
    }
    e.share_bootstraps();
    e.circuit.drop_unused_tables();
    e.circuit.inputs = g
        .inputs()
        .iter()
        .map(|id| e.value[id])
        .chain(e.derived_values.iter().copied())
        .chain(e.ggsw.iter().map(|(_, v)| *v))
        .collect();
    if precisions.len() > 1 {
        e.circuit.keys = super::keys::assign(&e.circuit).map_err(|m| err(g, g.outputs()[0].node, m))?;
    }
    let inputs = g.inputs().iter().map(|&id| e.encoding_of(id)).collect();
    let mut outputs = Vec::new();
    for o in g.outputs() {
        e.circuit.outputs.push(e.value[&o.node]);
        outputs.push(e.encoding_of(o.node));
    }
    let requirements = e.requirements(&outputs)?;
    let ggsw = e.ggsw.into_iter().map(|(g, _)| g).collect();
    Ok(LoweredGraph { circuit: e.circuit, inputs, derived: e.derived, ggsw, outputs, requirements, node_lookups })
}

impl Emitter<'_> {
    fn encoding_of(&self, id: NodeId) -> Encoding {
        let v = self.value[&id];
        Encoding { delta_log2: self.scale[&v], base: self.base[&v] }
    }

    /// What node `id` asks of its operands' scales.
    fn demands(&self, id: NodeId) -> Vec<(usize, Demand)> {
        let p = self.precisions.get((self.part_of)(id)).copied().unwrap_or(self.p);
        let read = |k: u32| Demand::Read(63 - p - k);
        match &self.g.node(id).op {
            Op::Tlu(t) => vec![(0, read(t.rounding))],
            Op::MaxEnc { rounding, .. } => {
                vec![(0, read(*rounding)), (1, read(*rounding)), (1, Demand::Affine(Some(0)))]
            }
            Op::SatEnc { rounding, .. } => vec![(0, read(*rounding)), (0, Demand::Affine(Some(0)))],
            Op::AbsEnc { rounding, .. } => vec![(0, read(*rounding))],
            Op::MatMulEnc => match self.client_operand(id) {
                // the other operand is packed at the product's scale
                Some(k) => vec![(1 - k, Demand::Affine(Some(0)))],
                None => vec![(0, read(0)), (1, read(0))],
            },
            Op::Assume { .. } => vec![(0, Demand::Affine(Some(0)))],
            op if is_affine(op) => {
                let probe = &self.probes[&id];
                let n = self.g.operands(id).len();
                (0..n)
                    .map(|k| {
                        let j = probe
                            .rows
                            .iter()
                            .flat_map(|r| r.iter())
                            .filter(|&&(i, _, w)| i == k && w != 0)
                            .map(|&(_, _, w)| w.trailing_zeros())
                            .min();
                        (k, Demand::Affine(j))
                    })
                    .collect()
            }
            _ => Vec::new(),
        }
    }

    /// The range a node's value is encoded for: its own, or the compiled range an
    /// `assume` right after it declares (the assume reuses its ciphertexts).
    pub fn encoded_range(&self, id: NodeId) -> Range {
        let users = self.g.users(id);
        match users.as_slice() {
            [u] if matches!(self.g.node(*u).op, Op::Assume { .. }) => self.g.enc_range(*u),
            _ => self.g.enc_range(id),
        }
    }

    pub fn new_value(&mut self, len: usize, base: i64, scale: u32) -> usize {
        self.circuit.value_len.push(len);
        self.circuit.small.push(false);
        let v = self.circuit.value_len.len() - 1;
        self.base.insert(v, base);
        self.scale.insert(v, scale);
        v
    }

    /// A new value under the small key.
    pub fn new_small_value(&mut self, len: usize, base: i64, scale: u32) -> usize {
        let v = self.new_value(len, base, scale);
        self.circuit.small[v] = true;
        v
    }

    fn node(&mut self, id: NodeId) -> Result<()> {
        self.part = (self.part_of)(id).min(self.precisions.len().saturating_sub(1));
        self.p = self.precisions.get(self.part).copied().unwrap_or(self.p);
        let op = self.g.node(id).op.clone();
        let ops = self.g.operands(id);
        let d = self.d[&id];
        let v = match &op {
            Op::Input { .. } if self.small_inputs.contains(&id) => {
                self.new_small_value(sample_len(self.g, id), self.g.enc_range(id).lo, d)
            }
            Op::Input { .. } => self.new_value(sample_len(self.g, id), self.g.enc_range(id).lo, d),
            // A narrower compiled range changes no ciphertext.
            Op::Assume { .. } => self.value[&ops[0]],
            Op::Tlu(t) => self.lookup(id, ops[0], t)?,
            Op::MaxEnc { rounding, diff } => self.max(id, ops[0], ops[1], *rounding, *diff)?,
            Op::SatEnc { lo, hi, rounding } => self.saturate(id, ops[0], *lo, *hi, *rounding)?,
            Op::AbsEnc { rounding, shift } => self.abs(id, ops[0], *rounding, *shift)?,
            Op::MatMulEnc => self.matmul(id, ops[0], ops[1])?,
            op if is_affine(op) => self.affine(id, &ops)?,
            other => return Err(err(self.g, id, format!("{} cannot run on encrypted data", other.mnemonic()))),
        };
        self.value.insert(id, v);
        Ok(())
    }

    /// Probe an affine op: its matrix (per output, terms (operand, element, weight)) and
    /// its constant, per sample.
    fn probe(&self, id: NodeId, op: &Op, ops: &[NodeId]) -> Result<Probe> {
        if matches!(op, Op::Reshape { .. } | Op::Transpose { .. } | Op::Gather { .. } | Op::Concat { .. }) {
            return self.probe_layout(id, op, ops);
        }
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
        Ok(Probe { rows, constant })
    }

    /// A layout op moves elements without computing: evaluate it on the elements' ids (one
    /// sample; operand k's element e is id offset_k + e) and read off which input element
    /// each output is. Linear in the size, where probing with unit inputs is quadratic.
    fn probe_layout(&self, id: NodeId, op: &Op, ops: &[NodeId]) -> Result<Probe> {
        let mut offset = 0i64;
        let mut owner = Vec::new();
        let mut args = Vec::new();
        for (k, &o) in ops.iter().enumerate() {
            let n = sample_len(self.g, o);
            let mut dims = vec![1];
            dims.extend(sample_dims(self.g, o));
            let ids: Vec<i64> = (offset..offset + n as i64).collect();
            args.push(Tensor::I64(
                ArrayD::from_shape_vec(IxDyn(&dims), ids).map_err(|e| err(self.g, id, e.to_string()))?,
            ));
            owner.push((k, offset, n as i64));
            offset += n as i64;
        }
        let refs: Vec<&Tensor> = args.iter().collect();
        let out = veil_ir::interp::eval_op(op, &refs).map_err(|e| err(self.g, id, e))?;
        let out = out.as_i64().ok_or_else(|| err(self.g, id, "not an integer op"))?;
        let rows = out
            .iter()
            .map(|&v| {
                let &(k, start, _) = owner
                    .iter()
                    .find(|(_, start, n)| v >= *start && v < start + n)
                    .expect("ids come from the operands");
                vec![(k, (v - start) as usize, 1)]
            })
            .collect::<Vec<Terms>>();
        Ok(Probe { constant: vec![0; rows.len()], rows })
    }

    /// The ciphertext weight that puts `w` times a value at scale `d_in` into a result at
    /// scale `d_out`: w·2^(d_out − d_in), an integer by the scale constraints.
    fn weight(w: i64, d_in: u32, d_out: u32) -> i64 {
        if d_out >= d_in {
            w << (d_out - d_in)
        } else {
            w >> (d_in - d_out)
        }
    }

    /// Lower an affine op: out_j = Σ w·in + f(0)_j, re-based.
    fn affine(&mut self, id: NodeId, ops: &[NodeId]) -> Result<usize> {
        let d = self.d[&id];
        let inputs: Vec<usize> = ops.iter().map(|o| self.value[o]).collect();
        let base_out = self.encoded_range(id).lo;
        let probe = &self.probes[&id];
        let out_len = probe.rows.len();
        let mut li = LinearInstr::new(0, inputs.clone());
        for (j, terms) in probe.rows.iter().enumerate() {
            // message_out = Σ w·(message_in + base_in) + f(0) − base_out
            let mut c = probe.constant[j] as i128 - base_out as i128;
            for &(k, e, w) in terms {
                let v = inputs[k];
                li.push_term(k, e, Self::weight(w, self.scale[&v], d));
                c += w as i128 * self.base[&v] as i128;
            }
            li.end_row(encode(c, d));
        }
        let small = inputs.iter().any(|&v| self.circuit.is_small(v));
        if small && !inputs.iter().all(|&v| self.circuit.is_small(v)) {
            return Err(err(self.g, id, "mixes values under the large and the small key"));
        }
        let out = if small { self.new_small_value(out_len, base_out, d) } else { self.new_value(out_len, base_out, d) };
        li.output = out;
        self.circuit.instructions.push(Instruction::Linear(li));
        Ok(out)
    }

    /// A copy of Σ sign·value (element-wise, at their own scales) ready for a lookup
    /// reading 2^(63−p−k)-wide slots from `read.base`.
    pub fn read_copy(&mut self, terms: &[(usize, i64)], read: &Read) -> Result<usize> {
        let target = 63 - self.p - read.k;
        let n = self.circuit.value_len[terms[0].0];
        let inputs: Vec<usize> = terms.iter().map(|t| t.0).collect();
        let mut scales = Vec::new();
        for &(v, _) in terms {
            let d = self.scale[&v];
            let j = target.checked_sub(d).ok_or_else(|| BackendError::Lower {
                node: format!("value {v}"),
                msg: "a lookup reads a value at a coarser scale than its own".into(),
            })?;
            scales.push(1i64 << j);
        }
        let mut li = LinearInstr::new(0, inputs);
        for e in 0..n {
            // (Σ s·x − read.base)·Δr = Σ s·2^j·(x − base_x)·Δx + (Σ s·base_x − read.base)·Δr
            let mut c = -(read.base as i128);
            for (k, &(v, s)) in terms.iter().enumerate() {
                li.push_term(k, e, s * scales[k]);
                c += s as i128 * self.base[&v] as i128;
            }
            // A rounded read (k > 0) holds 2^k integers per slot, and the integers at a
            // slot's edge would be read either way by the bootstrap's noise. Half an
            // integer more puts each one half an integer inside the slot the interpreter
            // rounds it to (half up), so only noise beyond that margin changes a read.
            let half = if read.k > 0 { 1u64 << (target - 1) } else { 0 };
            li.end_row(encode(c, target).wrapping_add(half));
        }
        let out = if self.circuit.is_small(terms[0].0) {
            self.new_small_value(n, read.base, target)
        } else {
            self.new_value(n, read.base, target)
        };
        li.output = out;
        self.circuit.instructions.push(Instruction::Linear(li));
        Ok(out)
    }

    /// A read copy of one value, shared by every lookup reading it the same way.
    fn shared_copy(&mut self, v: usize, read: &Read) -> Result<usize> {
        let key = (v, read.k, read.base, self.p);
        if let Some(&c) = self.copies.get(&key) {
            return Ok(c);
        }
        let c = self.read_copy(&[(v, 1)], read)?;
        self.copies.insert(key, c);
        Ok(c)
    }

    /// Append a lookup of every element of `input` through its table; returns the output.
    pub fn push_lookup(&mut self, input: usize, tables: Vec<u32>, base: i64, scale: u32, slots_used: usize) -> usize {
        let out = self.new_value(tables.len(), base, scale);
        self.slots_used.insert(self.circuit.instructions.len(), slots_used);
        self.circuit.instructions.push(Instruction::Lookup(LookupInstr {
            output: out,
            input,
            table: tables,
            second: None,
            partition: self.part as u8,
        }));
        out
    }

    /// A table over the 2^p slots of `read`: slot s holds f(value of s, clamped into `r`),
    /// encoded as (f − base)·2^scale.
    pub fn table(&mut self, read: &Read, r: Range, base: i64, scale: u32, f: impl Fn(i64) -> i128) -> u32 {
        let step = 1i64 << read.k;
        let table = (0..1usize << self.p)
            .map(|s| {
                let v = (read.base + s as i64 * step).clamp(r.lo, r.hi);
                encode(f(v) - base as i128, scale)
            })
            .collect();
        self.circuit.tables.push(table);
        (self.circuit.tables.len() - 1) as u32
    }

    /// Slots a read of `r` reaches: its buckets, and a spare on each side when the read
    /// keeps them.
    pub fn slots_of(r: Range, read: &Read) -> usize {
        let step = 1i64 << read.k;
        let first = (r.lo + step / 2).div_euclid(step) * step;
        let below = ((first - read.base) >> read.k) as usize;
        entries(r, read.k) as usize + 2 * below
    }

    fn lookup(&mut self, id: NodeId, src: NodeId, t: &veil_ir::Tlu) -> Result<usize> {
        let read = read_of(t.input, t.rounding, 1 << self.p, false);
        let copy = self.shared_copy(self.value[&src], &read)?;
        let d_out = self.d[&id];
        let base_out = self.encoded_range(id).lo;
        let params = t.element_params(&sample_dims(self.g, id)).map_err(|e| err(self.g, id, e))?;
        let mut groups: HashMap<Vec<u64>, u32> = HashMap::new();
        let mut table_of = Vec::with_capacity(params.len());
        for p in &params {
            let key: Vec<u64> = p.iter().map(|v| v.to_bits()).collect();
            let idx = match groups.get(&key) {
                Some(&i) => i,
                None => {
                    let i = self.table(&read, t.input, base_out, d_out, |v| t.apply(v, p) as i128);
                    groups.insert(key, i);
                    i
                }
            };
            table_of.push(idx);
        }
        let used = Self::slots_of(t.input, &read);
        Ok(self.push_lookup(copy, table_of, base_out, d_out, used))
    }

    /// Pair lookups that read the same copy and reach only the lower half of the slots:
    /// one bootstrap serves both, the second function living in the tables' upper half.
    fn share_bootstraps(&mut self) {
        let precisions: Vec<u32> = (0..self.circuit.partitions()).map(|q| self.circuit.precision_of(q)).collect();
        let half_of = |l: &LookupInstr| {
            let p = precisions[l.partition as usize];
            (p >= 2).then(|| 1usize << (p - 1))
        };
        let mut waiting: HashMap<usize, usize> = HashMap::new(); // input value → instruction
        let mut merged: Vec<(usize, usize)> = Vec::new();
        for (i, ins) in self.circuit.instructions.iter().enumerate() {
            let Instruction::Lookup(l) = ins else { continue };
            let fits = half_of(l).is_some_and(|h| self.slots_used.get(&i).is_some_and(|&u| u <= h));
            if !fits {
                continue;
            }
            // a copy is read at one precision, so lookups sharing it share a partition
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
            let half = half_of(first).expect("paired lookups fit half their tables");
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
        let d = self.d[&id];
        let (ra, rb) = (self.g.enc_range(a), self.g.enc_range(b));
        let dr = diff.unwrap_or(ra.minus(&rb));
        let read = read_of(dr, rounding, 1 << self.p, false);
        let (va, vb) = (self.value[&a], self.value[&b]);
        let diff_v = self.read_copy(&[(va, 1), (vb, -1)], &read)?;
        // the relu of each slot's difference (clamped to the compiled range, then rounded,
        // as the interpreter does), encoded with base 0 at the result's scale
        let t = self.table(&read, dr, 0, d, |v| veil_ir::interp::max_enc(v, 0, rounding, None) as i128);
        let n = sample_len(self.g, id);
        let used = Self::slots_of(dr, &read);
        let relu = self.push_lookup(diff_v, vec![t; n], 0, d, used);
        // out = b + relu
        Ok(self.plus_lookup(id, vb, relu, 1))
    }

    /// Node `id`'s value as `x + sign·l` element-wise, with `l` a lookup's output (base 0)
    /// at the result's scale, re-based to the result's range.
    fn plus_lookup(&mut self, id: NodeId, vx: usize, l: usize, sign: i64) -> usize {
        let d = self.d[&id];
        let n = self.circuit.value_len[l];
        let base_out = self.encoded_range(id).lo;
        let wx = Self::weight(1, self.scale[&vx], d);
        let mut li = LinearInstr::new(0, vec![vx, l]);
        for e in 0..n {
            li.push_term(0, e, wx);
            li.push_term(1, e, sign);
            li.end_row(encode(self.base[&vx] as i128 - base_out as i128, d));
        }
        let out = self.new_value(n, base_out, d);
        li.output = out;
        self.circuit.instructions.push(Instruction::Linear(li));
        out
    }

    /// |x| / 2^shift on the whole torus (see `Op::AbsEnc`). With W = 2^(p + rounding), the
    /// read puts slot 0 at −W, so slots 0..2^p hold q in [−W, 0) and the bootstrap's
    /// second, negated half holds q in [0, W). Writing V = W / 2^shift, the table stores
    /// |q|/2^shift − V/2 for the first half; the second half then reads
    /// −(|q − W|/2^shift − V/2) = |q|/2^shift − V/2, as needed. The output is encoded with
    /// base V/2, and no padding bit is spent.
    fn abs(&mut self, id: NodeId, x: NodeId, rounding: u32, shift: u32) -> Result<usize> {
        let d = self.d[&id];
        let r = self.g.enc_range(x);
        let need = veil_ir::enc::abs_precision(r, rounding);
        if need > self.p {
            return Err(err(self.g, id, format!("|x| needs {need} bits, its lookups have {}", self.p)));
        }
        let w = 1i64
            .checked_shl(self.p + rounding)
            .filter(|&w| self.p + rounding < 62 && w > 0)
            .ok_or_else(|| err(self.g, id, format!("|x| read to 2^{rounding} at {} bits overflows 64 bits", self.p)))?;
        let read = Read { k: rounding, base: -w };
        let copy = self.shared_copy(self.value[&x], &read)?;
        let step = 1i64 << rounding;
        let centre = (w >> shift) / 2;
        let table = (0..1i64 << self.p).map(|s| encode((((w - s * step) >> shift) - centre) as i128, d)).collect();
        self.circuit.tables.push(table);
        let t = (self.circuit.tables.len() - 1) as u32;
        let n = sample_len(self.g, id);
        // every slot of the torus is in use: no second function can share this bootstrap
        Ok(self.push_lookup(copy, vec![t; n], centre, d, 2 << self.p))
    }

    /// Saturation: x − excess(read of x), one lookup for the excess (see `Op::SatEnc`).
    fn saturate(&mut self, id: NodeId, x: NodeId, lo: i64, hi: i64, rounding: u32) -> Result<usize> {
        let d = self.d[&id];
        let r = self.g.enc_range(x);
        let read = read_of(r, rounding, 1 << self.p, false);
        let vx = self.value[&x];
        let copy = self.shared_copy(vx, &read)?;
        let t = self.table(&read, r, 0, d, |v| {
            veil_ir::enc::saturate_excess(veil_ir::enc::rounded(v, rounding), lo, hi) as i128
        });
        let n = sample_len(self.g, id);
        let used = Self::slots_of(r, &read);
        let excess = self.push_lookup(copy, vec![t; n], 0, d, used);
        Ok(self.plus_lookup(id, vx, excess, -1))
    }

    /// What the parameters must satisfy: the noise at every lookup input, and exact
    /// decryption of every output (the caller may widen an output's allowed noise when
    /// the client reads it rounded).
    fn requirements(&self, outputs: &[Encoding]) -> Result<Requirements> {
        let coefs = self.circuit.noise_coefs();
        // a state output becomes the next run's input, assumed to carry at most one
        // bootstrap's noise plus a fresh encryption's
        for &(_, o) in &self.circuit.state {
            let v = self.circuit.outputs[o];
            if coefs[v].iter().any(|c| c.bootstrapped > 1.0 || c.fresh > 1.0) {
                return Err(BackendError::Lower {
                    node: self.g.outputs()[o].name.clone(),
                    msg: "a state output must come straight out of a lookup (its noise would grow every run)".into(),
                });
            }
        }
        let mut lookup_noise: Vec<NoiseCoefs> = Vec::new();
        for ins in &self.circuit.instructions {
            if let Instruction::Lookup(l) = ins {
                for e in 0..l.table.len() {
                    let c = self.circuit.lookup_input_coefs(&coefs, l, e);
                    // keep only inputs no other one dominates
                    if !lookup_noise.iter().any(|o| o.dominates(&c)) {
                        lookup_noise.retain(|o| !c.dominates(o));
                        lookup_noise.push(c);
                    }
                }
            }
        }
        let outs = outputs
            .iter()
            .zip(&self.circuit.outputs)
            .map(|(o, &v)| {
                let worst = coefs[v].iter().fold(NoiseCoefs::default(), |a, c| a.max(c));
                (worst, 2f64.powi(o.delta_log2 as i32 - 1 - 64))
            })
            .collect();
        let precision = self.precisions.iter().copied().max().unwrap_or(0);
        Ok(Requirements {
            precision: if self.circuit.lookups_per_sample() > 0 { precision } else { 0 },
            lookups: self.circuit.lookups_per_sample(),
            keyswitches: self.circuit.keyswitches_per_sample(),
            lookup_noise,
            outputs: outs,
            p_error: 2f64.powi(-40),
            partitions: if self.precisions.len() > 1 { self.partition_requirements(&coefs) } else { Vec::new() },
            products: self.circuit.product_requirements(),
        })
    }

    /// Per partition: its lookups, keyswitches by source key, the noise at its lookups'
    /// inputs by source key (undominated ones only), and the outputs under its key.
    fn partition_requirements(&self, coefs: &[Vec<NoiseCoefs>]) -> Vec<PartitionRequirements> {
        let c = &self.circuit;
        let ks = c.keyswitches_between();
        let lookups = c.lookups_per_partition();
        let mut parts: Vec<PartitionRequirements> = (0..c.partitions())
            .map(|q| PartitionRequirements {
                precision: c.precision_of(q),
                lookups: lookups[q],
                keyswitches_from: ks.iter().map(|row| row[q]).collect(),
                ..Default::default()
            })
            .collect();
        for ins in &c.instructions {
            if let Instruction::Lookup(l) = ins {
                let (from, noise) = (c.key_of(l.input), &mut parts[l.partition as usize].lookup_noise);
                for e in 0..l.table.len() {
                    let coef = c.lookup_input_coefs(coefs, l, e);
                    if !noise.iter().any(|(f, o)| *f == from && o.dominates(&coef)) {
                        noise.retain(|(f, o)| !(*f == from && coef.dominates(o)));
                        noise.push((from, coef));
                    }
                }
            }
        }
        for (i, &v) in c.outputs.iter().enumerate() {
            parts[c.key_of(v)].outputs.push(i);
        }
        parts
    }
}
