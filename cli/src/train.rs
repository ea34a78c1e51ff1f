//! `veil train`: encrypted training with every role in one process (development), in
//! clear, simulated or encrypted mode, with a progress bar, a history and a plot. The
//! client/server commands are in `train_files`.

use crate::history::{History, StepRecord};
use crate::npy;
use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use ndarray::{Array1, Array2, ArrayD, Ix1, Ix2};
use rand::SeedableRng;
use std::path::{Path, PathBuf};
use std::time::Instant;
use veil_backend::artifact::Artifact;
use veil_backend::training::{compile_training, TrainingClient, TRAINING_P_ERROR};
use veil_ir::Tensor;
use veil_passes::training::{accuracy, batches, FloatSgd, TrainSpec, TrainingModel, TrainingPlan};

/// What a training compile takes besides the data's shape.
#[derive(clap::Args, Clone, Debug)]
pub struct SpecArgs {
    /// Samples per SGD step (the last batch of an epoch is completed from its first samples).
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    #[arg(long, default_value_t = 1.0)]
    pub learning_rate: f64,
    /// L2 penalty on the weights (scikit-learn's alpha); 0 for none.
    #[arg(long, default_value_t = 0.0)]
    pub l2: f64,
    /// The range every feature lies in, LO,HI (values outside it are an error).
    #[arg(long, value_parser = parse_range, default_value = "-1,1", allow_hyphen_values = true)]
    pub feature_range: (f64, f64),
    /// Bound on |weight| for features scaled to [-1, 1] (the compiler rounds it).
    #[arg(long, default_value_t = 1.0)]
    pub weight_range: f64,
    /// Bits every lookup resolves (the main speed lever).
    #[arg(long, default_value_t = 6)]
    pub precision: u32,
    /// Failure probability per lookup; training tolerates rare failures.
    #[arg(long, default_value_t = TRAINING_P_ERROR)]
    pub p_error: f64,
}

fn parse_range(s: &str) -> std::result::Result<(f64, f64), String> {
    let parts: Vec<&str> = s.split(',').map(str::trim).collect();
    let [lo, hi] = parts.as_slice() else { return Err(format!("expected LO,HI, got '{s}'")) };
    let lo: f64 = lo.parse().map_err(|_| format!("'{lo}' is not a number"))?;
    let hi: f64 = hi.parse().map_err(|_| format!("'{hi}' is not a number"))?;
    Ok((lo, hi))
}

impl SpecArgs {
    pub fn spec(&self, features: usize, classes: Vec<i64>) -> Result<TrainSpec> {
        if !(self.p_error > 0.0 && self.p_error < 1.0) {
            bail!("--p-error must be a probability in (0, 1)");
        }
        let mut s = TrainSpec::new(features, classes);
        s.batch = self.batch_size;
        s.learning_rate = self.learning_rate;
        s.l2 = self.l2;
        s.feature_range = self.feature_range;
        s.weight_range = self.weight_range;
        s.precision = self.precision;
        Ok(s)
    }
}

/// Features and labels read from .npy files.
pub struct Data {
    pub x: Array2<f32>,
    pub labels: Vec<i64>,
    pub x_path: PathBuf,
}

/// Read features `[n, F]` and integer class labels `[n]`: a wrong shape, a count that
/// does not match, or a label that is not an integer is an error naming the file.
pub fn load_data(x_path: &Path, y_path: &Path) -> Result<Data> {
    let x = match npy::read_f32(x_path)? {
        Tensor::F32(a) => a,
        Tensor::I64(_) => unreachable!("read_f32 gives floats"),
    };
    let shape = x.shape().to_vec();
    let x = x.into_dimensionality::<Ix2>().map_err(|_| {
        anyhow::anyhow!("{} must be a [samples, features] array, got shape {shape:?}", x_path.display())
    })?;
    if x.nrows() == 0 || x.ncols() == 0 {
        bail!("{} holds no samples or no features (shape {:?})", x_path.display(), x.dim());
    }
    let labels = read_labels(y_path)?;
    if labels.len() != x.nrows() {
        bail!("{} has {} samples but {} has {} labels", x_path.display(), x.nrows(), y_path.display(), labels.len());
    }
    Ok(Data { x, labels, x_path: x_path.to_path_buf() })
}

