//! Encryption and decryption of batches of samples, and the ciphertext containers that
//! travel between client and server.

use crate::error::{Result, RuntimeError};
use crate::keys::{check_fingerprint, ClientKey};
use serde::{Deserialize, Serialize};
use tfhe::core_crypto::prelude::*;
use tfhe::named::Named;
use tfhe_versionable::{Versionize, VersionsDispatch};
use veil_backend::circuit::Circuit;

/// Encrypted inputs, client → server: per circuit input, per sample, a seeded ciphertext
/// list (the masks are regenerated from a seed, so only bodies travel).
#[derive(Clone, Serialize, Deserialize, Versionize)]
#[versionize(EncryptedInputsVersions)]
pub struct EncryptedInputs {
    pub fingerprint: Vec<u8>,
    pub samples: usize,
    pub(crate) values: Vec<Vec<SeededLweCiphertextListOwned<u64>>>,
}

#[derive(VersionsDispatch)]
#[allow(unused)]
pub enum EncryptedInputsVersions {
    V0(EncryptedInputs),
}

impl Named for EncryptedInputs {
    const NAME: &'static str = "veil::EncryptedInputs";
}

/// Encrypted outputs, server → client: per circuit output, per sample.
#[derive(Clone, Serialize, Deserialize, Versionize)]
#[versionize(EncryptedOutputsVersions)]
pub struct EncryptedOutputs {
    pub fingerprint: Vec<u8>,
    pub samples: usize,
    pub(crate) values: Vec<Vec<LweCiphertextListOwned<u64>>>,
    /// The parameter set whose large key each output is under (empty: all set 0).
    pub(crate) keys: Vec<u8>,
}

#[derive(VersionsDispatch)]
#[allow(unused)]
pub enum EncryptedOutputsVersions {
    V0(EncryptedOutputs),
}

impl Named for EncryptedOutputs {
    const NAME: &'static str = "veil::EncryptedOutputs";
}

impl ClientKey {
    /// Encrypt plaintexts `[input][sample][element]` under the large key.
    pub fn encrypt(&self, plaintexts: &[Vec<Vec<u64>>]) -> EncryptedInputs {
        let big = vec![false; plaintexts.len()];
        self.encrypt_keys(plaintexts, &big, &[])
    }

    /// Encrypt plaintexts `[circuit input][sample][element]` for `circuit`: each input
    /// under the key the circuit reads it with (the small key for inputs only products read).
    pub fn encrypt_for(&self, circuit: &Circuit, plaintexts: &[Vec<Vec<u64>>]) -> EncryptedInputs {
        let small: Vec<bool> = circuit.inputs.iter().map(|&v| circuit.is_small(v)).collect();
        let sets: Vec<usize> = circuit.inputs.iter().map(|&v| circuit.key_of(v)).collect();
        self.encrypt_keys(plaintexts, &small, &sets)
    }

    /// Encrypt each input `k` under the small key when `small[k]`, else under the large
    /// key of parameter set `sets[k]` (set 0 when absent).
    pub(crate) fn encrypt_keys(&self, plaintexts: &[Vec<Vec<u64>>], small: &[bool], sets: &[usize]) -> EncryptedInputs {
        let mut seeder = new_seeder();
        let samples = plaintexts.first().map_or(0, |v| v.len());
        let values = plaintexts
            .iter()
            .enumerate()
            .map(|(k, per_sample)| {
                let use_small = small.get(k).copied().unwrap_or(false) && self.small.is_some();
                let big = self.big_of(sets.get(k).copied().unwrap_or(0)).unwrap_or((&self.big, self.big_noise_std));
                let (key, noise) = match (&self.small, use_small) {
                    (Some(s), true) => (s, self.small_gaussian()),
                    _ => (big.0, crate::keys::gaussian(big.1)),
                };
                let size = key.lwe_dimension().to_lwe_size();
                per_sample
                    .iter()
                    .map(|row| {
                        let mut list = SeededLweCiphertextList::new(
                            0u64,
                            size,
                            LweCiphertextCount(row.len()),
                            seeder.seed().into(),
                            CiphertextModulus::new_native(),
                        );
                        let pt = PlaintextList::from_container(row.as_slice());
                        par_encrypt_seeded_lwe_ciphertext_list(key, &mut list, &pt, noise, seeder.as_mut());
                        list
                    })
                    .collect()
            })
            .collect();
        EncryptedInputs { fingerprint: self.fingerprint.clone(), samples, values }
    }

