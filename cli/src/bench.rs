//! `veil demo` and `veil bench`: the models in models/, end to end.

use crate::fhe::{run_compiled_timed, run_encrypted};
use crate::npy;
use crate::Mode;
use anyhow::{bail, Context, Result};
use ndarray::{Axis, Slice};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::time::Instant;
use veil_backend::artifact::Artifact;
use veil_backend::pipeline::CompileOptions;
use veil_ir::{Graph, Tensor};
use veil_runtime::Evaluator;

/// models/ beside the sources when run from the repository, else ./models.
pub fn default_models_dir() -> PathBuf {
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..").join("models");
    if repo.is_dir() {
        repo
    } else {
        PathBuf::from("models")
    }
}

struct ModelData {
    name: String,
    graph: Graph,
    calib: Tensor,
    test_x: Tensor,
    test_y: Tensor,
    classification: bool,
}

fn load_dir(dir: &Path) -> Result<ModelData> {
    let meta: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("meta.json"))
            .with_context(|| format!("reading {}/meta.json", dir.display()))?,
    )?;
    Ok(ModelData {
        name: dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
        graph: veil_frontend::onnx::import_file(dir.join("model.onnx"))?,
        calib: npy::read_f32(&dir.join("calib.npy"))?,
        test_x: npy::read_f32(&dir.join("test_x.npy"))?,
        test_y: npy::read(&dir.join("test_y.npy"))?,
        classification: meta["task"] == "classification",
    })
}

fn first_rows(t: &Tensor, n: usize) -> Tensor {
    let a = t.to_f32();
    let n = n.min(a.shape()[0]);
    Tensor::F32(a.slice_axis(Axis(0), Slice::from(0..n)).to_owned())
}

/// The model's first floating-point output.
fn primary(outs: &[Tensor]) -> Result<&Tensor> {
    outs.iter().find(|t| matches!(t, Tensor::F32(_))).context("the model has no floating-point output")
}

fn argmax_rows(t: &Tensor) -> Vec<usize> {
    t.to_f32()
        .map_axis(Axis(1), |r| {
            r.iter().enumerate().fold((0, f32::NEG_INFINITY), |b, (i, &v)| if v > b.1 { (i, v) } else { b }).0
        })
        .into_iter()
        .collect()
}

/// How many of `exec`'s samples give the clear run's prediction (its first rows): the
/// same class for classifiers, the same value (to 1e-4 relative) for regressors.
fn matching_clear(d: &ModelData, exec: &Tensor, clear: &Tensor) -> usize {
    let n = exec.shape()[0];
    if d.classification {
        argmax_rows(exec).iter().zip(argmax_rows(clear)).take(n).filter(|(a, b)| **a == *b).count()
    } else {
        let (e, c) = (exec.values_f64(), clear.values_f64());
        let per = e.len() / n.max(1);
        (0..n).filter(|&i| (i * per..(i + 1) * per).all(|k| (e[k] - c[k]).abs() <= 1e-4 * (1.0 + c[k].abs()))).count()
    }
}

/// Accuracy (classification) or R² (regression) of `out` against the first rows of `y`.
fn metric(d: &ModelData, out: &Tensor) -> f64 {
    let n = out.shape()[0];
    if d.classification {
        let y: Vec<i64> = d.test_y.values_f64().iter().take(n).map(|&v| v as i64).collect();
        argmax_rows(out).iter().zip(&y).filter(|(p, t)| **p as i64 == **t).count() as f64 / n as f64
    } else {
        let y: Vec<f64> = d.test_y.values_f64().into_iter().take(n).collect();
        let p = out.values_f64();
        let mean = y.iter().sum::<f64>() / n as f64;
        let res: f64 = y.iter().zip(&p).map(|(a, b)| (a - b).powi(2)).sum();
        let tot: f64 = y.iter().map(|a| (a - mean).powi(2)).sum();
        1.0 - res / tot
    }
}

fn compile(d: &ModelData, opts: &CompileOptions) -> Result<(Artifact, f64)> {
    let start = Instant::now();
    let (a, _) = veil_backend::pipeline::compile(&d.graph, std::slice::from_ref(&d.calib), opts)
        .with_context(|| format!("compiling {}", d.name))?;
    Ok((a, start.elapsed().as_secs_f64()))
}

