//! Encrypted training: the client encrypts batches and the starting model; the server runs
//! the step circuit batch after batch with the evaluation keys only, feeding each step's
//! state outputs (the updated weights) back as the next step's state inputs; the client
//! decrypts the final state.

use crate::error::{Result, RuntimeError};
use crate::evaluator::{Evaluator, PerSample};
use crate::keys::{check_fingerprint, ClientKey};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use tfhe::core_crypto::prelude::*;
use tfhe::named::Named;
use tfhe_versionable::{Upgrade, Version, Versionize, VersionsDispatch};
use veil_backend::circuit::Circuit;

/// Encrypted training batches, client → server: per batch (one step each), the circuit
/// inputs that are not state (features, targets, dither, derived square sums), seeded.
#[derive(Clone, Serialize, Deserialize, Versionize)]
#[versionize(EncryptedBatchesVersions)]
pub struct EncryptedBatches {
    pub fingerprint: Vec<u8>,
    pub(crate) batches: Vec<Vec<SeededLweCiphertextListOwned<u64>>>,
    /// Per batch, per GGSW input of the circuit, its GGSW ciphertexts (one per polynomial,
    /// seeded).
    pub(crate) ggsw: Vec<Vec<Vec<SeededGgswCiphertextOwned<u64>>>>,
}

/// Batches as written before external products (no GGSW inputs).
#[derive(Version)]
pub struct EncryptedBatchesV0 {
    fingerprint: Vec<u8>,
    batches: Vec<Vec<SeededLweCiphertextListOwned<u64>>>,
}

impl Upgrade<EncryptedBatchesV1> for EncryptedBatchesV0 {
    type Error = std::convert::Infallible;

    fn upgrade(self) -> std::result::Result<EncryptedBatchesV1, Self::Error> {
        let ggsw = vec![Vec::new(); self.batches.len()];
        Ok(EncryptedBatchesV1 { fingerprint: self.fingerprint, batches: self.batches, ggsw })
    }
}

/// Batches with unseeded GGSW ciphertexts (written for one day, before they were seeded).
#[derive(Version)]
pub struct EncryptedBatchesV1 {
    fingerprint: Vec<u8>,
    batches: Vec<Vec<SeededLweCiphertextListOwned<u64>>>,
    ggsw: Vec<Vec<Vec<GgswCiphertextOwned<u64>>>>,
}

impl Upgrade<EncryptedBatches> for EncryptedBatchesV1 {
    type Error = RuntimeError;

    fn upgrade(self) -> std::result::Result<EncryptedBatches, Self::Error> {
        if self.ggsw.iter().flatten().any(|input| !input.is_empty()) {
            return Err(RuntimeError::Invalid(
                "batches with unseeded GGSW ciphertexts, from an older veil: encrypt them again".into(),
            ));
        }
        let ggsw = self.ggsw.into_iter().map(|b| b.into_iter().map(|_| Vec::new()).collect()).collect();
        Ok(EncryptedBatches { fingerprint: self.fingerprint, batches: self.batches, ggsw })
    }
}

#[derive(VersionsDispatch)]
#[allow(unused)]
pub enum EncryptedBatchesVersions {
    V0(EncryptedBatchesV0),
    V1(EncryptedBatchesV1),
    V2(EncryptedBatches),
}

/// One batch's inputs: LWE ciphertext lists, and per GGSW input its GGSW ciphertexts.
pub type BatchInputs<'a> = (&'a [SeededLweCiphertextListOwned<u64>], &'a [Vec<SeededGgswCiphertextOwned<u64>>]);

impl Named for EncryptedBatches {
    const NAME: &'static str = "veil::EncryptedBatches";
}

/// The model being trained, encrypted: one ciphertext list per state input, and the
/// number of steps that produced it.
#[derive(Clone, Serialize, Deserialize, Versionize)]
#[versionize(EncryptedStateVersions)]
pub struct EncryptedState {
    pub fingerprint: Vec<u8>,
    pub steps: u64,
    pub(crate) values: Vec<LweCiphertextListOwned<u64>>,
}

#[derive(VersionsDispatch)]
#[allow(unused)]
pub enum EncryptedStateVersions {
    V0(EncryptedState),
}

impl Named for EncryptedState {
    const NAME: &'static str = "veil::EncryptedState";
}

