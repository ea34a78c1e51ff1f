//! Keys and ciphertexts on disk, through tfhe's versioned, size-limited serialization.
//! The type is part of the encoding, so passing a server key where a client key is
//! expected is an error, as is a truncated or tampered file.

use crate::error::{Result, RuntimeError};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::io::{BufReader, BufWriter, Write};
use std::path::Path;
use tfhe::named::Named;
use tfhe::safe_serialization::{safe_deserialize, safe_serialize};
use tfhe::{Unversionize, Versionize};

/// Largest file read, per kind.
pub const CLIENT_KEY_LIMIT: u64 = 1 << 28;
pub const SERVER_KEY_LIMIT: u64 = 1 << 35;
pub const CIPHERTEXT_LIMIT: u64 = 1 << 34;

fn file_err(path: &Path, msg: impl Into<String>) -> RuntimeError {
    RuntimeError::File { path: path.display().to_string(), msg: msg.into() }
}

/// Write through a temporary file renamed into place, so nothing is left half-written.
pub fn write<T: Serialize + Versionize + Named>(path: &Path, value: &T, limit: u64) -> Result<()> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().ok_or_else(|| file_err(path, "not a file path"))?;
    let tmp = dir.join(format!(".{}.tmp{}", name.to_string_lossy(), std::process::id()));
    let result = (|| -> Result<()> {
        let f = std::fs::File::create(&tmp).map_err(|e| file_err(&tmp, e.to_string()))?;
        let mut w = BufWriter::new(f);
        safe_serialize(value, &mut w, limit).map_err(|e| file_err(path, e.to_string()))?;
        w.flush().map_err(|e| file_err(path, e.to_string()))?;
        w.get_ref().sync_all().map_err(|e| file_err(path, e.to_string()))
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, path).map_err(|e| file_err(path, e.to_string()))
}

/// Read a file of type `T`, refusing more than `limit` bytes.
pub fn read<T: DeserializeOwned + Unversionize + Named>(path: &Path, limit: u64) -> Result<T> {
    let f = std::fs::File::open(path).map_err(|e| file_err(path, format!("cannot read: {e}")))?;
    let len = f.metadata().map_err(|e| file_err(path, e.to_string()))?.len();
    if len > limit {
        return Err(file_err(path, format!("{len} bytes is over the {limit}-byte limit for a {}", T::NAME)));
    }
    safe_deserialize(BufReader::new(f), limit).map_err(|e| file_err(path, format!("not a valid {}: {e}", T::NAME)))
}
