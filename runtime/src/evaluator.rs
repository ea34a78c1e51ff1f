//! The server: evaluate a circuit on encrypted inputs with the evaluation keys only.

use crate::bootstrap::Bootstrapper;
use crate::crypto::{EncryptedInputs, EncryptedOutputs};
use crate::error::{Result, RuntimeError};
use crate::keys::{check_fingerprint, ExpandedSet, ServerKey};
use rayon::prelude::*;
use std::collections::HashMap;
use tfhe::core_crypto::algorithms::slice_algorithms::slice_wrapping_add_scalar_mul_assign;
use tfhe::core_crypto::prelude::*;
use veil_backend::circuit::{Circuit, Instruction, LinearInstr, LookupInstr};
use veil_backend::params::Params;

/// Keys expanded and converted, tables turned into bootstrap accumulators: everything the
/// evaluation needs that does not depend on the inputs, prepared once.
pub struct Evaluator<'a> {
    circuit: &'a Circuit,
    fingerprint: Vec<u8>,
    /// The server key's stamp: model fingerprint and key-pair id.
    key_stamp: Vec<u8>,
    /// Dimension of each parameter set's large key.
    bigs: Vec<usize>,
    /// Dimension of set 0's small key (0 without lookups).
    small: usize,
    /// Each parameter set's own keyswitch and bootstrap key (none without lookups).
    sets: Vec<ExpandedSet>,
    /// Keyswitching keys between sets, by (from, to).
    conversions: HashMap<(usize, usize), LweKeyswitchKeyOwned<u64>>,
    /// Each table as a bootstrap accumulator for its partition's key.
    accumulators: Vec<GlweCiphertextOwned<u64>>,
    /// The packing keyswitching key, for circuits with external products.
    packing: Option<LwePackingKeyswitchKeyOwned<u64>>,
    /// The GGSW decompositions the client's ciphertexts must have.
    products: veil_backend::params::ProductParams,
}

