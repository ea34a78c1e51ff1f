//! Keys: the client key (secret) and the server key (evaluation keys only), made for one
//! compiled model's parameters and marked with its fingerprint.

use crate::error::{Result, RuntimeError};
use serde::{Deserialize, Serialize};
use tfhe::core_crypto::prelude::*;
use tfhe::named::Named;
use tfhe_versionable::{Upgrade, Version, Versionize, VersionsDispatch};
use veil_backend::params::Params;

/// Secret keys: the large key (inputs, accumulators, outputs) and, when the circuit has
/// lookups, the GLWE key it comes from and the small key bootstraps start from.
#[derive(Clone, Serialize, Deserialize, Versionize)]
#[versionize(ClientKeyVersions)]
pub struct ClientKey {
    pub fingerprint: Vec<u8>,
    pub(crate) big: LweSecretKeyOwned<u64>,
    pub(crate) small: Option<LweSecretKeyOwned<u64>>,
    pub(crate) big_noise_std: f64,
    /// The keys of parameter sets 1, 2, … (empty with one set).
    pub(crate) more: Vec<ClientSetKey>,
}

/// One further parameter set's secret keys.
#[derive(Clone, Serialize, Deserialize, Versionize)]
#[versionize(ClientSetKeyVersions)]
pub struct ClientSetKey {
    pub(crate) big: LweSecretKeyOwned<u64>,
    pub(crate) small: LweSecretKeyOwned<u64>,
    pub(crate) big_noise_std: f64,
}

#[derive(VersionsDispatch)]
#[allow(unused)]
pub enum ClientSetKeyVersions {
    V0(ClientSetKey),
}

#[derive(VersionsDispatch)]
#[allow(unused)]
pub enum ClientKeyVersions {
    V0(ClientKey),
}

impl Named for ClientKey {
    const NAME: &'static str = "veil::ClientKey";
}

/// Evaluation keys, compressed (seeded): the server expands them once when it loads them.
#[derive(Clone, Serialize, Deserialize, Versionize)]
#[versionize(ServerKeyVersions)]
pub struct ServerKey {
    pub fingerprint: Vec<u8>,
    pub(crate) bootstrap: Option<SeededLweBootstrapKeyOwned<u64>>,
    pub(crate) keyswitch: Option<SeededLweKeyswitchKeyOwned<u64>>,
    /// The keys of parameter sets 1, 2, … (empty with one set).
    pub(crate) more: Vec<ServerSetKey>,
    /// Keyswitching keys from one set's large key to another's small key.
    pub(crate) conversions: Vec<ConversionKey>,
    /// Packing keyswitching key (set 0's large LWE key → its GLWE key), for circuits with
    /// external products.
    pub(crate) packing: Option<SeededLwePackingKeyswitchKeyOwned<u64>>,
}

/// One further parameter set's evaluation keys: its bootstrap key and its own keyswitch.
#[derive(Clone, Serialize, Deserialize, Versionize)]
#[versionize(ServerSetKeyVersions)]
pub struct ServerSetKey {
    pub(crate) bootstrap: SeededLweBootstrapKeyOwned<u64>,
    pub(crate) keyswitch: SeededLweKeyswitchKeyOwned<u64>,
}

#[derive(VersionsDispatch)]
#[allow(unused)]
pub enum ServerSetKeyVersions {
    V0(ServerSetKey),
}

/// A keyswitching key from set `from`'s large key to set `to`'s small key.
#[derive(Clone, Serialize, Deserialize, Versionize)]
#[versionize(ConversionKeyVersions)]
pub struct ConversionKey {
    pub(crate) from: u32,
    pub(crate) to: u32,
    pub(crate) key: SeededLweKeyswitchKeyOwned<u64>,
}

#[derive(VersionsDispatch)]
#[allow(unused)]
pub enum ConversionKeyVersions {
    V0(ConversionKey),
}

/// A server key as written before external products (no packing key).
#[derive(Version)]
pub struct ServerKeyV0 {
    fingerprint: Vec<u8>,
    bootstrap: Option<SeededLweBootstrapKeyOwned<u64>>,
    keyswitch: Option<SeededLweKeyswitchKeyOwned<u64>>,
    more: Vec<ServerSetKey>,
    conversions: Vec<ConversionKey>,
}

