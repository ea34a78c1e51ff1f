//! Keys and ciphertexts on disk, through tfhe's versioned, size-limited serialization,
//! inside a small container: magic, format version, SHA-256 of the payload, payload.
//! The type is part of tfhe's encoding, so passing a server key where a client key is
//! expected is an error; the checksum makes a truncated or modified file an error too,
//! rather than garbage after decryption.

use crate::error::{Result, RuntimeError};
use serde::de::DeserializeOwned;
use serde::Serialize;
use sha2::{Digest, Sha256};
use std::io::{Read, Write};
use std::path::Path;
use tfhe::named::Named;
use tfhe::safe_serialization::{safe_deserialize, safe_serialize};
use tfhe::{Unversionize, Versionize};

const MAGIC: &[u8; 8] = b"VEILFILE";
const VERSION: u32 = 1;
/// magic + version + checksum
const HEADER: usize = 8 + 4 + 32;

/// Largest file read, per kind.
pub const CLIENT_KEY_LIMIT: u64 = 1 << 28;
pub const SERVER_KEY_LIMIT: u64 = 1 << 35;
pub const CIPHERTEXT_LIMIT: u64 = 1 << 34;

fn file_err(path: &Path, msg: impl Into<String>) -> RuntimeError {
    RuntimeError::File { path: path.display().to_string(), msg: msg.into() }
}

/// Write through a temporary file renamed into place, so nothing is left half-written.
pub fn write<T: Serialize + Versionize + Named>(path: &Path, value: &T, limit: u64) -> Result<()> {
    let mut payload = Vec::new();
    safe_serialize(value, &mut payload, limit).map_err(|e| file_err(path, e.to_string()))?;
    veil_backend::files::write_atomic(path, |w| {
        w.write_all(MAGIC)?;
        w.write_all(&VERSION.to_le_bytes())?;
        w.write_all(&Sha256::digest(&payload))?;
        w.write_all(&payload)
    })
    .map_err(|e| file_err(path, format!("cannot write: {e}")))
}

/// Read a file of type `T`, refusing more than `limit` bytes.
pub fn read<T: DeserializeOwned + Unversionize + Named>(path: &Path, limit: u64) -> Result<T> {
    let f = std::fs::File::open(path).map_err(|e| file_err(path, format!("cannot read: {e}")))?;
    let len = f.metadata().map_err(|e| file_err(path, e.to_string()))?.len();
    if len > limit + HEADER as u64 {
        return Err(file_err(path, format!("{len} bytes is over the {limit}-byte limit for a {}", T::NAME)));
    }
    let mut bytes = Vec::with_capacity(len as usize);
    f.take(limit + HEADER as u64).read_to_end(&mut bytes).map_err(|e| file_err(path, e.to_string()))?;
    if bytes.len() < HEADER || &bytes[..8] != MAGIC {
        return Err(file_err(path, format!("not a veil file (expected a {})", T::NAME)));
    }
    let version = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
    if version != VERSION {
        return Err(file_err(path, format!("file format {version} is not supported (this veil reads {VERSION})")));
    }
    let (sum, payload) = (&bytes[12..HEADER], &bytes[HEADER..]);
    if Sha256::digest(payload).as_slice() != sum {
        return Err(file_err(path, "the file is truncated or was modified (checksum mismatch)"));
    }
    safe_deserialize(payload, limit).map_err(|e| file_err(path, format!("not a valid {}: {e}", T::NAME)))
}