/// Circuit input positions sent as LWE ciphertexts with each batch (not state, not
/// GGSW), in order.
fn batch_inputs(circuit: &Circuit) -> Vec<usize> {
    (0..circuit.inputs.len())
        .filter(|k| !circuit.state.iter().any(|&(i, _)| i == *k) && circuit.ggsw_of(circuit.inputs[*k]).is_none())
        .collect()
}

/// Circuit input positions of the GGSW inputs, in order.
fn ggsw_inputs(circuit: &Circuit) -> Vec<usize> {
    (0..circuit.inputs.len()).filter(|&k| circuit.ggsw_of(circuit.inputs[k]).is_some()).collect()
}

fn check_list(what: &str, count: usize, dim: usize, want_count: usize, want_dim: usize) -> Result<()> {
    if count != want_count || dim != want_dim {
        return Err(RuntimeError::Invalid(format!(
            "{what} holds {count} ciphertexts of dimension {dim}, the model expects {want_count} of dimension {want_dim}"
        )));
    }
    Ok(())
}

impl EncryptedBatches {
    pub fn len(&self) -> usize {
        self.batches.len()
    }

    pub fn is_empty(&self) -> bool {
        self.batches.is_empty()
    }

    /// The inputs of batch `i`: its LWE inputs and its GGSW inputs.
    pub fn batch(&self, i: usize) -> Option<BatchInputs<'_>> {
        Some((self.batches.get(i)?.as_slice(), self.ggsw.get(i)?.as_slice()))
    }

    /// Every batch holds the circuit's non-state inputs at the right sizes (dimension `big`,
    /// or `small` for inputs under the small key; GGSW ciphertexts of polynomial size
    /// `poly` with the decomposition of `products`).
    pub fn check(
        &self,
        circuit: &Circuit,
        big: usize,
        small: usize,
        poly: usize,
        products: &veil_backend::params::ProductParams,
    ) -> Result<()> {
        let want = batch_inputs(circuit);
        let want_ggsw = ggsw_inputs(circuit);
        if self.ggsw.len() != self.batches.len() {
            return Err(RuntimeError::Invalid(
                "the batches file holds GGSW inputs for another number of batches".into(),
            ));
        }
        for (n, batch) in self.ggsw.iter().enumerate() {
            if batch.len() != want_ggsw.len() {
                return Err(RuntimeError::Invalid(format!(
                    "batch {n} holds {} GGSW inputs, a training step takes {}",
                    batch.len(),
                    want_ggsw.len()
                )));
            }
            for (list, &k) in batch.iter().zip(&want_ggsw) {
                let fits = list.len() == circuit.value_len[circuit.inputs[k]]
                    && list.iter().all(|g| {
                        g.polynomial_size().0 == poly
                            && g.glwe_size().0.checked_mul(poly) == Some(big + poly)
                            && g.decomposition_base_log().0 == products.ggsw_base_log as usize
                            && g.decomposition_level_count().0 == products.ggsw_level as usize
                    });
                if !fits {
                    return Err(RuntimeError::Invalid(format!(
                        "batch {n}, input {k}: the GGSW ciphertexts do not fit the model's parameters"
                    )));
                }
            }
        }
        for (n, batch) in self.batches.iter().enumerate() {
            if batch.len() != want.len() {
                return Err(RuntimeError::Invalid(format!(
                    "batch {n} holds {} inputs, a training step takes {}",
                    batch.len(),
                    want.len()
                )));
            }
            for (list, &k) in batch.iter().zip(&want) {
                let what = format!("batch {n}, input {k}");
                let dim = list.lwe_size().to_lwe_dimension().0;
                let v = circuit.inputs[k];
                let want = if circuit.is_small(v) { small } else { big };
                check_list(&what, list.lwe_ciphertext_count().0, dim, circuit.value_len[v], want)?;
            }
        }
        Ok(())
    }
}

impl EncryptedState {
    pub fn values(&self) -> &[LweCiphertextListOwned<u64>] {
        &self.values
    }

    /// Replace the state by the next step's.
    pub fn advance(&mut self, values: Vec<LweCiphertextListOwned<u64>>) {
        self.values = values;
        self.steps += 1;
    }

    /// One list per state input, at the right sizes.
    pub fn check(&self, circuit: &Circuit, big: usize) -> Result<()> {
        if self.values.len() != circuit.state.len() {
            return Err(RuntimeError::Invalid(format!(
                "the weights file holds {} tensors, the model carries {}",
                self.values.len(),
                circuit.state.len()
            )));
        }
        for (list, &(k, _)) in self.values.iter().zip(&circuit.state) {
            let dim = list.lwe_size().to_lwe_dimension().0;
            check_list(
                "the weights file",
                list.lwe_ciphertext_count().0,
                dim,
                circuit.value_len[circuit.inputs[k]],
                big,
            )?;
        }
        Ok(())
    }
}

