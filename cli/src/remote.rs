//! `veil serve` and `veil remote`: the service and its client.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::io::Read;
use std::path::Path;
use std::time::{Duration, Instant};

fn init_logs() {
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,tower_http=info,sqlx=warn")),
        )
        .init();
}

/// One Ctrl-C or SIGTERM (what container runtimes send to stop a process).
async fn one_signal() {
    #[cfg(unix)]
    {
        let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) else {
            let _ = tokio::signal::ctrl_c().await;
            return;
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
}

/// Completes on the first Ctrl-C or SIGTERM, saying so; a second one exits at once.
async fn stop_signal(what: &'static str) {
    one_signal().await;
    eprintln!("{what}: shutting down, finishing the work in hand (Ctrl-C again to stop now)");
    tokio::spawn(async move {
        one_signal().await;
        eprintln!("{what}: stopped before the work in hand was finished");
        std::process::exit(130);
    });
}

/// `veil serve`: run the service until Ctrl-C or SIGTERM (requests in flight finish).
pub fn serve(config: veil_service::Config, listen: &str) -> Result<()> {
    init_logs();
    let rt = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    rt.block_on(async move {
        let listener =
            tokio::net::TcpListener::bind(listen).await.with_context(|| format!("cannot listen on {listen}"))?;
        let jobs = match &config.queue {
            Some(url) => format!("jobs queued in {}", veil_service::redact_url(url)),
            None => "jobs run in this process".into(),
        };
        // models loaded and the queue connected before saying anything is served
        let app = veil_service::app(config).await?;
        eprintln!("veil serve: listening on http://{} ({jobs})", listener.local_addr()?);
        veil_service::serve_app(app, listener, stop_signal("veil serve")).await?;
        Ok(())
    })
}

/// `veil worker`: evaluate queued tasks until Ctrl-C or SIGTERM.
pub fn worker(config: veil_service::worker::WorkerConfig) -> Result<()> {
    init_logs();
    let rt = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    rt.block_on(veil_service::worker::work(config, stop_signal("veil worker")))?;
    Ok(())
}

/// What `veil remote register` saves: where the key lives and how to use it.
#[derive(Serialize, Deserialize)]
pub struct Session {
    pub server: String,
    pub model: String,
    pub key_id: String,
    pub token: String,
}

/// The server's error text, or the status line.
fn describe(e: ureq::Error) -> anyhow::Error {
    match e {
        ureq::Error::Status(code, r) => {
            let body = r.into_string().unwrap_or_default();
            let msg = serde_json::from_str::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v["error"].as_str().map(str::to_string))
                .unwrap_or(body);
            anyhow::anyhow!("the server answered {code}: {msg}")
        }
        ureq::Error::Transport(t) => anyhow::anyhow!("cannot reach the server: {t}"),
    }
}

fn read_body(r: ureq::Response) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    r.into_reader().read_to_end(&mut out).context("reading the server's answer")?;
    Ok(out)
}

/// `veil remote register`: upload a server key once; save the session (key id, token).
pub fn register(server: &str, model: &str, server_key: &Path, session: &Path) -> Result<()> {
    let server = server.trim_end_matches('/');
    // Check locally that this is a server key (a secret client key must never leave the
    // data owner) and that the service serves the model, before sending megabytes.
    let _: veil_runtime::ServerKey = veil_runtime::files::read(server_key, veil_runtime::files::SERVER_KEY_LIMIT)
        .with_context(|| {
            format!("{} is not a server key (send keys/server.key, never client.key)", server_key.display())
        })?;
    let listed: serde_json::Value =
        serde_json::from_slice(&read_body(ureq::get(&format!("{server}/models")).call().map_err(describe)?)?)
            .context("the server's model list is not JSON")?;
    let names: Vec<&str> =
        listed["models"].as_array().into_iter().flatten().filter_map(|m| m["name"].as_str()).collect();
    if !names.contains(&model) {
        bail!("the server has no model '{model}'; it serves: {}", names.join(", "));
    }
    let file = std::fs::File::open(server_key).with_context(|| format!("cannot read {}", server_key.display()))?;
    let len = file.metadata()?.len();
    let start = Instant::now();
    let r = ureq::post(&format!("{server}/models/{model}/keys"))
        .set("Content-Length", &len.to_string())
        .send(file)
        .map_err(describe)?;
    let v: serde_json::Value = serde_json::from_slice(&read_body(r)?).context("the server's answer is not JSON")?;
    let (Some(key_id), Some(token)) = (v["key_id"].as_str(), v["token"].as_str()) else {
        bail!("the server's answer has no key id and token: {v}");
    };
    let s = Session { server: server.into(), model: model.into(), key_id: key_id.into(), token: token.into() };
    // it holds the token: readable by its owner only
    veil_backend::files::write_atomic_private(session, |w| {
        serde_json::to_writer_pretty(w, &s).map_err(std::io::Error::other)
    })
    .with_context(|| format!("cannot write {}", session.display()))?;
    eprintln!(
        "registered {} ({:.1} MB) for model {model} in {:.1} s: key {key_id}; session (holds the token: keep it) → {}",
        server_key.display(),
        len as f64 / 1e6,
        start.elapsed().as_secs_f64(),
        session.display()
    );
    Ok(())
}

