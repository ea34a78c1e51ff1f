//! Measured noise against the noise model, on real keys and real bootstraps.

use crate::bootstrap::Bootstrapper;
use crate::keys::keygen;
use rayon::prelude::*;
use tfhe::core_crypto::prelude::*;
use veil_backend::noise;
use veil_backend::params::Params;
use veil_backend::security::key_variance;

fn params(n: u64, k: u64, poly: u64, pbs: (u32, u32), ks: (u32, u32), precision: u32) -> Params {
    Params {
        lwe_dimension: n,
        glwe_dimension: k,
        polynomial_size: poly,
        pbs_base_log: pbs.0,
        pbs_level: pbs.1,
        ks_base_log: ks.0,
        ks_level: ks.1,
        lwe_noise_std: key_variance(n).sqrt(),
        glwe_noise_std: key_variance(k * poly).sqrt(),
        precision,
        p_error: 0.0,
        global_p_error: 0.0,
        pbs_cost_ms: 0.0,
        bootstrap_key_bytes: 0,
        keyswitch_key_bytes: 0,
        partitions: Vec::new(),
        conversions: Vec::new(),
        products: Default::default(),
    }
}

/// Signed torus distance between a decrypted plaintext and its expected value.
fn torus_error(got: u64, want: u64) -> f64 {
    got.wrapping_sub(want) as i64 as f64 / 2f64.powi(64)
}

struct Run {
    /// Error after keyswitch (decrypted with the small key), per sample.
    ks: Vec<f64>,
    /// Error after keyswitch + bootstrap with an identity table, per sample; None when the
    /// bootstrap read the wrong slot.
    pbs: Vec<Option<f64>>,
}

/// Encrypt `count` slot-centred messages, keyswitch and bootstrap each with an identity
/// table, and record the errors.
fn measure(p: &Params, count: usize) -> Run {
    let (ck, sk) = keygen(p, b"noise-test").unwrap();
    let (ksk, fourier) = sk.expand().unwrap().sets.remove(0);
    let slots = 1usize << p.precision;
    let delta = 1u64 << (63 - p.precision);
    let acc = generate_programmable_bootstrap_glwe_lut(
        fourier.polynomial_size(),
        fourier.glwe_size(),
        slots,
        CiphertextModulus::new_native(),
        1u64,
        |s| s.wrapping_mul(delta),
    );
    let messages: Vec<u64> = (0..count).map(|i| (i * 7 % slots) as u64).collect();
    let pts: Vec<u64> = messages.iter().map(|m| m * delta).collect();
    let cts = ck.encrypt(&[vec![pts.clone()]]).expand();
    let small = ck.small.as_ref().unwrap();
    let results: Vec<(f64, Option<f64>)> = (0..count)
        .into_par_iter()
        .map_init(
            || Bootstrapper::new(&ksk, &fourier),
            |worker, i| {
                worker.keyswitch(&ksk, &cts[0][0].get(i));
                let ks_err = torus_error(decrypt_lwe_ciphertext(small, worker.small()).0, pts[i]);
                let mut out =
                    LweCiphertext::new(0u64, ck.big.lwe_dimension().to_lwe_size(), CiphertextModulus::new_native());
                worker.bootstrap(&fourier, &acc, &mut out);
                let got = decrypt_lwe_ciphertext(&ck.big, &out).0;
                let slot = (got.wrapping_add(delta / 2) / delta) as usize % (2 * slots);
                let pbs = (slot == messages[i] as usize).then(|| torus_error(got, pts[i]));
                (ks_err, pbs)
            },
        )
        .collect();
    Run { ks: results.iter().map(|r| r.0).collect(), pbs: results.iter().map(|r| r.1).collect() }
}

fn variance(v: impl Iterator<Item = f64>) -> f64 {
    let v: Vec<f64> = v.collect();
    v.iter().map(|x| x * x).sum::<f64>() / v.len() as f64
}

