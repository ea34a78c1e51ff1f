//! Structural checks of keys and ciphertexts after they are read.
//!
//! A file's checksum only proves it was not damaged; a crafted file (a valid checksum
//! over a bad payload) can still declare dimensions its data does not have, and tfhe's
//! entities, deserialized field by field, trust them: a later keyswitch or decryption
//! would index past the data or divide by a zero size. Every key and ciphertext type
//! veil reads checks here that its containers hold exactly what its sizes say, with the
//! native modulus, before any of it is used; [`check_server_key`] and
//! [`ClientKey::check_params`] then check the sizes against the model's parameters.

use crate::crypto::{EncryptedInputs, EncryptedOutputs};
use crate::error::{Result, RuntimeError};
use crate::keys::{ClientKey, ServerKey};
use crate::training::{EncryptedBatches, EncryptedState};
use tfhe::core_crypto::prelude::*;
use veil_backend::params::Params;

/// Largest dimension, polynomial size or level count a file may declare: far above any
/// secure parameter set, low enough that sizes cannot overflow.
const MAX_SIZE: usize = 1 << 20;

/// Internal consistency of a value read from a file.
pub trait Validate {
    /// `Err` says what is inconsistent.
    fn validate(&self) -> std::result::Result<(), String>;
}

fn size_ok(what: &str, v: usize) -> std::result::Result<(), String> {
    if v == 0 || v > MAX_SIZE {
        return Err(format!("{what} {v} is out of range"));
    }
    Ok(())
}

fn modulus_ok(native: bool) -> std::result::Result<(), String> {
    if !native {
        return Err("ciphertexts must use the native 2^64 modulus".into());
    }
    Ok(())
}

fn lwe_list_ok(l: &LweCiphertextListOwned<u64>) -> std::result::Result<(), String> {
    size_ok("ciphertext size", l.lwe_size().0)?;
    modulus_ok(l.ciphertext_modulus().is_native_modulus())?;
    if !l.as_ref().len().is_multiple_of(l.lwe_size().0) {
        return Err(format!("{} values do not make ciphertexts of size {}", l.as_ref().len(), l.lwe_size().0));
    }
    Ok(())
}

/// A seeded GGSW ciphertext's sizes and data agree (sizes first: tfhe derives the level
/// count by dividing by them). Seeded: one body polynomial per row of each level matrix.
fn ggsw_ok(g: &SeededGgswCiphertextOwned<u64>) -> std::result::Result<(), String> {
    size_ok("GGSW GLWE size", g.glwe_size().0)?;
    size_ok("GGSW polynomial size", g.polynomial_size().0)?;
    modulus_ok(g.ciphertext_modulus().is_native_modulus())?;
    let row = g.glwe_size().0.saturating_mul(g.polynomial_size().0);
    if row > MAX_SIZE || g.as_ref().is_empty() || !g.as_ref().len().is_multiple_of(row) {
        return Err("a GGSW ciphertext's data does not match its sizes".into());
    }
    let decomposition = g.decomposition_base_log().0.saturating_mul(g.decomposition_level_count().0);
    if decomposition > 64 || decomposition == 0 {
        return Err("a GGSW ciphertext's decomposition is out of range".into());
    }
    Ok(())
}

/// A seeded packing keyswitching key's sizes and data agree: one body polynomial per input
/// element and level.
fn packing_key_ok(p: &SeededLwePackingKeyswitchKeyOwned<u64>) -> std::result::Result<(), String> {
    size_ok("packing key polynomial size", p.output_key_polynomial_size().0)?;
    size_ok("packing key levels", p.decomposition_level_count().0)?;
    size_ok("packing key GLWE dimension", p.output_key_glwe_dimension().0)?;
    modulus_ok(p.ciphertext_modulus().is_native_modulus())?;
    let per_input = p.decomposition_level_count().0 * p.output_key_polynomial_size().0;
    let decomposition = p.decomposition_base_log().0.saturating_mul(p.decomposition_level_count().0);
    if p.as_ref().is_empty() || !p.as_ref().len().is_multiple_of(per_input) || decomposition > 64 || decomposition == 0
    {
        return Err("the packing keyswitching key's data does not match its sizes".into());
    }
    size_ok("packing key input dimension", p.input_key_lwe_dimension().0)
}

fn seeded_list_ok(l: &SeededLweCiphertextListOwned<u64>) -> std::result::Result<(), String> {
    // Seeded: one body per ciphertext; the size only shapes the regenerated masks.
    size_ok("ciphertext size", l.lwe_size().0)?;
    modulus_ok(l.ciphertext_modulus().is_native_modulus())
}

impl Validate for ClientKey {
    fn validate(&self) -> std::result::Result<(), String> {
        size_ok("key dimension", self.big.lwe_dimension().0)?;
        if let Some(s) = &self.small {
            size_ok("small key dimension", s.lwe_dimension().0)?;
        }
        if !(self.big_noise_std.is_finite() && self.big_noise_std >= 0.0) {
            return Err(format!("noise level {} is not a standard deviation", self.big_noise_std));
        }
        for s in &self.more {
            size_ok("key dimension", s.big.lwe_dimension().0)?;
            size_ok("small key dimension", s.small.lwe_dimension().0)?;
            if !(s.big_noise_std.is_finite() && s.big_noise_std >= 0.0) {
                return Err(format!("noise level {} is not a standard deviation", s.big_noise_std));
            }
        }
        if self.more.len() > 7 {
            return Err(format!("{} parameter sets (at most 8)", self.more.len() + 1));
        }
        Ok(())
    }
}

