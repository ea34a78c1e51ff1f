//! The HTTP API and the state behind it.

use crate::engine::Engine;
use crate::error::ServiceError;
use crate::local_queue::LocalQueue;
use crate::pg_queue::PgQueue;
use crate::queue::{JobStatus, Queue};
use crate::store::{random_hex, sha256_hex, valid_id, JobState, KeyRecord};
use crate::Config;
use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, Path, State as Extract};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::StreamExt;
use std::sync::Arc;
use tokio::io::AsyncWriteExt;
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;
use veil_backend::artifact::Artifact;
use veil_runtime::files::{self, SERVER_KEY_LIMIT};
use veil_runtime::{Evaluator, ServerKey};

type Result<T> = std::result::Result<T, ServiceError>;

pub struct State {
    pub config: Config,
    pub engine: Arc<Engine>,
    pub queue: Queue,
}

impl State {
    /// Load the models, open the data directory and connect the queue.
    pub async fn open(config: Config) -> Result<State> {
        let engine = Arc::new(Engine::open(&config.models, &config.data_dir, config.cached_keys)?);
        let queue = match &config.queue {
            None => Queue::Local(LocalQueue::new()),
            Some(url) => {
                Queue::Postgres { queue: PgQueue::connect(url, 8).await?, samples_per_task: config.samples_per_task }
            }
        };
        Ok(State { config, engine, queue })
    }

    /// The key's record, if `headers` carry its token.
    fn authorize(&self, key: &str, headers: &HeaderMap) -> Result<KeyRecord> {
        let rec = valid_id(key)
            .then(|| self.engine.store.key(key))
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
}

pub fn router(state: Arc<State>) -> Router {
    let limit = state.config.max_request_bytes;
    let timeout = state.config.request_timeout;
    let keys = Router::new().route("/models/{model}/keys", post(register_key)).layer(DefaultBodyLimit::disable());
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/models", get(models))
        .route("/keys/{key}/run", post(run))
        .route("/keys/{key}/jobs", post(submit))
        .route("/jobs/{job}", get(job_status).delete(delete_job))
        .route("/jobs/{job}/result", get(job_result))
        .layer(DefaultBodyLimit::max(limit))
        .merge(keys)
        .layer(TimeoutLayer::with_status_code(StatusCode::REQUEST_TIMEOUT, timeout))
        .layer(TraceLayer::new_for_http())
        .with_state(state)
}

/// Liveness and readiness: 503 while the job queue's database does not answer.
async fn health(Extract(s): Extract<Arc<State>>) -> impl IntoResponse {
    if s.queue.healthy().await {
        (StatusCode::OK, "ok")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "the job queue's database does not answer")
    }
}

async fn metrics(Extract(s): Extract<Arc<State>>) -> impl IntoResponse {
    if let Some(t) = s.queue.totals().await {
        let m = &s.engine.metrics;
        m.queue_depth.set(t.jobs_waiting);
        m.queue_tasks.set(t.tasks_waiting);
        m.queue_jobs_done.set(t.jobs_done);
        m.queue_jobs_failed.set(t.jobs_failed);
        m.queue_samples.set(t.samples);
        m.queue_lookups.set(t.lookups);
        m.queue_eval_seconds.set(t.eval_seconds);
    }
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], s.engine.metrics.encode())
}

async fn models(Extract(s): Extract<Arc<State>>) -> Json<serde_json::Value> {
    let mut list: Vec<_> = s
        .engine
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
    let a = s.engine.model(&model)?;
    let tmp = s.engine.store.tmp_path();
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
    tokio::fs::rename(&tmp, s.engine.store.key_file(&id)).await.map_err(|e| ServiceError::Io(e.to_string()))?;
    let rec = KeyRecord {
        model: model.clone(),
        fingerprint: crate::store::hex(&a.fingerprint),
        token_sha256: sha256_hex(&token),
    };
    s.engine.store.add_key(&id, rec)?;
    s.engine.cache_evaluator(&id, ev);
    s.engine.metrics.keys_registered.inc();
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
    let e = s.engine.clone();
    let (out, samples) = tokio::task::spawn_blocking(move || e.evaluate(&key, &body))
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
    let cts = s.engine.inputs_for(&key, &body)?;
    let id = s.queue.submit(&s.engine, &key, &body, cts).await?;
    s.engine.metrics.jobs_submitted.inc();
    Ok((StatusCode::ACCEPTED, Json(serde_json::json!({ "job_id": id }))))
}

async fn authorized_job(s: &State, job: &str, headers: &HeaderMap) -> Result<JobStatus> {
    let status = match valid_id(job) {
        true => s.queue.status(&s.engine, job).await?,
        false => None,
    };
    let status = status.ok_or_else(|| ServiceError::NotFound(format!("no job '{job}'")))?;
    s.authorize(&status.key, headers)?;
    Ok(status)
}

async fn job_status(
    Extract(s): Extract<Arc<State>>,
    Path(job): Path<String>,
    headers: HeaderMap,
) -> Result<Json<JobStatus>> {
    Ok(Json(authorized_job(&s, &job, &headers).await?))
}

async fn delete_job(
    Extract(s): Extract<Arc<State>>,
    Path(job): Path<String>,
    headers: HeaderMap,
) -> Result<impl IntoResponse> {
    let status = authorized_job(&s, &job, &headers).await?;
    s.queue.delete(&s.engine, &job, &status).await?;
    tracing::info!(job = %job, "job deleted");
    Ok(StatusCode::NO_CONTENT)
}

async fn job_result(
    Extract(s): Extract<Arc<State>>,
    Path(job): Path<String>,
    headers: HeaderMap,
) -> Result<impl IntoResponse> {
    let status = authorized_job(&s, &job, &headers).await?;
    match status.state {
        JobState::Done => {
            let bytes = s.queue.result(&s.engine, &job, &status).await?;
            Ok(([(header::CONTENT_TYPE, "application/octet-stream")], bytes))
        }
        JobState::Failed => {
            Err(ServiceError::BadRequest(format!("job {job} failed: {}", status.error.unwrap_or_default())))
        }
        _ => Err(ServiceError::NotReady(format!("job {job} is {:?}", status.state).to_lowercase())),
    }
}
