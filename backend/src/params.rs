//! Crypto parameters chosen per circuit.
//!
//! The search covers the LWE dimension n, the GLWE dimension k and polynomial size N, and
//! the bootstrap and keyswitch decompositions (base and levels). A candidate is feasible
//! when every key meets the 128-bit curve ([`crate::security`]) and, at every lookup, the
//! input noise — ‖w‖² times the noise of the bootstrapped and fresh ciphertexts feeding
//! it, plus keyswitch and modulus switch — stays inside half a table slot with
//! probability 1 − p_error; every decrypted output must also decrypt exactly. Among
//! feasible candidates the one with the lowest modelled time per lookup wins.

use crate::error::{BackendError, Result};
use crate::noise;
use crate::security::{self, key_variance, MIN_DIMENSION};
use serde::{Deserialize, Serialize};

/// What noise reaches a point of the circuit: Σw² over the ciphertexts feeding it through
/// linear maps, by kind: bootstrap outputs and fresh encryptions under the large key,
/// keyswitches to the small key, and fresh encryptions under the small key.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct NoiseCoefs {
    pub bootstrapped: f64,
    pub fresh: f64,
    #[serde(default)]
    pub keyswitched: f64,
    #[serde(default)]
    pub small_fresh: f64,
    /// Packing keyswitches (LWE → GLWE) feeding the value, times ‖M‖² of the client
    /// polynomial each packed ciphertext is then multiplied by (see `lower::products`).
    #[serde(default)]
    pub packed: f64,
    /// External products feeding the value, times ‖M‖² of their client polynomial.
    #[serde(default)]
    pub external: f64,
}

impl NoiseCoefs {
    /// Noise of a value under the large key.
    pub fn variance(&self, var_bootstrapped: f64, var_fresh: f64) -> f64 {
        self.bootstrapped * var_bootstrapped + self.fresh * var_fresh
    }

    /// Noise of any value, keyswitches and small-key encryptions included.
    pub fn variance_all(&self, var_bootstrapped: f64, var_fresh: f64, var_ks: f64, var_small: f64) -> f64 {
        self.variance(var_bootstrapped, var_fresh) + self.keyswitched * var_ks + self.small_fresh * var_small
    }

    /// Noise external products add: packing keyswitches and the products themselves.
    pub fn product_variance(&self, var_packing: f64, var_external: f64) -> f64 {
        self.packed * var_packing + self.external * var_external
    }

    /// The same value keyswitched to the small key.
    pub fn keyswitch(self) -> NoiseCoefs {
        NoiseCoefs { keyswitched: self.keyswitched + 1.0, ..self }
    }

    /// Every kind at least as large as in `o`.
    pub fn dominates(&self, o: &NoiseCoefs) -> bool {
        self.bootstrapped >= o.bootstrapped
            && self.fresh >= o.fresh
            && self.keyswitched >= o.keyswitched
            && self.small_fresh >= o.small_fresh
            && self.packed >= o.packed
            && self.external >= o.external
    }

    /// The larger of each kind.
    pub fn max(&self, o: &NoiseCoefs) -> NoiseCoefs {
        NoiseCoefs {
            bootstrapped: self.bootstrapped.max(o.bootstrapped),
            fresh: self.fresh.max(o.fresh),
            keyswitched: self.keyswitched.max(o.keyswitched),
            small_fresh: self.small_fresh.max(o.small_fresh),
            packed: self.packed.max(o.packed),
            external: self.external.max(o.external),
        }
    }

    /// w² times these coefficients.
    pub fn scaled(&self, w2: f64) -> NoiseCoefs {
        NoiseCoefs {
            bootstrapped: w2 * self.bootstrapped,
            fresh: w2 * self.fresh,
            keyswitched: w2 * self.keyswitched,
            small_fresh: w2 * self.small_fresh,
            packed: w2 * self.packed,
            external: w2 * self.external,
        }
    }

    pub fn plus(&self, o: &NoiseCoefs) -> NoiseCoefs {
        NoiseCoefs {
            bootstrapped: self.bootstrapped + o.bootstrapped,
            fresh: self.fresh + o.fresh,
            keyswitched: self.keyswitched + o.keyswitched,
            small_fresh: self.small_fresh + o.small_fresh,
            packed: self.packed + o.packed,
            external: self.external + o.external,
        }
    }
}