impl ClientKey {
    /// Encrypt training batches: `plaintexts[batch][circuit input][element]` for every
    /// circuit input; the state inputs' entries are left out (the server holds the state).
    pub fn encrypt_batches(
        &self,
        circuit: &Circuit,
        params: &veil_backend::params::Params,
        plaintexts: &[Vec<Vec<u64>>],
    ) -> Result<EncryptedBatches> {
        let keep = batch_inputs(circuit);
        let batches = plaintexts
            .iter()
            .map(|inputs| {
                if inputs.len() != circuit.inputs.len() {
                    return Err(RuntimeError::Invalid(format!(
                        "a batch has {} inputs, the circuit {}",
                        inputs.len(),
                        circuit.inputs.len()
                    )));
                }
                let rows: Vec<Vec<Vec<u64>>> = keep.iter().map(|&k| vec![inputs[k].clone()]).collect();
                let small: Vec<bool> = keep.iter().map(|&k| circuit.is_small(circuit.inputs[k])).collect();
                let enc = self.encrypt_keys(&rows, &small, &[]);
                let lwe = enc.values.into_iter().map(|mut per_sample| per_sample.remove(0)).collect();
                Ok((lwe, self.encrypt_ggsw_inputs(circuit, params, inputs)?))
            })
            .collect::<Result<Vec<_>>>()?;
        let (batches, ggsw) = batches.into_iter().unzip();
        Ok(EncryptedBatches { fingerprint: self.fingerprint.clone(), batches, ggsw })
    }

    /// The GGSW inputs of one batch: each input's polynomials (coefficients 0..span back
    /// to back in `inputs[k]`) encrypted under the large key.
    fn encrypt_ggsw_inputs(
        &self,
        circuit: &Circuit,
        params: &veil_backend::params::Params,
        inputs: &[Vec<u64>],
    ) -> Result<Vec<Vec<SeededGgswCiphertextOwned<u64>>>> {
        let key = self.glwe_key(params.polynomial_size as usize);
        let noise = crate::keys::gaussian(self.big_noise_std);
        let mut seeder = new_seeder();
        ggsw_inputs(circuit)
            .into_iter()
            .map(|k| {
                let g = circuit.ggsw_of(circuit.inputs[k]).expect("a GGSW input");
                let span = g.span as usize;
                let coeffs = &inputs[k];
                if coeffs.len() != span * circuit.value_len[g.value] || span > params.polynomial_size as usize {
                    return Err(RuntimeError::Invalid(format!("GGSW input {k} has the wrong number of coefficients")));
                }
                Ok(coeffs
                    .chunks(span.max(1))
                    .map(|c| crate::products::encrypt_ggsw(&key, c, &params.products, noise, seeder.as_mut()))
                    .collect())
            })
            .collect()
    }

    /// Encrypt a starting state: one plaintext vector per state input.
    pub fn encrypt_state(&self, circuit: &Circuit, plaintexts: &[Vec<u64>]) -> Result<EncryptedState> {
        if plaintexts.len() != circuit.state.len() {
            return Err(RuntimeError::Invalid(format!(
                "{} starting tensors for {} state inputs",
                plaintexts.len(),
                circuit.state.len()
            )));
        }
        let rows: Vec<Vec<Vec<u64>>> = plaintexts.iter().map(|p| vec![p.clone()]).collect();
        let values = self.encrypt(&rows).expand().into_iter().map(|mut per_sample| per_sample.remove(0)).collect();
        Ok(EncryptedState { fingerprint: self.fingerprint.clone(), steps: 0, values })
    }

    /// Decrypt a state: plaintexts per state input (decoding rounds them).
    pub fn decrypt_state(&self, state: &EncryptedState) -> Result<Vec<Vec<u64>>> {
        check_fingerprint("the encrypted weights", &state.fingerprint, &self.fingerprint)?;
        crate::keys::check_key_pair("the encrypted weights", &state.fingerprint, &self.fingerprint)?;
        state
            .values
            .iter()
            .map(|list| {
                if list.lwe_size().to_lwe_dimension() != self.big_key().lwe_dimension() {
                    return Err(RuntimeError::Invalid("weights of the wrong dimension for this key".into()));
                }
                let mut pt = PlaintextList::new(0u64, PlaintextCount(list.lwe_ciphertext_count().0));
                decrypt_lwe_ciphertext_list(self.big_key(), list, &mut pt);
                Ok(pt.into_container())
            })
            .collect()
    }
}