#[test]
fn keyswitch_and_bootstrap_noise_match_the_model() {
    // Two sets the optimizer picks for real circuits (4-bit and 3-bit lookups).
    for p in [params(802, 1, 2048, (15, 2), (3, 5), 4), params(770, 2, 1024, (12, 3), (3, 4), 3)] {
        let run = measure(&p, 1000);
        let ks_model = noise::fresh(p.big_dimension())
            + noise::keyswitch(p.big_dimension(), p.lwe_dimension, p.ks_base_log, p.ks_level);
        let ks_measured = variance(run.ks.iter().copied());
        let pbs_model = p.bootstrap_variance();
        assert!(run.pbs.iter().all(|e| e.is_some()), "a bootstrap failed at p_error ~2^-40");
        let pbs_measured = variance(run.pbs.iter().flatten().copied());
        let (rk, rp) = (ks_measured / ks_model, pbs_measured / pbs_model);
        eprintln!(
            "n={} k={} N={}: keyswitch σ² measured 2^{:.2} model 2^{:.2} (×{rk:.2}); bootstrap σ² measured 2^{:.2} model 2^{:.2} (×{rp:.2})",
            p.lwe_dimension,
            p.glwe_dimension,
            p.polynomial_size,
            ks_measured.log2(),
            ks_model.log2(),
            pbs_measured.log2(),
            pbs_model.log2()
        );
        assert!((0.5..=2.0).contains(&rk), "keyswitch noise off by ×{rk}");
        assert!((0.5..=2.0).contains(&rp), "bootstrap noise off by ×{rp}");
    }
}

/// Run `count` lookups on `p` and check the failures against the model's p_error.
fn check_failure_rate(p: &Params, count: usize, what: &str) {
    let predicted = lookup_failure_rate(p);
    let run = measure(p, count);
    let failures = run.pbs.iter().filter(|e| e.is_none()).count();
    let expected = predicted * count as f64;
    let sd = (expected * (1.0 - predicted)).sqrt();
    eprintln!(
        "{what}: {}-bit lookups, n={} N={} KS 2^{}×{}: p_error model 2^{:.2} ({expected:.1} of {count} expected), observed {failures}",
        p.precision,
        p.lwe_dimension,
        p.polynomial_size,
        p.ks_base_log,
        p.ks_level,
        predicted.log2()
    );
    assert!(
        (failures as f64 - expected).abs() <= 4.0 * sd + 2.0,
        "{what}: observed {failures} failures, expected {expected:.1} ± {sd:.1}"
    );
}

/// The model's failure probability for a fresh ciphertext looked up on `p`.
fn lookup_failure_rate(p: &Params) -> f64 {
    noise::p_error(noise::fresh(p.big_dimension()) + p.pre_rotation_variance(), noise::lookup_half_width(p.precision))
}

/// Lowest-variance bootstrap decomposition with at most 3 levels.
fn best_pbs(n: u64, k: u64, poly: u64) -> (u32, u32) {
    (1..=3u32)
        .flat_map(|l| (1..=64 / l).map(move |b| (b, l)))
        .min_by(|x, y| noise::bootstrap(n, k, poly, x.0, x.1).total_cmp(&noise::bootstrap(n, k, poly, y.0, y.1)))
        .unwrap()
}

#[test]
fn failure_rate_at_a_loose_keyswitch_matches_the_model() {
    // A deliberately loose (still 128-bit secure) set: a coarse keyswitch decomposition
    // makes about one lookup in a hundred read the wrong slot; the bootstrap itself
    // (N = 2048, best decomposition) stays clean so each outcome is unambiguous.
    let (n, k, poly) = (800u64, 1u64, 2048u64);
    let pbs = best_pbs(n, k, poly);
    let (ks, precision) = (3..=5u32)
        .flat_map(|p| (1..=4u32).flat_map(move |l| (1..=16 / l).map(move |b| ((b, l), p))))
        .find(|&(ks, p)| (2f64.powi(-8)..2f64.powi(-5)).contains(&lookup_failure_rate(&params(n, k, poly, pbs, ks, p))))
        .expect("some keyswitch decomposition fails about 1% of the time");
    let p = params(n, k, poly, pbs, ks, precision);
    assert!(p.is_secure());
    check_failure_rate(&p, 2000, "keyswitch-dominated");
}

#[test]
fn failure_rate_dominated_by_the_modulus_switch_matches_the_centred_model() {
    // N = 1024 (k = 2, so the bootstrap output stays clean) with a fine keyswitch: the
    // rounding to 2N dominates, so the failure count tests the centred modulus-switch
    // formula. Plain rounding would fail far more often.
    let (n, k, poly) = (800u64, 2u64, 1024u64);
    let pbs = best_pbs(n, k, poly);
    let big = k * poly;
    let ks = (1..=8u32)
        .flat_map(|l| (1..=32 / l).map(move |b| (b, l)))
        .min_by(|x, y| noise::keyswitch(big, n, x.0, x.1).total_cmp(&noise::keyswitch(big, n, y.0, y.1)))
        .unwrap();
    let precision = (3..=8u32)
        .find(|&b| lookup_failure_rate(&params(n, k, poly, pbs, ks, b)) > 2f64.powi(-6))
        .expect("some precision fails a few percent of the time at N = 1024");
    let p = params(n, k, poly, pbs, ks, precision);
    assert!(p.is_secure());
    let ms = noise::centered_modulus_switch(n, poly);
    let other = noise::fresh(big) + noise::keyswitch(big, n, ks.0, ks.1);
    assert!(ms > 3.0 * other, "the modulus switch must dominate: {ms:e} vs {other:e}");
    let plain = noise::p_error(other + noise::modulus_switch(n, poly), noise::lookup_half_width(precision));
    let centred = lookup_failure_rate(&p);
    let misread = noise::p_error(p.bootstrap_variance(), noise::lookup_half_width(precision));
    assert!(misread < 1e-6, "bootstrap output noise would blur the count: {misread:e}");
    assert!(plain > 2.0 * centred, "plain {plain} vs centred {centred}: the test would not tell them apart");
    eprintln!("plain rounding would predict p_error 2^{:.2}", plain.log2());
    check_failure_rate(&p, 2000, "modulus-switch-dominated");
}