/// What the circuit needs from its parameters.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Requirements {
    /// Bits every lookup resolves (0 when there are none).
    pub precision: u32,
    /// Lookups per sample.
    pub lookups: usize,
    /// Keyswitches per sample: one per lookup of a large-key value, one per element
    /// keyswitched ahead for lookups that read small-key sums.
    #[serde(default)]
    pub keyswitches: usize,
    /// Noise at each distinct lookup input, the keyswitch to the small key included (a
    /// lookup reading a large-key value keyswitches it first).
    pub lookup_noise: Vec<NoiseCoefs>,
    /// Each decrypted output: its noise and the half-width (torus) it must stay under.
    pub outputs: Vec<(NoiseCoefs, f64)>,
    /// Failure probability allowed per lookup and per decryption.
    pub p_error: f64,
    /// With several parameter sets (partitions), what each needs (the fields above then
    /// describe the circuit as if it ran with one set); empty with one set.
    #[serde(default)]
    pub partitions: Vec<PartitionRequirements>,
    /// External products of client GGSW ciphertexts (none: zeros).
    #[serde(default)]
    pub products: ProductRequirements,
}

/// What external products (`lower::products`) need: per sample, how many LWE ciphertexts
/// are packed into GLWEs and how many external products run, and the smallest polynomial
/// size whose ring holds the products without wrapping onto a read coefficient.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ProductRequirements {
    pub packings: usize,
    pub externals: usize,
    pub min_polynomial_size: u64,
}

/// What one partition's parameter set must satisfy (see [`crate::partitions`]).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct PartitionRequirements {
    pub precision: u32,
    /// Lookups per sample in this partition.
    pub lookups: usize,
    /// Keyswitches per sample into this partition's small key, by the large key they
    /// start from (a partition index).
    pub keyswitches_from: Vec<usize>,
    /// Noise at this partition's lookup inputs: (partition of the input's large key,
    /// coefficients), keyswitch included.
    pub lookup_noise: Vec<(usize, NoiseCoefs)>,
    /// The circuit outputs under this partition's large key (indices into `outputs`).
    pub outputs: Vec<usize>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Params {
    /// Small LWE key (bootstrap input); 0 without lookups.
    pub lwe_dimension: u64,
    pub glwe_dimension: u64,
    /// Without lookups, the dimension of the plain LWE key (glwe_dimension 1).
    pub polynomial_size: u64,
    pub pbs_base_log: u32,
    pub pbs_level: u32,
    pub ks_base_log: u32,
    pub ks_level: u32,
    pub lwe_noise_std: f64,
    pub glwe_noise_std: f64,
    pub precision: u32,
    /// Worst per-lookup (or per-decryption) failure probability the model predicts.
    pub p_error: f64,
    pub global_p_error: f64,
    /// Modelled cost of one keyswitch + bootstrap in ms on the reference machine.
    pub pbs_cost_ms: f64,
    pub bootstrap_key_bytes: u64,
    pub keyswitch_key_bytes: u64,
    /// Further parameter sets (partitions 1, 2, …), each with its own keys; empty: the
    /// circuit runs with this one set. A partition's own keyswitch (its large key to its
    /// small key) uses its `ks_*` fields.
    #[serde(default)]
    pub partitions: Vec<Params>,
    /// Keyswitches between partitions (large key of `from` to small key of `to`).
    #[serde(default)]
    pub conversions: Vec<Conversion>,
    /// External products' decompositions (none without products).
    #[serde(default)]
    pub products: ProductParams,
}

/// Decompositions of external products (0 levels: the circuit has none): the packing
/// keyswitching key (large LWE key → GLWE key, one per circuit) and the client's GGSW
/// ciphertexts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ProductParams {
    pub packing_base_log: u32,
    pub packing_level: u32,
    pub ggsw_base_log: u32,
    pub ggsw_level: u32,
}

/// A keyswitching key from one partition's large key to another's small key.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Conversion {
    pub from: u32,
    pub to: u32,
    pub base_log: u32,
    pub level: u32,
}

impl Params {
    /// Parameter set of partition `q` (0: this one).
    pub fn set(&self, q: usize) -> &Params {
        if q == 0 {
            self
        } else {
            &self.partitions[q - 1]
        }
    }

    /// Evaluation key bytes in memory over every set, conversion keys included:
    /// (bootstrap, keyswitch).
    pub fn total_key_bytes(&self) -> (u64, u64) {
        let bsk = self.bootstrap_key_bytes + self.partitions.iter().map(|p| p.bootstrap_key_bytes).sum::<u64>();
        let conv: u64 = self
            .conversions
            .iter()
            .map(|c| {
                let (from, to) = (self.set(c.from as usize), self.set(c.to as usize));
                keyswitch_key_bytes(from.big_dimension(), c.level, to.lwe_dimension)
            })
            .sum();
        let ksk = self.keyswitch_key_bytes + self.partitions.iter().map(|p| p.keyswitch_key_bytes).sum::<u64>() + conv;
        (bsk, ksk)
    }

