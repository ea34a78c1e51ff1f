//! External products with the client's GGSW ciphertexts (`veil_backend::lower::products`):
//! the client encrypts integer polynomials as GGSW ciphertexts; the server packs LWE
//! ciphertexts into GLWEs, multiplies them by the GGSW ciphertexts and extracts LWE
//! ciphertexts from the products' coefficients. No bootstrap is involved.

use crate::error::{Result, RuntimeError};
use crate::evaluator::{Evaluator, PerSample};
use rayon::prelude::*;
use tfhe::core_crypto::algorithms::polynomial_algorithms::{
    polynomial_wrapping_monic_monomial_div_assign, polynomial_wrapping_monic_monomial_mul_assign,
};
use tfhe::core_crypto::algorithms::slice_algorithms::slice_wrapping_add_assign;
use tfhe::core_crypto::commons::math::random::Uniform;
use tfhe::core_crypto::fft_impl::fft64::{c64, ABox};
use tfhe::core_crypto::prelude::*;
use veil_backend::circuit::ProductInstr;
use veil_backend::params::ProductParams;

/// A GGSW ciphertext in the Fourier domain.
pub(crate) type FourierGgsw = FourierGgswCiphertext<ABox<[c64]>>;

/// The messages of a GGSW's rows for the polynomial M = Σ_t coeffs[t]·Y^t, before the
/// level's factor q/B^ℓ: rows j < k carry −M·s_j, the last row M — tfhe's constant GGSW
/// encryption with a polynomial message. The same for every level, so computed once.
fn ggsw_row_messages(key: &GlweSecretKey<&[u64]>, coeffs: &[u64]) -> Vec<Vec<u64>> {
    let n = key.polynomial_size().0;
    let polys = key.as_polynomial_list();
    let mut rows: Vec<Vec<u64>> = polys
        .iter()
        .map(|s| {
            // −M·s_j, negacyclic; M is sparse (a few coefficients)
            let mut row = vec![0u64; n];
            for (t, &m) in coeffs.iter().enumerate().filter(|(_, &m)| m != 0) {
                for (i, &b) in s.as_ref().iter().enumerate() {
                    let (e, neg) = ((i + t) % n, (i + t) / n % 2 == 1);
                    let v = m.wrapping_mul(b);
                    row[e] = if neg { row[e].wrapping_add(v) } else { row[e].wrapping_sub(v) };
                }
            }
            row
        })
        .collect();
    let mut last = vec![0u64; n];
    last.iter_mut().zip(coeffs).for_each(|(o, &m)| *o = m);
    rows.push(last);
    rows
}

/// Seeded GGSW encryption of the integer polynomial M = Σ_t coeffs[t]·Y^t under `key`
/// (masks regenerated from the seed, so only the bodies travel: half the size). Level
/// matrix ℓ (ℓ = levels … 1) and its rows are encrypted with the generator forks tfhe's
/// seeded GGSW encryption uses, so tfhe's decompression rebuilds the masks.
pub(crate) fn encrypt_ggsw(
    key: &GlweSecretKey<&[u64]>,
    coeffs: &[u64],
    p: &ProductParams,
    noise: DynamicDistribution<u64>,
    seeder: &mut dyn Seeder,
) -> SeededGgswCiphertextOwned<u64> {
    let (levels, base_log) = (p.ggsw_level as usize, p.ggsw_base_log as usize);
    let mut ggsw = SeededGgswCiphertext::new(
        0u64,
        key.glwe_dimension().to_glwe_size(),
        key.polynomial_size(),
        DecompositionBaseLog(base_log),
        DecompositionLevelCount(levels),
        seeder.seed().into(),
        CiphertextModulus::new_native(),
    );
    let messages = ggsw_row_messages(key, coeffs);
    let mut generator = EncryptionRandomGenerator::<DefaultRandomGenerator>::new(ggsw.compression_seed(), seeder);
    let forks = generator
        .try_fork_from_config(ggsw.encryption_fork_config(Uniform, noise))
        .expect("a GGSW's generator forks per level");
    for (index, (mut matrix, mut level_generator)) in ggsw.iter_mut().zip(forks).enumerate() {
        let factor = 1u64 << (64 - base_log * (levels - index));
        let rows = level_generator
            .try_fork_from_config(matrix.encryption_fork_config(Uniform, noise))
            .expect("a level matrix's generator forks per row");
        for ((row, mut glwe), mut row_generator) in matrix.as_mut_seeded_glwe_list().iter_mut().enumerate().zip(rows) {
            let mut body = glwe.get_mut_body();
            body.as_mut().iter_mut().zip(&messages[row]).for_each(|(o, &m)| *o = m.wrapping_mul(factor));
            encrypt_seeded_glwe_ciphertext_assign_with_pre_seeded_generator(key, &mut glwe, noise, &mut row_generator);
        }
    }
    ggsw
}

/// A seeded GGSW ciphertext expanded and converted to the Fourier domain, as external
/// products use it.
pub(crate) fn to_fourier(g: &SeededGgswCiphertextOwned<u64>) -> FourierGgsw {
    let g = g.clone().decompress_into_ggsw_ciphertext();
    let mut f = FourierGgswCiphertext::new(
        g.glwe_size(),
        g.polynomial_size(),
        g.decomposition_base_log(),
        g.decomposition_level_count(),
    );
    convert_standard_ggsw_ciphertext_to_fourier(&g, &mut f);
    f
}

