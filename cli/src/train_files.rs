//! Encrypted training split between the data owner and the server, through files:
//! `train-compile` and `train-encrypt` (data owner), `train-run` (server, evaluation key
//! only), `train-decrypt` (data owner).

use crate::model::load_compiled;
use crate::npy;
use crate::train::{check_batch, load_data, training_classes, write_model, SpecArgs};
use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use rand::SeedableRng;
use std::path::{Path, PathBuf};
use std::time::Instant;
use veil_backend::artifact::Artifact;
use veil_backend::training::{compile_training, TrainingClient};
use veil_passes::training::{accuracy, batches};
use veil_runtime::files::{self, CIPHERTEXT_LIMIT, SERVER_KEY_LIMIT};
use veil_runtime::{EncryptedBatches, EncryptedState, Evaluator, ServerKey};

/// A training artifact, or an error saying what the file is instead.
fn load_training(path: &Path) -> Result<Artifact> {
    let a = load_compiled(path)?;
    if a.training.is_none() {
        bail!(
            "{} is an inference model; training needs a training model (veil train-compile … -o TRAIN.veil)",
            path.display()
        );
    }
    Ok(a)
}

/// The shape of the data to train on: from the data files, or given directly.
pub struct Shape {
    pub data: Option<(PathBuf, PathBuf)>,
    pub features: Option<usize>,
    pub classes: Option<Vec<i64>>,
}

pub fn compile_cmd(shape: &Shape, args: &SpecArgs, output: &Path) -> Result<()> {
    let mut data = None;
    let (features, classes) = match (shape, &shape.data) {
        (_, Some((x, y))) => {
            let d = load_data(x, y)?;
            check_batch(args.batch_size, d.x.nrows(), x)?;
            let shape = (d.x.ncols(), training_classes(&d.labels, y)?);
            data = Some(d);
            shape
        }
        (Shape { features: Some(f), classes: Some(c), .. }, None) => {
            let mut c = c.clone();
            c.sort_unstable();
            c.dedup();
            (*f, c)
        }
        _ => bail!("give the data (--data X.npy --labels y.npy) or its shape (--features F --classes 0,1,…)"),
    };
    npy::check_writable(output, "the training model")?;
    let start = Instant::now();
    let (a, _) = compile_training(args.spec(features, classes)?, args.p_error)?;
    if let (Some(d), Some(plan)) = (&data, &a.training) {
        // the values, not only the shape: NaN or a feature outside the range is an error now
        plan.quantize_features(&d.x, &d.x_path.display().to_string())?;
    }
    a.write(output)?;
    eprint!("{}", crate::report::text(&a, false));
    eprintln!("compiled the training step in {:.2} s → {}", start.elapsed().as_secs_f64(), output.display());
    Ok(())
}

pub struct EncryptCmd {
    pub model: PathBuf,
    pub client_key: PathBuf,
    pub data: PathBuf,
    pub labels: PathBuf,
    pub output: PathBuf,
    pub initial_weights: Option<PathBuf>,
    pub seed: Option<u64>,
}

pub fn encrypt_cmd(c: &EncryptCmd) -> Result<()> {
    npy::check_writable(&c.output, "the batches")?;
    if let Some(w) = &c.initial_weights {
        npy::check_writable(w, "the starting weights")?;
    }
    let a = load_training(&c.model)?;
    let ck = crate::fhe::load_client_key(&c.client_key, &a)?;
    let tc = TrainingClient::new(&a)?;
    let plan = tc.plan;
    let d = load_data(&c.data, &c.labels)?;
    check_batch(plan.spec.batch, d.x.nrows(), &c.data)?;
    let xq = plan.quantize_features(&d.x, &c.data.display().to_string())?;
    let t = plan.targets(&d.labels, &c.labels.display().to_string())?;
    let mut seen: Vec<i64> = d.labels.clone();
    seen.sort_unstable();
    seen.dedup();
    if let [only] = seen.as_slice() {
        eprintln!(
            "warning: {} holds only class {only}: fine as one part of the data (train-run takes several --batches files), but trained on alone the model learns nothing of the other classes",
            c.labels.display()
        );
    }
    let start = Instant::now();
    let mut rng = match c.seed {
        Some(s) => rand::rngs::StdRng::seed_from_u64(s),
        None => rand::rngs::StdRng::from_os_rng(),
    };
    let steps = batches(d.x.nrows(), plan.spec.batch);
    let plain = steps
        .iter()
        .map(|rows| tc.step_plaintexts(&plan.step_inputs(&xq, &t, rows, &mut rng)))
        .collect::<veil_backend::Result<Vec<_>>>()?;
    let enc = ck.encrypt_batches(&a.circuit, &a.params, &plain)?;
    files::write(&c.output, &enc, CIPHERTEXT_LIMIT)?;
    eprintln!(
        "encrypted {} samples as {} batches of {} in {:.2} s → {}",
        d.x.nrows(),
        steps.len(),
        plan.spec.batch,
        start.elapsed().as_secs_f64(),
        c.output.display()
    );
    if let Some(w) = &c.initial_weights {
        let state = ck.encrypt_state(&a.circuit, &tc.state_plaintexts(&plan.initial_state()))?;
        files::write(w, &state, CIPHERTEXT_LIMIT)?;
        eprintln!("encrypted zero starting weights → {}", w.display());
    }
    Ok(())
}

pub struct RunCmd {
    pub model: PathBuf,
    pub server_key: PathBuf,
    pub batches: Vec<PathBuf>,
    pub weights: PathBuf,
    pub output: PathBuf,
    pub epochs: usize,
}