    /// Number of parameter sets.
    pub fn set_count(&self) -> usize {
        1 + self.partitions.len()
    }

    /// The decomposition (base log, levels) keyswitching partition `from`'s large key to
    /// partition `to`'s small key.
    pub fn keyswitch_between(&self, from: usize, to: usize) -> Option<(u32, u32)> {
        if from == to {
            let s = self.set(from);
            return Some((s.ks_base_log, s.ks_level));
        }
        self.conversions.iter().find(|c| c.from as usize == from && c.to as usize == to).map(|c| (c.base_log, c.level))
    }

    /// The circuit's partitions are these sets: as many, each at its precision, with a
    /// keyswitching key for every pair of keys a lookup crosses. `Err` says what differs.
    pub fn check_partitions(&self, circuit: &crate::circuit::Circuit) -> std::result::Result<(), String> {
        if circuit.partition_precisions.is_empty() && self.partitions.is_empty() {
            return Ok(());
        }
        if circuit.partitions() != self.set_count() {
            return Err(format!(
                "the circuit has {} parameter set(s), the parameters {}",
                circuit.partitions(),
                self.set_count()
            ));
        }
        for q in 0..self.set_count() {
            if self.set(q).precision != circuit.precision_of(q) {
                return Err(format!("parameter set {q} is not at its partition's precision"));
            }
        }
        for (from, row) in circuit.keyswitches_between().iter().enumerate() {
            for (to, &count) in row.iter().enumerate() {
                if count > 0 && self.keyswitch_between(from, to).is_none() {
                    return Err(format!("no keyswitching key from set {from} to set {to}"));
                }
            }
        }
        Ok(())
    }

    /// The circuit's products fit these parameters: products exist in both or neither, and
    /// every exponent and extracted coefficient lies inside the ring without wrapping onto
    /// a read coefficient. `Err` says what does not fit.
    pub fn check_products(&self, circuit: &crate::circuit::Circuit) -> std::result::Result<(), String> {
        if circuit.ggsw.is_empty() == self.has_products() {
            return Err("the circuit's products and the parameters' product keys disagree".into());
        }
        let need = circuit.product_requirements().min_polynomial_size;
        let n = self.polynomial_size;
        let extracts_fit = circuit.instructions.iter().all(|i| match i {
            crate::circuit::Instruction::Product(p) => p.extract.iter().all(|&(_, c)| (c as u64) < n),
            _ => true,
        });
        let spans_fit = circuit.ggsw.iter().all(|g| (g.span as u64) <= n);
        if need > n || !extracts_fit || !spans_fit {
            return Err(format!(
                "the circuit's products need polynomials of {need} coefficients, the parameters have {n}"
            ));
        }
        Ok(())
    }

    /// Variance a bootstrap in partition `to` sees for an input under partition `from`'s
    /// large key with coefficients `c` (the keyswitch included in `c`), modulus switch
    /// included.
    pub fn lookup_input_variance_between(&self, from: usize, to: usize, c: &NoiseCoefs) -> f64 {
        if from == 0 && to == 0 && self.partitions.is_empty() {
            return self.lookup_input_variance(c);
        }
        let (src, dst) = (self.set(from), self.set(to));
        let var_ks = self
            .keyswitch_between(from, to)
            .map_or(f64::INFINITY, |(b, l)| noise::keyswitch(src.big_dimension(), dst.lwe_dimension, b, l));
        c.variance_all(src.bootstrap_variance(), src.fresh_variance(), var_ks, dst.small_fresh_variance())
            + dst.modulus_switch_variance()
    }

    /// Dimension of the large key inputs, accumulators and outputs use.
    pub fn big_dimension(&self) -> u64 {
        self.glwe_dimension * self.polynomial_size
    }

    pub fn has_lookups(&self) -> bool {
        self.lwe_dimension > 0
    }

