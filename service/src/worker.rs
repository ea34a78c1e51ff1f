//! `veil worker`: a stateless process that takes tasks from the PostgreSQL queue and
//! evaluates them with the server keys in the shared data directory (keys cached by id).
//! Run as many as the machines allow; each evaluates one task at a time on all its cores.

use crate::engine::Engine;
use crate::error::ServiceError;
use crate::pg_queue::{PgQueue, Task};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// How a worker runs.
#[derive(Clone, Debug)]
pub struct WorkerConfig {
    /// The compiled models it may be asked to evaluate (the server's, by file stem).
    pub models: Vec<PathBuf>,
    /// The data directory the server writes keys and job inputs to (shared).
    pub data_dir: PathBuf,
    /// `postgres://…`
    pub queue: String,
    pub cached_keys: usize,
    /// A task whose worker has not renewed its lease for this long is given to another.
    pub lease: Duration,
    /// Longest wait for work between checks (submissions also wake workers at once).
    pub poll: Duration,
    /// The name recorded on the tasks it claims.
    pub name: String,
}

impl WorkerConfig {
    pub fn new(models: Vec<PathBuf>, data_dir: PathBuf, queue: String) -> WorkerConfig {
        let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "worker".into());
        WorkerConfig {
            models,
            data_dir,
            queue,
            cached_keys: 4,
            lease: Duration::from_secs(30),
            poll: Duration::from_secs(2),
            name: format!("{host}-{}", std::process::id()),
        }
    }
}

/// Take and evaluate tasks until `shutdown` completes (the task in hand is finished first).
pub async fn work(
    config: WorkerConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ServiceError> {
    let engine = Arc::new(Engine::open_existing(&config.models, &config.data_dir, config.cached_keys)?);
    let queue = Arc::new(PgQueue::connect(&config.queue, 4).await?);
    let mut listener = queue.listener().await?;
    let fingerprints = engine.fingerprints();
    let mut names: Vec<&String> = engine.models.keys().collect();
    names.sort();
    tracing::info!(
        worker = %config.name,
        queue = %crate::pg_queue::redact(&config.queue),
        models = ?names,
        data_dir = %config.data_dir.display(),
        "veil worker waiting for tasks (of these models, from this data directory)"
    );
    tokio::pin!(shutdown);
    loop {
        let task = tokio::select! {
            _ = &mut shutdown => break,
            t = queue.claim(&config.name, config.lease, &fingerprints, &engine.store.id) => t,
        };
        match task {
            Ok(Some(task)) => run_task(&engine, &queue, &config, task).await,
            Ok(None) => {
                tokio::select! {
                    _ = &mut shutdown => break,
                    _ = tokio::time::timeout(config.poll, listener.recv()) => {}
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot reach the queue; retrying");
                tokio::select! {
                    _ = &mut shutdown => break,
                    _ = tokio::time::sleep(config.poll) => {}
                }
            }
        }
    }
    tracing::info!(worker = %config.name, "veil worker stopped");
    Ok(())
}

/// Evaluate one task on a blocking thread while renewing its lease; record the outcome.
async fn run_task(engine: &Arc<Engine>, queue: &PgQueue, config: &WorkerConfig, task: Task) {
    let me = config.name.as_str();
    tracing::info!(job = %task.job, part = task.part, attempt = task.attempts, "task claimed");
    let (e, t) = (engine.clone(), task.clone());
    let started = std::time::Instant::now();
    let mut eval = tokio::task::spawn_blocking(move || {
        e.evaluate_file(&t.key, &e.store.part_input(&t.job, t.part), &e.store.part_output(&t.job, t.part))
    });
    let mut renew = tokio::time::interval(config.lease / 3);
    renew.tick().await; // the first tick is immediate
    let outcome = loop {
        tokio::select! {
            r = &mut eval => break r,
            _ = renew.tick() => match queue.renew(&task, me, config.lease).await {
                Ok(true) => {}
                Ok(false) => tracing::warn!(job = %task.job, part = task.part, "lease lost: another worker has the task"),
                Err(e) => tracing::warn!(error = %e, "cannot renew the lease"),
            },
        }
    };
    let recorded = match outcome {
        Ok(Ok(samples)) => {
            let lookups = (samples * engine.lookups_per_sample(&task.key)) as u64;
            match queue.complete(&task, me, lookups, started.elapsed()).await {
                Ok(true) => {
                    tracing::info!(job = %task.job, part = task.part, samples, "task done");
                    Ok(())
                }
                Ok(false) => {
                    // deleted while it ran: leave no output behind
                    if matches!(queue.job(&task.job).await, Ok(None)) {
                        let _ = std::fs::remove_file(engine.store.part_output(&task.job, task.part));
                        tracing::info!(job = %task.job, part = task.part, "the job was deleted while its task ran");
                    } else {
                        tracing::warn!(job = %task.job, part = task.part, "finished after losing the lease: not counted");
                    }
                    Ok(())
                }
                Err(e) => Err(e),
            }
        }
        Ok(Err(e)) => {
            tracing::warn!(job = %task.job, part = task.part, error = %e, "task failed");
            // the data owner sees the job's error: not this machine's paths
            let shown = match &e {
                ServiceError::Io(_) => {
                    "a worker could not read or write the job's files (the worker's log says which)".to_string()
                }
                other => other.to_string(),
            };
            queue.fail(&task, me, &shown).await
        }
        Err(panic) => queue.fail(&task, me, &format!("the evaluation panicked: {panic}")).await,
    };
    if let Err(e) = recorded {
        // the lease runs out and another worker takes the task again
        tracing::warn!(job = %task.job, part = task.part, error = %e, "cannot record the outcome");
    }
}
