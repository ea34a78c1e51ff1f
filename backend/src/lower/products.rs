//! Products of two encrypted matrices (`matmul_enc`), lowered to lookups of squares.
//!
//! A bootstrap computes a function of one value, so a product of two encrypted values
//! needs them combined linearly first. Two exact ways, and the cheaper is taken:
//! - squares: `Σ_k a_k·b_k = ½·[Σ_k (a_k + b_k)² − Σ_k a_k² − Σ_k b_k²]`: one lookup per
//!   term, plus the square sums. An operand that is a client input (through layout ops
//!   only) costs nothing: the client knows its integers and sends their square sums as an
//!   extra input ([`super::DerivedInput`]). Otherwise each of its elements is squared by a
//!   lookup.
//! - quarter squares: `a·b = ¼·[(a + b)² − (a − b)²]`: two lookups per term.
//!
//! - external products (when the emitter asks for them and one operand is a client
//!   input): the client encrypts that operand's rows (or columns) as GGSW ciphertexts of
//!   integer polynomials, the server packs the other operand's LWE ciphertexts into GLWEs,
//!   and one external product GGSW(M) ⊡ GLWE(P) computes a whole polynomial product M·P,
//!   whose coefficients are the dot products (or scaled rows) wanted. No bootstrap at
//!   all: for a training step of batch 8 × 30 features, 16 external products and 38
//!   packing keyswitches replace 518 lookups.
//!
//! The halves and quarters cost nothing and round nothing: the square tables hold s² at
//! half (a quarter of) the result's scale, so their sum is the exact product at the
//! result's scale. Each sum a + b (and a − b) is read exactly, so it must fit the
//! circuit's precision: max(bits(a), bits(b)) + 1 bits. A third way, one lookup on the
//! packed pair a·2^q + b, needs bits(a) + bits(b): for 3-bit data and 6-bit weights that
//! is 9 bits instead of 6, about 16× the bootstrap cost in the cost model, for half the
//! lookups, so it is not used.

use super::emit::{read_of, sample_dims, Emitter, Read};
use super::{encode, err, DerivedInput};
use crate::circuit::{GgswValue, Instruction, KeyswitchInstr, LinearInstr, ProductInstr};
use crate::error::Result;
use ndarray::ArrayD;
use std::collections::HashSet;
use veil_ir::{Graph, NodeId, Op, Range};
use veil_passes::bitwidth::entries;

/// Graph inputs (not state) that only products read, possibly through layout ops: the
/// client encrypts those under the small key, and their sums with the other operand are
/// formed there, with no keyswitch per product.
pub(super) fn product_only_inputs(g: &Graph, state: &[(usize, usize)]) -> HashSet<NodeId> {
    let outputs: HashSet<NodeId> = g.outputs().iter().map(|o| o.node).collect();
    let only_products = |start: NodeId| {
        let mut stack = vec![start];
        while let Some(n) = stack.pop() {
            if outputs.contains(&n) {
                return false;
            }
            for u in g.users(n) {
                match g.node(u).op {
                    Op::MatMulEnc => {}
                    Op::Reshape { .. } | Op::Transpose { .. } | Op::Gather { .. } => stack.push(u),
                    _ => return false,
                }
            }
        }
        true
    };
    g.inputs()
        .iter()
        .enumerate()
        .filter(|(i, _)| !state.iter().any(|(s, _)| s == i))
        .map(|(_, &id)| id)
        .filter(|&id| !g.users(id).is_empty() && only_products(id))
        .collect()
}