    /// Sizes within what keygen and evaluation handle, and 128-bit security: what a
    /// parameter set read from a file must satisfy before keys are made or checked
    /// against it. `Err` names the first value out of range.
    pub fn validate(&self) -> std::result::Result<(), String> {
        let within = |what: &str, v: u64, lo: u64, hi: u64| {
            if (lo..=hi).contains(&v) {
                Ok(())
            } else {
                Err(format!("{what} {v} is outside {lo}..={hi}"))
            }
        };
        let std_ok = |s: f64| s.is_finite() && s >= 0.0;
        if !std_ok(self.lwe_noise_std) || !std_ok(self.glwe_noise_std) {
            return Err("noise levels must be finite standard deviations".into());
        }
        if self.has_lookups() {
            within("LWE dimension", self.lwe_dimension, MIN_DIMENSION, 1 << 14)?;
            within("GLWE dimension", self.glwe_dimension, 1, 8)?;
            within("polynomial size", self.polynomial_size, 1 << 8, 1 << 17)?;
            if !self.polynomial_size.is_power_of_two() {
                return Err(format!("polynomial size {} is not a power of two", self.polynomial_size));
            }
            within("precision", self.precision as u64, 1, 16)?;
            for (what, base, level) in
                [("bootstrap", self.pbs_base_log, self.pbs_level), ("keyswitch", self.ks_base_log, self.ks_level)]
            {
                within(&format!("{what} levels"), level as u64, 1, 64)?;
                within(&format!("{what} base log"), base as u64, 1, 64 / level as u64)?;
            }
        } else {
            within("LWE dimension", self.big_dimension(), MIN_DIMENSION, 1 << 14)?;
        }
        if !self.is_secure() {
            return Err("the parameters are below 128-bit security".into());
        }
        if self.partitions.len() > 7 {
            return Err(format!("{} parameter sets (at most 8)", self.set_count()));
        }
        for (i, p) in self.partitions.iter().enumerate() {
            if !p.partitions.is_empty() || !p.conversions.is_empty() || !p.has_lookups() {
                return Err(format!("parameter set {} is malformed", i + 1));
            }
            p.validate().map_err(|e| format!("parameter set {}: {e}", i + 1))?;
        }
        let pp = &self.products;
        if pp.packing_level > 0 || pp.ggsw_level > 0 {
            for (what, base, level) in
                [("packing", pp.packing_base_log, pp.packing_level), ("GGSW", pp.ggsw_base_log, pp.ggsw_level)]
            {
                within(&format!("{what} levels"), level as u64, 1, 64)?;
                within(&format!("{what} base log"), base as u64, 1, 64 / level as u64)?;
            }
            if !self.has_lookups() {
                return Err("products need a GLWE key, which only circuits with lookups have".into());
            }
        }
        for c in &self.conversions {
            let n = self.set_count() as u32;
            if c.from >= n || c.to >= n || c.from == c.to {
                return Err(format!("a keyswitch from set {} to set {} (of {n})", c.from, c.to));
            }
            within("conversion keyswitch levels", c.level as u64, 1, 64)?;
            within("conversion keyswitch base log", c.base_log as u64, 1, 64 / c.level as u64)?;
        }
        Ok(())
    }

    /// Variance of a bootstrap's output.
    pub fn bootstrap_variance(&self) -> f64 {
        if !self.has_lookups() {
            return 0.0;
        }
        noise::bootstrap(
            self.lwe_dimension,
            self.glwe_dimension,
            self.polynomial_size,
            self.pbs_base_log,
            self.pbs_level,
        )
    }

    /// Variance of a fresh encryption under the large key.
    pub fn fresh_variance(&self) -> f64 {
        key_variance(self.big_dimension())
    }

    /// Variance keyswitch and modulus switch add before a blind rotation.
    pub fn pre_rotation_variance(&self) -> f64 {
        if !self.has_lookups() {
            return 0.0;
        }
        self.keyswitch_variance() + self.modulus_switch_variance()
    }

    /// Variance one keyswitch from the large key to the small key adds.
    pub fn keyswitch_variance(&self) -> f64 {
        if !self.has_lookups() {
            return 0.0;
        }
        noise::keyswitch(self.big_dimension(), self.lwe_dimension, self.ks_base_log, self.ks_level)
    }

    /// Variance the (centred) modulus switch before a blind rotation adds.
    pub fn modulus_switch_variance(&self) -> f64 {
        if !self.has_lookups() {
            return 0.0;
        }
        noise::centered_modulus_switch(self.lwe_dimension, self.polynomial_size)
    }

    /// Variance of a fresh encryption under the small key.
    pub fn small_fresh_variance(&self) -> f64 {
        if !self.has_lookups() {
            return 0.0;
        }
        key_variance(self.lwe_dimension)
    }

    /// Variance a bootstrap sees for an input with coefficients `c` (keyswitch included in
    /// `c`), modulus switch included.
    pub fn lookup_input_variance(&self, c: &NoiseCoefs) -> f64 {
        c.variance_all(
            self.bootstrap_variance(),
            self.fresh_variance(),
            self.keyswitch_variance(),
            self.small_fresh_variance(),
        ) + self.product_variance(c)
            + self.modulus_switch_variance()
    }

