//! `veil bench`'s training rows: every training set in models/ (a folder with
//! `train_x.npy`), compiled with the default settings, timed encrypted for a few batches,
//! and trained in simulation for two epochs beside float SGD on the same batches.

use anyhow::{Context, Result};
use rand::SeedableRng;
use serde_json::json;
use std::path::{Path, PathBuf};
use std::time::Instant;
use veil_backend::training::{compile_training, TrainingClient, TRAINING_P_ERROR};
use veil_passes::training::{accuracy, batches, FloatSgd, TrainSpec};

/// Training sets under `models_dir` (folders holding train_x.npy), those named or all.
pub fn training_dirs(models_dir: &Path, names: &[String]) -> Result<Vec<PathBuf>> {
    let mut dirs: Vec<PathBuf> = if names.is_empty() {
        std::fs::read_dir(models_dir)
            .with_context(|| format!("reading {}", models_dir.display()))?
            .flatten()
            .map(|e| e.path())
            .collect()
    } else {
        names.iter().map(|n| models_dir.join(n)).collect()
    };
    dirs.retain(|p| p.join("train_x.npy").exists());
    dirs.sort();
    Ok(dirs)
}

pub fn bench(models_dir: &Path, names: &[String], exec_batches: usize) -> Result<Vec<serde_json::Value>> {
    let dirs = training_dirs(models_dir, names)?;
    if dirs.is_empty() {
        return Ok(Vec::new());
    }
    println!(
        "\n{:<22} {:>7} {:>9} {:>5} {:>8} {:>7} {:>8} {:>9} {:>9}  {:<24} {:<24}",
        "training (batch 8)",
        "lookups",
        "pack/ext",
        "bits",
        "keygen s",
        "key MB",
        "s/batch",
        "floor s",
        "KS+PBS ms",
        "simulated acc, epochs 1,2",
        "float SGD, epochs 1,2"
    );
    let mut rows = Vec::new();
    for dir in dirs {
        let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        match bench_one(&dir, exec_batches) {
            Ok(r) => {
                let pair = |v: &serde_json::Value| {
                    v.as_array()
                        .map(|a| {
                            a.iter().map(|x| format!("{:.4}", x.as_f64().unwrap_or(0.0))).collect::<Vec<_>>().join(", ")
                        })
                        .unwrap_or_default()
                };
                println!(
                    "{:<22} {:>7} {:>9} {:>5} {:>8.2} {:>7.0} {:>8.2} {:>9.2} {:>9}  {:<24} {:<24}",
                    name,
                    r["lookups_per_batch"],
                    format!("{}/{}", r["packings_per_batch"], r["external_products_per_batch"]),
                    r["widest_lookup_bits"],
                    r["keygen_s"].as_f64().unwrap_or(0.0),
                    r["server_key_mb"].as_f64().unwrap_or(0.0),
                    r["seconds_per_batch"].as_f64().unwrap_or(0.0),
                    r["floor_seconds_per_batch"].as_f64().unwrap_or(0.0),
                    format!(
                        "{:.1}+{:.1}",
                        r["keyswitch_ms"].as_f64().unwrap_or(0.0),
                        r["bootstrap_ms"].as_f64().unwrap_or(0.0)
                    ),
                    pair(&r["simulated_test_accuracy"]),
                    pair(&r["float_sgd_test_accuracy"]),
                );
                rows.push(r);
            }
            Err(e) => {
                println!("{name:<22} failed: {e:#}");
                rows.push(json!({ "training_set": name, "error": format!("{e:#}") }));
            }
        }
    }
    Ok(rows)
}

