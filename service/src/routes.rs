//! The HTTP API and the state behind it.

use crate::error::ServiceError;
use crate::metrics::Metrics;
use crate::store::{random_hex, sha256_hex, valid_id, JobRecord, JobState, KeyRecord, Store};
use crate::Config;
use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, Path, State as Extract};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::StreamExt;
use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio::io::AsyncWriteExt;
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;
use veil_backend::artifact::Artifact;
use veil_runtime::files::{self, CIPHERTEXT_LIMIT, SERVER_KEY_LIMIT};
use veil_runtime::{EncryptedInputs, Evaluator, RuntimeError, ServerKey};

type Result<T> = std::result::Result<T, ServiceError>;

pub struct State {
    pub config: Config,
    /// Served models by name. Loaded once and kept for the process's life (evaluators
    /// borrow their circuits).
    pub models: HashMap<String, &'static Artifact>,
    pub store: Store,
    cache: Mutex<lru::LruCache<String, Arc<Evaluator<'static>>>>,
    pub metrics: Metrics,
    queue: tokio::sync::mpsc::UnboundedSender<String>,
    queue_rx: Mutex<Option<tokio::sync::mpsc::UnboundedReceiver<String>>>,
}

impl State {
    pub fn open(config: Config) -> Result<State> {
        let mut models = HashMap::new();
        for path in &config.models {
            let a = Artifact::read(path).map_err(|e| ServiceError::Startup(format!("{}: {e}", path.display())))?;
            if a.training.is_some() {
                return Err(ServiceError::Startup(format!("{} is a training model", path.display())));
            }
            let name = path.file_stem().unwrap_or_default().to_string_lossy().to_string();
            if models.insert(name.clone(), &*Box::leak(Box::new(a))).is_some() {
                return Err(ServiceError::Startup(format!("two models are named {name}")));
            }
        }
        let store = Store::open(&config.data_dir)?;
        let cached = NonZeroUsize::new(config.cached_keys.max(1)).expect("at least one");
        let (queue, rx) = tokio::sync::mpsc::unbounded_channel();
        Ok(State {
            config,
            models,
            store,
            cache: Mutex::new(lru::LruCache::new(cached)),
            metrics: Metrics::new(),
            queue,
            queue_rx: Mutex::new(Some(rx)),
        })
    }

    pub fn take_queue(&self) -> Option<tokio::sync::mpsc::UnboundedReceiver<String>> {
        self.queue_rx.lock().expect("queue lock").take()
    }

    pub fn enqueue(&self, job: String) {
        self.metrics.queue_depth.inc();
        // the receiver lives as long as the worker task, i.e. the runtime
        let _ = self.queue.send(job);
    }

    fn model(&self, name: &str) -> Result<&'static Artifact> {
        self.models.get(name).copied().ok_or_else(|| ServiceError::NotFound(format!("no model named '{name}'")))
    }

    /// The key's record, if `headers` carry its token.
    fn authorize(&self, key: &str, headers: &HeaderMap) -> Result<KeyRecord> {
        let rec = valid_id(key)
            .then(|| self.store.key(key))
            .flatten()
            .ok_or_else(|| ServiceError::NotFound(format!("no key '{key}'")))?;
        let token = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or_else(|| {
                ServiceError::Unauthorized("this request needs the key's token (Authorization: Bearer …)".into())
            })?;
        if sha256_hex(token.trim()) != rec.token_sha256 {
            return Err(ServiceError::Unauthorized(format!("wrong token for key '{key}'")));
        }
        Ok(rec)
    }

    /// The key's evaluator: cached, or loaded from its file (blocking: seconds).
    fn evaluator(&self, key: &str) -> Result<Arc<Evaluator<'static>>> {
        if let Some(ev) = self.cache.lock().expect("cache lock").get(key) {
            return Ok(ev.clone());
        }
        let rec = self.store.key(key).ok_or_else(|| ServiceError::NotFound(format!("no key '{key}'")))?;
        let a = self.model(&rec.model)?;
        let sk: ServerKey = files::read(&self.store.key_file(key), SERVER_KEY_LIMIT)
            .map_err(|e| ServiceError::Internal(format!("stored key {key}: {e}")))?;
        let ev = Arc::new(
            Evaluator::new(&a.circuit, &a.params, sk, &a.fingerprint)
                .map_err(|e| ServiceError::Internal(format!("stored key {key}: {e}")))?,
        );
        self.cache.lock().expect("cache lock").put(key.to_string(), ev.clone());
        Ok(ev)
    }

    /// A ciphertext file (bytes) sent for `key`: read, and made for the key's model.
    fn inputs_for(&self, key: &str, input: &[u8]) -> Result<EncryptedInputs> {
        let cts: EncryptedInputs = files::from_bytes(input, CIPHERTEXT_LIMIT)
            .map_err(|e| ServiceError::BadRequest(format!("the body is not a ciphertext file: {e}")))?;
        let rec = self.store.key(key).ok_or_else(|| ServiceError::NotFound(format!("no key '{key}'")))?;
        veil_runtime::keys::check_fingerprint(
            "the ciphertexts",
            &cts.fingerprint,
            &self.model(&rec.model)?.fingerprint,
        )
        .map_err(|e| ServiceError::BadRequest(e.to_string()))?;
        Ok(cts)
    }

    /// Evaluate a ciphertext file (bytes) with a key's evaluator: the output file's bytes
    /// and the sample count (blocking).
    pub fn evaluate(&self, key: &str, input: &[u8]) -> Result<(Vec<u8>, usize)> {
        let cts = self.inputs_for(key, input)?;
        let ev = self.evaluator(key)?;
        let start = Instant::now();
        let out = ev.run(&cts, &|_| {}).map_err(|e| match e {
            RuntimeError::Invalid(m) => ServiceError::BadRequest(m),
            other => ServiceError::Internal(other.to_string()),
        })?;
        self.metrics.eval_seconds.inc_by(start.elapsed().as_secs_f64());
        self.metrics.samples.inc_by(cts.samples as u64);
        self.metrics.lookups.inc_by((cts.samples * ev.circuit().lookups_per_sample()) as u64);
        let bytes = files::to_bytes(&out, CIPHERTEXT_LIMIT).map_err(ServiceError::Internal)?;
        Ok((bytes, cts.samples))
    }
}