pub fn demo(models_dir: &Path, name: &str, samples: usize) -> Result<()> {
    let dir = models_dir.join(name);
    if !dir.join("model.onnx").exists() {
        bail!("no model {name} in {} (expected {}/model.onnx)", models_dir.display(), dir.display());
    }
    let d = load_dir(&dir)?;
    let (a, secs) = compile(&d, &CompileOptions::default())?;
    eprintln!(
        "compiled {name} in {secs:.2} s: {} lookups/sample, widest {} bits, N = {}",
        a.report.lookups_per_sample, a.report.max_precision, a.params.polynomial_size
    );
    let x = first_rows(&d.test_x, samples);
    let n = x.shape()[0];
    let clear = a.quantized_model()?.run_clear(std::slice::from_ref(&x))?;
    let (fhe, t) = run_compiled_timed(&a, std::slice::from_ref(&x), Mode::Execute, true)?;
    let (c, f) = (primary(&clear)?, primary(&fhe)?);
    let labels = d.test_y.values_f64();
    let (mut agree, mut noise_explained) = (0, Vec::new());
    println!(
        "{:>6}  {:>8}  {:>10}  {:>10}   decrypted outputs (first values)",
        "sample", "label", "clear", "encrypted"
    );
    for (i, label) in labels.iter().enumerate().take(n) {
        let row = |t: &Tensor| {
            t.to_f32().index_axis(Axis(0), i).iter().map(|v| format!("{v:.3}")).take(5).collect::<Vec<_>>().join(" ")
        };
        let (pc, pf, same) = if d.classification {
            let (a, b) = (argmax_rows(c)[i], argmax_rows(f)[i]);
            (a.to_string(), b.to_string(), a == b)
        } else {
            let (a, b) = (c.values_f64()[i], f.values_f64()[i]);
            (format!("{a:.3}"), format!("{b:.3}"), (a - b).abs() <= 0.05 * a.abs().max(1.0))
        };
        agree += usize::from(same);
        println!("{i:>6}  {label:>8}  {pc:>10}  {pf:>10}   {}", row(f));
        if !same {
            let share = simulated_share(&a, &rows(&x, i), &rows(f, i), d.classification, i as u64)?;
            if share > 0.0 {
                noise_explained.push((i, share));
            }
        }
    }
    println!(
        "{agree}/{n} encrypted predictions match the clear ones; encrypted run {:.2} s ({:.2} s/sample on {} cores), keygen {:.2} s",
        t.run.as_secs_f64(),
        t.run.as_secs_f64() / n.max(1) as f64,
        rayon::current_num_threads(),
        t.keygen.as_secs_f64()
    );
    for (i, share) in &noise_explained {
        println!(
            "sample {i}: the clear prediction sits within the lookups' rounding noise; {:.1}% of {SIMULATED_RUNS} noisy simulations predict what the encrypted run did",
            100.0 * share
        );
    }
    let unexplained = n - agree - noise_explained.len();
    if unexplained > 0 {
        bail!(
            "{unexplained} of {n} encrypted predictions differ from the clear ones beyond what the modelled noise produces"
        );
    }
    Ok(())
}

/// Noisy simulations per disagreeing sample in `veil demo`.
const SIMULATED_RUNS: usize = 400;

/// Rows `i..i+1` of `t`.
fn rows(t: &Tensor, i: usize) -> Tensor {
    Tensor::F32(t.to_f32().slice_axis(Axis(0), Slice::from(i..i + 1)).to_owned())
}

/// Share of noisy simulations of one sample (`x`, one row) that predict what the encrypted
/// run did (`fhe`, one row): lookups round their inputs inside the bootstrap, so a value
/// at a bucket edge may be read either way, and a near-tie may flip. A share of zero means
/// the encrypted result is not one the modelled noise gives: a real fault.
fn simulated_share(a: &Artifact, x: &Tensor, fhe: &Tensor, classification: bool, seed: u64) -> Result<f64> {
    use rand::SeedableRng;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let plain = a.client.encode(std::slice::from_ref(x))?;
    let fhe_class = argmax_rows(fhe)[0];
    let fhe_value = fhe.values_f64()[0];
    let mut hits = 0;
    for _ in 0..SIMULATED_RUNS {
        let out = a.circuit.simulate(&plain, Some(&a.params), &mut rng);
        let sim = a.client.finish(&a.client.decode_integers(&out)?, std::slice::from_ref(x))?;
        let p = primary(&sim)?;
        hits += usize::from(if classification {
            argmax_rows(p)[0] == fhe_class
        } else {
            let v = p.values_f64()[0];
            (v - fhe_value).abs() <= 0.05 * v.abs().max(1.0)
        });
    }
    Ok(hits as f64 / SIMULATED_RUNS as f64)
}