fn bench_one(dir: &Path, exec_batches: usize) -> Result<serde_json::Value> {
    let train = crate::train::load_data(&dir.join("train_x.npy"), &dir.join("train_y.npy"))?;
    let test = crate::train::load_data(&dir.join("test_x.npy"), &dir.join("test_y.npy"))?;
    let (x, y, xt, yt) = (train.x, train.labels, test.x, test.labels);
    let classes = crate::train::classes_of(&y);
    let spec = TrainSpec::new(x.ncols(), classes.clone());
    let start = Instant::now();
    let (a, model) = compile_training(spec, TRAINING_P_ERROR)?;
    let compile_s = start.elapsed().as_secs_f64();
    let plan = a.training.clone().context("a training artifact")?;
    let tc = TrainingClient::new(&a)?;
    let xq = plan.quantize_features(&x, "train_x.npy")?;
    let t = plan.targets(&y, "train_y.npy")?;
    let steps = batches(x.nrows(), plan.spec.batch);
    let mut rng = rand::rngs::StdRng::seed_from_u64(0);
    let inputs: Vec<_> = steps.iter().map(|rows| plan.step_inputs(&xq, &t, rows, &mut rng)).collect();

    // two epochs simulated, the float step on the same batches beside them
    let mut float = FloatSgd::new(&model, &x, &y)?;
    let mut plain = tc.state_plaintexts(&plan.initial_state());
    let (mut sim_acc, mut float_acc) = (Vec::new(), Vec::new());
    for _ in 0..2 {
        for (rows, inp) in steps.iter().zip(&inputs) {
            plain = tc.simulate_step(&tc.step_plaintexts(inp)?, &plain, Some(&a.params), &mut rng);
            float.step(rows)?;
        }
        let st = tc.decode_state(&plain);
        let (w, b) = plan.decode(&st[0], &st[1])?;
        sim_acc.push(accuracy(&classes, &w, &b, &xt, &yt));
        let (w, b) = float.weights();
        float_acc.push(accuracy(&classes, &w, &b, &xt, &yt));
    }

    // encrypted: keys, then a few steps timed
    let start = Instant::now();
    let (ck, sk) = veil_runtime::keygen(&a.params, &a.fingerprint)?;
    let keygen_s = start.elapsed().as_secs_f64();
    let key_mb = tfhe::safe_serialization::safe_serialized_size(&sk).map(|b| b as f64 / 1e6).unwrap_or(0.0);
    let ev = veil_runtime::Evaluator::new(&a.circuit, &a.params, sk, &a.fingerprint)?;
    let (ks_ms, pbs_ms) = ev.time_lookup(&ck, 9)?;
    let products = a.circuit.product_requirements();
    let (pack_ms, ext_ms) = if products.packings > 0 { ev.time_products(&ck, 9)? } else { (0.0, 0.0) };
    let k = exec_batches.max(1).min(inputs.len());
    let plain_steps = inputs[..k].iter().map(|s| tc.step_plaintexts(s)).collect::<veil_backend::Result<Vec<_>>>()?;
    let enc = ck.encrypt_batches(&a.circuit, &a.params, &plain_steps)?;
    let state = ck.encrypt_state(&a.circuit, &tc.state_plaintexts(&plan.initial_state()))?;
    let mut times = Vec::new();
    ev.train(&[&enc], state, 1, &|_| {}, &mut |done, _| {
        times.push(done.seconds);
        Ok(())
    })?;
    let per_batch = times.iter().sum::<f64>() / times.len().max(1) as f64;
    let threads = rayon::current_num_threads().max(1) as f64;
    let lookups = a.circuit.lookups_per_sample();
    let keyswitches = a.circuit.keyswitches_per_sample();
    let floor = (lookups as f64 * pbs_ms
        + keyswitches as f64 * ks_ms
        + products.packings as f64 * pack_ms
        + products.externals as f64 * ext_ms)
        / 1e3
        / threads;
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("meta.json")).unwrap_or_else(|_| "{}".into()))
            .unwrap_or_default();
    Ok(json!({
        "training_set": dir.file_name().map(|n| n.to_string_lossy().into_owned()),
        "features": x.ncols(),
        "classes": classes,
        "batch_size": plan.spec.batch,
        "compile_s": compile_s,
        "lookups_per_batch": lookups,
        "keyswitches_per_batch": keyswitches,
        "packings_per_batch": products.packings,
        "external_products_per_batch": products.externals,
        "packing_ms": pack_ms,
        "external_product_ms": ext_ms,
        "widest_lookup_bits": a.params.precision,
        "params": a.params,
        "keygen_s": keygen_s,
        "server_key_mb": key_mb,
        "encrypted_batches_timed": times.len(),
        "seconds_per_batch": per_batch,
        "keyswitch_ms": ks_ms,
        "bootstrap_ms": pbs_ms,
        "floor_seconds_per_batch": floor,
        "floor": "(lookups × one bootstrap + keyswitches × one keyswitch + packings × one packing keyswitch + external products × one external product) / threads, each timed alone on this machine",
        "simulated_test_accuracy": sim_acc,
        "float_sgd_test_accuracy": float_acc,
        "sklearn_sgd_test_accuracy": meta["sklearn_sgd_test_accuracy"],
        "logistic_regression_test_accuracy": meta["logistic_regression_test_accuracy"],
    }))
}