impl<'a> Evaluator<'a> {
    pub fn new(circuit: &'a Circuit, params: &Params, key: ServerKey, fingerprint: &[u8]) -> Result<Evaluator<'a>> {
        check_fingerprint("the server key", &key.fingerprint, fingerprint)?;
        crate::validate::check_server_key(&key, params)?;
        params.check_partitions(circuit).map_err(RuntimeError::Invalid)?;
        if !circuit.ggsw.is_empty() || params.has_products() {
            params.check_products(circuit).map_err(RuntimeError::Invalid)?;
        }
        let key_stamp = key.fingerprint.clone();
        let bigs: Vec<usize> = (0..params.set_count()).map(|q| params.set(q).big_dimension() as usize).collect();
        let has_lookups = circuit.lookups_per_sample() > 0;
        let mut packing = None;
        let (sets, conversions) = match key.expand() {
            Some(k) => {
                let fits = k.sets.len() == params.set_count()
                    && k.sets.iter().enumerate().all(|(q, (ks, b))| {
                        ks.input_key_lwe_dimension().0 == bigs[q]
                            && b.polynomial_size().0 == params.set(q).polynomial_size as usize
                    });
                if !fits {
                    return Err(RuntimeError::Invalid("the server key does not match the model's parameters".into()));
                }
                packing = k.packing;
                (k.sets, k.conversions.into_iter().collect::<HashMap<_, _>>())
            }
            None if has_lookups => {
                return Err(RuntimeError::Invalid(
                    "the server key has no bootstrap keys but the model needs them".into(),
                ))
            }
            None => (Vec::new(), HashMap::new()),
        };
        let accumulators = if sets.is_empty() {
            Vec::new()
        } else {
            let parts = circuit.table_partitions();
            circuit
                .tables
                .iter()
                .zip(parts)
                .map(|(t, q)| {
                    let b = &sets.get(q).ok_or_else(|| RuntimeError::Invalid("a table of a missing set".into()))?.1;
                    if t.len() != 1 << circuit.precision_of(q) {
                        return Err(RuntimeError::Invalid("a lookup table has the wrong size".into()));
                    }
                    Ok(generate_programmable_bootstrap_glwe_lut(
                        b.polynomial_size(),
                        b.glwe_size(),
                        t.len(),
                        CiphertextModulus::new_native(),
                        1u64,
                        |slot| t[slot as usize],
                    ))
                })
                .collect::<Result<Vec<_>>>()?
        };
        let small = sets.first().map_or(0, |(k, _)| k.output_key_lwe_dimension().0);
        Ok(Evaluator {
            circuit,
            fingerprint: fingerprint.to_vec(),
            key_stamp,
            bigs,
            small,
            sets,
            conversions,
            accumulators,
            packing,
            products: params.products,
        })
    }

    /// The packing keyswitching key, if the circuit has external products.
    pub(crate) fn packing_key(&self) -> Option<&LwePackingKeyswitchKeyOwned<u64>> {
        self.packing.as_ref()
    }

    /// The GGSW decompositions the circuit's external products expect.
    pub(crate) fn product_params(&self) -> &veil_backend::params::ProductParams {
        &self.products
    }

    /// Run on a batch; `progress` is called with the number of lookups just finished.
    pub fn run(&self, inputs: &EncryptedInputs, progress: &(dyn Fn(usize) + Sync)) -> Result<EncryptedOutputs> {
        check_fingerprint("the encrypted inputs", &inputs.fingerprint, &self.fingerprint)?;
        self.check_key_pair("the encrypted inputs", &inputs.fingerprint)?;
        inputs.check(self.circuit, &|q| self.bigs.get(q).copied().unwrap_or(0), self.small)?;
        let samples = inputs.samples;
        if !self.circuit.ggsw.is_empty() {
            return Err(RuntimeError::Invalid(
                "this model multiplies by GGSW inputs, which only training runs send (use `veil train-run`)".into(),
            ));
        }
        let outputs = self.run_expanded(inputs.expand(), &HashMap::new(), samples, progress)?;
        let keys = match self.circuit.partitions() {
            1 => Vec::new(),
            _ => self.circuit.outputs.iter().map(|&v| self.circuit.key_of(v) as u8).collect(),
        };
        Ok(EncryptedOutputs { fingerprint: inputs.fingerprint.clone(), samples, values: outputs, keys })
    }

    /// Ciphertexts stamped `stamp` were encrypted for this evaluator's key pair.
    pub fn check_key_pair(&self, what: &str, stamp: &[u8]) -> Result<()> {
        crate::keys::check_key_pair(what, stamp, &self.key_stamp)
    }

    /// Run on ciphertexts already expanded and checked: `[circuit input][sample]` in,
    /// `[circuit output][sample]` out.
    pub(crate) fn run_expanded(
        &self,
        inputs: Vec<PerSample>,
        ggsw: &HashMap<usize, Vec<Vec<crate::products::FourierGgsw>>>,
        samples: usize,
        progress: &(dyn Fn(usize) + Sync),
    ) -> Result<Vec<PerSample>> {
        // values[v][sample]
        let mut values: Vec<Option<PerSample>> = vec![None; self.circuit.value_len.len()];
        for (k, per_sample) in inputs.into_iter().enumerate() {
            values[self.circuit.inputs[k]] = Some(per_sample);
        }
        // Waves: run every linear map and keyswitch whose inputs are ready (in circuit
        // order), then every lookup whose input is ready, all together in one parallel
        // region, and again. Lookups that do not depend on each other (one per cut of a
        // tree's feature, branches of a network) so share the cores even when each has
        // few elements.
        let mut remaining: Vec<&Instruction> = self.circuit.instructions.iter().collect();
        while !remaining.is_empty() {
            let mut wave: Vec<&LookupInstr> = Vec::new();
            let mut rest = Vec::with_capacity(remaining.len());
            for ins in remaining {
                match ins {
                    Instruction::Linear(l) if l.inputs.iter().all(|&v| values[v].is_some()) => {
                        values[l.output] = Some(self.linear(l, &values, samples))
                    }
                    Instruction::Keyswitch(k) if values[k.input].is_some() => {
                        values[k.output] = Some(self.keyswitch(k.input, &values)?)
                    }
                    Instruction::Lookup(l) if values[l.input].is_some() => wave.push(l),
                    Instruction::Product(p) if values[p.input].is_some() => {
                        let polys = ggsw
                            .get(&p.ggsw)
                            .filter(|per_sample| per_sample.len() == samples)
                            .ok_or_else(|| RuntimeError::Invalid("a product's GGSW input is missing".into()))?;
                        values[p.output] = Some(self.product(p, Self::get(&values, p.input), polys)?)
                    }
                    _ => rest.push(ins),
                }
            }
            if wave.is_empty() && !rest.is_empty() {
                return Err(RuntimeError::Invalid("an instruction reads a value never computed".into()));
            }
            let done =
                wave.par_iter().map(|l| self.lookup(l, &values, samples, progress)).collect::<Result<Vec<_>>>()?;
            for (l, (first, second)) in wave.into_iter().zip(done) {
                values[l.output] = Some(first);
                if let Some(o) = l.second {
                    values[o] = Some(second);
                }
            }
            remaining = rest;
        }
        self.circuit
            .outputs
            .iter()
            .map(|&o| values[o].clone().ok_or_else(|| RuntimeError::Invalid("an output was never computed".into())))
            .collect()
    }

    /// The circuit this evaluator runs.
    pub fn circuit(&self) -> &Circuit {
        self.circuit
    }

    /// The fingerprint of the model it runs.
    pub fn fingerprint(&self) -> &[u8] {
        &self.fingerprint
    }

    /// Dimension of the key inputs and outputs are encrypted under.
    pub fn big_dimension(&self) -> usize {
        self.bigs[0]
    }

    /// Dimension of the small key (inputs under it, and lookups' inputs).
    pub fn small_dimension(&self) -> usize {
        self.small
    }

    /// LWE size of a value's ciphertexts.
    fn size_of(&self, v: usize) -> LweSize {
        LweSize(if self.circuit.is_small(v) { self.small } else { self.bigs[self.circuit.key_of(v)] } + 1)
    }

    /// Keyswitch every element of every sample of a large-key value to the small key.
    fn keyswitch(&self, input: usize, values: &[Option<Vec<LweCiphertextListOwned<u64>>>]) -> Result<PerSample> {
        let Some((ksk, _)) = self.sets.first() else {
            return Err(RuntimeError::Invalid("the circuit keyswitches but no keyswitching key was loaded".into()));
        };
        let lists = Self::get(values, input);
        Ok(lists
            .iter()
            .map(|list| {
                let mut out = LweCiphertextList::new(
                    0u64,
                    ksk.output_key_lwe_dimension().to_lwe_size(),
                    list.lwe_ciphertext_count(),
                    CiphertextModulus::new_native(),
                );
                out.par_iter_mut()
                    .zip(list.par_iter())
                    .for_each(|(mut o, i)| keyswitch_lwe_ciphertext(ksk, &i, &mut o));
                out
            })
            .collect())
    }

    fn get(values: &[Option<Vec<LweCiphertextListOwned<u64>>>], v: usize) -> &[LweCiphertextListOwned<u64>] {
        values[v].as_deref().expect("instructions are in dependency order")
    }

    /// out_j = Σ w·in + constant_j, each sample in parallel.
    fn linear(
        &self,
        l: &LinearInstr,
        values: &[Option<Vec<LweCiphertextListOwned<u64>>>],
        samples: usize,
    ) -> Vec<LweCiphertextListOwned<u64>> {
        let ins: Vec<&[LweCiphertextListOwned<u64>]> = l.inputs.iter().map(|&v| Self::get(values, v)).collect();
        let size = self.size_of(l.output);
        (0..samples)
            .into_par_iter()
            .map(|s| {
                let mut out = LweCiphertextList::new(
                    0u64,
                    size,
                    LweCiphertextCount(l.outputs()),
                    CiphertextModulus::new_native(),
                );
                for (j, mut ct) in out.iter_mut().enumerate() {
                    for (i, e, w) in l.terms(j) {
                        let src = ins[i][s].get(e);
                        slice_wrapping_add_scalar_mul_assign(ct.as_mut(), src.as_ref(), w as u64);
                    }
                    let body = ct.get_mut_body();
                    *body.data = body.data.wrapping_add(l.constant[j]);
                }
                out
            })
            .collect()
    }

    /// Keyswitch then bootstrap every element of every sample, all in parallel. Returns
    /// the outputs, and the second function's outputs when the instruction has one
    /// (empty otherwise).
    fn lookup(
        &self,
        l: &LookupInstr,
        values: &[Option<Vec<LweCiphertextListOwned<u64>>>],
        samples: usize,
        progress: &(dyn Fn(usize) + Sync),
    ) -> Result<(PerSample, PerSample)> {
        let (from, to) = (self.circuit.key_of(l.input), l.partition as usize);
        let Some((own, bsk)) = self.sets.get(to) else {
            return Err(RuntimeError::Invalid("the circuit has lookups but no bootstrap keys were loaded".into()));
        };
        let ksk = if from == to {
            own
        } else {
            self.conversions.get(&(from, to)).ok_or_else(|| {
                RuntimeError::Invalid(format!("no keyswitching key from parameter set {from} to set {to}"))
            })?
        };
        let input = Self::get(values, l.input);
        let small_input = self.circuit.is_small(l.input);
        let n = l.table.len();
        let size = LweSize(self.bigs[to] + 1);
        let new_ct = || LweCiphertext::new(0u64, size, CiphertextModulus::new_native());
        let jobs: Vec<(usize, usize)> = (0..samples).flat_map(|s| (0..n).map(move |e| (s, e))).collect();
        let results: Vec<(LweCiphertextOwned<u64>, Option<LweCiphertextOwned<u64>>)> = jobs
            .par_iter()
            .map_init(
                || Bootstrapper::new(ksk, bsk),
                |worker, &(s, e)| {
                    if small_input {
                        worker.load_small(&input[s].get(e));
                    } else {
                        worker.keyswitch(ksk, &input[s].get(e));
                    }
                    let mut out = new_ct();
                    worker.bootstrap(bsk, &self.accumulators[l.table[e] as usize], &mut out);
                    let second = l.second.map(|_| {
                        let mut o = new_ct();
                        worker.second_half(&mut o);
                        o
                    });
                    progress(1);
                    (out, second)
                },
            )
            .collect();
        let first = gather(samples, n, size, |i| &results[i].0);
        let second = match l.second {
            Some(_) => gather(samples, n, size, |i| results[i].1.as_ref().expect("computed with the first")),
            None => Vec::new(),
        };
        Ok((first, second))
    }
}

/// One value's ciphertexts, per sample.
pub(crate) type PerSample = Vec<LweCiphertextListOwned<u64>>;

/// Per-sample lists of `n` ciphertexts from results indexed sample-major.
fn gather<'r>(
    samples: usize,
    n: usize,
    size: LweSize,
    pick: impl Fn(usize) -> &'r LweCiphertextOwned<u64>,
) -> PerSample {
    (0..samples)
        .map(|s| {
            let mut list = LweCiphertextList::new(0u64, size, LweCiphertextCount(n), CiphertextModulus::new_native());
            for (e, mut ct) in list.iter_mut().enumerate() {
                ct.as_mut().copy_from_slice(pick(s * n + e).as_ref());
            }
            list
        })
        .collect()
}