/// The model folders to benchmark: those named, or every folder directly under models/.
fn bench_dirs(models_dir: &Path, names: &[String]) -> Result<Vec<PathBuf>> {
    if !names.is_empty() {
        // training sets named here are benchmarked as such (see bench_train)
        return Ok(names
            .iter()
            .map(|n| models_dir.join(n))
            .filter(|p| !p.join("train_x.npy").exists() || p.join("model.onnx").exists())
            .collect());
    }
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(models_dir)
        .with_context(|| format!("reading {}", models_dir.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.join("model.onnx").exists())
        .collect();
    // the tree ensembles live one level down
    if let Ok(trees) = std::fs::read_dir(models_dir.join("trees")) {
        dirs.extend(trees.flatten().map(|e| e.path()).filter(|p| p.join("model.onnx").exists()));
    }
    dirs.sort();
    Ok(dirs)
}

pub fn bench(
    models_dir: &Path,
    names: &[String],
    samples: usize,
    train_batches: usize,
    json_out: Option<&Path>,
) -> Result<()> {
    let mut rows = Vec::new();
    println!(
        "{:<32} {:>8} {:>8} {:>9} {:>7} {:>5} {:>11} {:>11} {:>7} {:>7} {:>7} {:>7} {:>9}",
        "model",
        "compile",
        "keygen",
        "key MB",
        "lookups",
        "bits",
        "latency s",
        "thrpt s/smp",
        "float",
        "clear",
        "simul",
        "exec",
        "exec=clr"
    );
    for dir in bench_dirs(models_dir, names)? {
        let d = load_dir(&dir)?;
        // tree ensembles: with the threshold tests on the client (default) and the server
        let mut variants = vec![(CompileOptions::default(), "")];
        if d.graph.node_ids().any(|n| matches!(d.graph.node(n).op, veil_ir::Op::TreeEnsemble(_))) {
            let mut server = CompileOptions::default();
            server.search.client_tree_tests = false;
            variants.push((server, " [server tests]"));
        }
        for (opts, variant) in &variants {
            let row = match bench_one(&d, samples, opts, variant) {
                Ok(r) => r,
                Err(e) => {
                    println!("{:<32} failed: {e:#}", format!("{}{variant}", d.name));
                    rows.push(json!({ "model": format!("{}{variant}", d.name), "error": format!("{e:#}") }));
                    continue;
                }
            };
            println!(
                "{:<32} {:>8.2} {:>8.2} {:>9.1} {:>7} {:>5} {:>11.3} {:>11.3} {:>7.4} {:>7.4} {:>7.4} {:>7.4} {:>9}",
                row["model"].as_str().unwrap_or(""),
                row["compile_s"].as_f64().unwrap_or(0.0),
                row["keygen_s"].as_f64().unwrap_or(0.0),
                row["server_key_mb"].as_f64().unwrap_or(0.0),
                row["lookups"],
                row["max_bits"],
                row["latency_s"].as_f64().unwrap_or(0.0),
                row["throughput_s_per_sample"].as_f64().unwrap_or(0.0),
                row["float"].as_f64().unwrap_or(0.0),
                row["clear"].as_f64().unwrap_or(0.0),
                row["simulate"].as_f64().unwrap_or(0.0),
                row["execute"].as_f64().unwrap_or(0.0),
                format!("{}/{}", row["execute_matches_clear"], row["execute_samples"]),
            );
            rows.push(row);
        }
    }
    let training = crate::bench_train::bench(models_dir, names, train_batches)?;
    let report = json!({
        "machine_threads": rayon::current_num_threads(),
        "samples_encrypted": samples,
        "training": training,
        "metric": "accuracy (classifiers) or R² (regressors) on the test set; execute on the first `samples` test samples, the others on all; execute_matches_clear: of those samples, how many predict what the clear run predicts",
        "models": rows,
    });
    if let Some(p) = json_out {
        npy::write_atomic(p, |w| Ok(serde_json::to_writer_pretty(w, &report)?))?;
        eprintln!("wrote {}", p.display());
    }
    Ok(())
}

fn bench_one(d: &ModelData, samples: usize, opts: &CompileOptions, variant: &str) -> Result<serde_json::Value> {
    let (a, compile_s) = compile(d, opts)?;
    let start = Instant::now();
    let (ck, sk) = veil_runtime::keygen(&a.params, &a.fingerprint)?;
    let keygen_s = start.elapsed().as_secs_f64();
    let key_mb = tfhe::safe_serialization::safe_serialized_size(&sk).map(|b| b as f64 / 1e6).unwrap_or(0.0);
    let ev = Evaluator::new(&a.circuit, &a.params, sk, &a.fingerprint)?;
    // Latency: one sample alone (its lookups in parallel); throughput: a batch.
    let one = first_rows(&d.test_x, 1);
    let cts = ck.encrypt_for(&a.circuit, &a.client.encode(std::slice::from_ref(&one))?);
    let (_, latency) = run_encrypted(&ev, &a, &cts, false)?;
    let x = first_rows(&d.test_x, samples);
    let n = x.shape()[0];
    let cts = ck.encrypt_for(&a.circuit, &a.client.encode(std::slice::from_ref(&x))?);
    let (out, batch) = run_encrypted(&ev, &a, &cts, false)?;
    let ints = a.client.decode_integers(&ck.decrypt(&out)?)?;
    let exec = a.client.finish(&ints, std::slice::from_ref(&x))?;
    let float = veil_ir::interp::run(&d.graph, std::slice::from_ref(&d.test_x))?;
    let clear = a.quantized_model()?.run_clear(std::slice::from_ref(&d.test_x))?;
    let (sim, _) = run_compiled_timed(&a, std::slice::from_ref(&d.test_x), Mode::Simulate, false)?;
    Ok(json!({
        "model": format!("{}{variant}", d.name),
        "compile_s": compile_s,
        "keygen_s": keygen_s,
        "server_key_mb": key_mb,
        "lookups": a.circuit.lookups_per_sample(),
        "max_bits": a.report.max_precision,
        "bits": { "input": a.report.input_bits, "weight": a.report.weight_bits, "activation": a.report.act_bits, "output": a.report.output_bits, "output_digits": a.report.output_digits, "score_parts": a.report.score_parts.max(1) },
        "params": a.params,
        "latency_s": latency.as_secs_f64(),
        "throughput_s_per_sample": batch.as_secs_f64() / n.max(1) as f64,
        "float": metric(d, primary(&float)?),
        "clear": metric(d, primary(&clear)?),
        "simulate": metric(d, primary(&sim)?),
        "execute": metric(d, primary(&exec)?),
        "execute_samples": n,
        "execute_matches_clear": matching_clear(d, primary(&exec)?, primary(&clear)?),
        "test_samples": d.test_x.shape()[0],
        "metric": if d.classification { "accuracy" } else { "r2" },
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The demo's test for a disagreement: a near-tie's flip is among the noisy
    /// simulations' outcomes, a far-off class is not.
    #[test]
    fn simulated_share_tells_a_near_tie_from_a_fault() {
        use rand::SeedableRng;
        let d = load_dir(&default_models_dir().join("mlp_digits")).unwrap();
        let (a, _) = compile(&d, &CompileOptions::default()).unwrap();
        let class = |c: usize| {
            let mut v = ndarray::Array2::<f32>::zeros((1, 10));
            v[[0, c]] = 1.0;
            Tensor::F32(v.into_dyn())
        };
        // the test samples whose two best classes score closest in the clear
        let plain = a.client.encode(std::slice::from_ref(&d.test_x)).unwrap();
        let clear = a
            .client
            .finish(
                &a.client
                    .decode_integers(&a.circuit.simulate(&plain, None, &mut rand::rngs::StdRng::seed_from_u64(0)))
                    .unwrap(),
                std::slice::from_ref(&d.test_x),
            )
            .unwrap();
        let logits = primary(&clear).unwrap().to_f32();
        let mut ranked: Vec<(f32, usize, usize, usize)> = logits
            .outer_iter()
            .enumerate()
            .map(|(i, row)| {
                let mut order: Vec<usize> = (0..row.len()).collect();
                order.sort_by(|&x, &y| row[y].total_cmp(&row[x]));
                (row[order[0]] - row[order[1]], i, order[1], order[row.len() - 1])
            })
            .collect();
        ranked.sort_by(|x, y| x.0.total_cmp(&y.0));
        let mut flipped = false;
        for &(gap, i, second, last) in ranked.iter().take(5) {
            let x = rows(&d.test_x, i);
            let near = simulated_share(&a, &x, &class(second), true, 1).unwrap();
            let far = simulated_share(&a, &x, &class(last), true, 1).unwrap();
            eprintln!("sample {i} (gap {gap:.3}): noisy simulations predicting the runner-up {near}, the last {far}");
            assert_eq!(far, 0.0, "sample {i}");
            flipped |= near > 0.0 && near < 1.0;
        }
        assert!(flipped, "no near-tie among the five closest flipped under the modelled noise");
    }
}
