//! What evaluates: the served models, the registered keys, and an evaluator cache. Shared
//! by the HTTP service (synchronous runs, in-process jobs) and by `veil worker` processes
//! (jobs from the PostgreSQL queue), which read the same data directory.

use crate::error::ServiceError;
use crate::metrics::Metrics;
use crate::store::Store;
use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use veil_backend::artifact::Artifact;
use veil_runtime::files::{self, CIPHERTEXT_LIMIT, SERVER_KEY_LIMIT};
use veil_runtime::{EncryptedInputs, EncryptedOutputs, Evaluator, RuntimeError, ServerKey};

type Result<T> = std::result::Result<T, ServiceError>;

pub struct Engine {
    /// Served models by name. Loaded once and kept for the process's life (evaluators
    /// borrow their circuits).
    pub models: HashMap<String, &'static Artifact>,
    pub store: Store,
    cache: Mutex<lru::LruCache<String, Arc<Evaluator<'static>>>>,
    pub metrics: Metrics,
}

impl Engine {
    /// Load `models` (each named by its file stem; training models refused) and open the
    /// data directory, keeping up to `cached_keys` evaluators.
    pub fn open(models: &[PathBuf], data_dir: &Path, cached_keys: usize) -> Result<Engine> {
        Engine::with_store(models, Store::open(data_dir)?, cached_keys)
    }

    /// [`Engine::open`] on a data directory that must exist already (a worker's).
    pub fn open_existing(models: &[PathBuf], data_dir: &Path, cached_keys: usize) -> Result<Engine> {
        Engine::with_store(models, Store::open_existing(data_dir)?, cached_keys)
    }

    fn with_store(models: &[PathBuf], store: Store, cached_keys: usize) -> Result<Engine> {
        let mut loaded = HashMap::new();
        for path in models {
            let a = Artifact::read(path).map_err(|e| ServiceError::Startup(e.to_string()))?;
            if a.training.is_some() {
                return Err(ServiceError::Startup(format!("{} is a training model", path.display())));
            }
            let name = path.file_stem().unwrap_or_default().to_string_lossy().to_string();
            if loaded.insert(name.clone(), &*Box::leak(Box::new(a))).is_some() {
                return Err(ServiceError::Startup(format!("two models are named {name}")));
            }
        }
        let cached = NonZeroUsize::new(cached_keys.max(1)).expect("at least one");
        Ok(Engine { models: loaded, store, cache: Mutex::new(lru::LruCache::new(cached)), metrics: Metrics::new() })
    }

