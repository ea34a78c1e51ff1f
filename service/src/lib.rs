//! `veil serve`: encrypted inference over HTTP.
//!
//! A data owner registers its server key for a model once (`POST /models/{model}/keys`,
//! streamed to disk and checked against the model's fingerprint) and receives a key id
//! and a secret token. It then sends ciphertext files, synchronously
//! (`POST /keys/{id}/run`) or as jobs (`POST /keys/{id}/jobs`, `GET /jobs/{id}`,
//! `GET /jobs/{id}/result`); every request about a key or its jobs carries the token
//! (`Authorization: Bearer …`). The server never holds a secret key: it sees server keys
//! and ciphertexts only. Evaluation runs on blocking threads (rayon inside), keys are
//! loaded once and cached by id, and jobs and keys live in the data directory, so a
//! restart loses neither.
//!
//! Jobs run in the service itself by default (no database needed). With
//! `Config::queue` set to a PostgreSQL URL they are split into parts of a few samples,
//! queued in the database, and evaluated by [`worker::work`] processes anywhere that
//! reach the database and the shared data directory (see `pg_queue` for the protocol).

mod engine;
mod error;
mod local_queue;
mod metrics;
mod pg_queue;
mod queue;
mod routes;
mod store;
pub mod worker;

pub use error::ServiceError;
pub use pg_queue::{redact as redact_url, MAX_ATTEMPTS};

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// How the service runs.
#[derive(Clone, Debug)]
pub struct Config {
    /// Compiled models (`.veil`); each is served under its file stem.
    pub models: Vec<PathBuf>,
    /// Keys, job inputs and results.
    pub data_dir: PathBuf,
    /// Largest request body other than a key upload (bytes).
    pub max_request_bytes: usize,
    /// Largest server-key upload (bytes).
    pub max_key_bytes: u64,
    /// Server keys kept expanded in memory (each is ~100–200 MB expanded).
    pub cached_keys: usize,
    /// A synchronous request taking longer is answered 408 (jobs have no limit).
    pub request_timeout: Duration,
    /// `postgres://…`: jobs go to this durable queue for `veil worker` processes. None:
    /// jobs run inside the service.
    pub queue: Option<String>,
    /// With a PostgreSQL queue, a job is split into tasks of this many samples.
    pub samples_per_task: usize,
    /// Finished jobs (and their files) are deleted this long after they end; `None`:
    /// kept until deleted (`DELETE /jobs/{id}`).
    pub keep_jobs: Option<Duration>,
}

impl Config {
    pub fn new(models: Vec<PathBuf>, data_dir: PathBuf) -> Config {
        Config {
            models,
            data_dir,
            max_request_bytes: 256 << 20,
            max_key_bytes: 4 << 30,
            cached_keys: 4,
            request_timeout: Duration::from_secs(600),
            queue: None,
            samples_per_task: 1,
            keep_jobs: Some(Duration::from_secs(72 * 3600)),
        }
    }
}

/// The router and the state behind it (models loaded, keys and jobs restored, the queue
/// connected, the in-process job worker started when there is no database).
pub async fn app(config: Config) -> Result<axum::Router, ServiceError> {
    let state = Arc::new(routes::State::open(config).await?);
    if let queue::Queue::Local(q) = &state.queue {
        q.start(state.engine.clone());
    }
    if let Some(keep) = state.config.keep_jobs {
        start_sweeper(state.clone(), keep);
    }
    Ok(routes::router(state))
}

/// Delete finished jobs older than `keep`, checking every tenth of it (1 s to 10 min).
fn start_sweeper(state: Arc<routes::State>, keep: Duration) {
    let every = (keep / 10).clamp(Duration::from_secs(1), Duration::from_secs(600));
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(every).await;
            match state.queue.sweep(&state.engine, keep).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(jobs = n, "finished jobs expired and deleted"),
                Err(e) => tracing::warn!(error = %e, "cannot expire old jobs"),
            }
        }
    });
}

/// Serve `config` on `listener` until `shutdown` completes; requests in flight finish.
pub async fn serve(
    config: Config,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ServiceError> {
    serve_app(app(config).await?, listener, shutdown).await
}

/// Serve a router made by [`app`] on `listener` until `shutdown` completes.
pub async fn serve_app(
    app: axum::Router,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ServiceError> {
    tracing::info!(addr = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(), "veil serve listening");
    axum::serve(listener, app).with_graceful_shutdown(shutdown).await.map_err(|e| ServiceError::Io(e.to_string()))
}