    /// The external products' share of the noise with coefficients `c`.
    pub fn product_variance(&self, c: &NoiseCoefs) -> f64 {
        let p = &self.products;
        if p.packing_level == 0 {
            return 0.0;
        }
        c.product_variance(
            noise::packing_keyswitch(self.big_dimension(), p.packing_base_log, p.packing_level),
            noise::external_product(self.glwe_dimension, self.polynomial_size, p.ggsw_base_log, p.ggsw_level),
        )
    }

    /// Does the circuit multiply by client GGSW ciphertexts?
    pub fn has_products(&self) -> bool {
        self.products.packing_level > 0
    }

    /// Both keys meet the 128-bit curve.
    pub fn is_secure(&self) -> bool {
        let big = security::is_secure(self.big_dimension(), self.glwe_noise_std);
        let small = !self.has_lookups() || security::is_secure(self.lwe_dimension, self.lwe_noise_std);
        big && small
    }
}

/// Modelled milliseconds for one keyswitch + bootstrap, fitted to tfhe 1.8 on this kind of
/// machine (one thread; veil-runtime's ignored `lookup_time_tracks_the_cost_model` test
/// measures it): the blind rotation
/// does n external products, each (k+1)(l+1) FFTs of size N plus (k+1)²·l products of
/// N-coefficient polynomials in the Fourier domain; the keyswitch k·N·l_ks·(n+1)
/// multiply-adds.
pub fn lookup_cost_ms(n: u64, k: u64, poly: u64, pbs_level: u32, ks_level: u32) -> f64 {
    rotation_cost_ms(n, k, poly, pbs_level) + keyswitch_cost_ms(n, k, poly, ks_level)
}

/// The blind rotation (and sample extraction) of [`lookup_cost_ms`].
pub fn rotation_cost_ms(n: u64, k: u64, poly: u64, pbs_level: u32) -> f64 {
    let (n, k, big_n, l) = (n as f64, k as f64, poly as f64, pbs_level as f64);
    let ffts = (k + 1.0) * (l + 1.0) * big_n.log2();
    let products = (k + 1.0) * (k + 1.0) * l;
    n * big_n * (2.12e-7 * ffts + 6.5e-7 * products)
}

/// Bytes of a bootstrap key in memory: n GGSW ciphertexts of (k+1)²·l polynomials of N
/// 64-bit coefficients.
pub fn bootstrap_key_bytes(n: u64, k: u64, poly: u64, pbs_level: u32) -> u64 {
    n * (k + 1) * (k + 1) * pbs_level as u64 * poly * 8
}

/// Bytes of a keyswitching key from a dimension-`big` key to a dimension-`n` one: big·l
/// LWE ciphertexts of n + 1 64-bit values.
pub fn keyswitch_key_bytes(big: u64, ks_level: u32, n: u64) -> u64 {
    big * ks_level as u64 * (n + 1) * 8
}

/// The keyswitch of [`lookup_cost_ms`]: k·N·l_ks·(n+1) multiply-adds.
pub fn keyswitch_cost_ms(n: u64, k: u64, poly: u64, ks_level: u32) -> f64 {
    6.4e-7 * (k * poly) as f64 * ks_level as f64 * (n + 1) as f64
}

/// Modelled time of one sample's lookups and keyswitches: what the optimizer minimises.
pub(crate) fn sample_cost(req: &Requirements, n: u64, k: u64, poly: u64, pbs_level: u32, ks_level: u32) -> f64 {
    req.lookups.max(1) as f64 * rotation_cost_ms(n, k, poly, pbs_level)
        + req.keyswitches as f64 * keyswitch_cost_ms(n, k, poly, ks_level)
}

/// A decomposition: base log, levels, and the variance it gives.
pub(crate) type Decomposition = (u32, u32, f64);

/// Best base (lowest variance) for each level count of a decomposition.
pub(crate) fn best_bases(max_level: u32, var: impl Fn(u32, u32) -> f64) -> Vec<Decomposition> {
    (1..=max_level)
        .filter_map(|level| {
            (1..=64 / level)
                .map(|b| (b, level, var(b, level)))
                .filter(|(_, _, v)| v.is_finite())
                .min_by(|a, b| a.2.total_cmp(&b.2))
        })
        .collect()
}