fn read_labels(path: &Path) -> Result<Vec<i64>> {
    let flat = |shape: &[usize]| -> Result<()> {
        match shape {
            [_] | [_, 1] => Ok(()),
            s => bail!("{} must hold one class label per sample ([samples]), got shape {s:?}", path.display()),
        }
    };
    match npy::read(path)? {
        Tensor::I64(a) => {
            flat(a.shape())?;
            Ok(a.iter().copied().collect())
        }
        Tensor::F32(a) => {
            flat(a.shape())?;
            a.iter()
                .enumerate()
                .map(|(i, &v)| {
                    if v.is_finite() && v.fract() == 0.0 {
                        Ok(v as i64)
                    } else {
                        bail!("{}: sample {i} has label {v}, not an integer class id", path.display())
                    }
                })
                .collect()
        }
    }
}

/// The distinct labels, sorted.
pub fn classes_of(labels: &[i64]) -> Vec<i64> {
    let mut c = labels.to_vec();
    c.sort_unstable();
    c.dedup();
    c
}

/// The classes to train on: at least two, else an error naming the labels file.
pub fn training_classes(labels: &[i64], path: &Path) -> Result<Vec<i64>> {
    let c = classes_of(labels);
    if c.len() < 2 {
        bail!(
            "{} holds only class {}: training a classifier needs at least two classes",
            path.display(),
            c.first().map_or("(none)".to_string(), |v| v.to_string())
        );
    }
    Ok(c)
}

/// How `veil train` runs the step.
#[derive(Clone, Copy, Debug, clap::ValueEnum, PartialEq)]
pub enum TrainMode {
    /// The circuit's integers, unencrypted (fast; exactly what encryption computes, up to
    /// the bootstrap's approximate rounding).
    Clear,
    /// The circuit on plaintexts with the noise encryption adds.
    Simulate,
    /// Really encrypted (keys made in memory).
    Execute,
}

pub struct TrainCmd {
    pub data: PathBuf,
    pub labels: PathBuf,
    pub mode: TrainMode,
    pub output: PathBuf,
    pub epochs: usize,
    pub max_batches: Option<usize>,
    pub test: Option<(PathBuf, PathBuf)>,
    pub history: Option<PathBuf>,
    pub plot: Option<PathBuf>,
    pub weights_dir: Option<PathBuf>,
    pub seed: u64,
    pub spec: SpecArgs,
}

/// What one step of any mode advances.
enum Runner<'a> {
    Clear {
        state: [ArrayD<i64>; 2],
    },
    Simulate {
        plain: Vec<Vec<u64>>,
        rng: rand::rngs::StdRng,
    },
    Execute {
        ev: veil_runtime::Evaluator<'a>,
        ck: veil_runtime::ClientKey,
        batches: veil_runtime::EncryptedBatches,
        state: veil_runtime::EncryptedState,
    },
}

