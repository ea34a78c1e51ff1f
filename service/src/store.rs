//! What the service keeps in its data directory: registered keys (the key file and a
//! record: model, SHA-256 of the token) and jobs (input, output, record), each record
//! written atomically, so a restart finds every key and every unfinished job.

use crate::error::ServiceError;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct KeyRecord {
    pub model: String,
    /// The compiled model's fingerprint (hex): workers find the model by it, whatever
    /// their copy of the file is named.
    #[serde(default)]
    pub fingerprint: String,
    /// Hex SHA-256 of the access token (the token itself is never stored).
    pub token_sha256: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    Queued,
    Running,
    Done,
    Failed,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct JobRecord {
    pub key: String,
    pub state: JobState,
    pub samples: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

pub struct Store {
    dir: PathBuf,
    /// This directory's id (the `store-id` file): jobs queued in PostgreSQL name the
    /// directory their files are in, so workers reading another one leave them alone.
    pub id: String,
    keys: Mutex<HashMap<String, KeyRecord>>,
    jobs: Mutex<HashMap<String, JobRecord>>,
}

fn io(what: &str, path: &Path, e: impl std::fmt::Display) -> ServiceError {
    ServiceError::Io(format!("{what} {}: {e}", path.display()))
}

/// Records `*.json` in `dir`, by file stem.
fn load_records<T: for<'de> Deserialize<'de>>(dir: &Path) -> Result<HashMap<String, T>, ServiceError> {
    let mut out = HashMap::new();
    for entry in std::fs::read_dir(dir).map_err(|e| io("reading", dir, e))?.flatten() {
        let path = entry.path();
        if path.extension().is_some_and(|e| e == "json") {
            let text = std::fs::read_to_string(&path).map_err(|e| io("reading", &path, e))?;
            let rec = serde_json::from_str(&text).map_err(|e| io("parsing", &path, e))?;
            let id = path.file_stem().unwrap_or_default().to_string_lossy().to_string();
            out.insert(id, rec);
        }
    }
    Ok(out)
}

fn write_record<T: Serialize>(path: &Path, rec: &T) -> Result<(), ServiceError> {
    let text = serde_json::to_vec(rec).map_err(|e| io("encoding", path, e))?;
    veil_backend::files::write_atomic(path, |w| std::io::Write::write_all(w, &text)).map_err(|e| io("writing", path, e))
}

/// A random id or token: `bytes` random bytes as hex.
pub fn random_hex(bytes: usize) -> String {
    let v: Vec<u8> = (0..bytes).map(|_| rand::random::<u8>()).collect();
    hex(&v)
}

pub fn hex(v: &[u8]) -> String {
    v.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn sha256_hex(text: &str) -> String {
    hex(&Sha256::digest(text.as_bytes()))
}

/// Ids are our own hex strings: anything else names no file of ours.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_hexdigit())
}

impl Store {
    /// Open (creating it if needed) the service's data directory.
    pub fn open(dir: &Path) -> Result<Store, ServiceError> {
        for sub in ["keys", "jobs", "tmp"] {
            let d = dir.join(sub);
            std::fs::create_dir_all(&d).map_err(|e| io("creating", &d, e))?;
        }
        let id_file = dir.join("store-id");
        if !id_file.exists() {
            let id = random_hex(16);
            veil_backend::files::write_atomic(&id_file, |w| std::io::Write::write_all(w, id.as_bytes()))
                .map_err(|e| io("writing", &id_file, e))?;
        }
        Store::open_existing(dir)
    }

    /// Open a data directory a server made (a worker's view): it must exist, with its id.
    pub fn open_existing(dir: &Path) -> Result<Store, ServiceError> {
        let id_file = dir.join("store-id");
        let id = std::fs::read_to_string(&id_file).map_err(|_| {
            ServiceError::Startup(format!(
                "{} is not a veil serve data directory (no store-id file): give workers the directory the server uses (--data-dir), shared between machines",
                dir.display()
            ))
        })?;
        let id = id.trim().to_string();
        if !valid_id(&id) {
            return Err(ServiceError::Startup(format!("{} is not a store id", id_file.display())));
        }
        Ok(Store {
            dir: dir.to_path_buf(),
            id,
            keys: Mutex::new(load_records(&dir.join("keys"))?),
            jobs: Mutex::new(load_records(&dir.join("jobs"))?),
        })
    }

    pub fn tmp_path(&self) -> PathBuf {
        self.dir.join("tmp").join(random_hex(16))
    }

    pub fn key_file(&self, id: &str) -> PathBuf {
        self.dir.join("keys").join(format!("{id}.key"))
    }

    pub fn job_input(&self, id: &str) -> PathBuf {
        self.dir.join("jobs").join(format!("{id}.in"))
    }

    pub fn job_output(&self, id: &str) -> PathBuf {
        self.dir.join("jobs").join(format!("{id}.out"))
    }

    /// Finished jobs (done or failed) of the embedded queue whose record was last written
    /// before `cutoff`.
    pub fn finished_before(&self, cutoff: std::time::SystemTime) -> Vec<String> {
        let jobs = self.jobs.lock().expect("jobs lock");
        jobs.iter()
            .filter(|(_, j)| matches!(j.state, JobState::Done | JobState::Failed))
            .filter(|(id, _)| {
                std::fs::metadata(self.dir.join("jobs").join(format!("{id}.json")))
                    .and_then(|m| m.modified())
                    .is_ok_and(|t| t < cutoff)
            })
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// Forget a job of the embedded queue: its record and files.
    pub fn remove_job(&self, id: &str) {
        for p in [self.job_input(id), self.job_output(id), self.dir.join("jobs").join(format!("{id}.json"))] {
            let _ = std::fs::remove_file(p);
        }
        self.jobs.lock().expect("jobs lock").remove(id);
    }

    /// Remove the files of a job split in `parts` parts.
    pub fn remove_parts(&self, id: &str, parts: usize) {
        for i in 0..parts {
            let _ = std::fs::remove_file(self.part_input(id, i));
            let _ = std::fs::remove_file(self.part_output(id, i));
        }
    }

    /// Part `part` of a job split across workers (inputs, outputs).
    pub fn part_input(&self, id: &str, part: usize) -> PathBuf {
        self.dir.join("jobs").join(format!("{id}.{part}.in"))
    }

    pub fn part_output(&self, id: &str, part: usize) -> PathBuf {
        self.dir.join("jobs").join(format!("{id}.{part}.out"))
    }

    pub fn add_key(&self, id: &str, rec: KeyRecord) -> Result<(), ServiceError> {
        write_record(&self.dir.join("keys").join(format!("{id}.json")), &rec)?;
        self.keys.lock().expect("keys lock").insert(id.to_string(), rec);
        Ok(())
    }

    /// The key's record. Keys registered by another process sharing the directory (a
    /// second server, or the server when this is a worker) are read from disk on first use.
    pub fn key(&self, id: &str) -> Option<KeyRecord> {
        if let Some(rec) = self.keys.lock().expect("keys lock").get(id) {
            return Some(rec.clone());
        }
        if !valid_id(id) {
            return None;
        }
        let text = std::fs::read_to_string(self.dir.join("keys").join(format!("{id}.json"))).ok()?;
        let rec: KeyRecord = serde_json::from_str(&text).ok()?;
        self.keys.lock().expect("keys lock").insert(id.to_string(), rec.clone());
        Some(rec)
    }

    pub fn set_job(&self, id: &str, rec: JobRecord) -> Result<(), ServiceError> {
        write_record(&self.dir.join("jobs").join(format!("{id}.json")), &rec)?;
        self.jobs.lock().expect("jobs lock").insert(id.to_string(), rec);
        Ok(())
    }

    pub fn job(&self, id: &str) -> Option<JobRecord> {
        self.jobs.lock().expect("jobs lock").get(id).cloned()
    }

    /// Jobs not finished (queued, or running when the service stopped).
    pub fn unfinished_jobs(&self) -> Vec<String> {
        let jobs = self.jobs.lock().expect("jobs lock");
        let mut ids: Vec<String> = jobs
            .iter()
            .filter(|(_, j)| matches!(j.state, JobState::Queued | JobState::Running))
            .map(|(id, _)| id.clone())
            .collect();
        ids.sort();
        ids
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_finished_jobs_expire() {
        let dir = std::env::temp_dir().join(format!("veil-store-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store = Store::open(&dir).unwrap();
        let rec = |state| JobRecord { key: "k".into(), state, samples: 1, error: None };
        store.set_job("aa", rec(JobState::Done)).unwrap();
        store.set_job("bb", rec(JobState::Queued)).unwrap();
        store.set_job("cc", rec(JobState::Failed)).unwrap();
        let later = std::time::SystemTime::now() + std::time::Duration::from_secs(1);
        let mut old = store.finished_before(later);
        old.sort();
        assert_eq!(old, ["aa", "cc"]);
        assert!(store.finished_before(std::time::SystemTime::UNIX_EPOCH).is_empty());
        store.remove_job("aa");
        assert!(store.job("aa").is_none() && !dir.join("jobs").join("aa.json").exists());
        // the id survives reopening
        let id = store.id.clone();
        assert_eq!(Store::open(&dir).unwrap().id, id);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
