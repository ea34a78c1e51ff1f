//! The in-process job queue: one worker task takes jobs in order and evaluates each on
//! a blocking thread (the evaluator itself uses every core). Unfinished jobs found in
//! the data directory at start (queued, or running when the service stopped) are queued
//! again.

use crate::routes::State;
use crate::store::{JobRecord, JobState};
use std::sync::Arc;

pub fn start_worker(state: Arc<State>) {
    let Some(mut rx) = state.take_queue() else { return };
    for id in state.store.unfinished_jobs() {
        tracing::info!(job = %id, "re-queued after a restart");
        state.enqueue(id);
    }
    tokio::spawn(async move {
        while let Some(id) = rx.recv().await {
            let s = state.clone();
            if let Err(e) = tokio::task::spawn_blocking(move || run_job(&s, &id)).await {
                tracing::error!(error = %e, "job worker panicked");
            }
            state.metrics.queue_depth.dec();
        }
    });
}

fn run_job(s: &State, id: &str) {
    let Some(rec) = s.store.job(id) else { return };
    let set = |state: JobState, error: Option<String>| {
        let r = JobRecord { state, error, ..rec.clone() };
        if let Err(e) = s.store.set_job(id, r) {
            tracing::error!(job = %id, error = %e, "cannot record the job's state");
        }
    };
    set(JobState::Running, None);
    let result = std::fs::read(s.store.job_input(id))
        .map_err(|e| crate::ServiceError::Io(e.to_string()))
        .and_then(|input| s.evaluate(&rec.key, &input))
        .and_then(|(out, _)| {
            veil_backend::files::write_atomic(&s.store.job_output(id), |w| std::io::Write::write_all(w, &out))
                .map_err(|e| crate::ServiceError::Io(e.to_string()))
        });
    match result {
        Ok(()) => {
            s.metrics.jobs_done.inc();
            tracing::info!(job = %id, samples = rec.samples, "job done");
            set(JobState::Done, None);
        }
        Err(e) => {
            s.metrics.jobs_failed.inc();
            tracing::info!(job = %id, error = %e, "job failed");
            set(JobState::Failed, Some(e.to_string()));
        }
    }
}