/// The graph input an operand is a rearrangement of, and for each of the operand's
/// elements (per sample) the input element it is.
/// State inputs do not count: the client knows them only at the first step.
pub(super) fn trace_input(g: &Graph, id: NodeId, state: &[(usize, usize)]) -> Option<(usize, Vec<u32>)> {
    let mut chain = Vec::new();
    let mut cur = id;
    let index = loop {
        match &g.node(cur).op {
            Op::Input { index } if state.iter().any(|&(i, _)| i == *index) => return None,
            Op::Input { index } => break *index,
            Op::Reshape { .. } | Op::Transpose { .. } | Op::Gather { .. } => chain.push(cur),
            Op::Assume { .. } => {}
            _ => return None,
        }
        cur = g.operands(cur)[0];
    };
    let dims = sample_dims(g, cur);
    let n: usize = dims.iter().product();
    let mut shape = vec![1];
    shape.extend(&dims);
    let mut idx = ArrayD::from_shape_vec(shape, (0..n as i64).collect()).ok()?;
    for &op in chain.iter().rev() {
        idx = veil_ir::interp::layout(&g.node(op).op, &[&idx], -1).ok()?;
    }
    Some((index, idx.iter().map(|&v| v as u32).collect()))
}

/// The packs, sums of external products and extractions of a product in the rows or
/// columns layout (see `Emitter::external`), for O outer client rows, U outer encrypted
/// rows and T terms; `eidx(u, t)` is the encrypted element, `oidx(o, u)` the output.
type Layout = (Vec<Vec<(u32, i32)>>, Vec<Vec<(u32, u32)>>, Vec<(u32, u32)>);

fn layout(
    rows: bool,
    [o_len, u_len, t_len]: [usize; 3],
    eidx: &dyn Fn(usize, usize) -> usize,
    oidx: &dyn Fn(usize, usize) -> usize,
) -> Layout {
    let (mut packs, mut sums, mut extract) = (Vec::new(), Vec::new(), vec![(0u32, 0u32); o_len * u_len]);
    if rows {
        for u in 0..u_len {
            packs.push((0..t_len).map(|t| (eidx(u, t) as u32, -(t as i32))).collect());
        }
        for o in 0..o_len {
            for u in 0..u_len {
                extract[oidx(o, u)] = (sums.len() as u32, 0);
                sums.push(vec![(o as u32, u as u32)]);
            }
        }
    } else {
        for u in 0..u_len {
            let mut terms = Vec::new();
            for t in 0..t_len {
                terms.push((t as u32, packs.len() as u32));
                packs.push(vec![(eidx(u, t) as u32, 0)]);
            }
            for o in 0..o_len {
                extract[oidx(o, u)] = (sums.len() as u32, o as u32);
            }
            sums.push(terms);
        }
    }
    (packs, sums, extract)
}

/// One operand's square sums: a client-derived input (one element per row or column), or
/// a lookup per element squared.
enum SquareSums {
    Derived(usize),
    Lookups(usize),
}

