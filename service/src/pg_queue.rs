//! The durable job queue in PostgreSQL, for `veil serve --queue postgres://…` and
//! `veil worker` processes on any machine that reaches the database and the shared data
//! directory.
//!
//! A job is split into tasks of a few samples each (one row per task). A worker claims
//! the oldest waiting task with `FOR UPDATE SKIP LOCKED` (concurrent workers never claim
//! the same row) and holds it under a lease it renews while evaluating. A worker that
//! dies stops renewing; once the lease has expired the task is claimed again by another
//! worker. Completing needs the lease, so a task is completed once even if a worker that
//! lost its lease finishes late. After [`MAX_ATTEMPTS`] claims whose workers all died the
//! task fails rather than crash workers forever, and the job's waiting tasks are
//! cancelled. Jobs and tasks are rows, so a server restart loses nothing; ciphertexts
//! stay in the shared directory.
//!
//! A job records the compiled model's fingerprint and the data directory's id
//! (`Store::id`): a worker claims only tasks of models it loaded, from the directory it
//! reads, so a worker started with another model file or another directory leaves the
//! work to the right ones instead of failing it.

use crate::error::ServiceError;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgListener, PgPool, PgPoolOptions};
use sqlx::{Connection, Row};
use std::str::FromStr;
use std::time::Duration;

/// Claims of one task before it is failed (each earlier claim's worker died).
pub const MAX_ATTEMPTS: i32 = 3;

/// The channel a submission notifies, so idle workers wake at once instead of polling.
const CHANNEL: &str = "veil_tasks";

/// Version of the tables below; a database holding another version is refused.
const SCHEMA_VERSION: i32 = 2;

const SCHEMA: &str = "
CREATE TABLE veil_jobs (
    id TEXT PRIMARY KEY,
    key_id TEXT NOT NULL,
    samples INTEGER NOT NULL,
    fingerprint TEXT NOT NULL,
    store_id TEXT NOT NULL,
    submitted_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE TABLE veil_tasks (
    seq BIGSERIAL PRIMARY KEY,
    job_id TEXT NOT NULL REFERENCES veil_jobs(id) ON DELETE CASCADE,
    part INTEGER NOT NULL,
    samples INTEGER NOT NULL,
    state TEXT NOT NULL DEFAULT 'queued'
        CHECK (state IN ('queued', 'running', 'done', 'failed', 'cancelled')),
    lookups BIGINT NOT NULL DEFAULT 0,
    eval_ms BIGINT NOT NULL DEFAULT 0,
    worker TEXT,
    lease_until TIMESTAMPTZ,
    attempts INTEGER NOT NULL DEFAULT 0,
    completions INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    finished_at TIMESTAMPTZ,
    UNIQUE (job_id, part)
);
CREATE INDEX veil_tasks_waiting ON veil_tasks (seq) WHERE state IN ('queued', 'running');
";

/// What the job a task belongs to needs: its model (fingerprint, hex) and data directory.
#[derive(Clone, Debug)]
pub struct JobSpec<'a> {
    pub id: &'a str,
    pub key: &'a str,
    pub fingerprint: &'a str,
    pub store_id: &'a str,
}

/// Totals over the queue, for the metrics.
#[derive(Clone, Debug, Default)]
pub struct Totals {
    /// Jobs with tasks waiting or running, and those tasks.
    pub jobs_waiting: i64,
    pub tasks_waiting: i64,
    pub jobs_done: i64,
    pub jobs_failed: i64,
    /// Over finished tasks.
    pub samples: i64,
    pub lookups: i64,
    pub eval_seconds: f64,
}

/// A claimed task: part `part` of job `job`, evaluated with key `key`.
#[derive(Clone, Debug)]
pub struct Task {
    pub job: String,
    pub part: usize,
    pub key: String,
    pub attempts: i32,
}