impl Upgrade<ServerKey> for ServerKeyV0 {
    type Error = std::convert::Infallible;

    fn upgrade(self) -> std::result::Result<ServerKey, Self::Error> {
        let ServerKeyV0 { fingerprint, bootstrap, keyswitch, more, conversions } = self;
        Ok(ServerKey { fingerprint, bootstrap, keyswitch, more, conversions, packing: None })
    }
}

#[derive(VersionsDispatch)]
#[allow(unused)]
pub enum ServerKeyVersions {
    V0(ServerKeyV0),
    V1(ServerKey),
}

impl Named for ServerKey {
    const NAME: &'static str = "veil::ServerKey";
}

pub(crate) fn hex(f: &[u8]) -> String {
    f.iter().take(8).map(|b| format!("{b:02x}")).collect()
}

/// Keys and ciphertexts carry a *stamp*: the model's fingerprint, then a marker and the
/// id of the key pair they belong to (random, drawn at keygen), so that a mismatch of
/// either is an error rather than garbage. Files written before key ids existed carry the
/// fingerprint alone.
const KEY_MARK: &[u8; 4] = b"#key";
const KEY_ID_BYTES: usize = 16;

/// (model fingerprint, key-pair id if any) of a stamp.
fn split_stamp(stamp: &[u8]) -> (&[u8], &[u8]) {
    let n = stamp.len();
    if n >= KEY_MARK.len() + KEY_ID_BYTES && &stamp[n - KEY_ID_BYTES - KEY_MARK.len()..n - KEY_ID_BYTES] == KEY_MARK {
        (&stamp[..n - KEY_ID_BYTES - KEY_MARK.len()], &stamp[n - KEY_ID_BYTES..])
    } else {
        (stamp, &[])
    }
}

/// Check that an object stamped `found` belongs to the model with fingerprint (or stamp)
/// `expected`.
pub fn check_fingerprint(what: &str, found: &[u8], expected: &[u8]) -> Result<()> {
    let (a, b) = (split_stamp(found).0, split_stamp(expected).0);
    if a != b {
        return Err(RuntimeError::Mismatch { what: what.into(), found: hex(a), expected: hex(b) });
    }
    Ok(())
}

/// Check that an object stamped `found` was made with the key pair of stamp `key` (when
/// both say which).
pub fn check_key_pair(what: &str, found: &[u8], key: &[u8]) -> Result<()> {
    let (a, b) = (split_stamp(found).1, split_stamp(key).1);
    if !a.is_empty() && !b.is_empty() && a != b {
        return Err(RuntimeError::KeyPair { what: what.into() });
    }
    Ok(())
}

/// A stamp for a new key pair of the model `fingerprint`.
fn new_stamp(fingerprint: &[u8], seeder: &mut dyn Seeder) -> Vec<u8> {
    let mut s = split_stamp(fingerprint).0.to_vec();
    s.extend_from_slice(KEY_MARK);
    s.extend_from_slice(&seeder.seed().0.to_le_bytes());
    s
}

pub(crate) fn gaussian(std: f64) -> DynamicDistribution<u64> {
    DynamicDistribution::new_gaussian_from_std_dev(StandardDev(std))
}

