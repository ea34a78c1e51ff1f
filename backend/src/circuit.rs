//! The circuit: a flat program over vectors of LWE ciphertexts, and its simulation on
//! plaintexts.
//!
//! Every value is a vector of ciphertexts (per sample), under the large key or, where
//! marked, the small key bootstraps start from. An element holding integer v with
//! encoding (delta, base) carries the plaintext (v − base)·delta mod 2^64. Four
//! instructions exist: an affine map with clear integer weights (within one key), a
//! keyswitch from the large key to the small one, a lookup (keyswitch if its input is
//! under the large key, then programmable bootstrap with a table per element; the result
//! is under the large key), and a product with the client's GGSW ciphertexts (pack,
//! external products, extract; see [`ProductInstr`]). Keyswitching once and summing under
//! the small key saves a keyswitch per lookup where many lookups read sums of few values
//! (products of squares).

use crate::params::{NoiseCoefs, Params};
use rand::Rng;
use rand_distr::{Distribution, StandardNormal};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LinearInstr {
    pub output: usize,
    pub inputs: Vec<usize>,
    /// Terms of output j: `row_start[j]..row_start[j + 1]`.
    pub row_start: Vec<u32>,
    /// Which of `inputs`, which element, what weight.
    pub term_input: Vec<u32>,
    pub term_index: Vec<u32>,
    pub term_weight: Vec<i64>,
    /// Plaintext added to each output element.
    pub constant: Vec<u64>,
}

impl LinearInstr {
    /// An instruction with no rows yet, reading `inputs`.
    pub fn new(output: usize, inputs: Vec<usize>) -> LinearInstr {
        LinearInstr {
            output,
            inputs,
            row_start: vec![0],
            term_input: vec![],
            term_index: vec![],
            term_weight: vec![],
            constant: vec![],
        }
    }

    /// Add a term `weight · inputs[input][index]` to the row being built.
    pub fn push_term(&mut self, input: usize, index: usize, weight: i64) {
        self.term_input.push(input as u32);
        self.term_index.push(index as u32);
        self.term_weight.push(weight);
    }

    /// Close the row being built, with its constant plaintext.
    pub fn end_row(&mut self, constant: u64) {
        self.row_start.push(self.term_weight.len() as u32);
        self.constant.push(constant);
    }

    pub fn terms(&self, j: usize) -> impl Iterator<Item = (usize, usize, i64)> + '_ {
        let (a, b) = (self.row_start[j] as usize, self.row_start[j + 1] as usize);
        (a..b).map(move |t| (self.term_input[t] as usize, self.term_index[t] as usize, self.term_weight[t]))
    }

    pub fn outputs(&self) -> usize {
        self.constant.len()
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LookupInstr {
    pub output: usize,
    pub input: usize,
    /// Table of each element.
    pub table: Vec<u32>,
    /// Two lookups on one input sharing a bootstrap: when the input only occupies the
    /// lower half of the slots, a table's upper half can hold a second function, read
    /// half a turn further (the blind-rotated accumulator's coefficient N/2). `second`
    /// receives that function's result.
    #[serde(default)]
    pub second: Option<usize>,
    /// The parameter set (partition) the bootstrap runs in: its tables have
    /// 2^`Circuit::precision_of(partition)` slots, its output is under that partition's
    /// large key, and its input is keyswitched from its own key to the partition's small key.
    #[serde(default)]
    pub partition: u8,
}

/// The plaintext shift that reads a table's upper half: half of the 2^p slots.
pub const SECOND_HALF: u64 = 1 << 62;

/// Keyswitch every element of a large-key value to the small key.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct KeyswitchInstr {
    pub output: usize,
    pub input: usize,
}

/// Products with a client's GGSW ciphertexts (`lower::products`): LWE elements of `input`
/// (large key) are packed into GLWEs, each GLWE is multiplied by GGSW encryptions of
/// client polynomials (external products, summed), and LWE ciphertexts are extracted
/// from the sums' coefficients. With M a GGSW's polynomial and P a packed GLWE holding
/// element e at Y^x, coefficient c of M·P is Σ M_t·e over entries with t + x = c.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ProductInstr {
    /// LWE values under the large key, encoded with base 0 at `input`'s scale.
    pub output: usize,
    /// The client's GGSW input (one ciphertext per polynomial).
    pub ggsw: usize,
    pub input: usize,
    /// The GLWEs to pack: entries (element of `input`, exponent of Y; negative exponents
    /// x stand for −Y^(N+x) in the negacyclic ring).
    pub packs: Vec<Vec<(u32, i32)>>,
    /// Sums of external products: entries (GGSW polynomial, pack).
    pub sums: Vec<Vec<(u32, u32)>>,
    /// Output element j: (sum, coefficient) extracted.
    pub extract: Vec<(u32, u32)>,
}