/// Where a training run is: after each step, the callback learns this.
pub struct StepDone {
    pub epoch: usize,
    /// Index of the step within the epoch.
    pub batch: usize,
    pub batches_per_epoch: usize,
    pub seconds: f64,
}

impl Evaluator<'_> {
    /// Check that batches and a state belong to this model and fit its circuit.
    pub fn check_training(&self, parts: &[&EncryptedBatches], state: &EncryptedState) -> Result<()> {
        if self.circuit().state.is_empty() {
            return Err(RuntimeError::Invalid(
                "this model is not a training model (its circuit carries no state)".into(),
            ));
        }
        check_fingerprint("the encrypted weights", &state.fingerprint, self.fingerprint())?;
        self.check_key_pair("the encrypted weights", &state.fingerprint)?;
        state.check(self.circuit(), self.big_dimension())?;
        for p in parts {
            check_fingerprint("the encrypted batches", &p.fingerprint, self.fingerprint())?;
            self.check_key_pair("the encrypted batches", &p.fingerprint)?;
            let poly = self.packing_key().map_or(0, |k| k.output_key_polynomial_size().0);
            p.check(self.circuit(), self.big_dimension(), self.small_dimension(), poly, self.product_params())?;
        }
        Ok(())
    }

    /// One step: the batch's inputs and the state in, the next state out.
    pub fn train_step(
        &self,
        batch: &[SeededLweCiphertextListOwned<u64>],
        ggsw: &[Vec<SeededGgswCiphertextOwned<u64>>],
        state: &[LweCiphertextListOwned<u64>],
        progress: &(dyn Fn(usize) + Sync),
    ) -> Result<Vec<LweCiphertextListOwned<u64>>> {
        let circuit = self.circuit();
        let ggsw_at = ggsw_inputs(circuit);
        let fourier: std::collections::HashMap<usize, Vec<Vec<crate::products::FourierGgsw>>> = ggsw_at
            .iter()
            .zip(ggsw)
            .map(|(&k, list)| (circuit.inputs[k], vec![list.par_iter().map(crate::products::to_fourier).collect()]))
            .collect();
        let mut expanded: Vec<LweCiphertextListOwned<u64>> =
            batch.par_iter().map(|l| l.clone().decompress_into_lwe_ciphertext_list()).collect();
        let mut inputs: Vec<PerSample> = Vec::with_capacity(circuit.inputs.len());
        let mut from_batch = expanded.drain(..);
        for k in 0..circuit.inputs.len() {
            match circuit.state.iter().position(|&(i, _)| i == k) {
                Some(s) => inputs.push(vec![state[s].clone()]),
                None if ggsw_at.contains(&k) => inputs.push(Vec::new()),
                None => inputs.push(vec![from_batch
                    .next()
                    .ok_or_else(|| RuntimeError::Invalid("a batch is missing inputs".into()))?]),
            }
        }
        let mut outputs = self.run_expanded(inputs, &fourier, 1, progress)?;
        Ok(circuit.state.iter().map(|&(_, o)| std::mem::take(&mut outputs[o]).remove(0)).collect())
    }

    /// Run `epochs` passes over the batches of every part, in order, from `state`. The
    /// server needs no secret key: only this evaluator (built from the server key).
    pub fn train(
        &self,
        parts: &[&EncryptedBatches],
        mut state: EncryptedState,
        epochs: usize,
        progress: &(dyn Fn(usize) + Sync),
        on_step: &mut dyn FnMut(&StepDone, &EncryptedState) -> Result<()>,
    ) -> Result<EncryptedState> {
        self.check_training(parts, &state)?;
        let per_epoch: usize = parts.iter().map(|p| p.len()).sum();
        for epoch in 0..epochs {
            let mut n = 0;
            for part in parts {
                for (batch, ggsw) in part.batches.iter().zip(&part.ggsw) {
                    let start = std::time::Instant::now();
                    let next = self.train_step(batch, ggsw, &state.values, progress)?;
                    state.advance(next);
                    let done = StepDone {
                        epoch,
                        batch: n,
                        batches_per_epoch: per_epoch,
                        seconds: start.elapsed().as_secs_f64(),
                    };
                    on_step(&done, &state)?;
                    n += 1;
                }
            }
        }
        Ok(state)
    }
}
