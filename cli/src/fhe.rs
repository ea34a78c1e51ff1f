//! The encrypted workflow: keygen, encrypt, run, decrypt, and running a compiled model in
//! clear, simulated or encrypted mode.

use crate::model::{load_compiled, load_inference};
use crate::npy;
use crate::Mode;
use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use rand::SeedableRng;
use std::path::Path;
use std::time::{Duration, Instant};
use veil_backend::artifact::Artifact;
use veil_ir::Tensor;
use veil_runtime::files::{self, CIPHERTEXT_LIMIT, CLIENT_KEY_LIMIT, SERVER_KEY_LIMIT};
use veil_runtime::{ClientKey, EncryptedInputs, EncryptedOutputs, Evaluator, ServerKey};

/// Time spent in each step of an encrypted run.
#[derive(Default, Debug, Clone)]
pub struct Timings {
    pub keygen: Duration,
    pub encrypt: Duration,
    pub server_load: Duration,
    pub run: Duration,
    pub decrypt: Duration,
}

impl Timings {
    pub fn print(&self, samples: usize) {
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        eprintln!(
            "timing: keygen {:.0} ms · encrypt {:.1} ms · server key load {:.0} ms · encrypted run {:.0} ms ({:.0} ms/sample) · decrypt {:.1} ms",
            ms(self.keygen),
            ms(self.encrypt),
            ms(self.server_load),
            ms(self.run),
            ms(self.run) / samples.max(1) as f64,
            ms(self.decrypt)
        );
    }
}

pub(crate) fn spinner(msg: &str) -> ProgressBar {
    let pb = ProgressBar::new_spinner();
    pb.set_message(msg.to_string());
    pb.enable_steady_tick(Duration::from_millis(120));
    pb
}

