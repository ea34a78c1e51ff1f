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

mod error;
mod jobs;
mod metrics;
mod routes;
mod store;

pub use error::ServiceError;

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
        }
    }
}

/// The router and the state behind it (models loaded, keys and jobs restored, the job
/// worker started). Must be called inside a tokio runtime.
pub fn app(config: Config) -> Result<axum::Router, ServiceError> {
    let state = Arc::new(routes::State::open(config)?);
    jobs::start_worker(state.clone());
    Ok(routes::router(state))
}

/// Serve `config` on `listener` until `shutdown` completes; requests in flight finish.
pub async fn serve(
    config: Config,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ServiceError> {
    let app = app(config)?;
    tracing::info!(addr = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(), "veil serve listening");
    axum::serve(listener, app).with_graceful_shutdown(shutdown).await.map_err(|e| ServiceError::Io(e.to_string()))
}
