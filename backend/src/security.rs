//! 128-bit security of LWE and GLWE secret keys.
//!
//! The reference is the lattice-estimator fit Concrete uses for 128-bit security with
//! q = 2^64 and binary keys (Bergerat et al., "Parameter optimization and larger
//! precision for (T)FHE", J. Cryptology 2023): a key of dimension n ≥ 450 is secure when
//! its noise standard deviation (torus-normalized) is at least
//! 2^max(−0.025696778711484593·n + 2.675931372549016, 2 − 64). A GLWE key counts as an
//! LWE key of dimension k·N.
//!
//! veil encrypts with tfhe's minimal variance for 132-bit security — the noise tfhe's
//! keyswitch and bootstrap formulas assume — which meets this curve everywhere it applies
//! (checked by a test).

use tfhe::core_crypto::commons::noise_formulas::secure_noise::minimal_lwe_variance_for_132_bits_security_gaussian_impl;

/// Smallest dimension the 128-bit fit covers.
pub const MIN_DIMENSION: u64 = 450;

/// log2 of the smallest noise standard deviation that keeps a dimension-`n` key at 128
/// bits of security, or `None` below the fit's domain.
pub fn min_log2_std(n: u64) -> Option<f64> {
    (n >= MIN_DIMENSION).then(|| (-0.025696778711484593 * n as f64 + 2.675931372549016).max(2.0 - 64.0))
}

/// Is noise of standard deviation `std` (torus-normalized) secure for dimension `n`?
pub fn is_secure(n: u64, std: f64) -> bool {
    // Both curves share the 2^-62 floor: allow for rounding there.
    min_log2_std(n).is_some_and(|m| std.log2() >= m - 1e-9)
}

/// The noise variance veil encrypts with for a key of dimension `n` (tfhe's 132-bit
/// minimal variance).
pub fn key_variance(n: u64) -> f64 {
    minimal_lwe_variance_for_132_bits_security_gaussian_impl(n as f64, 2f64.powi(64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tfhe_noise_meets_the_128_bit_curve() {
        for n in (MIN_DIMENSION..=1 << 16).step_by(7) {
            let std = key_variance(n).sqrt();
            assert!(is_secure(n, std), "n = {n}: std 2^{:.2} below 2^{:.2}", std.log2(), min_log2_std(n).unwrap());
        }
    }

    #[test]
    fn curve_values() {
        // 2^-17.88 at n = 800; the floor 2^-62 from n ≈ 2517 on
        assert!((min_log2_std(800).unwrap() - (-17.881)).abs() < 1e-3);
        assert_eq!(min_log2_std(4096).unwrap(), -62.0);
        assert_eq!(min_log2_std(449), None);
        assert!(!is_secure(800, 2f64.powf(-20.0)));
    }
}
