//! The circuit: a flat program over vectors of LWE ciphertexts, and its simulation on
//! plaintexts.
//!
//! Every value is a vector of ciphertexts (per sample), under the large key or, where
//! marked, the small key bootstraps start from. An element holding integer v with
//! encoding (delta, base) carries the plaintext (v − base)·delta mod 2^64. Three
//! instructions exist: an affine map with clear integer weights (within one key), a
//! keyswitch from the large key to the small one, and a lookup (keyswitch if its input is
//! under the large key, then programmable bootstrap with a table per element; the result
//! is under the large key). Keyswitching once and summing under the small key saves a
//! keyswitch per lookup where many lookups read sums of few values (products).

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

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Instruction {
    Linear(LinearInstr),
    Lookup(LookupInstr),
    Keyswitch(KeyswitchInstr),
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
            }
        }
        coefs
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
