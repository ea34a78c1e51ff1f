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
//! The halves and quarters cost nothing and round nothing: the square tables hold s² at
//! half (a quarter of) the result's scale, so their sum is the exact product at the
//! result's scale. Each sum a + b (and a − b) is read exactly, so it must fit the
//! circuit's precision: max(bits(a), bits(b)) + 1 bits. A third way, one lookup on the
//! packed pair a·2^q + b, needs bits(a) + bits(b): for 3-bit data and 6-bit weights that
//! is 9 bits instead of 6, about 16× the bootstrap cost in the cost model, for half the
//! lookups, so it is not used.

use super::emit::{read_of, sample_dims, Emitter, Read};
use super::{encode, err, DerivedInput};
use crate::circuit::{Instruction, KeyswitchInstr, LinearInstr};
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

/// One operand's square sums: a client-derived input (one element per row or column), or
/// a lookup per element squared.
enum SquareSums {
    Derived(usize),
    Lookups(usize),
}

impl Emitter<'_> {
    pub(super) fn matmul(&mut self, id: NodeId, a: NodeId, b: NodeId) -> Result<usize> {
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