/// Median milliseconds of one keyswitch and one bootstrap with `p`'s real keys.
fn lookup_time(p: &Params) -> (f64, f64) {
    let (ck, sk) = keygen(p, b"timing-test").unwrap();
    let (ksk, fourier) = sk.expand().unwrap().sets.remove(0);
    // a real encryption (all-zero masks would skip work)
    let cts = ck.encrypt(&[vec![vec![3u64 << 58]]]).expand();
    let acc = GlweCiphertext::new(
        1u64 << 50,
        fourier.glwe_size(),
        fourier.polynomial_size(),
        CiphertextModulus::new_native(),
    );
    let mut worker = Bootstrapper::new(&ksk, &fourier);
    let mut out = LweCiphertext::new(0u64, ck.big.lwe_dimension().to_lwe_size(), CiphertextModulus::new_native());
    let (mut ks, mut br) = (Vec::new(), Vec::new());
    for _ in 0..25 {
        let t = std::time::Instant::now();
        worker.keyswitch(&ksk, &cts[0][0].get(0));
        ks.push(t.elapsed().as_secs_f64() * 1e3);
        let t = std::time::Instant::now();
        worker.bootstrap(&fourier, &acc, &mut out);
        br.push(t.elapsed().as_secs_f64() * 1e3);
    }
    (crate::evaluator::median(ks), crate::evaluator::median(br))
}

/// A measurement, not run by default (~30 s in release):
/// `cargo test --release -p veil-runtime lookup_time -- --ignored --nocapture`.
#[test]
#[ignore]
fn lookup_time_tracks_the_cost_model() {
    // sets the optimizer picks for 4- and 5-bit lookups, and two it weighs against them
    let sets = [
        params(850, 2, 1024, (16, 2), (3, 5), 4),
        params(874, 1, 2048, (15, 2), (2, 8), 5),
        params(914, 1, 2048, (15, 2), (3, 6), 5),
        params(874, 1, 2048, (12, 3), (2, 8), 5),
        params(914, 1, 2048, (23, 1), (3, 6), 5),
        // the 50-tree forest's one-level set (its scores as one partial sum per tree)
        params(890, 2, 1024, (23, 1), (4, 4), 4),
        // the set encrypted training at 6 bits and p_error 2^-7 uses
        params(850, 1, 2048, (23, 1), (2, 8), 6),
    ];
    let mut ratios = Vec::new();
    for p in sets {
        let (ks, br) = lookup_time(&p);
        let model = veil_backend::params::lookup_cost_ms(
            p.lwe_dimension,
            p.glwe_dimension,
            p.polynomial_size,
            p.pbs_level,
            p.ks_level,
        );
        let total = ks + br;
        eprintln!(
            "n={} k={} N={} PBS 2^{}×{} KS 2^{}×{}: keyswitch {ks:.1} ms, bootstrap {br:.1} ms, total {total:.1} ms; model {model:.1} ms",
            p.lwe_dimension, p.glwe_dimension, p.polynomial_size, p.pbs_base_log, p.pbs_level, p.ks_base_log, p.ks_level
        );
        ratios.push(total / model);
    }
    // A shared machine runs faster or slower by the day, so the sets' ratios to the model
    // must agree with each other (the model ranks sets right) within 1.5×, whatever the
    // machine's speed today.
    let (lo, hi) = ratios.iter().fold((f64::MAX, 0.0f64), |(a, b), &r| (a.min(r), b.max(r)));
    eprintln!("measured / model: {lo:.2} to {hi:.2}");
    assert!(hi / lo < 1.5, "the model misranks parameter sets: measured/model from {lo:.2} to {hi:.2}");
}