/// Levels of the packing keyswitch and of the client's GGSW ciphertexts: two each, at the
/// base giving the least noise (their noise is multiplied by the client polynomials'
/// ‖M‖², so they must be far more precise than a lookup's keyswitch; two levels measure
/// well under the lookups' budget for training, and cost little next to the bootstraps).
const PRODUCT_LEVELS: u32 = 2;

/// The product decompositions for a (k, N) and their variances (packing, per-‖M‖²
/// external product); zeros when `req` has no products.
fn product_decompositions(req: &Requirements, k: u64, poly: u64) -> (ProductParams, f64, f64) {
    if req.products.packings == 0 && req.products.externals == 0 {
        return (ProductParams::default(), 0.0, 0.0);
    }
    let best = |var: &dyn Fn(u32) -> f64| {
        (1..=64 / PRODUCT_LEVELS).map(|b| (b, var(b))).filter(|(_, v)| v.is_finite()).min_by(|a, b| a.1.total_cmp(&b.1))
    };
    let (pb, vp) = best(&|b| noise::packing_keyswitch(k * poly, b, PRODUCT_LEVELS)).unwrap_or((1, f64::INFINITY));
    let (gb, vg) = best(&|b| noise::external_product(k, poly, b, PRODUCT_LEVELS)).unwrap_or((1, f64::INFINITY));
    let p = ProductParams {
        packing_base_log: pb,
        packing_level: PRODUCT_LEVELS,
        ggsw_base_log: gb,
        ggsw_level: PRODUCT_LEVELS,
    };
    (p, vp, vg)
}

/// Modelled ms of a sample's packing keyswitches (k·N·l·(k+1)·N multiply-adds each, at
/// the keyswitch's rate) and external products (one CMUX of the blind rotation each).
pub fn product_cost_ms(req: &Requirements, k: u64, poly: u64, p: &ProductParams) -> f64 {
    let packing = 6.4e-7 * (k * poly) as f64 * p.packing_level as f64 * ((k + 1) * poly) as f64;
    let external = rotation_cost_ms(1, k, poly, p.ggsw_level);
    req.products.packings as f64 * packing + req.products.externals as f64 * external
}

/// Choose parameters for `req`.
pub fn optimize(req: &Requirements) -> Result<Params> {
    if req.lookups == 0 || req.precision == 0 {
        return optimize_without_lookups(req);
    }
    let p = req.precision;
    let lookup_max = noise::max_variance(noise::lookup_half_width(p), req.p_error);
    let mut best: Option<(f64, Params)> = None;
    // Keyswitch noise depends only on (k·N, n): share it across (k, N) pairs.
    let mut ks_cache: std::collections::HashMap<(u64, u64), Vec<Decomposition>> = std::collections::HashMap::new();
    for k in 1..=3u64 {
        for log_n in 8..=16u32 {
            let poly = 1u64 << log_n;
            // a table slot must span at least two coefficients (half-box rotation)
            if poly < 1 << (p + 1) || k * poly < MIN_DIMENSION || k * poly > 1 << 16 {
                continue;
            }
            let big = k * poly;
            if poly < req.products.min_polynomial_size {
                continue;
            }
            let var_fresh = key_variance(big);
            let (products, var_pack, var_ext) = product_decompositions(req, k, poly);
            let out_ok = |var_pbs: f64| {
                req.outputs.iter().all(|(c, hw)| {
                    c.variance(var_pbs, var_fresh) + c.product_variance(var_pack, var_ext)
                        <= noise::max_variance(*hw, req.p_error)
                })
            };
            for n in (MIN_DIMENSION..=1600).step_by(8) {
                // Cost grows with n: once the cheapest decompositions cost more than the
                // best candidate, no larger n can win for this (k, N).
                if best.as_ref().is_some_and(|(c, _)| sample_cost(req, n, k, poly, 1, 1) >= *c) {
                    break;
                }
                let var_ms = noise::centered_modulus_switch(n, poly);
                if var_ms > lookup_max {
                    continue;
                }
                let pbs = best_bases(4, |b, l| noise::bootstrap(n, k, poly, b, l));
                let ks = ks_cache
                    .entry((big, n))
                    .or_insert_with(|| best_bases(12, |b, l| noise::keyswitch(big, n, b, l)))
                    .clone();
                for &(pb, pl, var_pbs) in &pbs {
                    if !out_ok(var_pbs) {
                        continue;
                    }
                    let var_small = key_variance(n);
                    for &(kb, kl, var_ks) in &ks {
                        let at = |c: &NoiseCoefs| {
                            c.variance_all(var_pbs, var_fresh, var_ks, var_small)
                                + c.product_variance(var_pack, var_ext)
                                + var_ms
                        };
                        let fits = req.lookup_noise.iter().all(|c| at(c) <= lookup_max);
                        if !fits {
                            continue;
                        }
                        let cost = sample_cost(req, n, k, poly, pl, kl) + product_cost_ms(req, k, poly, &products);
                        if best.as_ref().is_some_and(|(c, _)| *c <= cost) {
                            continue;
                        }
                        let worst = req.lookup_noise.iter().map(at).fold(var_ks + var_ms, f64::max);
                        let p_err = noise::p_error(worst, noise::lookup_half_width(p));
                        best = Some((
                            cost,
                            Params {
                                lwe_dimension: n,
                                glwe_dimension: k,
                                polynomial_size: poly,
                                pbs_base_log: pb,
                                pbs_level: pl,
                                ks_base_log: kb,
                                ks_level: kl,
                                lwe_noise_std: key_variance(n).sqrt(),
                                glwe_noise_std: var_fresh.sqrt(),
                                precision: p,
                                p_error: p_err,
                                global_p_error: 1.0 - (1.0 - p_err).powf(req.lookups as f64),
                                pbs_cost_ms: lookup_cost_ms(n, k, poly, pl, kl),
                                bootstrap_key_bytes: bootstrap_key_bytes(n, k, poly, pl),
                                keyswitch_key_bytes: keyswitch_key_bytes(big, kl, n),
                                partitions: Vec::new(),
                                conversions: Vec::new(),
                                products,
                            },
                        ));
                    }
                }
            }
        }
    }
    best.map(|(_, p)| p).ok_or_else(|| {
        BackendError::NoParameters(format!(
            "no 128-bit secure parameters give {p}-bit lookups with p_error {:.1e} for the circuit's noise (largest Σw² into a lookup: {:.3e}); lower the precision or raise --p-error",
            req.p_error,
            req.lookup_noise.iter().map(|c| c.bootstrapped.max(c.fresh)).fold(0.0, f64::max)
        ))
    })
}