/// The server's side: no client key anywhere, by type (only `ServerKey` is read).
pub fn run_cmd(c: &RunCmd) -> Result<()> {
    if c.epochs == 0 {
        bail!("--epochs must be at least 1");
    }
    if c.batches.is_empty() {
        bail!("give at least one batches file (--batches BATCHES.ct)");
    }
    npy::check_writable(&c.output, "the trained weights")?;
    let a = load_training(&c.model)?;
    let sk: ServerKey = files::read(&c.server_key, SERVER_KEY_LIMIT)?;
    let parts: Vec<EncryptedBatches> = c
        .batches
        .iter()
        .map(|p| files::read(p, CIPHERTEXT_LIMIT).with_context(|| format!("reading batches {}", p.display())))
        .collect::<Result<_>>()?;
    let state: EncryptedState = files::read(&c.weights, CIPHERTEXT_LIMIT)
        .with_context(|| format!("reading weights {}", c.weights.display()))?;
    for (p, part) in c.batches.iter().zip(&parts) {
        veil_runtime::keys::check_fingerprint(&format!("batches {}", p.display()), &part.fingerprint, &a.fingerprint)?;
    }
    veil_runtime::keys::check_fingerprint(
        &format!("weights {}", c.weights.display()),
        &state.fingerprint,
        &a.fingerprint,
    )?;
    let start = Instant::now();
    let ev = Evaluator::new(&a.circuit, &a.params, sk, &a.fingerprint)
        .with_context(|| format!("loading server key {}", c.server_key.display()))?;
    let refs: Vec<&EncryptedBatches> = parts.iter().collect();
    ev.check_training(&refs, &state).with_context(|| {
        let names: Vec<String> = c.batches.iter().map(|p| p.display().to_string()).collect();
        format!("batches {} with weights {}", names.join(", "), c.weights.display())
    })?;
    eprintln!("server key loaded in {:.2} s", start.elapsed().as_secs_f64());
    let per_epoch: usize = parts.iter().map(|p| p.len()).sum();
    let bar = ProgressBar::new((per_epoch * c.epochs) as u64);
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{bar:30}] {pos}/{len} batches · {msg} · eta {eta}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    let first_step = state.steps;
    let mut seconds = 0.0;
    let start = Instant::now();
    let end = ev.train(&refs, state, c.epochs, &|_| {}, &mut |done, st| {
        seconds += done.seconds;
        bar.set_message(format!("epoch {}/{} · {:.2} s/batch", done.epoch + 1, c.epochs, done.seconds));
        bar.inc(1);
        // the weights after every whole epoch are written, so an interrupted run resumes
        // from the last one
        if done.batch + 1 == done.batches_per_epoch {
            files::write(&c.output, st, CIPHERTEXT_LIMIT)
                .map_err(|e| veil_runtime::RuntimeError::Invalid(e.to_string()))?;
        }
        Ok(())
    })?;
    bar.finish_and_clear();
    let steps = end.steps - first_step;
    eprintln!(
        "{steps} encrypted steps in {:.1} s ({:.2} s per batch, {} lookups each); weights after {} steps in all → {}",
        start.elapsed().as_secs_f64(),
        seconds / steps.max(1) as f64,
        a.circuit.lookups_per_sample(),
        end.steps,
        c.output.display()
    );
    Ok(())
}

pub struct DecryptCmd {
    pub model: PathBuf,
    pub client_key: PathBuf,
    pub weights: PathBuf,
    pub output: PathBuf,
    pub weights_dir: Option<PathBuf>,
    pub test: Option<(PathBuf, PathBuf)>,
}

pub fn decrypt_cmd(c: &DecryptCmd) -> Result<()> {
    npy::check_writable(&c.output, "the model")?;
    let a = load_training(&c.model)?;
    let ck = crate::fhe::load_client_key(&c.client_key, &a)?;
    let tc = TrainingClient::new(&a)?;
    // everything that can fail is read and checked before anything is written
    let test = match &c.test {
        Some((x, y)) => {
            let d = load_data(x, y)?;
            if d.x.ncols() != tc.plan.spec.features {
                bail!("{} has {} features, the model {}", x.display(), d.x.ncols(), tc.plan.spec.features);
            }
            tc.plan.quantize_features(&d.x, &x.display().to_string())?;
            tc.plan.targets(&d.labels, &y.display().to_string())?;
            Some((x, d))
        }
        None => None,
    };
    let state: EncryptedState = files::read(&c.weights, CIPHERTEXT_LIMIT)
        .with_context(|| format!("reading weights {}", c.weights.display()))?;
    state.check(&a.circuit, ck.dimension()).with_context(|| format!("weights {}", c.weights.display()))?;
    let ints =
        tc.decode_state(&ck.decrypt_state(&state).with_context(|| format!("decrypting {}", c.weights.display()))?);
    let (w, b) = tc.plan.decode(&ints[0], &ints[1]).with_context(|| format!("decoding {}", c.weights.display()))?;
    write_model(tc.plan, &w, &b, &c.output, c.weights_dir.as_deref())?;
    let mut msg = format!("decrypted the weights after {} steps → {}", state.steps, c.output.display());
    if let Some((x, d)) = test {
        let acc = accuracy(&tc.plan.spec.classes, &w, &b, &d.x, &d.labels);
        msg += &format!("; accuracy on {}: {acc:.4}", x.display());
    }
    eprintln!("{msg}");
    Ok(())
}