/// A gadget decomposition (base 2^base, `levels` levels) fits 64 bits; `what` names the key.
fn decomposition_ok(what: &str, base: usize, levels: usize) -> std::result::Result<(), String> {
    size_ok(&format!("{what} key levels"), levels)?;
    if base == 0 || base * levels > 64 {
        return Err(format!("the {what} key's decomposition 2^{base}×{levels} does not fit 64 bits"));
    }
    Ok(())
}

/// A bootstrap key and a keyswitching key hold what their sizes say.
fn set_ok(b: &SeededLweBootstrapKeyOwned<u64>, k: &SeededLweKeyswitchKeyOwned<u64>) -> std::result::Result<(), String> {
    size_ok("bootstrap key polynomial size", b.polynomial_size().0)?;
    if !b.polynomial_size().0.is_power_of_two() {
        return Err("the bootstrap key's polynomial size is not a power of two".into());
    }
    size_ok("bootstrap key GLWE size", b.glwe_size().0)?;
    decomposition_ok("bootstrap", b.decomposition_base_log().0, b.decomposition_level_count().0)?;
    modulus_ok(b.ciphertext_modulus().is_native_modulus())?;
    let ggsw = b.decomposition_level_count().0 * b.glwe_size().0 * b.polynomial_size().0;
    if !b.as_ref().len().is_multiple_of(ggsw) || b.as_ref().is_empty() {
        return Err("the bootstrap key's data does not match its sizes".into());
    }
    keyswitch_ok(k)
}

fn keyswitch_ok(k: &SeededLweKeyswitchKeyOwned<u64>) -> std::result::Result<(), String> {
    size_ok("keyswitch key output size", k.output_lwe_size().0)?;
    decomposition_ok("keyswitch", k.decomposition_base_log().0, k.decomposition_level_count().0)?;
    modulus_ok(k.ciphertext_modulus().is_native_modulus())?;
    let per_input = k.decomposition_level_count().0;
    if !k.as_ref().len().is_multiple_of(per_input) || k.as_ref().is_empty() {
        return Err("the keyswitch key's data does not match its sizes".into());
    }
    Ok(())
}

impl Validate for ServerKey {
    fn validate(&self) -> std::result::Result<(), String> {
        match (&self.bootstrap, &self.keyswitch) {
            (None, None) if self.more.is_empty() && self.conversions.is_empty() => Ok(()),
            (Some(b), Some(k)) => {
                set_ok(b, k)?;
                for s in &self.more {
                    set_ok(&s.bootstrap, &s.keyswitch)?;
                }
                for c in &self.conversions {
                    keyswitch_ok(&c.key)?;
                }
                if let Some(p) = &self.packing {
                    packing_key_ok(p)?;
                }
                Ok(())
            }
            _ => Err("the key holds a bootstrap key without a keyswitch key, or the reverse".into()),
        }
    }
}

impl Validate for EncryptedInputs {
    fn validate(&self) -> std::result::Result<(), String> {
        for per_sample in &self.values {
            if per_sample.len() != self.samples {
                return Err(format!("an input holds {} samples, the batch says {}", per_sample.len(), self.samples));
            }
            per_sample.iter().try_for_each(seeded_list_ok)?;
        }
        Ok(())
    }
}

impl Validate for EncryptedOutputs {
    fn validate(&self) -> std::result::Result<(), String> {
        for per_sample in &self.values {
            if per_sample.len() != self.samples {
                return Err(format!("an output holds {} samples, the batch says {}", per_sample.len(), self.samples));
            }
            per_sample.iter().try_for_each(lwe_list_ok)?;
        }
        Ok(())
    }
}

impl Validate for EncryptedBatches {
    fn validate(&self) -> std::result::Result<(), String> {
        self.batches.iter().flatten().try_for_each(seeded_list_ok)?;
        for g in self.ggsw.iter().flatten().flatten() {
            ggsw_ok(g)?;
        }
        Ok(())
    }
}

impl Validate for EncryptedState {
    fn validate(&self) -> std::result::Result<(), String> {
        self.values.iter().try_for_each(lwe_list_ok)
    }
}

