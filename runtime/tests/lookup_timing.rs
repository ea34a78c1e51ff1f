//! Measures one keyswitch and one bootstrap on this machine for the parameter sets the
//! optimizer picks for 4- and 5-bit lookups, and checks the optimizer's cost model
//! (`veil_backend::params::lookup_cost_ms`) against them. Ignored by default (it is a
//! measurement, ~30 s); run with
//! `cargo test --release -p veil-runtime --test lookup_timing -- --ignored --nocapture`.

use std::time::Instant;
use tfhe::core_crypto::prelude::*;
use veil_backend::params::lookup_cost_ms;
use veil_runtime::bootstrap::Bootstrapper;

/// Median milliseconds of (keyswitch, bootstrap) for one parameter set.
fn measure(n: usize, k: usize, poly: usize, (pb, pl): (usize, usize), (kb, kl): (usize, usize)) -> (f64, f64) {
    let mut boxed = new_seeder();
    let seeder = boxed.as_mut();
    let mut secret = SecretRandomGenerator::<DefaultRandomGenerator>::new(seeder.seed());
    let mut enc = EncryptionRandomGenerator::<DefaultRandomGenerator>::new(seeder.seed(), seeder);
    let m = CiphertextModulus::new_native();
    let small = LweSecretKey::generate_new_binary(LweDimension(n), &mut secret);
    let glwe = GlweSecretKey::generate_new_binary(GlweDimension(k), PolynomialSize(poly), &mut secret);
    let big = glwe.clone().into_lwe_secret_key();
    let noise = Gaussian::from_dispersion_parameter(StandardDev(2f64.powi(-40)), 0.0);
    let ksk = allocate_and_generate_new_lwe_keyswitch_key(
        &big,
        &small,
        DecompositionBaseLog(kb),
        DecompositionLevelCount(kl),
        noise,
        m,
        &mut enc,
    );
    let bsk = par_allocate_and_generate_new_lwe_bootstrap_key(
        &small,
        &glwe,
        DecompositionBaseLog(pb),
        DecompositionLevelCount(pl),
        noise,
        m,
        &mut enc,
    );
    let mut fourier = FourierLweBootstrapKey::new(
        bsk.input_lwe_dimension(),
        bsk.glwe_size(),
        bsk.polynomial_size(),
        bsk.decomposition_base_log(),
        bsk.decomposition_level_count(),
    );
    par_convert_standard_lwe_bootstrap_key_to_fourier(&bsk, &mut fourier);
    // a real encryption (all-zero masks would skip work)
    let ct = allocate_and_encrypt_new_lwe_ciphertext(&big, Plaintext(3u64 << 58), noise, m, &mut enc);
    let acc = GlweCiphertext::new(1u64 << 50, GlweSize(k + 1), PolynomialSize(poly), m);
    let mut b = Bootstrapper::new(&ksk, &fourier);
    let mut out = LweCiphertext::new(0u64, LweSize(k * poly + 1), m);
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (mut ks, mut br) = (Vec::new(), Vec::new());
    for _ in 0..25 {
        let t = Instant::now();
        b.keyswitch(&ksk, &ct.as_view());
        ks.push(t.elapsed().as_secs_f64() * 1e3);
        let t = Instant::now();
        b.bootstrap(&fourier, &acc, &mut out);
        br.push(t.elapsed().as_secs_f64() * 1e3);
    }
    (median(ks), median(br))
}

#[test]
#[ignore]
fn cost_model_tracks_measured_lookup_time() {
    let sets = [
        (850, 2, 1024, (16, 2), (3, 5)),
        (874, 1, 2048, (15, 2), (2, 8)),
        (914, 1, 2048, (15, 2), (3, 6)),
        (874, 1, 2048, (12, 3), (2, 8)),
        (914, 1, 2048, (23, 1), (3, 6)),
    ];
    for (n, k, poly, pbs, ks) in sets {
        let (t_ks, t_br) = measure(n, k, poly, pbs, ks);
        let model = lookup_cost_ms(n as u64, k as u64, poly as u64, pbs.1 as u32, ks.1 as u32);
        let total = t_ks + t_br;
        println!(
            "n={n} k={k} N={poly} PBS 2^{}×{} KS 2^{}×{}: keyswitch {t_ks:.1} ms, bootstrap {t_br:.1} ms, total {total:.1} ms; model {model:.1} ms",
            pbs.0, pbs.1, ks.0, ks.1
        );
        // a shared, noisy machine: the model must stay within 2× either way
        assert!(model / total < 2.0 && total / model < 2.0, "model {model:.1} ms vs measured {total:.1} ms");
    }
}