impl Evaluator<'_> {
    /// One product instruction on every sample: pack, multiply, extract.
    pub(crate) fn product(
        &self,
        p: &ProductInstr,
        input: &[LweCiphertextListOwned<u64>],
        ggsw: &[Vec<FourierGgsw>],
    ) -> Result<PerSample> {
        let pksk = self.packing_key().ok_or_else(|| {
            RuntimeError::Invalid("the model multiplies encrypted values but no packing key was loaded".into())
        })?;
        let (glwe_size, poly) = (pksk.output_key_glwe_dimension().to_glwe_size(), pksk.output_key_polynomial_size());
        let modulus = CiphertextModulus::new_native();
        let lwe_size = LweSize(glwe_size.to_glwe_dimension().0 * poly.0 + 1);
        input
            .iter()
            .zip(ggsw)
            .map(|(list, polys)| {
                if polys.len() < p.sums.iter().flatten().map(|&(g, _)| g as usize + 1).max().unwrap_or(0) {
                    return Err(RuntimeError::Invalid("a GGSW input holds too few ciphertexts".into()));
                }
                // each entry packed on its own, shifted to its exponent, then summed per pack
                let entries: Vec<(usize, u32, i32)> = p
                    .packs
                    .iter()
                    .enumerate()
                    .flat_map(|(q, pack)| pack.iter().map(move |&(e, x)| (q, e, x)))
                    .collect();
                let shifted: Vec<(usize, GlweCiphertextOwned<u64>)> = entries
                    .par_iter()
                    .map(|&(q, e, x)| {
                        let mut g = GlweCiphertext::new(0u64, glwe_size, poly, modulus);
                        keyswitch_lwe_ciphertext_into_glwe_ciphertext(pksk, &list.get(e as usize), &mut g);
                        for mut c in g.as_mut_polynomial_list().iter_mut() {
                            if x >= 0 {
                                polynomial_wrapping_monic_monomial_mul_assign(&mut c, MonomialDegree(x as usize));
                            } else {
                                polynomial_wrapping_monic_monomial_div_assign(&mut c, MonomialDegree((-x) as usize));
                            }
                        }
                        (q, g)
                    })
                    .collect();
                let mut packs: Vec<GlweCiphertextOwned<u64>> =
                    (0..p.packs.len()).map(|_| GlweCiphertext::new(0u64, glwe_size, poly, modulus)).collect();
                for (q, g) in &shifted {
                    slice_wrapping_add_assign(packs[*q].as_mut(), g.as_ref());
                }
                let sums: Vec<GlweCiphertextOwned<u64>> = p
                    .sums
                    .par_iter()
                    .map(|terms| {
                        let mut acc = GlweCiphertext::new(0u64, glwe_size, poly, modulus);
                        for &(g, q) in terms {
                            add_external_product_assign(&mut acc, &polys[g as usize], &packs[q as usize]);
                        }
                        acc
                    })
                    .collect();
                let mut out = LweCiphertextList::new(0u64, lwe_size, LweCiphertextCount(p.extract.len()), modulus);
                for (mut ct, &(sum, c)) in out.iter_mut().zip(&p.extract) {
                    extract_lwe_sample_from_glwe_ciphertext(&sums[sum as usize], &mut ct, MonomialDegree(c as usize));
                }
                Ok(out)
            })
            .collect()
    }
}

impl Evaluator<'_> {
    /// Median milliseconds of one packing keyswitch and one external product with this
    /// evaluator's keys, on real encryptions by `ck`: what Σ product time is made of.
    pub fn time_products(&self, ck: &crate::ClientKey, runs: usize) -> Result<(f64, f64)> {
        let pksk =
            self.packing_key().ok_or_else(|| RuntimeError::Invalid("the model has no products to time".into()))?;
        let (glwe_size, poly) = (pksk.output_key_glwe_dimension().to_glwe_size(), pksk.output_key_polynomial_size());
        let cts = ck.encrypt(&[vec![vec![3u64 << 58]]]).expand();
        let lwe = cts[0][0].get(0);
        let mut coeffs = vec![0u64; 30.min(poly.0)];
        coeffs.iter_mut().enumerate().for_each(|(i, c)| *c = (i % 7) as u64);
        let noise = crate::keys::gaussian(ck.big_noise_std);
        let mut seeder = new_seeder();
        let ggsw =
            to_fourier(&encrypt_ggsw(&ck.glwe_key(poly.0), &coeffs, self.product_params(), noise, seeder.as_mut()));
        let modulus = CiphertextModulus::new_native();
        let mut packed = GlweCiphertext::new(0u64, glwe_size, poly, modulus);
        let mut acc = GlweCiphertext::new(0u64, glwe_size, poly, modulus);
        let (mut pk, mut ep) = (Vec::new(), Vec::new());
        for _ in 0..runs.max(1) {
            let t = std::time::Instant::now();
            keyswitch_lwe_ciphertext_into_glwe_ciphertext(pksk, &lwe, &mut packed);
            pk.push(t.elapsed().as_secs_f64() * 1e3);
            let t = std::time::Instant::now();
            add_external_product_assign(&mut acc, &ggsw, &packed);
            ep.push(t.elapsed().as_secs_f64() * 1e3);
        }
        Ok((crate::evaluator::median(pk), crate::evaluator::median(ep)))
    }
}