#[test]
fn product_noise_stays_within_the_model() {
    // The training step's set: a GGSW polynomial of 30 coefficients ±3 (‖M‖² = 270) times
    // 30 fresh values packed at Y^(−t); coefficient 0 is their dot product. The model
    // (Circuit::noise_coefs) charges ‖M‖²·(fresh + 30 packing keyswitches + one external
    // product); measured must not exceed it.
    use crate::evaluator::Evaluator;
    use veil_backend::circuit::{Circuit, GgswValue, Instruction, ProductInstr};
    let spec = veil_passes::training::TrainSpec::new(30, vec![0, 1]);
    let p = veil_backend::training::compile_training(spec, veil_backend::training::TRAINING_P_ERROR).unwrap().0.params;
    assert!(p.has_products() && p.polynomial_size == 2048, "{p:?}");
    let terms = 30usize;
    let circuit = Circuit {
        value_len: vec![terms, 1, 1],
        inputs: vec![0, 1],
        outputs: vec![2],
        instructions: vec![Instruction::Product(ProductInstr {
            output: 2,
            ggsw: 1,
            input: 0,
            packs: vec![(0..terms).map(|t| (t as u32, -(t as i32))).collect()],
            sums: vec![vec![(0, 0)]],
            extract: vec![(0, 0)],
        })],
        tables: Vec::new(),
        precision: 6,
        state: Vec::new(),
        small: Vec::new(),
        partition_precisions: Vec::new(),
        keys: Vec::new(),
        ggsw: vec![GgswValue { value: 1, span: terms as u32, norm2: 9.0 * terms as f64 }],
    };
    let (ck, sk) = keygen(&p, b"noise-test").unwrap();
    let ev = Evaluator::new(&circuit, &p, sk, b"noise-test").unwrap();
    // a fixed pseudo-random sequence (Knuth's MMIX LCG), high bits
    let mut state = 3u64;
    let mut next = |n: u64| {
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (state >> 33) % n
    };
    let samples = 40;
    let delta_log2 = 50;
    let w: Vec<Vec<i64>> = (0..samples).map(|_| (0..terms).map(|_| next(25) as i64 - 12).collect()).collect();
    let m: Vec<Vec<i64>> =
        (0..samples).map(|_| (0..terms).map(|_| if next(2) == 0 { 3 } else { -3 }).collect()).collect();
    let plain: Vec<Vec<u64>> = w.iter().map(|r| r.iter().map(|&v| (v << delta_log2) as u64).collect()).collect();
    let lwe = ck.encrypt(&[plain]).expand().remove(0);
    let mut seeder = new_seeder();
    let noise = crate::keys::gaussian(ck.big_noise_std);
    let ggsw: Vec<Vec<_>> = m
        .iter()
        .map(|r| {
            let coeffs: Vec<u64> = r.iter().map(|&v| v as u64).collect();
            let g = crate::products::encrypt_ggsw(&ck.glwe_key(2048), &coeffs, &p.products, noise, seeder.as_mut());
            vec![crate::products::to_fourier(&g)]
        })
        .collect();
    let ggsw = std::collections::HashMap::from([(1usize, ggsw)]);
    let out = ev.run_expanded(vec![lwe, Vec::new()], &ggsw, samples, &|_| {}).unwrap();
    let errors: Vec<f64> = (0..samples)
        .map(|s| {
            let want: i64 = (0..terms).map(|t| m[s][t] * w[s][t]).sum();
            let got = decrypt_lwe_ciphertext(&ck.big, &out[0][s].get(0)).0;
            torus_error(got, (want << delta_log2) as u64)
        })
        .collect();
    let measured = variance(errors.iter().copied());
    let coefs = veil_backend::params::NoiseCoefs {
        fresh: 270.0,
        packed: 270.0 * terms as f64,
        external: 270.0,
        ..Default::default()
    };
    let model = coefs.variance(0.0, p.fresh_variance()) + p.product_variance(&coefs);
    eprintln!(
        "product noise σ² measured 2^{:.2}, model 2^{:.2} (fresh 2^{:.2}, packing 2^{:.2}, external 2^{:.2})",
        measured.log2(),
        model.log2(),
        (270.0 * p.fresh_variance()).log2(),
        (270.0 * terms as f64 * noise::packing_keyswitch(2048, p.products.packing_base_log, 2)).log2(),
        (270.0 * noise::external_product(1, 2048, p.products.ggsw_base_log, 2)).log2()
    );
    assert!(measured <= 2.0 * model, "product noise above the model: 2^{:.2} > 2^{:.2}", measured.log2(), model.log2());
    // and the products are right: every error is far below one unit at 2^50
    assert!(errors.iter().all(|e| e.abs() < 2f64.powi(-16)), "{errors:?}");
}