pub fn router(state: Arc<State>) -> Router {
    let limit = state.config.max_request_bytes;
    let timeout = state.config.request_timeout;
    let keys = Router::new().route("/models/{model}/keys", post(register_key)).layer(DefaultBodyLimit::disable());
    Router::new()
        .route("/health", get(|| async { "ok" }))
        .route("/metrics", get(metrics))
        .route("/models", get(models))
        .route("/keys/{key}/run", post(run))
        .route("/keys/{key}/jobs", post(submit))
        .route("/jobs/{job}", get(job_status))
        .route("/jobs/{job}/result", get(job_result))
        .layer(DefaultBodyLimit::max(limit))
        .merge(keys)
        .layer(TimeoutLayer::with_status_code(StatusCode::REQUEST_TIMEOUT, timeout))
        .layer(TraceLayer::new_for_http())
        .with_state(state)
}

async fn metrics(Extract(s): Extract<Arc<State>>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], s.metrics.encode())
}

async fn models(Extract(s): Extract<Arc<State>>) -> Json<serde_json::Value> {
    let mut list: Vec<_> = s
        .models
        .iter()
        .map(|(name, a)| {
            serde_json::json!({
                "name": name,
                "fingerprint": crate::store::hex(&a.fingerprint),
                "inputs": a.client.inputs.iter().map(|i| serde_json::json!({ "name": i.quant.name, "shape": i.shape })).collect::<Vec<_>>(),
                "lookups_per_sample": a.circuit.lookups_per_sample(),
            })
        })
        .collect();
    list.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
    Json(serde_json::json!({ "models": list }))
}

/// Stream a server key to a temporary file (refusing more than the limit), check it
/// belongs to the model, load it, and register it under a new id and token.
async fn register_key(
    Extract(s): Extract<Arc<State>>,
    Path(model): Path<String>,
    body: Body,
) -> Result<impl IntoResponse> {
    let a = s.model(&model)?;
    let tmp = s.store.tmp_path();
    let loaded = async {
        stream_to(&tmp, body, s.config.max_key_bytes).await?;
        let path = tmp.clone();
        tokio::task::spawn_blocking(move || load_key(a, &path))
            .await
            .map_err(|e| ServiceError::Internal(e.to_string()))?
    };
    let ev = match loaded.await {
        Ok(ev) => ev,
        Err(e) => {
            let _ = tokio::fs::remove_file(&tmp).await;
            return Err(e);
        }
    };
    let (id, token) = (random_hex(16), random_hex(32));
    tokio::fs::rename(&tmp, s.store.key_file(&id)).await.map_err(|e| ServiceError::Io(e.to_string()))?;
    s.store.add_key(&id, KeyRecord { model: model.clone(), token_sha256: sha256_hex(&token) })?;
    s.cache.lock().expect("cache lock").put(id.clone(), ev);
    s.metrics.keys_registered.inc();
    tracing::info!(key = %id, model = %model, "server key registered");
    Ok((StatusCode::CREATED, Json(serde_json::json!({ "key_id": id, "token": token, "model": model }))))
}