/// Generate a fresh key pair for `params`.
pub fn keygen(params: &Params, fingerprint: &[u8]) -> Result<(ClientKey, ServerKey)> {
    params.validate().map_err(|e| RuntimeError::Invalid(format!("refusing to generate keys: {e}")))?;
    let mut boxed_seeder = new_seeder();
    let seeder = boxed_seeder.as_mut();
    let stamp = new_stamp(fingerprint, seeder);
    let fingerprint = stamp.as_slice();
    let mut secret = SecretRandomGenerator::<DefaultRandomGenerator>::new(seeder.seed());
    let modulus = CiphertextModulus::new_native();
    if !params.has_lookups() {
        let big = LweSecretKey::generate_new_binary(LweDimension(params.big_dimension() as usize), &mut secret);
        let client = ClientKey {
            fingerprint: fingerprint.to_vec(),
            big,
            small: None,
            big_noise_std: params.glwe_noise_std,
            more: Vec::new(),
        };
        let server = ServerKey {
            fingerprint: fingerprint.to_vec(),
            bootstrap: None,
            keyswitch: None,
            more: Vec::new(),
            conversions: Vec::new(),
            packing: None,
        };
        return Ok((client, server));
    }
    // every set: large key (from its GLWE key), small key, bootstrap key, own keyswitch
    let mut sets = Vec::with_capacity(params.set_count());
    let mut packing = None;
    for q in 0..params.set_count() {
        let p = params.set(q);
        let glwe = GlweSecretKey::generate_new_binary(
            GlweDimension(p.glwe_dimension as usize),
            PolynomialSize(p.polynomial_size as usize),
            &mut secret,
        );
        let small = LweSecretKey::generate_new_binary(LweDimension(p.lwe_dimension as usize), &mut secret);
        let big = glwe.clone().into_lwe_secret_key();
        let bootstrap = par_allocate_and_generate_new_seeded_lwe_bootstrap_key(
            &small,
            &glwe,
            DecompositionBaseLog(p.pbs_base_log as usize),
            DecompositionLevelCount(p.pbs_level as usize),
            gaussian(p.glwe_noise_std),
            modulus,
            seeder,
        );
        let keyswitch = allocate_and_generate_new_seeded_lwe_keyswitch_key(
            &big,
            &small,
            DecompositionBaseLog(p.ks_base_log as usize),
            DecompositionLevelCount(p.ks_level as usize),
            gaussian(p.lwe_noise_std),
            modulus,
            seeder,
        );
        if q == 0 && params.has_products() {
            packing = Some(allocate_and_generate_new_seeded_lwe_packing_keyswitch_key(
                &big,
                &glwe,
                DecompositionBaseLog(params.products.packing_base_log as usize),
                DecompositionLevelCount(params.products.packing_level as usize),
                gaussian(p.glwe_noise_std),
                modulus,
                seeder,
            ));
        }
        sets.push((big, small, bootstrap, keyswitch, p.glwe_noise_std));
    }
    let conversions = params
        .conversions
        .iter()
        .map(|c| ConversionKey {
            from: c.from,
            to: c.to,
            key: allocate_and_generate_new_seeded_lwe_keyswitch_key(
                &sets[c.from as usize].0,
                &sets[c.to as usize].1,
                DecompositionBaseLog(c.base_log as usize),
                DecompositionLevelCount(c.level as usize),
                gaussian(params.set(c.to as usize).lwe_noise_std),
                modulus,
                seeder,
            ),
        })
        .collect();
    let mut sets = sets.into_iter();
    let (big, small, bootstrap, keyswitch, big_noise_std) = sets.next().expect("at least one set");
    let (more_client, more_server): (Vec<_>, Vec<_>) = sets
        .map(|(big, small, bootstrap, keyswitch, big_noise_std)| {
            (ClientSetKey { big, small, big_noise_std }, ServerSetKey { bootstrap, keyswitch })
        })
        .unzip();
    let client =
        ClientKey { fingerprint: fingerprint.to_vec(), big, small: Some(small), big_noise_std, more: more_client };
    let server = ServerKey {
        fingerprint: fingerprint.to_vec(),
        bootstrap: Some(bootstrap),
        keyswitch: Some(keyswitch),
        more: more_server,
        conversions,
        packing,
    };
    Ok((client, server))
}

/// Evaluation keys of one set, ready: keyswitch expanded, bootstrap key in the Fourier
/// domain.
pub(crate) type ExpandedSet = (LweKeyswitchKeyOwned<u64>, FourierLweBootstrapKeyOwned);

