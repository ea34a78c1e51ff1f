//! Noise model: the variance (torus-normalized) each operation adds, and the probability
//! that a lookup or a decryption fails given the variance it sees.
//!
//! The keyswitch, modulus-switch and bootstrap formulas are tfhe's own
//! (`tfhe::core_crypto::commons::noise_formulas`, derived for keys with 132-bit secure
//! noise); the bootstrap term includes the error of 53-bit-mantissa FFT products.
//! References: Chillotti et al., "TFHE: fast fully homomorphic encryption over the torus",
//! J. Cryptology 2020 (blind rotation, keyswitch); Bergerat et al., J. Cryptology 2023
//! (FFT noise, parameter optimization).

use crate::security::key_variance;
use tfhe::core_crypto::commons::noise_formulas::{
    centered_mean_shifted_modulus_switch, lwe_keyswitch, lwe_programmable_bootstrap, modulus_switch,
};

const Q: f64 = 18446744073709551616.0; // 2^64

/// A fresh encryption under a key of dimension `n`.
pub fn fresh(n: u64) -> f64 {
    key_variance(n)
}

/// A linear combination with clear integer weights w of independent ciphertexts of
/// variance `var` each: variance × ‖w‖₂².
pub fn linear(norm2: f64, var: f64) -> f64 {
    norm2 * var
}

/// Keyswitching from dimension `from` to `to` with a decomposition base 2^base_log and
/// `levels` levels.
pub fn keyswitch(from: u64, to: u64, base_log: u32, levels: u32) -> f64 {
    lwe_keyswitch::keyswitch_additive_variance_132_bits_security_gaussian_impl(
        from as f64,
        to as f64,
        2f64.powi(base_log as i32),
        levels as f64,
        Q,
        Q,
    )
}

/// Plain rounding of a dimension-`n` ciphertext from modulus 2^64 to 2N before blind
/// rotation: each mask rounding error e_i meets a key bit, so about n/2 of them add up.
pub fn modulus_switch(n: u64, poly_size: u64) -> f64 {
    modulus_switch::modulus_switch_additive_variance_impl(n as f64, Q, 2.0 * poly_size as f64)
}

/// Centred rounding, what the runtime does: the mask rounding errors are known to the
/// server, and with a uniform binary key their sum contributes Σe_i/2 on average, so the
/// body is corrected by that mean first and only the spread Σe_i(s_i − 1/2) is left —
/// half the variance of plain rounding (tfhe's "centered mean" modulus switch). The body's
/// own rounding, 1/(12·(2N)²), is added on top of tfhe's formula to stay conservative.
pub fn centered_modulus_switch(n: u64, poly_size: u64) -> f64 {
    let two_n = 2.0 * poly_size as f64;
    centered_mean_shifted_modulus_switch::centered_binary_shifted_modulus_switch_additive_variance_impl(
        n as f64, Q, two_n,
    ) + 1.0 / (12.0 * two_n * two_n)
}

/// The output of a programmable bootstrap (blind rotation with FFT products, then sample
/// extraction): independent of the input's noise.
pub fn bootstrap(n: u64, glwe_dim: u64, poly_size: u64, base_log: u32, levels: u32) -> f64 {
    lwe_programmable_bootstrap::pbs_variance_132_bits_security_gaussian_fft_mul_impl(
        n as f64,
        glwe_dim as f64,
        poly_size as f64,
        2f64.powi(base_log as i32),
        levels as f64,
        53.0,
        Q,
    )
}

/// Packing keyswitch of a ciphertext under a dimension-`big` LWE key into a GLWE whose
/// key flattens to that same dimension: the LWE keyswitch formula with the GLWE key's
/// dimension as output, added to every coefficient of the GLWE.
pub fn packing_keyswitch(big: u64, base_log: u32, levels: u32) -> f64 {
    keyswitch(big, big, base_log, levels)
}

/// An external product GGSW(M) ⊡ GLWE per unit of ‖M‖²₂, M the GGSW's message
/// polynomial: one CMUX of the blind rotation's formula (its decomposition term
/// (k+1)·l·N·(B²+2)/12·σ² plus the rounding term that meets the message). The rounding
/// term grows with ‖M‖² and the decomposition term does not, so scaling both by ‖M‖²
/// overestimates (Chillotti et al., J. Cryptology 2020, Thm. 3.13, external product).
pub fn external_product(glwe_dim: u64, poly_size: u64, base_log: u32, levels: u32) -> f64 {
    bootstrap(1, glwe_dim, poly_size, base_log, levels)
}

/// Probability that Gaussian noise of variance `var` exceeds `half_width` in magnitude:
/// erfc(half_width / √(2·var)).
pub fn p_error(var: f64, half_width: f64) -> f64 {
    if var <= 0.0 {
        return 0.0;
    }
    libm::erfc(half_width / (2.0 * var).sqrt())
}

/// The number of standard deviations `z` with P(|N(0,1)| > z) = p.
pub use veil_passes::bitwidth::z_for;

/// Largest variance at which noise stays below `half_width` with failure probability `p`.
pub fn max_variance(half_width: f64, p: f64) -> f64 {
    (half_width / z_for(p)).powi(2)
}

/// Half the width of a lookup slot at `precision` bits with one padding bit: noise beyond
/// it reads the neighbouring slot.
pub fn lookup_half_width(precision: u32) -> f64 {
    2f64.powi(-(precision as i32) - 2)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn z_inverts_p_error() {
        for p in [1e-3, 2f64.powi(-40), 2f64.powi(-128)] {
            let z = z_for(p);
            assert!((p_error(1.0, z) / p - 1.0).abs() < 1e-6, "p = {p}: {}", p_error(1.0, z));
        }
        let z = z_for(2f64.powi(-40));
        assert!(z > 7.0 && z < 7.3, "{z}");
    }

    #[test]
    fn modulus_switch_is_uniform_rounding_over_half_the_key() {
        // n/2 key bits on average times the variance 1/(48 N²) of rounding to 1/(2N)
        let v = modulus_switch(800, 2048);
        let expect = 800.0 / 2.0 / (48.0 * 2048.0f64.powi(2));
        assert!((v / expect - 1.0).abs() < 0.01, "{v} vs {expect}");
        // centring leaves the spread of n key bits around their mean: half as much
        let c = centered_modulus_switch(800, 2048);
        assert!((c / v - 0.5).abs() < 0.01, "{c} vs {v}");
    }

    #[test]
    fn model_reproduces_tfhe_documented_failure_probability() {
        // tfhe 1.0's PARAM_MESSAGE_2_CARRY_2_KS_PBS_GAUSSIAN_2M40: n 796, k 1, N 2048,
        // PBS 2^23 × 1 level, KS 2^3 × 5 levels, 4 bits + padding, 2-norm 5; tfhe
        // documents p_fail = 2^-40.489 for it.
        let var = 25.0 * bootstrap(796, 1, 2048, 23, 1) + keyswitch(2048, 796, 3, 5) + modulus_switch(796, 2048);
        let log2_p = p_error(var, lookup_half_width(4)).log2();
        assert!((log2_p - (-40.489)).abs() < 0.5, "log2 p_fail {log2_p}");
    }
}
