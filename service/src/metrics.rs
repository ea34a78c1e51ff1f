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
        };
        registry.register("samples", "Samples evaluated encrypted", m.samples.clone());
        registry.register("lookups", "Programmable bootstraps run (lookups × samples)", m.lookups.clone());
        registry.register("eval_seconds", "Seconds spent evaluating", m.eval_seconds.clone());
        registry.register("jobs_submitted", "Jobs queued", m.jobs_submitted.clone());
        registry.register("jobs_done", "Jobs finished", m.jobs_done.clone());
        registry.register("jobs_failed", "Jobs failed", m.jobs_failed.clone());
        registry.register("queue_depth", "Jobs waiting or running", m.queue_depth.clone());
        registry.register("keys_registered", "Server keys registered", m.keys_registered.clone());
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