impl Evaluator<'_> {
    /// Median milliseconds of one keyswitch and one bootstrap with this evaluator's keys,
    /// on a real encryption by `ck` (all-zero masks would skip work): what Σ lookup time
    /// is made of.
    pub fn time_lookup(&self, ck: &crate::ClientKey, runs: usize) -> Result<(f64, f64)> {
        let cts = ck.encrypt(&[vec![vec![3u64 << 58]]]).expand();
        let ct = cts[0][0].get(0);
        let Some((ksk, bsk)) = self.sets.first() else {
            return Err(RuntimeError::Invalid("the model has no lookups to time".into()));
        };
        let acc = self.accumulators.first().ok_or_else(|| RuntimeError::Invalid("no lookup tables".into()))?;
        let mut worker = Bootstrapper::new(ksk, bsk);
        let mut out = LweCiphertext::new(0u64, LweSize(self.bigs[0] + 1), CiphertextModulus::new_native());
        let (mut ks, mut br) = (Vec::new(), Vec::new());
        for _ in 0..runs.max(1) {
            let t = std::time::Instant::now();
            worker.keyswitch(ksk, &ct);
            ks.push(t.elapsed().as_secs_f64() * 1e3);
            let t = std::time::Instant::now();
            worker.bootstrap(bsk, acc, &mut out);
            br.push(t.elapsed().as_secs_f64() * 1e3);
        }
        Ok((median(ks), median(br)))
    }
}

/// The median of timings (the upper one of an even count).
pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}