fn read_session(session: &Path) -> Result<Session> {
    serde_json::from_slice(
        &std::fs::read(session).with_context(|| format!("cannot read session {}", session.display()))?,
    )
    .with_context(|| format!("{} is not a session file from veil remote register", session.display()))
}

/// A request, retried while the server cannot be reached (a restart), for up to 10 minutes.
fn with_retries(
    what: &str,
    mut call: impl FnMut() -> std::result::Result<ureq::Response, Box<ureq::Error>>,
) -> Result<ureq::Response> {
    let start = Instant::now();
    let mut wait = Duration::from_millis(500);
    loop {
        match call().map_err(|e| *e) {
            Ok(r) => return Ok(r),
            Err(ureq::Error::Transport(t)) if start.elapsed() < Duration::from_secs(600) => {
                eprintln!("cannot reach the server ({t}); retrying {what} in {:.0} s", wait.as_secs_f64());
                std::thread::sleep(wait);
                wait = (wait * 2).min(Duration::from_secs(30));
            }
            Err(e) => return Err(describe(e)),
        }
    }
}

/// Poll job `id` until it is done; its result's bytes. The job is deleted on the server
/// once fetched.
fn fetch_job(s: &Session, id: &str, session_path: &Path, output: &Path) -> Result<Vec<u8>> {
    let auth = format!("Bearer {}", s.token);
    let resume = format!(
        "resume with: veil remote fetch --session {} --job {id} -o {}",
        session_path.display(),
        output.display()
    );
    let sp = crate::fhe::spinner(&format!("job {id}"));
    loop {
        let st: serde_json::Value = serde_json::from_slice(&read_body(
            with_retries("the job's status", || {
                ureq::get(&format!("{}/jobs/{id}", s.server)).set("Authorization", &auth).call().map_err(Box::new)
            })
            .with_context(|| resume.clone())?,
        )?)?;
        match st["state"].as_str() {
            Some("done") => break,
            Some("failed") => bail!("job {id} failed: {}", st["error"].as_str().unwrap_or("")),
            Some(state) => sp.set_message(format!(
                "job {id}: {state}, {} of {} part(s) done",
                st["tasks_done"].as_u64().unwrap_or(0),
                st["tasks"].as_u64().unwrap_or(1)
            )),
            None => bail!("unexpected job status: {st}"),
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    sp.finish_and_clear();
    let out = read_body(
        with_retries("the result", || {
            ureq::get(&format!("{}/jobs/{id}/result", s.server)).set("Authorization", &auth).call().map_err(Box::new)
        })
        .with_context(|| resume.clone())?,
    )?;
    // the data owner has its result: the server need not keep the job's files
    let _ = ureq::delete(&format!("{}/jobs/{id}", s.server)).set("Authorization", &auth).call();
    Ok(out)
}

/// `veil remote fetch`: wait for a submitted job and write its encrypted outputs.
pub fn fetch(session: &Path, job: &str, output: &Path) -> Result<()> {
    let s = read_session(session)?;
    let start = Instant::now();
    let out = fetch_job(&s, job, session, output)?;
    veil_backend::files::write_atomic(output, |w| std::io::Write::write_all(w, &out))
        .with_context(|| format!("cannot write {}", output.display()))?;
    eprintln!("job {job} fetched in {:.2} s → {}", start.elapsed().as_secs_f64(), output.display());
    Ok(())
}

/// `veil remote run`: send ciphertexts, get the encrypted outputs back (synchronously, or
/// as a job polled until done).
pub fn run(session: &Path, input: &Path, output: &Path, job: bool) -> Result<()> {
    let s = read_session(session)?;
    let body = std::fs::read(input).with_context(|| format!("cannot read {}", input.display()))?;
    let auth = format!("Bearer {}", s.token);
    let start = Instant::now();
    let out = if !job {
        let r = ureq::post(&format!("{}/keys/{}/run", s.server, s.key_id))
            .set("Authorization", &auth)
            .send_bytes(&body)
            .map_err(describe)?;
        read_body(r)?
    } else {
        let r = ureq::post(&format!("{}/keys/{}/jobs", s.server, s.key_id))
            .set("Authorization", &auth)
            .send_bytes(&body)
            .map_err(describe)?;
        let v: serde_json::Value = serde_json::from_slice(&read_body(r)?)?;
        let id = v["job_id"].as_str().context("the server's answer has no job id")?.to_string();
        eprintln!("submitted as job {id}");
        fetch_job(&s, &id, session, output)?
    };
    veil_backend::files::write_atomic(output, |w| std::io::Write::write_all(w, &out))
        .with_context(|| format!("cannot write {}", output.display()))?;
    eprintln!("{} ran remotely in {:.2} s → {}", input.display(), start.elapsed().as_secs_f64(), output.display());
    Ok(())
}