pub fn train(cmd: &TrainCmd) -> Result<()> {
    if cmd.epochs == 0 {
        bail!("--epochs must be at least 1");
    }
    if cmd.max_batches == Some(0) {
        bail!("--max-batches must be at least 1");
    }
    npy::check_writable(&cmd.output, "the model")?;
    for (p, what) in [(&cmd.history, "the history"), (&cmd.plot, "the plot")] {
        if let Some(p) = p {
            npy::check_writable(p, what)?;
        }
    }
    if let Some(d) = &cmd.weights_dir {
        npy::check_writable(&d.join("weights.npy"), "the weights")
            .or_else(|_| npy::check_writable(d, "the weights directory"))?;
    }
    let data = load_data(&cmd.data, &cmd.labels)?;
    let classes = training_classes(&data.labels, &cmd.labels)?;
    check_batch(cmd.spec.batch_size, data.x.nrows(), &cmd.data)?;
    let spec = cmd.spec.spec(data.x.ncols(), classes.clone())?;
    let test = match &cmd.test {
        Some((x, y)) => {
            let t = load_data(x, y)?;
            if t.x.ncols() != data.x.ncols() {
                bail!("{} has {} features, the training data {}", x.display(), t.x.ncols(), data.x.ncols());
            }
            Some(t)
        }
        None => None,
    };
    let start = Instant::now();
    let (a, model) = compile_training(spec, cmd.spec.p_error).context("compiling the training step")?;
    let plan = a.training.clone().expect("a training artifact");
    let compile_s = start.elapsed().as_secs_f64();
    let xq = plan.quantize_features(&data.x, &cmd.data.display().to_string())?;
    let targets = plan.targets(&data.labels, &cmd.labels.display().to_string())?;
    if let Some(t) = &test {
        // checked like the training data, so a bad test file is reported up front
        plan.quantize_features(&t.x, &t.x_path.display().to_string())?;
    }
    print_plan(&a, &plan, compile_s);
    let mut steps = batches(data.x.nrows(), plan.spec.batch);
    if let Some(k) = cmd.max_batches {
        steps.truncate(k.max(1));
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(cmd.seed);
    let inputs: Vec<[ArrayD<i64>; 4]> =
        steps.iter().map(|rows| plan.step_inputs(&xq, &targets, rows, &mut rng)).collect();
    let tc = TrainingClient::new(&a)?;
    let (mut runner, keygen_s, key_mb) = start_runner(&a, &tc, &plan, &inputs, cmd.mode, cmd.seed)?;
    let eval = test.as_ref().unwrap_or(&data);
    let mut history = History {
        mode: format!("{:?}", cmd.mode).to_lowercase(),
        evaluated_on: if test.is_some() { "test" } else { "training" }.into(),
        samples: data.x.nrows(),
        features: data.x.ncols(),
        classes: classes.clone(),
        batch_size: plan.spec.batch,
        learning_rate: plan.spec.learning_rate,
        epochs: cmd.epochs,
        batches_per_epoch: steps.len(),
        lookups_per_step: a.circuit.lookups_per_sample(),
        widest_lookup_bits: a.params.precision,
        p_error: a.params.p_error,
        keygen_seconds: keygen_s,
        server_key_mb: key_mb,
        steps: Vec::new(),
    };
    let mut float = FloatSgd::new(&model, &data.x, &data.labels)?;
    let bar = step_bar(cmd.epochs * steps.len());
    let mut state = plan.initial_state();
    for epoch in 0..cmd.epochs {
        for (i, (rows, step_inputs)) in steps.iter().zip(&inputs).enumerate() {
            let t = Instant::now();
            state = runner.step(&model, &tc, &a, step_inputs, i, &bar)?;
            let seconds = t.elapsed().as_secs_f64();
            let (w, b) = plan.decode(&state[0], &state[1])?;
            let acc = accuracy(&classes, &w, &b, &eval.x, &eval.labels);
            float.step(rows)?;
            let (fw, fb) = float.weights();
            let facc = accuracy(&classes, &fw, &fb, &eval.x, &eval.labels);
            history.steps.push(StepRecord {
                epoch: epoch + 1,
                batch: i + 1,
                step: history.steps.len() + 1,
                seconds,
                accuracy: acc,
                float_accuracy: facc,
            });
            bar.set_message(format!(
                "epoch {}/{} · {seconds:.2} s/batch · {} accuracy {acc:.3} (float SGD {facc:.3})",
                epoch + 1,
                cmd.epochs,
                history.evaluated_on
            ));
            bar.inc(1);
        }
    }
    bar.finish_and_clear();
    finish(&plan, &state, &history, cmd)
}

/// A batch larger than the data would repeat samples within one step: refuse it.
pub fn check_batch(batch: usize, samples: usize, path: &Path) -> Result<()> {
    if batch > samples {
        bail!("--batch-size {batch} is larger than the {samples} samples in {}", path.display());
    }
    Ok(())
}

fn step_bar(total: usize) -> ProgressBar {
    let pb = ProgressBar::new(total as u64);
    pb.set_style(
        ProgressStyle::with_template("{spinner} [{bar:30}] {pos}/{len} batches · {msg}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    pb
}

fn print_plan(a: &Artifact, plan: &TrainingPlan, seconds: f64) {
    let p = &a.params;
    eprintln!(
        "compiled one SGD step in {seconds:.2} s: {} lookups per batch of {}, {}-bit lookups, weights in ±{} steps of {:.4} (±{:.2}), stochastic rounding at 1/{}; n={} N={} PBS 2^{}×{} KS 2^{}×{}, p_error {:.1e} per lookup, ≈{:.0} ms per lookup on one core",
        a.circuit.lookups_per_sample(),
        plan.spec.batch,
        p.precision,
        plan.weight_levels,
        plan.weight_scale,
        plan.weight_levels as f64 * plan.weight_scale,
        1u64 << plan.dither_bits,
        p.lwe_dimension,
        p.polynomial_size,
        p.pbs_base_log,
        p.pbs_level,
        p.ks_base_log,
        p.ks_level,
        p.p_error,
        p.pbs_cost_ms
    );
}

fn start_runner<'a>(
    a: &'a Artifact,
    tc: &TrainingClient,
    plan: &TrainingPlan,
    inputs: &[[ArrayD<i64>; 4]],
    mode: TrainMode,
    seed: u64,
) -> Result<(Runner<'a>, f64, f64)> {
    Ok(match mode {
        TrainMode::Clear => (Runner::Clear { state: plan.initial_state() }, 0.0, 0.0),
        TrainMode::Simulate => {
            let plain = tc.state_plaintexts(&plan.initial_state());
            (Runner::Simulate { plain, rng: rand::rngs::StdRng::seed_from_u64(seed ^ 0x5eed) }, 0.0, 0.0)
        }
        TrainMode::Execute => {
            let t = Instant::now();
            let sp = spinner("generating keys");
            let (ck, sk) = veil_runtime::keygen(&a.params, &a.fingerprint)?;
            let keygen = t.elapsed().as_secs_f64();
            sp.set_message("encrypting batches");
            let plain = inputs.iter().map(|s| tc.step_plaintexts(s)).collect::<veil_backend::Result<Vec<_>>>()?;
            let batches = ck.encrypt_batches(&a.circuit, &a.params, &plain)?;
            let state = ck.encrypt_state(&a.circuit, &tc.state_plaintexts(&plan.initial_state()))?;
            sp.set_message("preparing server keys");
            let ev = veil_runtime::Evaluator::new(&a.circuit, &a.params, sk, &a.fingerprint)?;
            ev.check_training(&[&batches], &state)?;
            sp.finish_and_clear();
            let mb = (a.params.bootstrap_key_bytes + a.params.keyswitch_key_bytes) as f64 / 1e6;
            eprintln!("keys generated in {keygen:.2} s ({mb:.0} MB of evaluation keys in memory)");
            (Runner::Execute { ev, ck, batches, state }, keygen, mb)
        }
    })
}

fn spinner(msg: &str) -> ProgressBar {
    let pb = ProgressBar::new_spinner();
    pb.set_message(msg.to_string());
    pb.enable_steady_tick(std::time::Duration::from_millis(120));
    pb
}

impl Runner<'_> {
    /// Run step `i` and return the state after it (decrypted, in execute mode: every
    /// role runs in this process).
    fn step(
        &mut self,
        model: &TrainingModel,
        tc: &TrainingClient,
        a: &Artifact,
        inputs: &[ArrayD<i64>; 4],
        i: usize,
        bar: &ProgressBar,
    ) -> Result<[ArrayD<i64>; 2]> {
        Ok(match self {
            Runner::Clear { state } => {
                *state = model.step_clear(inputs, state)?;
                state.clone()
            }
            Runner::Simulate { plain, rng } => {
                let step = tc.step_plaintexts(inputs)?;
                *plain = tc.simulate_step(&step, plain, Some(&a.params), rng);
                tc.decode_state(plain)
            }
            Runner::Execute { ev, ck, batches, state } => {
                let _ = bar;
                let (batch, ggsw) = batches.batch(i).context("a batch is missing")?;
                let next = ev.train_step(batch, ggsw, state.values(), &|_| {})?;
                state.advance(next);
                tc.decode_state(&ck.decrypt_state(state)?)
            }
        })
    }
}

/// Write the trained model (ONNX), its weights (.npy), the history and the plot.
fn finish(plan: &TrainingPlan, state: &[ArrayD<i64>; 2], history: &History, cmd: &TrainCmd) -> Result<()> {
    let (w, b) = plan.decode(&state[0], &state[1])?;
    write_model(plan, &w, &b, &cmd.output, cmd.weights_dir.as_deref())?;
    if let Some(h) = &cmd.history {
        history.write_json(h)?;
    }
    if let Some(p) = &cmd.plot {
        history.plot_svg(p)?;
    }
    let per_epoch: Vec<String> =
        history.per_epoch().iter().map(|(a, f)| format!("{a:.4} (float SGD {f:.4})")).collect();
    eprintln!(
        "{} training: {} steps, {:.2} s per batch; {} accuracy after each epoch: {}; model → {}",
        history.mode,
        history.steps.len(),
        history.mean_seconds_per_step(),
        history.evaluated_on,
        per_epoch.join(", "),
        cmd.output.display()
    );
    Ok(())
}

/// The trained classifier as ONNX (and its weights as `DIR/weights.npy [F, S]`,
/// `DIR/bias.npy [S]` in the original feature units).
pub fn write_model(
    plan: &TrainingPlan,
    w: &Array2<f32>,
    b: &Array1<f32>,
    output: &Path,
    weights_dir: Option<&Path>,
) -> Result<()> {
    let bytes = veil_frontend::onnx::export::linear_classifier(w, b, &plan.spec.classes, "veil_logistic_regression")?;
    npy::write_atomic(output, |out| Ok(std::io::Write::write_all(out, &bytes)?))?;
    if let Some(dir) = weights_dir {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        npy::write(&dir.join("weights.npy"), &Tensor::F32(w.clone().into_dyn()))?;
        npy::write(&dir.join("bias.npy"), &Tensor::F32(b.clone().into_dimensionality::<Ix1>()?.into_dyn()))?;
    }
    Ok(())
}