/// A job's progress, counted over its tasks.
#[derive(Clone, Debug)]
pub struct PgJob {
    pub key: String,
    pub samples: usize,
    pub tasks: usize,
    pub done: usize,
    pub running: usize,
    pub failed: usize,
    pub error: Option<String>,
}

pub struct PgQueue {
    pool: PgPool,
}

/// The URL without its password (in the authority or the query), for messages and logs.
pub fn redact(url: &str) -> String {
    // an unencoded '@' or '#' in a password makes the URL ambiguous: echo none of it
    let ambiguous = url.matches('@').count() > 1 || url.contains('#');
    let parsed = url::Url::parse(url).ok().filter(|_| !ambiguous);
    let Some(mut u) = parsed else {
        return "(a URL that does not parse; percent-encode special characters in the password)".into();
    };
    let _ = u.set_password(None);
    let kept: Vec<(String, String)> = u
        .query_pairs()
        .filter(|(k, _)| !k.eq_ignore_ascii_case("password"))
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    if kept.is_empty() {
        u.set_query(None);
    } else {
        u.query_pairs_mut().clear().extend_pairs(kept);
    }
    u.to_string()
}

fn db(e: sqlx::Error) -> ServiceError {
    ServiceError::Queue(e.to_string())
}

impl PgQueue {
    /// Connect (up to `connections` pooled connections) and create the tables if missing.
    ///
    /// Errors: the database cannot be reached or refuses the schema.
    pub async fn connect(url: &str, connections: u32) -> Result<PgQueue, ServiceError> {
        let unreachable =
            |e: sqlx::Error| ServiceError::Startup(format!("cannot reach the job queue at {}: {e}", redact(url)));
        if url.trim().is_empty() {
            return Err(ServiceError::Startup(
                "the job queue URL is empty (--queue or VEIL_QUEUE: postgres://user:password@host:port/database)"
                    .into(),
            ));
        }
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            return Err(ServiceError::Startup(format!(
                "the job queue must be a PostgreSQL URL (postgres://user:password@host:port/database), not {}",
                redact(url)
            )));
        }
        let options = PgConnectOptions::from_str(url).map_err(unreachable)?;
        // one connection first: its error says why (refused, unknown host, password),
        // where the pool's would only say it timed out
        PgConnection::connect_with(&options).await.map_err(unreachable)?.close().await.map_err(unreachable)?;
        let pool = PgPoolOptions::new()
            .max_connections(connections.max(2))
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(options)
            .await
            .map_err(unreachable)?;
        // Two processes creating the tables at once would race on the catalog: serialise.
        let mut tx = pool.begin().await.map_err(db)?;
        sqlx::query("SELECT pg_advisory_xact_lock(7315861)").execute(&mut *tx).await.map_err(db)?;
        sqlx::query("CREATE TABLE IF NOT EXISTS veil_schema (version INTEGER NOT NULL)")
            .execute(&mut *tx)
            .await
            .map_err(db)?;
        let found: Option<i32> =
            sqlx::query_scalar("SELECT version FROM veil_schema").fetch_optional(&mut *tx).await.map_err(db)?;
        match found {
            None => {
                sqlx::raw_sql(SCHEMA).execute(&mut *tx).await.map_err(db)?;
                sqlx::query("INSERT INTO veil_schema (version) VALUES ($1)")
                    .bind(SCHEMA_VERSION)
                    .execute(&mut *tx)
                    .await
                    .map_err(db)?;
            }
            Some(v) if v == SCHEMA_VERSION => {}
            Some(v) => {
                return Err(ServiceError::Startup(format!(
                    "the job queue at {} holds veil's tables in version {v}, this veil uses {SCHEMA_VERSION}: \
                     use a new database (or drop veil_schema, veil_tasks and veil_jobs)",
                    redact(url)
                )))
            }
        }
        tx.commit().await.map_err(db)?;
        Ok(PgQueue { pool })
    }

    /// The database answers (within 2 s).
    pub async fn healthy(&self) -> bool {
        let ping = sqlx::query("SELECT 1").execute(&self.pool);
        matches!(tokio::time::timeout(Duration::from_secs(2), ping).await, Ok(Ok(_)))
    }

    /// Queue job `job`: one task per entry of `parts` (its sample count).
    pub async fn submit(&self, job: &JobSpec<'_>, parts: &[usize]) -> Result<(), ServiceError> {
        let id = job.id;
        let mut tx = self.pool.begin().await.map_err(db)?;
        sqlx::query("INSERT INTO veil_jobs (id, key_id, samples, fingerprint, store_id) VALUES ($1, $2, $3, $4, $5)")
            .bind(id)
            .bind(job.key)
            .bind(parts.iter().sum::<usize>() as i32)
            .bind(job.fingerprint)
            .bind(job.store_id)
            .execute(&mut *tx)
            .await
            .map_err(db)?;
        for (part, &samples) in parts.iter().enumerate() {
            sqlx::query("INSERT INTO veil_tasks (job_id, part, samples) VALUES ($1, $2, $3)")
                .bind(id)
                .bind(part as i32)
                .bind(samples as i32)
                .execute(&mut *tx)
                .await
                .map_err(db)?;
        }
        sqlx::query("SELECT pg_notify($1, $2)").bind(CHANNEL).bind(id).execute(&mut *tx).await.map_err(db)?;
        tx.commit().await.map_err(db)
    }

    pub async fn job(&self, id: &str) -> Result<Option<PgJob>, ServiceError> {
        let row = sqlx::query(
            "SELECT j.key_id, j.samples, count(t.seq),
                    count(t.seq) FILTER (WHERE t.state = 'done'),
                    count(t.seq) FILTER (WHERE t.state = 'running'),
                    count(t.seq) FILTER (WHERE t.state = 'failed'),
                    min(t.error) FILTER (WHERE t.state = 'failed')
             FROM veil_jobs j LEFT JOIN veil_tasks t ON t.job_id = j.id
             WHERE j.id = $1 GROUP BY j.id",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await
        .map_err(db)?;
        let Some(r) = row else { return Ok(None) };
        let n = |i: usize| r.try_get::<i64, _>(i).map(|v| v as usize);
        Ok(Some(PgJob {
            key: r.try_get(0).map_err(db)?,
            samples: r.try_get::<i32, _>(1).map_err(db)? as usize,
            tasks: n(2).map_err(db)?,
            done: n(3).map_err(db)?,
            running: n(4).map_err(db)?,
            failed: n(5).map_err(db)?,
            error: r.try_get(6).map_err(db)?,
        }))
    }

    /// Claim the oldest task that is waiting, or whose worker's lease ran out, for
    /// `worker` under a lease of `lease`: only tasks of models whose fingerprints (hex)
    /// are in `models`, from the data directory `store_id`. A task claimed more than
    /// [`MAX_ATTEMPTS`] times is failed instead and the next one tried.
    pub async fn claim(
        &self,
        worker: &str,
        lease: Duration,
        models: &[String],
        store_id: &str,
    ) -> Result<Option<Task>, ServiceError> {
        loop {
            let row = sqlx::query(
                "UPDATE veil_tasks t
                 SET state = 'running', worker = $1, attempts = t.attempts + 1,
                     lease_until = now() + make_interval(secs => $2)
                 FROM (SELECT w.seq FROM veil_tasks w JOIN veil_jobs j ON j.id = w.job_id
                       WHERE (w.state = 'queued' OR (w.state = 'running' AND w.lease_until < now()))
                         AND j.fingerprint = ANY($3) AND j.store_id = $4
                       ORDER BY w.seq LIMIT 1 FOR UPDATE OF w SKIP LOCKED) c
                 WHERE t.seq = c.seq
                 RETURNING t.job_id, t.part, t.attempts, (SELECT key_id FROM veil_jobs j WHERE j.id = t.job_id)",
            )
            .bind(worker)
            .bind(lease.as_secs_f64())
            .bind(models)
            .bind(store_id)
            .fetch_optional(&self.pool)
            .await
            .map_err(db)?;
            let Some(r) = row else { return Ok(None) };
            let task = Task {
                job: r.try_get(0).map_err(db)?,
                part: r.try_get::<i32, _>(1).map_err(db)? as usize,
                attempts: r.try_get(2).map_err(db)?,
                key: r.try_get(3).map_err(db)?,
            };
            if task.attempts <= MAX_ATTEMPTS {
                return Ok(Some(task));
            }
            let why = format!(
                "part {} was started {} times and each worker stopped before finishing it",
                task.part, MAX_ATTEMPTS
            );
            tracing::warn!(job = %task.job, part = task.part, "giving up: {why}");
            self.fail(&task, worker, &why).await?;
        }
    }

    /// Extend the lease; false if the task is no longer ours (the lease ran out and
    /// another worker claimed it).
    pub async fn renew(&self, task: &Task, worker: &str, lease: Duration) -> Result<bool, ServiceError> {
        let r = sqlx::query(
            "UPDATE veil_tasks SET lease_until = now() + make_interval(secs => $4)
             WHERE job_id = $1 AND part = $2 AND worker = $3 AND state = 'running'",
        )
        .bind(&task.job)
        .bind(task.part as i32)
        .bind(worker)
        .bind(lease.as_secs_f64())
        .execute(&self.pool)
        .await
        .map_err(db)?;
        Ok(r.rows_affected() == 1)
    }

    /// Mark the task done, with the lookups it ran and its evaluation time; false if it
    /// is no longer ours (its result is then not counted).
    pub async fn complete(
        &self,
        task: &Task,
        worker: &str,
        lookups: u64,
        eval: Duration,
    ) -> Result<bool, ServiceError> {
        let r = sqlx::query(
            "UPDATE veil_tasks SET state = 'done', finished_at = now(), completions = completions + 1,
                    lease_until = NULL, lookups = $4, eval_ms = $5
             WHERE job_id = $1 AND part = $2 AND worker = $3 AND state = 'running'",
        )
        .bind(&task.job)
        .bind(task.part as i32)
        .bind(worker)
        .bind(lookups as i64)
        .bind(eval.as_millis() as i64)
        .execute(&self.pool)
        .await
        .map_err(db)?;
        Ok(r.rows_affected() == 1)
    }

    /// Mark the task failed with `error`: its job fails and its waiting tasks are
    /// cancelled.
    pub async fn fail(&self, task: &Task, worker: &str, error: &str) -> Result<(), ServiceError> {
        let mut tx = self.pool.begin().await.map_err(db)?;
        let r = sqlx::query(
            "UPDATE veil_tasks SET state = 'failed', error = $4, finished_at = now(), lease_until = NULL
             WHERE job_id = $1 AND part = $2 AND worker = $3 AND state = 'running'",
        )
        .bind(&task.job)
        .bind(task.part as i32)
        .bind(worker)
        .bind(error)
        .execute(&mut *tx)
        .await
        .map_err(db)?;
        if r.rows_affected() == 1 {
            sqlx::query(
                "UPDATE veil_tasks SET state = 'cancelled', finished_at = now() WHERE job_id = $1 AND state = 'queued'",
            )
            .bind(&task.job)
            .execute(&mut *tx)
            .await
            .map_err(db)?;
        }
        tx.commit().await.map_err(db)
    }

    /// Forget job `id` (its rows; running tasks' results will not be counted). Returns
    /// the number of parts it had, or `None` if there is no such job.
    pub async fn delete(&self, id: &str) -> Result<Option<usize>, ServiceError> {
        let mut tx = self.pool.begin().await.map_err(db)?;
        let parts: i64 = sqlx::query_scalar("SELECT count(*) FROM veil_tasks WHERE job_id = $1")
            .bind(id)
            .fetch_one(&mut *tx)
            .await
            .map_err(db)?;
        let r = sqlx::query("DELETE FROM veil_jobs WHERE id = $1").bind(id).execute(&mut *tx).await.map_err(db)?;
        tx.commit().await.map_err(db)?;
        Ok((r.rows_affected() == 1).then_some(parts as usize))
    }

    /// Delete the jobs whose tasks all ended more than `keep` ago: their ids and part
    /// counts (for their files).
    pub async fn expire(&self, keep: Duration) -> Result<Vec<(String, usize)>, ServiceError> {
        let rows = sqlx::query(
            "WITH old AS (
               SELECT j.id, count(t.seq) AS parts FROM veil_jobs j JOIN veil_tasks t ON t.job_id = j.id
               GROUP BY j.id
               HAVING bool_and(t.state IN ('done', 'failed', 'cancelled'))
                  AND max(t.finished_at) < now() - make_interval(secs => $1)
             )
             DELETE FROM veil_jobs j USING old WHERE j.id = old.id RETURNING j.id, old.parts",
        )
        .bind(keep.as_secs_f64())
        .fetch_all(&self.pool)
        .await
        .map_err(db)?;
        rows.iter().map(|r| Ok((r.try_get(0).map_err(db)?, r.try_get::<i64, _>(1).map_err(db)? as usize))).collect()
    }

    /// Totals for the metrics.
    pub async fn totals(&self) -> Result<Totals, ServiceError> {
        let r = sqlx::query(
            "SELECT
               (SELECT count(DISTINCT job_id) FROM veil_tasks WHERE state IN ('queued', 'running')),
               (SELECT count(*) FROM veil_tasks WHERE state IN ('queued', 'running')),
               (SELECT count(*) FROM veil_jobs j WHERE NOT EXISTS
                  (SELECT 1 FROM veil_tasks t WHERE t.job_id = j.id AND t.state <> 'done')),
               (SELECT count(DISTINCT job_id) FROM veil_tasks WHERE state = 'failed'),
               (SELECT coalesce(sum(samples), 0)::BIGINT FROM veil_tasks WHERE state = 'done'),
               (SELECT coalesce(sum(lookups), 0)::BIGINT FROM veil_tasks WHERE state = 'done'),
               (SELECT coalesce(sum(eval_ms), 0)::BIGINT FROM veil_tasks WHERE state = 'done')",
        )
        .fetch_one(&self.pool)
        .await
        .map_err(db)?;
        let n = |i: usize| r.try_get::<i64, _>(i).map_err(db);
        Ok(Totals {
            jobs_waiting: n(0)?,
            tasks_waiting: n(1)?,
            jobs_done: n(2)?,
            jobs_failed: n(3)?,
            samples: n(4)?,
            lookups: n(5)?,
            eval_seconds: n(6)? as f64 / 1e3,
        })
    }

    /// A listener woken by every submission.
    pub async fn listener(&self) -> Result<PgListener, ServiceError> {
        let mut l = PgListener::connect_with(&self.pool).await.map_err(db)?;
        l.listen(CHANNEL).await.map_err(db)?;
        Ok(l)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn redact_hides_the_password_only() {
        assert_eq!(super::redact("postgres://veil:s3cret@db:5432/veil"), "postgres://veil@db:5432/veil");
        assert_eq!(super::redact("postgres://db/veil"), "postgres://db/veil");
        assert_eq!(super::redact("postgres://u@h/d"), "postgres://u@h/d");
        assert_eq!(
            super::redact("postgres://u@h/d?sslmode=require&password=s3cret"),
            "postgres://u@h/d?sslmode=require"
        );
        let odd = super::redact("postgres://u:p@ss:/w#rd@h/d");
        assert!(!odd.contains("p@ss") && !odd.contains("w#rd") && !odd.contains("ss:/w"), "{odd}");
    }
}