impl Emitter<'_> {
    /// Which operand of product `id` (0 or 1) is a client input multiplied as GGSW
    /// ciphertexts, when external products are on.
    pub(super) fn client_operand(&self, id: NodeId) -> Option<usize> {
        if !self.external_products {
            return None;
        }
        let ops = self.g.operands(id);
        let state = &self.circuit.state;
        (0..2)
            .find(|&k| trace_input(self.g, ops[k], state).is_some() && trace_input(self.g, ops[1 - k], state).is_none())
    }

    pub(super) fn matmul(&mut self, id: NodeId, a: NodeId, b: NodeId) -> Result<usize> {
        if let Some(k) = self.client_operand(id) {
            return self.external(id, [a, b], k);
        }
        let (sa, sb) = (sample_dims(self.g, a), sample_dims(self.g, b));
        let (m, k, l) = (sa[0], sa[1], sb[1]);
        let (ra, rb) = (self.g.enc_range(a), self.g.enc_range(b));
        let slots = 1u64 << self.p;
        let sum = Range::new(ra.lo + rb.lo, ra.hi + rb.hi);
        let dif = ra.minus(&rb);
        if entries(sum, 0) > slots {
            return Err(err(
                self.g,
                id,
                format!(
                    "a product of values in {ra} and {rb} reads sums in {sum}: {} bits, over the circuit's {}",
                    veil_ir::tlu::lookup_precision(entries(sum, 0), 0),
                    self.p
                ),
            ));
        }
        let state = self.circuit.state.clone();
        let (ta, tb) = (trace_input(self.g, a, &state), trace_input(self.g, b, &state));
        let squares = m * k * l + if ta.is_some() { 0 } else { m * k } + if tb.is_some() { 0 } else { k * l };
        let quarter = 2 * m * k * l;
        if quarter < squares && entries(dif, 0) <= slots {
            self.quarter_squares(id, a, b, [m, k, l], sum, dif)
        } else {
            self.squares(id, a, b, [m, k, l], sum, [ta, tb])
        }
    }

    /// C = A·B with operand `k` a client input K (outer index o, contraction t) and the
    /// other an encrypted E (outer index u), as external products. Two layouts:
    /// - rows: polynomial o = Σ_t K[o,t]·Y^t, pack u = Σ_t E[u,t]·Y^(−t); C[o,u] is
    ///   coefficient 0 of their product (O·U external products);
    /// - columns: polynomial t = Σ_o K[o,t]·Y^o, pack (u,t) = E[u,t]; C[o,u] is
    ///   coefficient o of Σ_t poly_t·pack_(u,t) (U·T external products).
    ///
    /// A layout whose polynomials the client already sends is reused; otherwise the one
    /// with fewer external products is taken. Both pack U·T ciphertexts.
    fn external(&mut self, id: NodeId, ops: [NodeId; 2], k: usize) -> Result<usize> {
        let (sa, sb) = (sample_dims(self.g, ops[0]), sample_dims(self.g, ops[1]));
        let (m, t_len, l) = (sa[0], sa[1], sb[1]);
        let state = self.circuit.state.clone();
        let (from, map) = trace_input(self.g, ops[k], &state).expect("client_operand traced it");
        // index maps: client element (o, t), encrypted element (u, t), output (o, u)
        let (o_len, u_len) = if k == 0 { (m, l) } else { (l, m) };
        let kidx = |o: usize, t: usize| if k == 0 { o * t_len + t } else { t * l + o };
        let eidx = |u: usize, t: usize| if k == 0 { t * l + u } else { u * t_len + t };
        let oidx = |o: usize, u: usize| if k == 0 { o * l + u } else { u * l + o };
        let rows: Vec<Vec<(u32, u32)>> =
            (0..o_len).map(|o| (0..t_len).map(|t| (map[kidx(o, t)], t as u32)).collect()).collect();
        let cols: Vec<Vec<(u32, u32)>> =
            (0..t_len).map(|t| (0..o_len).map(|o| (map[kidx(o, t)], o as u32)).collect()).collect();
        let existing =
            |polys: &Vec<Vec<(u32, u32)>>| self.ggsw.iter().any(|(g, _)| g.from == from && &g.polys == polys);
        let use_rows = match (existing(&rows), existing(&cols)) {
            (true, _) => true,
            (false, true) => false,
            _ => o_len <= t_len,
        };
        let ggsw = self.ggsw_input(from, if use_rows { rows } else { cols });
        // the encrypted operand at the product's scale, base 0 (products of signed values)
        let d = self.d[&id];
        let e_val = self.value[&ops[1 - k]];
        let (de, be) = (self.scale[&e_val], self.base[&e_val]);
        let shift =
            d.checked_sub(de).ok_or_else(|| err(self.g, id, "the packed operand is coarser than the product"))?;
        let n_e = self.circuit.value_len[e_val];
        let mut li = LinearInstr::new(0, vec![e_val]);
        for e in 0..n_e {
            li.push_term(0, e, 1i64 << shift);
            li.end_row(encode(be as i128, d));
        }
        let packed = self.new_value(n_e, 0, d);
        li.output = packed;
        self.circuit.instructions.push(Instruction::Linear(li));
        let (packs, sums, extract) = layout(use_rows, [o_len, u_len, t_len], &eidx, &oidx);
        let prod = self.new_value(o_len * u_len, 0, d);
        self.circuit.instructions.push(Instruction::Product(ProductInstr {
            output: prod,
            ggsw,
            input: packed,
            packs,
            sums,
            extract,
        }));
        // to the output's own encoding
        let base_out = self.encoded_range(id).lo;
        let mut li = LinearInstr::new(0, vec![prod]);
        for j in 0..o_len * u_len {
            li.push_term(0, j, 1);
            li.end_row(encode(-(base_out as i128), d));
        }
        let out = self.new_value(o_len * u_len, base_out, d);
        li.output = out;
        self.circuit.instructions.push(Instruction::Linear(li));
        Ok(out)
    }

    /// The circuit value of the GGSW input with these polynomials of input `from`, made on
    /// first use.
    fn ggsw_input(&mut self, from: usize, polys: Vec<Vec<(u32, u32)>>) -> usize {
        if let Some((_, v)) = self.ggsw.iter().find(|(g, _)| g.from == from && g.polys == polys) {
            return *v;
        }
        let r = self.g.enc_range(self.g.inputs()[from]);
        let peak = r.lo.abs().max(r.hi.abs()) as f64;
        let g = super::GgswInput { from, polys };
        let norm2 = g.polys.iter().map(|p| p.len() as f64 * peak * peak).fold(0.0, f64::max);
        let v = self.new_value(g.polys.len(), 0, 0);
        self.circuit.ggsw.push(GgswValue { value: v, span: g.span() as u32, norm2 });
        self.ggsw.push((g, v));
        v
    }

    /// An operand under the small key, read exactly at the products' scale: itself when the
    /// client encrypted it so, else a keyswitched copy (made once, shared by every product
    /// and square reading it).
    fn small_copy(&mut self, x: NodeId) -> Result<usize> {
        let v = self.value[&x];
        if self.circuit.is_small(v) {
            return Ok(v);
        }
        if let Some(&c) = self.small_copies.get(&v) {
            return Ok(c);
        }
        let read = read_of(self.g.enc_range(x), 0, 1 << self.p, true);
        let copy = self.read_copy(&[(v, 1)], &read)?;
        let target = 63 - self.p;
        let small = self.new_small_value(self.circuit.value_len[v], read.base, target);
        self.circuit.instructions.push(Instruction::Keyswitch(KeyswitchInstr { output: small, input: copy }));
        self.small_copies.insert(v, small);
        Ok(small)
    }

    /// Lookups of (a_ik + s·b_kj)² for every term, at scale `scale`, the sums formed under
    /// the small key.
    fn term_squares(
        &mut self,
        a: NodeId,
        b: NodeId,
        [m, k, l]: [usize; 3],
        r: Range,
        s: i64,
        scale: u32,
    ) -> Result<usize> {
        let (va, vb) = (self.small_copy(a)?, self.small_copy(b)?);
        let read = read_of(r, 0, 1 << self.p, true);
        let target = 63 - self.p;
        let wa = 1i64 << (target - self.scale[&va]);
        let wb = s << (target - self.scale[&vb]);
        let mut li = LinearInstr::new(0, vec![va, vb]);
        for i in 0..m {
            for t in 0..k {
                for j in 0..l {
                    li.push_term(0, i * k + t, wa);
                    li.push_term(1, t * l + j, wb);
                    let c = self.base[&va] as i128 + s as i128 * self.base[&vb] as i128 - read.base as i128;
                    li.end_row(encode(c, target));
                }
            }
        }
        let sums = self.new_small_value(m * k * l, read.base, target);
        li.output = sums;
        self.circuit.instructions.push(Instruction::Linear(li));
        let table = self.table(&read, r, 0, scale, |v| (v as i128) * (v as i128));
        let used = Self::slots_of(r, &read);
        Ok(self.push_lookup(sums, vec![table; m * k * l], 0, scale, used))
    }

    fn squares(
        &mut self,
        id: NodeId,
        a: NodeId,
        b: NodeId,
        dims: [usize; 3],
        sum: Range,
        traced: [Option<(usize, Vec<u32>)>; 2],
    ) -> Result<usize> {
        let [m, k, l] = dims;
        let d = self.d[&id];
        let half = d.checked_sub(1).ok_or_else(|| err(self.g, id, "a product needs a scale of at least 2"))?;
        let sq = self.term_squares(a, b, dims, sum, 1, half)?;
        let [ta, tb] = traced;
        // a's square sums run over k for each row i, b's over k for each column j
        let rows_a: Vec<Vec<usize>> = (0..m).map(|i| (0..k).map(|t| i * k + t).collect()).collect();
        let cols_b: Vec<Vec<usize>> = (0..l).map(|j| (0..k).map(|t| t * l + j).collect()).collect();
        let sa = self.square_sums(a, ta, &rows_a, half)?;
        let sb = self.square_sums(b, tb, &cols_b, half)?;
        let (va2, vb2) = match (&sa, &sb) {
            (SquareSums::Derived(x) | SquareSums::Lookups(x), SquareSums::Derived(y) | SquareSums::Lookups(y)) => {
                (*x, *y)
            }
        };
        let base_out = self.encoded_range(id).lo;
        let mut li = LinearInstr::new(0, vec![sq, va2, vb2]);
        for (i, row) in rows_a.iter().enumerate() {
            for (j, col) in cols_b.iter().enumerate() {
                for t in 0..k {
                    li.push_term(0, (i * k + t) * l + j, 1);
                }
                Self::minus_sum(&mut li, 1, &sa, i, row);
                Self::minus_sum(&mut li, 2, &sb, j, col);
                // Σ(a+b)² − Σa² − Σb² = 2·ab, at half the result's scale
                li.end_row(encode(-2 * base_out as i128, half));
            }
        }
        let out = self.new_value(m * l, base_out, d);
        li.output = out;
        self.circuit.instructions.push(Instruction::Linear(li));
        Ok(out)
    }

    /// Subtract one row's (or column's) square sum: the derived element, or its squares.
    fn minus_sum(li: &mut LinearInstr, input: usize, sums: &SquareSums, group: usize, elements: &[usize]) {
        match sums {
            SquareSums::Derived(_) => li.push_term(input, group, -1),
            SquareSums::Lookups(_) => elements.iter().for_each(|&e| li.push_term(input, e, -1)),
        }
    }

    /// The square sums of operand `x` over `groups` of its elements, at scale `scale`.
    fn square_sums(
        &mut self,
        x: NodeId,
        traced: Option<(usize, Vec<u32>)>,
        groups: &[Vec<usize>],
        scale: u32,
    ) -> Result<SquareSums> {
        if let Some((from, map)) = traced {
            let groups: Vec<Vec<u32>> = groups.iter().map(|g| g.iter().map(|&e| map[e]).collect()).collect();
            let v = self.new_value(groups.len(), 0, scale);
            self.derived_values.push(v);
            self.derived.push(DerivedInput { from, groups, delta_log2: scale, base: 0 });
            return Ok(SquareSums::Derived(v));
        }
        let r = self.g.enc_range(x);
        let copy = self.small_copy(x)?;
        let read = Read { k: 0, base: self.base[&copy] };
        let table = self.table(&read, r, 0, scale, |v| (v as i128) * (v as i128));
        let n = self.circuit.value_len[copy];
        let used = Self::slots_of(r, &read);
        Ok(SquareSums::Lookups(self.push_lookup(copy, vec![table; n], 0, scale, used)))
    }

    fn quarter_squares(
        &mut self,
        id: NodeId,
        a: NodeId,
        b: NodeId,
        dims: [usize; 3],
        sum: Range,
        dif: Range,
    ) -> Result<usize> {
        let [m, k, l] = dims;
        let d = self.d[&id];
        let quarter = d.checked_sub(2).ok_or_else(|| err(self.g, id, "a product needs a scale of at least 4"))?;
        let plus = self.term_squares(a, b, dims, sum, 1, quarter)?;
        let minus = self.term_squares(a, b, dims, dif, -1, quarter)?;
        let base_out = self.encoded_range(id).lo;
        let mut li = LinearInstr::new(0, vec![plus, minus]);
        for i in 0..m {
            for j in 0..l {
                for t in 0..k {
                    li.push_term(0, (i * k + t) * l + j, 1);
                    li.push_term(1, (i * k + t) * l + j, -1);
                }
                // (a+b)² − (a−b)² = 4·ab, at a quarter of the result's scale
                li.end_row(encode(-4 * base_out as i128, quarter));
            }
        }
        let out = self.new_value(m * l, base_out, d);
        li.output = out;
        self.circuit.instructions.push(Instruction::Linear(li));
        Ok(out)
    }
}