/// A circuit input the client encrypts as GGSW ciphertexts of integer polynomials
/// (coefficients 0..span), one per element of the value.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GgswValue {
    pub value: usize,
    pub span: u32,
    /// Worst ‖M‖²₂ of one polynomial over the values the client may send.
    pub norm2: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Instruction {
    Linear(LinearInstr),
    Lookup(LookupInstr),
    Keyswitch(KeyswitchInstr),
    Product(ProductInstr),
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Circuit {
    /// Elements per sample of each value.
    pub value_len: Vec<usize>,
    pub inputs: Vec<usize>,
    pub outputs: Vec<usize>,
    pub instructions: Vec<Instruction>,
    /// Lookup tables, 2^precision plaintext slots each.
    pub tables: Vec<Vec<u64>>,
    pub precision: u32,
    /// State carried from one run to the next (a training step's weights): output
    /// `state[i].1` (a position in `outputs`) is encoded exactly as input `state[i].0` (a
    /// position in `inputs`), so the server feeds it back without the client.
    #[serde(default)]
    pub state: Vec<(usize, usize)>,
    /// Values under the small key (empty: none). Inputs marked so are encrypted by the
    /// client under the small key.
    #[serde(default)]
    pub small: Vec<bool>,
    /// Precision of each parameter set (partition) when there are several; empty: one
    /// set, at `precision`.
    #[serde(default)]
    pub partition_precisions: Vec<u32>,
    /// The large key (partition) each value is under; empty: all under partition 0's.
    #[serde(default)]
    pub keys: Vec<u8>,
    /// Inputs the client encrypts as GGSW ciphertexts (read by `Product` instructions).
    #[serde(default)]
    pub ggsw: Vec<GgswValue>,
}

impl Circuit {
    /// Number of parameter sets the circuit runs with (at least one).
    pub fn partitions(&self) -> usize {
        self.partition_precisions.len().max(1)
    }

    /// Table precision (bits) of partition `q`.
    pub fn precision_of(&self, q: usize) -> u32 {
        self.partition_precisions.get(q).copied().unwrap_or(self.precision)
    }

    /// The partition whose large key value `v` is under.
    pub fn key_of(&self, v: usize) -> usize {
        self.keys.get(v).copied().unwrap_or(0) as usize
    }

    /// Drop the tables no lookup reads (sharing a bootstrap replaces two lookups' tables
    /// by combined ones) and renumber the rest: an unread table belongs to no parameter
    /// set, so nothing could check its size against one.
    pub fn drop_unused_tables(&mut self) {
        let mut new_index: Vec<Option<u32>> = vec![None; self.tables.len()];
        for ins in &self.instructions {
            if let Instruction::Lookup(l) = ins {
                for &t in &l.table {
                    if let Some(slot) = new_index.get_mut(t as usize) {
                        *slot = Some(0);
                    }
                }
            }
        }
        for (next, slot) in new_index.iter_mut().filter(|s| s.is_some()).enumerate() {
            *slot = Some(next as u32);
        }
        let tables = std::mem::take(&mut self.tables);
        self.tables = tables.into_iter().zip(&new_index).filter(|(_, i)| i.is_some()).map(|(t, _)| t).collect();
        for ins in &mut self.instructions {
            if let Instruction::Lookup(l) = ins {
                l.table.iter_mut().for_each(|t| *t = new_index[*t as usize].expect("a read table is kept"));
            }
        }
    }

    /// The partition of each table (that of the lookups reading it; 0 for an unread one).
    pub fn table_partitions(&self) -> Vec<usize> {
        let mut out = vec![0; self.tables.len()];
        for ins in &self.instructions {
            if let Instruction::Lookup(l) = ins {
                for &t in &l.table {
                    if let Some(slot) = out.get_mut(t as usize) {
                        *slot = l.partition as usize;
                    }
                }
            }
        }
        out
    }

    /// Keyswitches per sample from each large key to each partition's small key:
    /// `[from][to]`.
    pub fn keyswitches_between(&self) -> Vec<Vec<usize>> {
        let n = self.partitions();
        let mut out = vec![vec![0; n]; n];
        for ins in &self.instructions {
            match ins {
                Instruction::Lookup(l) if !self.is_small(l.input) => {
                    out[self.key_of(l.input).min(n - 1)][(l.partition as usize).min(n - 1)] += l.table.len()
                }
                Instruction::Keyswitch(k) => out[self.key_of(k.input).min(n - 1)][0] += self.value_len[k.input],
                _ => {}
            }
        }
        out
    }

    /// Lookups per sample in each partition.
    pub fn lookups_per_partition(&self) -> Vec<usize> {
        let mut out = vec![0; self.partitions()];
        for ins in &self.instructions {
            if let Instruction::Lookup(l) = ins {
                if let Some(c) = out.get_mut(l.partition as usize) {
                    *c += l.table.len();
                }
            }
        }
        out
    }

    /// Is value `v` under the small key?
    pub fn is_small(&self, v: usize) -> bool {
        self.small.get(v).copied().unwrap_or(false)
    }

    pub fn keyswitches_per_sample(&self) -> usize {
        self.instructions
            .iter()
            .map(|i| match i {
                Instruction::Lookup(l) if !self.is_small(l.input) => l.table.len(),
                Instruction::Keyswitch(k) => self.value_len[k.input],
                _ => 0,
            })
            .sum()
    }

    pub fn lookups_per_sample(&self) -> usize {
        self.instructions.iter().map(|i| if let Instruction::Lookup(l) = i { l.table.len() } else { 0 }).sum()
    }

    /// Table reads per sample (a shared bootstrap reads two).
    pub fn reads_per_sample(&self) -> usize {
        self.instructions
            .iter()
            .map(|i| if let Instruction::Lookup(l) = i { l.table.len() * (1 + l.second.is_some() as usize) } else { 0 })
            .sum()
    }

    pub fn macs_per_sample(&self) -> usize {
        self.instructions.iter().map(|i| if let Instruction::Linear(l) = i { l.term_weight.len() } else { 0 }).sum()
    }

    /// Noise coefficients of every element of every value (Σw² over the kinds of noise
    /// feeding it), propagated through the linear maps.
    pub fn noise_coefs(&self) -> Vec<Vec<NoiseCoefs>> {
        let mut coefs: Vec<Vec<NoiseCoefs>> = self.value_len.iter().map(|&n| vec![NoiseCoefs::default(); n]).collect();
        for &i in &self.inputs {
            let fresh = if self.is_small(i) {
                NoiseCoefs { small_fresh: 1.0, ..Default::default() }
            } else {
                NoiseCoefs { fresh: 1.0, ..Default::default() }
            };
            coefs[i].iter_mut().for_each(|c| *c = fresh);
        }
        // A state input is a fresh encryption at first and a state output afterwards,
        // which the lowering checks carries at most one bootstrap's noise.
        for &(i, _) in &self.state {
            coefs[self.inputs[i]].iter_mut().for_each(|c| c.bootstrapped = 1.0);
        }
        for ins in &self.instructions {
            match ins {
                Instruction::Linear(l) => {
                    let out: Vec<NoiseCoefs> = (0..l.outputs())
                        .map(|j| {
                            l.terms(j).fold(NoiseCoefs::default(), |acc, (i, e, w)| {
                                acc.plus(&coefs[l.inputs[i]][e].scaled((w as f64) * (w as f64)))
                            })
                        })
                        .collect();
                    coefs[l.output] = out;
                }
                Instruction::Keyswitch(k) => coefs[k.output] = coefs[k.input].iter().map(|c| c.keyswitch()).collect(),
                Instruction::Lookup(l) => {
                    for out in std::iter::once(l.output).chain(l.second) {
                        coefs[out] = vec![NoiseCoefs { bootstrapped: 1.0, ..Default::default() }; l.table.len()];
                    }
                }
                Instruction::Product(p) => coefs[p.output] = self.product_coefs(p, &coefs[p.input]),
            }
        }
        coefs
    }

    /// What the products need from the parameters: packings and external products per
    /// sample, and the smallest ring in which no product term wraps onto a read
    /// coefficient (every exponent of M·P within one span of N).
    pub fn product_requirements(&self) -> crate::params::ProductRequirements {
        let mut r = crate::params::ProductRequirements::default();
        for ins in &self.instructions {
            if let Instruction::Product(p) = ins {
                r.packings += p.packs.iter().map(|q| q.len()).sum::<usize>();
                r.externals += p.sums.iter().map(|q| q.len()).sum::<usize>();
                let span = self.ggsw_of(p.ggsw).map_or(1, |g| g.span.max(1) as i64);
                let xs = p.packs.iter().flatten().map(|&(_, x)| x as i64);
                let (lo, hi) = xs.fold((0i64, 0i64), |(a, b), x| (a.min(x), b.max(x)));
                let width = (span - 1 + hi - lo + 1) as u64;
                r.min_polynomial_size = r.min_polynomial_size.max(width.next_power_of_two());
            }
        }
        r
    }

    /// The GGSW input `v` (its span and ‖M‖² bound), if `v` is one.
    pub fn ggsw_of(&self, v: usize) -> Option<&GgswValue> {
        self.ggsw.iter().find(|g| g.value == v)
    }

    /// Noise of a product's outputs: coefficient c of M·P sums M_t² times the noise of P's
    /// coefficient c − t, which is at most that of the worst element packed into P plus
    /// one packing keyswitch per element packed (each adds noise to every coefficient);
    /// then one external product's own noise per term, all per unit of ‖M‖².
    fn product_coefs(&self, p: &ProductInstr, input: &[NoiseCoefs]) -> Vec<NoiseCoefs> {
        let norm2 = self.ggsw_of(p.ggsw).map_or(0.0, |g| g.norm2);
        let packs: Vec<NoiseCoefs> = p
            .packs
            .iter()
            .map(|pack| {
                let worst = pack.iter().fold(NoiseCoefs::default(), |a, &(e, _)| a.max(&input[e as usize]));
                NoiseCoefs { packed: worst.packed + pack.len() as f64, ..worst }
            })
            .collect();
        let sums: Vec<NoiseCoefs> = p
            .sums
            .iter()
            .map(|terms| {
                // the external product's own noise does not vanish with M: at least one unit
                let own = NoiseCoefs { external: norm2.max(1.0), ..Default::default() };
                terms
                    .iter()
                    .fold(NoiseCoefs::default(), |a, &(_, q)| a.plus(&packs[q as usize].scaled(norm2)).plus(&own))
            })
            .collect();
        p.extract.iter().map(|&(sum, _)| sums[sum as usize]).collect()
    }

    /// Noise a lookup's bootstrap sees at element `e` of its input (the keyswitch of a
    /// large-key input included), as coefficients.
    pub fn lookup_input_coefs(&self, coefs: &[Vec<NoiseCoefs>], l: &LookupInstr, e: usize) -> NoiseCoefs {
        let c = coefs[l.input][e];
        if self.is_small(l.input) {
            c
        } else {
            c.keyswitch()
        }
    }

    /// Run on plaintexts: `inputs[k][sample]` is the plaintext vector of input k. With
    /// `noise`, each bootstrap input gets Gaussian noise of the variance the parameters
    /// predict for it, so approximate rounding and failures happen as they would
    /// encrypted; without, the run is exact.
    pub fn simulate(&self, inputs: &[Vec<Vec<u64>>], noise: Option<&Params>, rng: &mut impl Rng) -> Vec<Vec<Vec<u64>>> {
        let samples = inputs.first().map_or(0, |i| i.len());
        let coefs = noise.map(|_| self.noise_coefs());
        let mut values: Vec<Vec<Vec<u64>>> = vec![Vec::new(); self.value_len.len()];
        for (k, &v) in self.inputs.iter().enumerate() {
            values[v] = inputs[k].clone();
        }
        for ins in &self.instructions {
            match ins {
                Instruction::Linear(l) => {
                    let out = (0..samples)
                        .map(|s| {
                            (0..l.outputs())
                                .map(|j| {
                                    l.terms(j).fold(l.constant[j], |acc, (i, e, w)| {
                                        acc.wrapping_add(values[l.inputs[i]][s][e].wrapping_mul(w as u64))
                                    })
                                })
                                .collect()
                        })
                        .collect();
                    values[l.output] = out;
                }
                // a keyswitch changes the key, not the plaintext
                Instruction::Keyswitch(k) => values[k.output] = values[k.input].clone(),
                Instruction::Product(p) => {
                    let span = self.ggsw_of(p.ggsw).map_or(0, |g| g.span as usize);
                    let out =
                        (0..samples).map(|s| product_plain(p, &values[p.ggsw][s], span, &values[p.input][s])).collect();
                    values[p.output] = out;
                }
                Instruction::Lookup(l) => {
                    let p = self.precision_of(l.partition as usize);
                    let (from, to) = (self.key_of(l.input), l.partition as usize);
                    let std = |e: usize| -> f64 {
                        match (noise, &coefs) {
                            (Some(params), Some(c)) => {
                                params.lookup_input_variance_between(from, to, &self.lookup_input_coefs(c, l, e)).sqrt()
                            }
                            _ => 0.0,
                        }
                    };
                    let stds: Vec<f64> = (0..l.table.len()).map(std).collect();
                    let input = &values[l.input];
                    let (mut first, mut second) = (Vec::new(), Vec::new());
                    for row_in in input {
                        let (mut a, mut b) = (Vec::new(), Vec::new());
                        for (e, &t) in l.table.iter().enumerate() {
                            // one noisy bootstrap input, read once or twice
                            let mut m = row_in[e];
                            if stds[e] > 0.0 {
                                let z: f64 = StandardNormal.sample(rng);
                                m = m.wrapping_add((z * stds[e] * 2f64.powi(64)).round() as i64 as u64);
                            }
                            let table = &self.tables[t as usize];
                            a.push(bootstrap_plain(m, table, p));
                            if l.second.is_some() {
                                b.push(bootstrap_plain(m.wrapping_add(SECOND_HALF), table, p));
                            }
                        }
                        first.push(a);
                        second.push(b);
                    }
                    values[l.output] = first;
                    if let Some(o) = l.second {
                        values[o] = second;
                    }
                }
            }
        }
        self.outputs.iter().map(|&o| values[o].clone()).collect()
    }
}

/// A product on plaintexts: `ggsw` holds each polynomial's coefficients 0..span (signed
/// integers), `input` the packed elements' plaintexts. Exact in Z[Y, 1/Y]; the negacyclic
/// ring gives the same read coefficients when N is at least the lowering's minimum.
pub fn product_plain(p: &ProductInstr, ggsw: &[u64], span: usize, input: &[u64]) -> Vec<u64> {
    p.extract
        .iter()
        .map(|&(sum, c)| {
            let mut acc = 0u64;
            for &(g, q) in &p.sums[sum as usize] {
                let poly = &ggsw[g as usize * span..(g as usize + 1) * span];
                for &(e, x) in &p.packs[q as usize] {
                    let t = c as i64 - x as i64;
                    if (0..span as i64).contains(&t) {
                        acc = acc.wrapping_add(poly[t as usize].wrapping_mul(input[e as usize]));
                    }
                }
            }
            acc
        })
        .collect()
}

/// What a programmable bootstrap computes on a plaintext: the slot nearest to m (slots
/// 2^(63−p) apart), its table entry, negated past the padding bit (negacyclic).
pub fn bootstrap_plain(m: u64, table: &[u64], precision: u32) -> u64 {
    let shift = 63 - precision;
    let slot = (m.wrapping_add(1u64 << (shift - 1)) >> shift) as usize & ((2usize << precision) - 1);
    let half = 1usize << precision;
    if slot < half {
        table[slot]
    } else {
        table[slot - half].wrapping_neg()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bootstrap_reads_nearest_slot_and_wraps_negacyclically() {
        let table: Vec<u64> = (0..4).map(|v| v * 1000).collect();
        let d = 1u64 << 61; // precision 2: slots 2^61 apart
        assert_eq!(bootstrap_plain(2 * d, &table, 2), 2000);
        assert_eq!(bootstrap_plain(2 * d + d / 2 - 1, &table, 2), 2000);
        assert_eq!(bootstrap_plain(2 * d + d / 2, &table, 2), 3000);
        assert_eq!(bootstrap_plain(0u64.wrapping_sub(d / 3), &table, 2), 0);
        // 4·d is past the padding bit: −table[0]; 5·d: −table[1]
        assert_eq!(bootstrap_plain(5 * d, &table, 2), 1000u64.wrapping_neg());
    }
}