/// The server key's sizes are the model's parameters' (checked before it is expanded).
pub fn check_server_key(key: &ServerKey, params: &Params) -> Result<()> {
    let bad = |msg: String| Err(RuntimeError::Invalid(format!("the server key does not match the model: {msg}")));
    key.validate().or_else(bad)?;
    let (Some(b), Some(k)) = (&key.bootstrap, &key.keyswitch) else {
        return Ok(()); // no lookups: Evaluator::new checks the circuit needs none
    };
    if key.more.len() != params.partitions.len() || key.conversions.len() != params.conversions.len() {
        return bad(format!(
            "{} parameter set(s) and {} conversion key(s), the model's {} and {}",
            1 + key.more.len(),
            key.conversions.len(),
            params.set_count(),
            params.conversions.len()
        ));
    }
    let sets = std::iter::once((b, k)).chain(key.more.iter().map(|s| (&s.bootstrap, &s.keyswitch)));
    for (q, (b, k)) in sets.enumerate() {
        let p = params.set(q);
        let want = [
            ("small dimension", b.input_lwe_dimension().0, p.lwe_dimension as usize),
            ("GLWE dimension", b.glwe_size().0 - 1, p.glwe_dimension as usize),
            ("polynomial size", b.polynomial_size().0, p.polynomial_size as usize),
            ("bootstrap base log", b.decomposition_base_log().0, p.pbs_base_log as usize),
            ("bootstrap levels", b.decomposition_level_count().0, p.pbs_level as usize),
            ("keyswitch input dimension", k.input_key_lwe_dimension().0, p.big_dimension() as usize),
            ("keyswitch output dimension", k.output_key_lwe_dimension().0, p.lwe_dimension as usize),
            ("keyswitch base log", k.decomposition_base_log().0, p.ks_base_log as usize),
            ("keyswitch levels", k.decomposition_level_count().0, p.ks_level as usize),
        ];
        for (what, found, expected) in want {
            if found != expected {
                let set = if params.partitions.is_empty() { String::new() } else { format!("set {q}: ") };
                return bad(format!("{set}{what} {found}, the model's {expected}"));
            }
        }
    }
    for (c, want) in key.conversions.iter().zip(&params.conversions) {
        let (from, to) = (params.set(want.from as usize), params.set(want.to as usize));
        let fits = c.from == want.from
            && c.to == want.to
            && c.key.input_key_lwe_dimension().0 == from.big_dimension() as usize
            && c.key.output_key_lwe_dimension().0 == to.lwe_dimension as usize
            && c.key.decomposition_base_log().0 == want.base_log as usize
            && c.key.decomposition_level_count().0 == want.level as usize;
        if !fits {
            return bad(format!("the keyswitching key from set {} to set {} has other sizes", want.from, want.to));
        }
    }
    match (&key.packing, params.has_products()) {
        (None, false) => {}
        (Some(pk), true) => {
            let pp = &params.products;
            let fits = pk.input_key_lwe_dimension().0 == params.big_dimension() as usize
                && pk.output_key_glwe_dimension().0 == params.glwe_dimension as usize
                && pk.output_key_polynomial_size().0 == params.polynomial_size as usize
                && pk.decomposition_base_log().0 == pp.packing_base_log as usize
                && pk.decomposition_level_count().0 == pp.packing_level as usize;
            if !fits {
                return bad("the packing keyswitching key has other sizes".into());
            }
        }
        (Some(_), false) => return bad("a packing key the model does not use".into()),
        (None, true) => return bad("no packing keyswitching key, and the model multiplies encrypted values".into()),
    }
    Ok(())
}

impl ClientKey {
    /// The key's dimensions are the model's parameters'.
    pub fn check_params(&self, params: &Params) -> Result<()> {
        let bad = |msg: String| Err(RuntimeError::Invalid(format!("the client key does not match the model: {msg}")));
        self.validate().or_else(bad)?;
        if self.big.lwe_dimension().0 != params.big_dimension() as usize {
            return bad(format!("dimension {}, the model's {}", self.big.lwe_dimension().0, params.big_dimension()));
        }
        let small = self.small.as_ref().map_or(0, |s| s.lwe_dimension().0);
        let want = if params.has_lookups() { params.lwe_dimension as usize } else { 0 };
        if small != want {
            return bad(format!("small key dimension {small}, the model's {want}"));
        }
        if self.more.len() != params.partitions.len() {
            return bad(format!("{} parameter set(s), the model's {}", self.set_count(), params.set_count()));
        }
        for (q, s) in self.more.iter().enumerate() {
            let p = &params.partitions[q];
            if s.big.lwe_dimension().0 != p.big_dimension() as usize
                || s.small.lwe_dimension().0 != p.lwe_dimension as usize
            {
                return bad(format!("set {} has other dimensions than the model's", q + 1));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A list as a crafted file could hold it: `data` edited after serialization.
    fn edited(edit: impl Fn(&mut serde_json::Value)) -> LweCiphertextListOwned<u64> {
        let good = LweCiphertextList::new(0u64, LweSize(5), LweCiphertextCount(3), CiphertextModulus::new_native());
        let mut v = serde_json::to_value(&good).unwrap();
        edit(&mut v);
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn lists_whose_data_does_not_fit_their_size_are_refused() {
        assert!(lwe_list_ok(&edited(|_| {})).is_ok());
        let short = edited(|v| {
            v["data"].as_array_mut().unwrap().pop();
        });
        assert!(lwe_list_ok(&short).unwrap_err().contains("do not make ciphertexts"));
        let zero = edited(|v| v["lwe_size"] = serde_json::json!(0));
        assert!(lwe_list_ok(&zero).unwrap_err().contains("out of range"));
    }
}