/// A circuit with no lookups needs only a plain LWE key that lets outputs decrypt exactly.
fn optimize_without_lookups(req: &Requirements) -> Result<Params> {
    let fits = |d: u64| {
        let v = key_variance(d);
        req.outputs.iter().all(|(c, hw)| c.variance(0.0, v) <= noise::max_variance(*hw, req.p_error))
    };
    let d = (MIN_DIMENSION..=1 << 14).step_by(8).find(|&d| fits(d)).ok_or_else(|| {
        BackendError::NoParameters(
            "no LWE dimension up to 16384 decrypts the outputs exactly; narrow the outputs".into(),
        )
    })?;
    let var = key_variance(d);
    let p_err = req.outputs.iter().map(|(c, hw)| noise::p_error(c.variance(0.0, var), *hw)).fold(0.0, f64::max);
    Ok(Params {
        lwe_dimension: 0,
        glwe_dimension: 1,
        polynomial_size: d,
        pbs_base_log: 0,
        pbs_level: 0,
        ks_base_log: 0,
        ks_level: 0,
        lwe_noise_std: 0.0,
        glwe_noise_std: var.sqrt(),
        precision: 0,
        p_error: p_err,
        global_p_error: p_err,
        pbs_cost_ms: 0.0,
        bootstrap_key_bytes: 0,
        keyswitch_key_bytes: 0,
        partitions: Vec::new(),
        conversions: Vec::new(),
        products: ProductParams::default(),
    })
}

/// A typical circuit's needs at `precision` bits: 48 lookups reading dot products of
/// ‖w‖² = 100 (bootstrapped) and fresh inputs, outputs read to 2^-16, p_error 2^-40.
pub fn typical_requirements(precision: u32) -> Requirements {
    let norm2 = 100.0;
    Requirements {
        precision,
        lookups: 48,
        keyswitches: 48,
        lookup_noise: vec![
            NoiseCoefs { bootstrapped: norm2, keyswitched: 1.0, ..Default::default() },
            NoiseCoefs { fresh: norm2 * 4.0, keyswitched: 1.0, ..Default::default() },
        ],
        outputs: vec![(NoiseCoefs { bootstrapped: norm2, ..Default::default() }, 2f64.powi(-16))],
        p_error: 2f64.powi(-40),
        partitions: Vec::new(),
        products: ProductRequirements::default(),
    }
}

