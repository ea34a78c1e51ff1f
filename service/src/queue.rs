//! Where jobs go: the embedded queue (evaluated inside the service) or PostgreSQL
//! (evaluated by `veil worker` processes, split into parts). The HTTP layer sees one
//! interface: submit, status, result.

use crate::engine::Engine;
use crate::error::ServiceError;
use crate::local_queue::LocalQueue;
use crate::pg_queue::{JobSpec, PgQueue, Totals};
use crate::store::{random_hex, JobState};
use serde::Serialize;
use std::sync::Arc;
use veil_runtime::files::{self, CIPHERTEXT_LIMIT};
use veil_runtime::{EncryptedInputs, EncryptedOutputs};

type Result<T> = std::result::Result<T, ServiceError>;

pub enum Queue {
    Local(LocalQueue),
    Postgres { queue: PgQueue, samples_per_task: usize },
}

/// A job's status as `GET /jobs/{id}` answers it.
#[derive(Clone, Debug, Serialize)]
pub struct JobStatus {
    #[serde(skip)]
    pub key: String,
    pub state: JobState,
    pub samples: usize,
    /// Parts the job was split into, and how many are done.
    pub tasks: usize,
    pub tasks_done: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Queue {
    /// Queue the ciphertext file `body` (already read as `cts`) for `key`: the job id.
    pub async fn submit(&self, engine: &Arc<Engine>, key: &str, body: &[u8], cts: EncryptedInputs) -> Result<String> {
        match self {
            Queue::Local(q) => q.submit(engine, key, body, cts.samples),
            Queue::Postgres { queue, samples_per_task } => {
                let id = random_hex(16);
                let (e, job, per) = (engine.clone(), id.clone(), *samples_per_task);
                let fingerprint = engine.key_fingerprint(key)?;
                let parts = tokio::task::spawn_blocking(move || write_parts(&e, &job, &cts, per))
                    .await
                    .map_err(|e| ServiceError::Internal(e.to_string()))??;
                let spec = JobSpec { id: &id, key, fingerprint: &fingerprint, store_id: &engine.store.id };
                if let Err(err) = queue.submit(&spec, &parts).await {
                    engine.store.remove_parts(&id, parts.len());
                    return Err(err);
                }
                Ok(id)
            }
        }
    }

    pub async fn status(&self, engine: &Engine, job: &str) -> Result<Option<JobStatus>> {
        match self {
            Queue::Local(_) => Ok(engine.store.job(job).map(|r| JobStatus {
                key: r.key,
                state: r.state,
                samples: r.samples,
                tasks: 1,
                tasks_done: usize::from(r.state == JobState::Done),
                error: r.error,
            })),
            Queue::Postgres { queue, .. } => Ok(queue.job(job).await?.map(|j| JobStatus {
                state: if j.failed > 0 {
                    JobState::Failed
                } else if j.done == j.tasks {
                    JobState::Done
                } else if j.running > 0 || j.done > 0 {
                    JobState::Running
                } else {
                    JobState::Queued
                },
                key: j.key,
                samples: j.samples,
                tasks: j.tasks,
                tasks_done: j.done,
                error: j.error,
            })),
        }
    }

    /// The outputs of a finished job (a ciphertext file's bytes).
    pub async fn result(&self, engine: &Arc<Engine>, job: &str, status: &JobStatus) -> Result<Vec<u8>> {
        match self {
            Queue::Local(_) => {
                tokio::fs::read(engine.store.job_output(job)).await.map_err(|e| ServiceError::Io(e.to_string()))
            }
            Queue::Postgres { .. } => {
                let (e, job, tasks) = (engine.clone(), job.to_string(), status.tasks);
                tokio::task::spawn_blocking(move || join_parts(&e, &job, tasks))
                    .await
                    .map_err(|e| ServiceError::Internal(e.to_string()))?
            }
        }
    }

    /// Totals of the PostgreSQL queue, for the metrics (None: embedded queue, or the
    /// database did not answer).
    pub async fn totals(&self) -> Option<Totals> {
        match self {
            Queue::Local(_) => None,
            // a scrape must not hang on a database that does not answer: keep the last values
            Queue::Postgres { queue, .. } => {
                tokio::time::timeout(std::time::Duration::from_secs(2), queue.totals()).await.ok()?.ok()
            }
        }
    }

    /// The queue can take jobs (the database answers).
    pub async fn healthy(&self) -> bool {
        match self {
            Queue::Local(_) => true,
            Queue::Postgres { queue, .. } => queue.healthy().await,
        }
    }

    /// Delete finished jobs (and their files) that ended more than `keep` ago: how many.
    pub async fn sweep(&self, engine: &Engine, keep: std::time::Duration) -> Result<usize> {
        match self {
            Queue::Local(_) => {
                let cutoff = std::time::SystemTime::now() - keep;
                let old = engine.store.finished_before(cutoff);
                for id in &old {
                    engine.store.remove_job(id);
                }
                Ok(old.len())
            }
            Queue::Postgres { queue, .. } => {
                let old = queue.expire(keep).await?;
                for (id, parts) in &old {
                    engine.store.remove_parts(id, *parts);
                }
                Ok(old.len())
            }
        }
    }

    /// Forget a job and its files (a running job of the embedded queue cannot be).
    pub async fn delete(&self, engine: &Engine, job: &str, status: &JobStatus) -> Result<()> {
        match self {
            Queue::Local(_) => {
                if status.state == JobState::Running {
                    return Err(ServiceError::NotReady(format!("job {job} is running; delete it when it is done")));
                }
                engine.store.remove_job(job);
            }
            Queue::Postgres { queue, .. } => {
                if let Some(parts) = queue.delete(job).await? {
                    engine.store.remove_parts(job, parts);
                }
            }
        }
        Ok(())
    }
}

/// Write the batch's parts (at most `per` samples each) to the shared directory: the
/// sample count of each.
fn write_parts(e: &Engine, job: &str, cts: &EncryptedInputs, per: usize) -> Result<Vec<usize>> {
    let parts = cts.split(per);
    for (i, part) in parts.iter().enumerate() {
        let bytes = files::to_bytes(part, CIPHERTEXT_LIMIT).map_err(ServiceError::Internal)?;
        let path = e.store.part_input(job, i);
        veil_backend::files::write_atomic(&path, |w| std::io::Write::write_all(w, &bytes))
            .map_err(|err| ServiceError::Io(format!("writing {}: {err}", path.display())))?;
    }
    Ok(parts.iter().map(|p| p.samples).collect())
}

/// The parts' outputs joined in order into one ciphertext file.
fn join_parts(e: &Engine, job: &str, tasks: usize) -> Result<Vec<u8>> {
    let parts = (0..tasks)
        .map(|i| {
            let path = e.store.part_output(job, i);
            let bytes = std::fs::read(&path).map_err(|err| ServiceError::Io(format!("job {job} part {i}: {err}")))?;
            files::from_bytes::<EncryptedOutputs>(&bytes, CIPHERTEXT_LIMIT)
                .map_err(|err| ServiceError::Internal(format!("job {job} part {i}: {err}")))
        })
        .collect::<Result<Vec<_>>>()?;
    let joined = EncryptedOutputs::concat(parts).map_err(|err| ServiceError::Internal(err.to_string()))?;
    files::to_bytes(&joined, CIPHERTEXT_LIMIT).map_err(ServiceError::Internal)
}
