//! Prometheus metrics (`GET /metrics`).

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

pub struct Metrics {
    pub registry: Registry,
    pub samples: Counter,
    pub lookups: Counter,
    pub eval_seconds: Counter<f64, std::sync::atomic::AtomicU64>,
    pub jobs_submitted: Counter,
    pub jobs_done: Counter,
    pub jobs_failed: Counter,
    pub queue_depth: Gauge,
    pub keys_registered: Counter,
    /// The PostgreSQL queue's totals (work done by `veil worker` processes).
    pub queue_tasks: Gauge,
    pub queue_jobs_done: Gauge,
    pub queue_jobs_failed: Gauge,
    pub queue_samples: Gauge,
    pub queue_lookups: Gauge,
    pub queue_eval_seconds: Gauge<f64, std::sync::atomic::AtomicU64>,
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("veil");
        let m = Metrics {
            registry: Registry::default(),
            samples: Counter::default(),
            lookups: Counter::default(),
            eval_seconds: Counter::default(),
            jobs_submitted: Counter::default(),
            jobs_done: Counter::default(),
            jobs_failed: Counter::default(),
            queue_depth: Gauge::default(),
            keys_registered: Counter::default(),
            queue_tasks: Gauge::default(),
            queue_jobs_done: Gauge::default(),
            queue_jobs_failed: Gauge::default(),
            queue_samples: Gauge::default(),
            queue_lookups: Gauge::default(),
            queue_eval_seconds: Gauge::default(),
        };
        registry.register("samples", "Samples evaluated encrypted", m.samples.clone());
        registry.register("lookups", "Programmable bootstraps run (lookups × samples)", m.lookups.clone());
        registry.register("eval_seconds", "Seconds spent evaluating", m.eval_seconds.clone());
        registry.register("jobs_submitted", "Jobs queued", m.jobs_submitted.clone());
        registry.register("jobs_done", "Jobs finished", m.jobs_done.clone());
        registry.register("jobs_failed", "Jobs failed", m.jobs_failed.clone());
        registry.register("queue_depth", "Jobs waiting or running", m.queue_depth.clone());
        registry.register("keys_registered", "Server keys registered", m.keys_registered.clone());
        registry.register("queue_tasks", "PostgreSQL queue: tasks waiting or running", m.queue_tasks.clone());
        registry.register("queue_jobs_done", "PostgreSQL queue: jobs done", m.queue_jobs_done.clone());
        registry.register("queue_jobs_failed", "PostgreSQL queue: jobs failed", m.queue_jobs_failed.clone());
        registry.register("queue_samples", "PostgreSQL queue: samples evaluated by workers", m.queue_samples.clone());
        registry.register("queue_lookups", "PostgreSQL queue: bootstraps run by workers", m.queue_lookups.clone());
        registry.register(
            "queue_eval_seconds",
            "PostgreSQL queue: seconds workers spent evaluating",
            m.queue_eval_seconds.clone(),
        );
        Metrics { registry, ..m }
    }

    /// The text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // writing into a String cannot fail
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