fn expand_set(ks: SeededLweKeyswitchKeyOwned<u64>, bs: SeededLweBootstrapKeyOwned<u64>) -> ExpandedSet {
    let ks = ks.decompress_into_lwe_keyswitch_key();
    let bs = bs.par_decompress_into_lwe_bootstrap_key();
    let mut fourier = FourierLweBootstrapKey::new(
        bs.input_lwe_dimension(),
        bs.glwe_size(),
        bs.polynomial_size(),
        bs.decomposition_base_log(),
        bs.decomposition_level_count(),
    );
    par_convert_standard_lwe_bootstrap_key_to_fourier(&bs, &mut fourier);
    (ks, fourier)
}

/// Every set's expanded keys, and the conversion keys by (from, to).
pub(crate) struct ExpandedKeys {
    pub sets: Vec<ExpandedSet>,
    pub conversions: Vec<((usize, usize), LweKeyswitchKeyOwned<u64>)>,
    pub packing: Option<LwePackingKeyswitchKeyOwned<u64>>,
}

impl ServerKey {
    /// The keys as evaluation uses them: the keyswitch key expanded from its seed, the
    /// bootstrap key expanded and converted to the Fourier domain. `None` without lookups.
    pub(crate) fn expand(self) -> Option<ExpandedKeys> {
        let first = expand_set(self.keyswitch?, self.bootstrap?);
        let mut sets = vec![first];
        sets.extend(self.more.into_iter().map(|s| expand_set(s.keyswitch, s.bootstrap)));
        let conversions = self
            .conversions
            .into_iter()
            .map(|c| ((c.from as usize, c.to as usize), c.key.decompress_into_lwe_keyswitch_key()))
            .collect();
        let packing = self.packing.map(|k| k.decompress_into_lwe_packing_keyswitch_key());
        Some(ExpandedKeys { sets, conversions, packing })
    }
}

impl ClientKey {
    /// Dimension of the key inputs and outputs are encrypted under.
    pub fn dimension(&self) -> usize {
        self.big.lwe_dimension().0
    }

    /// Large key of parameter set `q` and the noise of fresh encryptions under it.
    pub(crate) fn big_of(&self, q: usize) -> Option<(&LweSecretKeyOwned<u64>, f64)> {
        match q {
            0 => Some((&self.big, self.big_noise_std)),
            _ => self.more.get(q - 1).map(|s| (&s.big, s.big_noise_std)),
        }
    }

    /// Number of parameter sets the key is for.
    pub fn set_count(&self) -> usize {
        1 + self.more.len()
    }

    /// Noise of fresh encryptions under the small key: the 128-bit minimum for its
    /// dimension, as the parameters choose it.
    pub(crate) fn small_gaussian(&self) -> DynamicDistribution<u64> {
        let n = self.small.as_ref().map_or(0, |k| k.lwe_dimension().0);
        gaussian(veil_backend::security::key_variance(n as u64).sqrt())
    }

    /// The small key (for noise measurements in tests).
    pub fn small_key(&self) -> Option<&LweSecretKeyOwned<u64>> {
        self.small.as_ref()
    }

    pub fn big_key(&self) -> &LweSecretKeyOwned<u64> {
        &self.big
    }

    /// The large key as the GLWE key it flattens (polynomial size `poly`).
    pub(crate) fn glwe_key(&self, poly: usize) -> GlweSecretKey<&[u64]> {
        GlweSecretKey::from_container(self.big.as_ref(), PolynomialSize(poly))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_tell_the_model_and_the_key_pair() {
        let mut seeder = new_seeder();
        let (a, b) = (new_stamp(b"model-1", seeder.as_mut()), new_stamp(b"model-1", seeder.as_mut()));
        // same model, other key pair
        assert!(check_fingerprint("x", &a, b"model-1").is_ok());
        assert!(check_fingerprint("x", &a, &b).is_ok());
        assert!(matches!(check_key_pair("x", &a, &b), Err(RuntimeError::KeyPair { .. })));
        assert!(check_key_pair("x", &a, &a).is_ok());
        // a stamp without a key id (older files) is checked for its model only
        assert!(check_key_pair("x", b"model-1", &a).is_ok());
        assert!(matches!(check_fingerprint("x", &a, b"model-2"), Err(RuntimeError::Mismatch { .. })));
    }
}