/// Modelled ms of one lookup (keyswitch + bootstrap) at `precision` bits, as the optimizer
/// prices the set it picks for [`typical_requirements`]: the bit-width search compares
/// candidate circuits by lookups × this, so that it and the optimizer share one cost
/// model ([`lookup_cost_ms`]). Memoised; infinite where no parameters exist.
pub fn typical_lookup_cost_ms(precision: u32) -> f64 {
    use std::sync::{Mutex, OnceLock};
    static COSTS: OnceLock<Mutex<std::collections::HashMap<u32, f64>>> = OnceLock::new();
    if precision == 0 {
        return 0.0;
    }
    let costs = COSTS.get_or_init(Default::default);
    if let Some(&c) = costs.lock().expect("cost cache").get(&precision) {
        return c;
    }
    let c = optimize(&typical_requirements(precision)).map_or(f64::INFINITY, |p| p.pbs_cost_ms);
    costs.lock().expect("cost cache").insert(precision, c);
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn typical_cost_grows_with_precision() {
        let costs: Vec<f64> = (1..=8).map(typical_lookup_cost_ms).collect();
        eprintln!("typical lookup cost by precision 1..=8: {costs:?}");
        assert!(costs.windows(2).all(|w| w[1] >= w[0]), "{costs:?}");
        // Past 5 bits the polynomial must grow: a 6-bit lookup costs several 5-bit ones.
        assert!(costs[5] > 3.0 * costs[4], "{costs:?}");
    }

    fn req(precision: u32, norm2: f64) -> Requirements {
        let mut r = typical_requirements(precision);
        r.lookup_noise = vec![
            NoiseCoefs { bootstrapped: norm2, keyswitched: 1.0, ..Default::default() },
            NoiseCoefs { fresh: norm2 * 4.0, keyswitched: 1.0, ..Default::default() },
        ];
        r.outputs = vec![(NoiseCoefs { bootstrapped: norm2, ..Default::default() }, 2f64.powi(-16))];
        r
    }

    #[test]
    fn every_parameter_set_is_secure_and_meets_its_budget() {
        for p in 1..=7 {
            for norm2 in [1.0, 100.0, 1000.0] {
                let r = req(p, norm2);
                let params = optimize(&r).unwrap_or_else(|e| panic!("p {p}, ‖w‖² {norm2}: {e}"));
                assert!(params.is_secure(), "{params:?}");
                assert!(params.p_error <= r.p_error * 1.0001, "{params:?}");
                // the worst lookup, recomputed from the parameters, stays within budget
                let worst = r.lookup_noise.iter().map(|c| params.lookup_input_variance(c)).fold(0.0, f64::max);
                assert!(noise::p_error(worst, noise::lookup_half_width(p)) <= r.p_error * 1.0001);
            }
        }
    }

    #[test]
    #[ignore = "prints the parameter table; run with --ignored --nocapture"]
    fn print_parameter_table() {
        for p in 2..=7 {
            for norm2 in [100.0, 1000.0, 10000.0] {
                let t = std::time::Instant::now();
                match optimize(&req(p, norm2)) {
                    Ok(x) => println!(
                        "p={p} |w|²={norm2:>6}: n={} k={} N={} pbs={}x{} ks={}x{} cost={:.1}ms bsk={}MB ksk={}MB p_err=2^{:.1} ({:?})",
                        x.lwe_dimension, x.glwe_dimension, x.polynomial_size, x.pbs_base_log, x.pbs_level, x.ks_base_log, x.ks_level,
                        x.pbs_cost_ms, x.bootstrap_key_bytes >> 20, x.keyswitch_key_bytes >> 20, x.p_error.log2(), t.elapsed()
                    ),
                    Err(e) => println!("p={p} |w|²={norm2}: {e}"),
                }
            }
        }
    }

    #[test]
    fn precision_is_the_main_cost_lever() {
        let c4 = optimize(&req(4, 100.0)).unwrap().pbs_cost_ms;
        let c6 = optimize(&req(6, 100.0)).unwrap().pbs_cost_ms;
        assert!(c6 > 2.0 * c4, "4 bits: {c4} ms, 6 bits: {c6} ms");
    }

    #[test]
    fn no_lookups_needs_only_a_plain_key() {
        let r = Requirements {
            outputs: vec![(NoiseCoefs { fresh: 30.0 * 127.0 * 127.0, ..Default::default() }, 2f64.powi(-24))],
            p_error: 2f64.powi(-40),
            ..Default::default()
        };
        let p = optimize(&r).unwrap();
        assert!(!p.has_lookups() && p.is_secure());
        assert!(p.polynomial_size >= 450 && p.polynomial_size < 3000, "{p:?}");
    }
}