async fn stream_to(path: &std::path::Path, body: Body, limit: u64) -> Result<()> {
    let mut file = tokio::fs::File::create(path).await.map_err(|e| ServiceError::Io(e.to_string()))?;
    let mut stream = body.into_data_stream();
    let mut total = 0u64;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| ServiceError::BadRequest(format!("the upload broke off: {e}")))?;
        total += chunk.len() as u64;
        if total > limit {
            return Err(ServiceError::TooLarge(format!("a server key over {limit} bytes")));
        }
        file.write_all(&chunk).await.map_err(|e| ServiceError::Io(e.to_string()))?;
    }
    file.flush().await.map_err(|e| ServiceError::Io(e.to_string()))
}

fn load_key(a: &'static Artifact, path: &std::path::Path) -> Result<Arc<Evaluator<'static>>> {
    let bytes = std::fs::read(path).map_err(|e| ServiceError::Io(e.to_string()))?;
    let sk: ServerKey = files::from_bytes(&bytes, SERVER_KEY_LIMIT)
        .map_err(|e| ServiceError::BadRequest(format!("the body is not a valid server key: {e}")))?;
    veil_runtime::keys::check_fingerprint("the server key", &sk.fingerprint, &a.fingerprint)
        .map_err(|e| ServiceError::BadRequest(e.to_string()))?;
    Ok(Arc::new(
        Evaluator::new(&a.circuit, &a.params, sk, &a.fingerprint)
            .map_err(|e| ServiceError::BadRequest(format!("the server key does not fit the model: {e}")))?,
    ))
}

async fn run(
    Extract(s): Extract<Arc<State>>,
    Path(key): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<impl IntoResponse> {
    s.authorize(&key, &headers)?;
    let s2 = s.clone();
    let (out, samples) = tokio::task::spawn_blocking(move || s2.evaluate(&key, &body))
        .await
        .map_err(|e| ServiceError::Internal(e.to_string()))??;
    tracing::info!(samples, "evaluated");
    Ok(([(header::CONTENT_TYPE, "application/octet-stream")], out))
}

async fn submit(
    Extract(s): Extract<Arc<State>>,
    Path(key): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<impl IntoResponse> {
    s.authorize(&key, &headers)?;
    // refuse what is not a ciphertext file for this model now, not in the worker
    let cts = s.inputs_for(&key, &body)?;
    let id = random_hex(16);
    let input = s.store.job_input(&id);
    veil_backend::files::write_atomic(&input, |w| std::io::Write::write_all(w, &body))
        .map_err(|e| ServiceError::Io(e.to_string()))?;
    s.store.set_job(&id, JobRecord { key, state: JobState::Queued, samples: cts.samples, error: None })?;
    s.metrics.jobs_submitted.inc();
    s.enqueue(id.clone());
    Ok((StatusCode::ACCEPTED, Json(serde_json::json!({ "job_id": id }))))
}

fn authorized_job(s: &State, job: &str, headers: &HeaderMap) -> Result<JobRecord> {
    let rec = valid_id(job)
        .then(|| s.store.job(job))
        .flatten()
        .ok_or_else(|| ServiceError::NotFound(format!("no job '{job}'")))?;
    s.authorize(&rec.key, headers)?;
    Ok(rec)
}

async fn job_status(
    Extract(s): Extract<Arc<State>>,
    Path(job): Path<String>,
    headers: HeaderMap,
) -> Result<Json<JobRecord>> {
    Ok(Json(authorized_job(&s, &job, &headers)?))
}

async fn job_result(
    Extract(s): Extract<Arc<State>>,
    Path(job): Path<String>,
    headers: HeaderMap,
) -> Result<impl IntoResponse> {
    let rec = authorized_job(&s, &job, &headers)?;
    match rec.state {
        JobState::Done => {
            let bytes = tokio::fs::read(s.store.job_output(&job)).await.map_err(|e| ServiceError::Io(e.to_string()))?;
            Ok(([(header::CONTENT_TYPE, "application/octet-stream")], bytes))
        }
        JobState::Failed => {
            Err(ServiceError::BadRequest(format!("job {job} failed: {}", rec.error.unwrap_or_default())))
        }
        _ => Err(ServiceError::NotReady(format!("job {job} is {:?}", rec.state).to_lowercase())),
    }
}