    /// Decrypt outputs to plaintexts `[output][sample][element]` (still noisy: decoding
    /// rounds them).
    pub fn decrypt(&self, cts: &EncryptedOutputs) -> Result<Vec<Vec<Vec<u64>>>> {
        check_fingerprint("the encrypted outputs", &cts.fingerprint, &self.fingerprint)?;
        crate::keys::check_key_pair("the encrypted outputs", &cts.fingerprint, &self.fingerprint)?;
        cts.values
            .iter()
            .enumerate()
            .map(|(o, per_sample)| {
                let set = cts.keys.get(o).copied().unwrap_or(0) as usize;
                let (key, _) = self.big_of(set).ok_or_else(|| {
                    RuntimeError::Invalid(format!("output {o} is under parameter set {set}, which this key lacks"))
                })?;
                per_sample
                    .iter()
                    .map(|list| {
                        if list.lwe_size().to_lwe_dimension() != key.lwe_dimension() {
                            return Err(RuntimeError::Invalid(
                                "ciphertexts of the wrong dimension for this key".into(),
                            ));
                        }
                        let mut pt = PlaintextList::new(0u64, PlaintextCount(list.lwe_ciphertext_count().0));
                        decrypt_lwe_ciphertext_list(key, list, &mut pt);
                        Ok(pt.into_container())
                    })
                    .collect()
            })
            .collect()
    }
}

impl EncryptedInputs {
    /// Check the batch fits the circuit: inputs, element counts, ciphertext size (the
    /// dimension of the large key of the input's parameter set, `big_dimension(set)`, or
    /// the small key's for inputs under it).
    pub fn check(
        &self,
        circuit: &Circuit,
        big_dimension: &dyn Fn(usize) -> usize,
        small_dimension: usize,
    ) -> Result<()> {
        if self.values.len() != circuit.inputs.len() {
            return Err(RuntimeError::Invalid(format!(
                "the ciphertexts hold {} input(s), the model takes {}",
                self.values.len(),
                circuit.inputs.len()
            )));
        }
        for (k, (per_sample, &v)) in self.values.iter().zip(&circuit.inputs).enumerate() {
            if per_sample.len() != self.samples {
                return Err(RuntimeError::Invalid(format!(
                    "input {k} holds {} samples, the batch says {}",
                    per_sample.len(),
                    self.samples
                )));
            }
            for list in per_sample {
                if list.lwe_ciphertext_count().0 != circuit.value_len[v] {
                    return Err(RuntimeError::Invalid(format!(
                        "input {k} has {} elements per sample, the model expects {}",
                        list.lwe_ciphertext_count().0,
                        circuit.value_len[v]
                    )));
                }
                let want = if circuit.is_small(v) { small_dimension } else { big_dimension(circuit.key_of(v)) };
                if list.lwe_size().to_lwe_dimension().0 != want {
                    return Err(RuntimeError::Invalid(format!(
                        "input {k} is encrypted under a dimension-{} key, the model uses {want}",
                        list.lwe_size().to_lwe_dimension().0
                    )));
                }
            }
        }
        Ok(())
    }

    /// Expand the seeded masks: the ciphertexts the evaluator works on.
    pub(crate) fn expand(&self) -> Vec<Vec<LweCiphertextListOwned<u64>>> {
        self.values
            .iter()
            .map(|per| per.iter().map(|l| l.clone().decompress_into_lwe_ciphertext_list()).collect())
            .collect()
    }
}

impl EncryptedInputs {
    /// Split the batch into consecutive groups of at most `per` samples (`per` ≥ 1), in
    /// order: the parts a distributed queue hands to different workers.
    pub fn split(&self, per: usize) -> Vec<EncryptedInputs> {
        let per = per.max(1);
        (0..self.samples)
            .step_by(per)
            .map(|first| {
                let end = (first + per).min(self.samples);
                EncryptedInputs {
                    fingerprint: self.fingerprint.clone(),
                    samples: end - first,
                    values: self.values.iter().map(|v| v[first..end].to_vec()).collect(),
                }
            })
            .collect()
    }
}

impl EncryptedOutputs {
    /// Join the outputs of consecutive parts of one batch (see [`EncryptedInputs::split`])
    /// back into one batch, in order.
    ///
    /// Errors: no parts, parts made for different models, or different output counts.
    pub fn concat(parts: Vec<EncryptedOutputs>) -> Result<EncryptedOutputs> {
        let mut iter = parts.into_iter();
        let mut out = iter.next().ok_or_else(|| RuntimeError::Invalid("no outputs to join".into()))?;
        for part in iter {
            check_fingerprint("a part of the outputs", &part.fingerprint, &out.fingerprint)?;
            if part.values.len() != out.values.len() {
                return Err(RuntimeError::Invalid(format!(
                    "a part of the outputs holds {} output(s), the first {}",
                    part.values.len(),
                    out.values.len()
                )));
            }
            if part.keys != out.keys {
                return Err(RuntimeError::Invalid("parts of the outputs are under different keys".into()));
            }
            for (all, more) in out.values.iter_mut().zip(part.values) {
                all.extend(more);
            }
            out.samples += part.samples;
        }
        Ok(out)
    }
}