    pub fn model(&self, name: &str) -> Result<&'static Artifact> {
        self.models.get(name).copied().ok_or_else(|| ServiceError::NotFound(format!("no model named '{name}'")))
    }

    /// Fingerprints (hex) of the loaded models.
    pub fn fingerprints(&self) -> Vec<String> {
        self.models.values().map(|a| crate::store::hex(&a.fingerprint)).collect()
    }

    /// The model a key was registered for: by fingerprint when the record has it (a
    /// worker's copy of the file may be named otherwise), else by name.
    fn model_of(&self, rec: &crate::store::KeyRecord) -> Result<&'static Artifact> {
        if rec.fingerprint.is_empty() {
            return self.model(&rec.model);
        }
        self.models.values().copied().find(|a| crate::store::hex(&a.fingerprint) == rec.fingerprint).ok_or_else(|| {
            ServiceError::Internal(format!(
                "model '{}' (fingerprint {}) is not loaded in this process",
                rec.model,
                &rec.fingerprint[..16.min(rec.fingerprint.len())]
            ))
        })
    }

    /// The fingerprint (hex) of the model a key was registered for.
    pub fn key_fingerprint(&self, key: &str) -> Result<String> {
        let rec = self.store.key(key).ok_or_else(|| ServiceError::NotFound(format!("no key '{key}'")))?;
        Ok(crate::store::hex(&self.model_of(&rec)?.fingerprint))
    }

    /// Lookups per sample of the key's model.
    pub fn lookups_per_sample(&self, key: &str) -> usize {
        self.store.key(key).and_then(|r| self.model_of(&r).ok()).map_or(0, |a| a.circuit.lookups_per_sample())
    }

    pub fn cache_evaluator(&self, key: &str, ev: Arc<Evaluator<'static>>) {
        self.cache.lock().expect("cache lock").put(key.to_string(), ev);
    }

    /// The key's evaluator: cached, or loaded from its file (blocking: seconds).
    pub fn evaluator(&self, key: &str) -> Result<Arc<Evaluator<'static>>> {
        if let Some(ev) = self.cache.lock().expect("cache lock").get(key) {
            return Ok(ev.clone());
        }
        let rec = self.store.key(key).ok_or_else(|| ServiceError::NotFound(format!("no key '{key}'")))?;
        let a = self.model_of(&rec)?;
        let sk: ServerKey = files::read(&self.store.key_file(key), SERVER_KEY_LIMIT)
            .map_err(|e| ServiceError::Internal(format!("stored key {key}: {e}")))?;
        let ev = Arc::new(
            Evaluator::new(&a.circuit, &a.params, sk, &a.fingerprint)
                .map_err(|e| ServiceError::Internal(format!("stored key {key}: {e}")))?,
        );
        self.cache_evaluator(key, ev.clone());
        Ok(ev)
    }

    /// A ciphertext file (bytes) sent for `key`: read, and made for the key's model.
    pub fn inputs_for(&self, key: &str, input: &[u8]) -> Result<EncryptedInputs> {
        let cts: EncryptedInputs = files::from_bytes(input, CIPHERTEXT_LIMIT)
            .map_err(|e| ServiceError::BadRequest(format!("the body is not a ciphertext file: {e}")))?;
        let rec = self.store.key(key).ok_or_else(|| ServiceError::NotFound(format!("no key '{key}'")))?;
        veil_runtime::keys::check_fingerprint("the ciphertexts", &cts.fingerprint, &self.model_of(&rec)?.fingerprint)
            .map_err(|e| ServiceError::BadRequest(e.to_string()))?;
        Ok(cts)
    }

    /// Evaluate ciphertexts with a key's evaluator (blocking).
    pub fn run(&self, key: &str, cts: &EncryptedInputs) -> Result<EncryptedOutputs> {
        let ev = self.evaluator(key)?;
        let start = Instant::now();
        let out = ev.run(cts, &|_| {}).map_err(|e| match e {
            RuntimeError::Invalid(m) => ServiceError::BadRequest(m),
            other => ServiceError::Internal(other.to_string()),
        })?;
        self.metrics.eval_seconds.inc_by(start.elapsed().as_secs_f64());
        self.metrics.samples.inc_by(cts.samples as u64);
        self.metrics.lookups.inc_by((cts.samples * ev.circuit().lookups_per_sample()) as u64);
        Ok(out)
    }

    /// Evaluate a ciphertext file (bytes): the output file's bytes and the sample count
    /// (blocking).
    pub fn evaluate(&self, key: &str, input: &[u8]) -> Result<(Vec<u8>, usize)> {
        let cts = self.inputs_for(key, input)?;
        let out = self.run(key, &cts)?;
        let bytes = files::to_bytes(&out, CIPHERTEXT_LIMIT).map_err(ServiceError::Internal)?;
        Ok((bytes, cts.samples))
    }

    /// Evaluate the ciphertext file `input` and write the outputs to `output` atomically
    /// (blocking): one job, or one part of a job.
    pub fn evaluate_file(&self, key: &str, input: &Path, output: &Path) -> Result<usize> {
        let bytes = std::fs::read(input).map_err(|e| ServiceError::Io(format!("reading {}: {e}", input.display())))?;
        let (out, samples) = self.evaluate(key, &bytes)?;
        veil_backend::files::write_atomic(output, |w| std::io::Write::write_all(w, &out))
            .map_err(|e| ServiceError::Io(format!("writing {}: {e}", output.display())))?;
        Ok(samples)
    }
}