fn lookup_bar(total: usize) -> ProgressBar {
    let pb = ProgressBar::new(total as u64);
    pb.set_style(
        ProgressStyle::with_template("{spinner} encrypted run [{bar:30}] {pos}/{len} lookups {per_sec} eta {eta}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    pb
}

/// Report every value beyond what the model was compiled for, per sample: inputs clipped
/// to their calibrated range, lookups saturating, accumulators overflowing (whose
/// encrypted results are garbage). A warning, or with `strict` an error. Returns the
/// samples whose encrypted results would be wrong.
pub fn check_ranges(a: &Artifact, xs: &[Tensor], strict: bool) -> Result<Vec<usize>> {
    let q = a.quantized_model()?;
    let clips = q.input_clips(xs)?;
    let (_, overflows) = q.run_clear_checked(xs)?;
    let shown = |samples: &[usize]| {
        let list: Vec<String> = samples.iter().take(10).map(|s| s.to_string()).collect();
        format!("{}{}", list.join(", "), if samples.len() > 10 { ", …" } else { "" })
    };
    let mut lines = Vec::new();
    for c in &clips {
        lines.push(format!(
            "input '{}': {} value(s) beyond the calibrated range are clipped to it (samples {})",
            c.input,
            c.count,
            shown(&c.samples)
        ));
    }
    let g = &q.graph;
    let mut wrong: Vec<usize> = Vec::new();
    for o in &overflows {
        let n = g.node(o.node);
        let r = g.enc_range(o.node);
        match o.kind {
            veil_ir::interp::OverflowKind::Activation => lines.push(format!(
                "{} '{}' saturates: {} value(s) reach {}..{} beyond its range {} (samples {})",
                n.op.mnemonic(),
                n.name,
                o.count,
                o.min,
                o.max,
                r,
                shown(&o.samples)
            )),
            veil_ir::interp::OverflowKind::Accumulator => {
                wrong.extend(&o.samples);
                lines.push(format!(
                    "{} '{}' overflows its compiled range {}: {} value(s) reach {}..{}, so the encrypted result is wrong (samples {})",
                    n.op.mnemonic(),
                    n.name,
                    r,
                    o.count,
                    o.min,
                    o.max,
                    shown(&o.samples)
                ))
            }
        }
    }
    wrong.sort_unstable();
    wrong.dedup();
    if lines.is_empty() {
        return Ok(wrong);
    }
    let text = format!(
        "these inputs leave the ranges the model was compiled for:\n  {}\n(calibrate with data covering such inputs)",
        lines.join("\n  ")
    );
    if strict {
        bail!("{text}");
    }
    eprintln!("warning: {text}");
    Ok(wrong)
}

/// Run a compiled model in clear, simulated or encrypted mode, after reporting values
/// beyond the compiled ranges (an error with `strict`); returns the model outputs.
pub fn run_checked(a: &Artifact, xs: &[Tensor], mode: Mode, strict: bool) -> Result<Vec<Tensor>> {
    check_ranges(a, xs, strict)?;
    Ok(run_compiled_timed(a, xs, mode, true)?.0)
}

pub fn run_compiled_timed(a: &Artifact, xs: &[Tensor], mode: Mode, verbose: bool) -> Result<(Vec<Tensor>, Timings)> {
    match mode {
        Mode::Float => bail!("float mode runs the float graph"),
        Mode::Clear => {
            let q = a.quantized_model()?;
            Ok((q.run_clear(xs)?, Timings::default()))
        }
        Mode::Simulate => {
            let plain = a.client.encode(xs)?;
            let mut rng = rand::rngs::StdRng::from_os_rng();
            let out = a.circuit.simulate(&plain, Some(&a.params), &mut rng);
            let ints = a.client.decode_integers(&out)?;
            Ok((a.client.finish(&ints, xs)?, Timings::default()))
        }
        Mode::Execute => {
            let mut t = Timings::default();
            let start = Instant::now();
            let sp = verbose.then(|| spinner("generating keys"));
            let (ck, sk) = veil_runtime::keygen(&a.params, &a.fingerprint)?;
            t.keygen = start.elapsed();
            let start = Instant::now();
            let cts = ck.encrypt_for(&a.circuit, &a.client.encode(xs)?);
            t.encrypt = start.elapsed();
            let start = Instant::now();
            if let Some(sp) = &sp {
                sp.set_message("preparing server keys");
            }
            let ev = Evaluator::new(&a.circuit, &a.params, sk, &a.fingerprint)?;
            t.server_load = start.elapsed();
            if let Some(sp) = sp {
                sp.finish_and_clear();
            }
            let (out, run) = run_encrypted(&ev, a, &cts, verbose)?;
            t.run = run;
            let start = Instant::now();
            let plain = ck.decrypt(&out)?;
            let ints = a.client.decode_integers(&plain)?;
            let outs = a.client.finish(&ints, xs)?;
            t.decrypt = start.elapsed();
            if verbose {
                t.print(cts.samples);
            }
            Ok((outs, t))
        }
    }
}

/// Evaluate with a progress bar over lookups.
pub fn run_encrypted(
    ev: &Evaluator,
    a: &Artifact,
    cts: &EncryptedInputs,
    verbose: bool,
) -> Result<(EncryptedOutputs, Duration)> {
    let total = a.circuit.lookups_per_sample() * cts.samples;
    let bar = (verbose && total > 0).then(|| lookup_bar(total));
    let start = Instant::now();
    let out = ev.run(cts, &|n| {
        if let Some(b) = &bar {
            b.inc(n as u64);
        }
    })?;
    let took = start.elapsed();
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    Ok((out, took))
}

pub fn keygen_cmd(model: &Path, out_dir: &Path) -> Result<()> {
    let a = load_compiled(model)?;
    std::fs::create_dir_all(out_dir).with_context(|| format!("cannot create {}", out_dir.display()))?;
    let start = Instant::now();
    let sp = spinner("generating keys");
    let (ck, sk) = veil_runtime::keygen(&a.params, &a.fingerprint)?;
    sp.finish_and_clear();
    let took = start.elapsed();
    let (cp, sp) = (out_dir.join("client.key"), out_dir.join("server.key"));
    files::write_secret(&cp, &ck, CLIENT_KEY_LIMIT)?;
    files::write(&sp, &sk, SERVER_KEY_LIMIT)?;
    let size = |p: &Path| crate::report::bytes(std::fs::metadata(p).map(|m| m.len()).unwrap_or(0));
    eprintln!(
        "keys generated in {:.2} s: {} ({}, secret: keep it) and {} ({}, for the server)",
        took.as_secs_f64(),
        cp.display(),
        size(&cp),
        sp.display(),
        size(&sp)
    );
    Ok(())
}

/// Read a client key and check it belongs to the compiled model (inference or training).
pub(crate) fn load_client_key(path: &Path, a: &Artifact) -> Result<ClientKey> {
    let ck: ClientKey = files::read(path, CLIENT_KEY_LIMIT)?;
    veil_runtime::keys::check_fingerprint(&format!("client key {}", path.display()), &ck.fingerprint, &a.fingerprint)?;
    ck.check_params(&a.params).with_context(|| format!("client key {}", path.display()))?;
    Ok(ck)
}

pub fn encrypt_cmd(model: &Path, client_key: &Path, input: &Path, output: &Path, strict: bool) -> Result<()> {
    npy::check_writable(output, "the ciphertexts")?;
    let a = load_inference(model)?;
    let ck = load_client_key(client_key, &a)?;
    let xs = npy::read_model_inputs(input, &a.client.model_inputs)?;
    check_ranges(&a, &xs, strict)?;
    let start = Instant::now();
    let cts = ck.encrypt_for(&a.circuit, &a.client.encode(&xs)?);
    files::write(output, &cts, CIPHERTEXT_LIMIT)?;
    eprintln!(
        "encrypted {} sample(s) in {:.1} ms → {}",
        cts.samples,
        start.elapsed().as_secs_f64() * 1e3,
        output.display()
    );
    Ok(())
}

pub fn run_cmd(model: &Path, server_key: &Path, input: &Path, output: &Path) -> Result<()> {
    npy::check_writable(output, "the encrypted outputs")?;
    let a = load_inference(model)?;
    let sk: ServerKey = files::read(server_key, SERVER_KEY_LIMIT)?;
    let cts: EncryptedInputs = files::read(input, CIPHERTEXT_LIMIT)?;
    veil_runtime::keys::check_fingerprint(
        &format!("ciphertexts {}", input.display()),
        &cts.fingerprint,
        &a.fingerprint,
    )?;
    let start = Instant::now();
    let ev = Evaluator::new(&a.circuit, &a.params, sk, &a.fingerprint)
        .with_context(|| format!("loading server key {}", server_key.display()))?;
    let load = start.elapsed();
    let (out, took) = run_encrypted(&ev, &a, &cts, true)?;
    files::write(output, &out, CIPHERTEXT_LIMIT)?;
    eprintln!(
        "ran {} sample(s) encrypted in {:.2} s ({:.0} ms/sample, {} lookups each; key load {:.2} s) → {}",
        cts.samples,
        took.as_secs_f64(),
        took.as_secs_f64() * 1e3 / cts.samples.max(1) as f64,
        a.circuit.lookups_per_sample(),
        load.as_secs_f64(),
        output.display()
    );
    Ok(())
}

pub fn decrypt_cmd(
    model: &Path,
    client_key: &Path,
    input: &Path,
    output: &Path,
    outputs_dir: Option<&Path>,
) -> Result<()> {
    npy::check_writable(output, "the outputs")?;
    let a = load_inference(model)?;
    let ck = load_client_key(client_key, &a)?;
    let cts: EncryptedOutputs = files::read(input, CIPHERTEXT_LIMIT)?;
    let plain = ck.decrypt(&cts).with_context(|| format!("decrypting {}", input.display()))?;
    let ints = a.client.decode_integers(&plain)?;
    if a.client.tail_inputs.iter().any(|s| matches!(s, veil_passes::model::TailSource::Model(_))) {
        bail!("this model's client step needs the original inputs; use `veil predict --mode execute`");
    }
    let outs = a.client.finish(&ints, &[])?;
    crate::write_outputs(output, outputs_dir, &a.client.model_outputs, &outs)?;
    eprintln!("decrypted {} sample(s) → {}", cts.samples, output.display());
    Ok(())
}
