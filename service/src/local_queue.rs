//! The embedded job queue (no database): one worker task in the service takes jobs in
//! order and evaluates each on a blocking thread (the evaluator itself uses every core).
//! Job records live in the data directory; unfinished jobs found there at start (queued,
//! or running when the service stopped) are queued again.

use crate::engine::Engine;
use crate::error::ServiceError;
use crate::store::{random_hex, JobRecord, JobState};
use std::sync::{Arc, Mutex};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

pub struct LocalQueue {
    tx: UnboundedSender<String>,
    rx: Mutex<Option<UnboundedReceiver<String>>>,
}

impl LocalQueue {
    pub fn new() -> LocalQueue {
        let (tx, rx) = unbounded_channel();
        LocalQueue { tx, rx: Mutex::new(Some(rx)) }
    }

    fn enqueue(&self, engine: &Engine, job: String) {
        engine.metrics.queue_depth.inc();
        // the receiver lives as long as the worker task, i.e. the runtime
        let _ = self.tx.send(job);
    }

    /// Store the job's input and record, and queue it.
    pub fn submit(&self, engine: &Engine, key: &str, body: &[u8], samples: usize) -> Result<String, ServiceError> {
        let id = random_hex(16);
        veil_backend::files::write_atomic(&engine.store.job_input(&id), |w| std::io::Write::write_all(w, body))
            .map_err(|e| ServiceError::Io(e.to_string()))?;
        engine.store.set_job(&id, JobRecord { key: key.to_string(), state: JobState::Queued, samples, error: None })?;
        self.enqueue(engine, id.clone());
        Ok(id)
    }

    /// Re-queue unfinished jobs and start the worker task (once; inside a tokio runtime).
    pub fn start(&self, engine: Arc<Engine>) {
        let Some(mut rx) = self.rx.lock().expect("queue lock").take() else { return };
        for id in engine.store.unfinished_jobs() {
            tracing::info!(job = %id, "re-queued after a restart");
            self.enqueue(&engine, id);
        }
        tokio::spawn(async move {
            while let Some(id) = rx.recv().await {
                let e = engine.clone();
                if let Err(err) = tokio::task::spawn_blocking(move || run_job(&e, &id)).await {
                    tracing::error!(error = %err, "job worker panicked");
                }
                engine.metrics.queue_depth.dec();
            }
        });
    }
}

fn run_job(e: &Engine, id: &str) {
    let Some(rec) = e.store.job(id) else { return };
    let set = |state: JobState, error: Option<String>| {
        let r = JobRecord { state, error, ..rec.clone() };
        if let Err(err) = e.store.set_job(id, r) {
            tracing::error!(job = %id, error = %err, "cannot record the job's state");
        }
    };
    set(JobState::Running, None);
    match e.evaluate_file(&rec.key, &e.store.job_input(id), &e.store.job_output(id)) {
        Ok(_) => {
            e.metrics.jobs_done.inc();
            tracing::info!(job = %id, samples = rec.samples, "job done");
            set(JobState::Done, None);
        }
        Err(err) => {
            e.metrics.jobs_failed.inc();
            tracing::info!(job = %id, error = %err, "job failed");
            set(JobState::Failed, Some(err.to_string()));
        }
    }
}
