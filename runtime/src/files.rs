//! Keys and ciphertexts on disk, through tfhe's versioned, size-limited serialization,
//! inside a small container: magic, format version, SHA-256 of the payload, payload.
//! The type is part of tfhe's encoding, so passing a server key where a client key is
//! expected is an error; the checksum makes a truncated or modified file an error too,
//! rather than garbage after decryption.

use crate::error::{Result, RuntimeError};
use crate::validate::Validate;
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
    let bytes = to_bytes(value, limit).map_err(|e| file_err(path, e))?;
    veil_backend::files::write_atomic(path, |w| w.write_all(&bytes))
        .map_err(|e| file_err(path, format!("cannot write: {e}")))
}

/// [`write`] for a secret (the client key): readable by its owner only.
pub fn write_secret<T: Serialize + Versionize + Named>(path: &Path, value: &T, limit: u64) -> Result<()> {
    let bytes = to_bytes(value, limit).map_err(|e| file_err(path, e))?;
    veil_backend::files::write_atomic_private(path, |w| w.write_all(&bytes))
        .map_err(|e| file_err(path, format!("cannot write: {e}")))
}

/// A value as veil's file format holds it: magic, version, checksum, payload.
pub fn to_bytes<T: Serialize + Versionize + Named>(value: &T, limit: u64) -> std::result::Result<Vec<u8>, String> {
    let mut payload = Vec::new();
    safe_serialize(value, &mut payload, limit).map_err(|e| e.to_string())?;
    Ok(stamp(&payload))
}

/// A serialized payload inside veil's header: magic, version, its SHA-256. (Tests and
/// fuzz targets stamp edited payloads with this, as a crafted file would be.)
pub fn stamp(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER + payload.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&Sha256::digest(payload));
    out.extend_from_slice(payload);
    out
}

/// Read a file of type `T`, refusing more than `limit` bytes, and check its structure
/// ([`Validate`]).
pub fn read<T: DeserializeOwned + Unversionize + Named + Validate>(path: &Path, limit: u64) -> Result<T> {
    let f = std::fs::File::open(path).map_err(|e| file_err(path, format!("cannot read: {e}")))?;
    let len = f.metadata().map_err(|e| file_err(path, e.to_string()))?.len();
    if len > limit + HEADER as u64 {
        return Err(file_err(path, format!("{len} bytes is over the {limit}-byte limit for a {}", T::NAME)));
    }
    let mut bytes = Vec::with_capacity(len as usize);
    f.take(limit + HEADER as u64).read_to_end(&mut bytes).map_err(|e| file_err(path, e.to_string()))?;
    from_bytes(&bytes, limit).map_err(|e| file_err(path, e))
}

/// [`read`] on bytes in memory; `Err` says what is wrong.
pub fn from_bytes<T: DeserializeOwned + Unversionize + Named + Validate>(
    bytes: &[u8],
    limit: u64,
) -> std::result::Result<T, String> {
    if bytes.len() < HEADER || &bytes[..8] != MAGIC {
        return Err(format!("not a veil file (expected a {})", T::NAME));
    }
    let version = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
    if version != VERSION {
        return Err(format!("file format {version} is not supported (this veil reads {VERSION})"));
    }
    let (sum, payload) = (&bytes[12..HEADER], &bytes[HEADER..]);
    if Sha256::digest(payload).as_slice() != sum {
        return Err("the file is truncated or was modified (checksum mismatch)".into());
    }
    let value: T = safe_deserialize(payload, limit).map_err(|e| {
        let e = e.to_string();
        // a sound file of another kind (a ciphertext file where keys were expected, …)
        if let Some(other) = other_veil_type(&e).filter(|t| *t != T::NAME) {
            return format!("this is a {other} file, not a {}: give the file this command takes", T::NAME);
        }
        format!(
            "not a valid {} ({e}): damaged, or written by a veil whose format this one cannot read; make it again (veil keygen, then veil encrypt or veil train-encrypt)",
            T::NAME
        )
    })?;
    value.validate().map_err(|e| format!("not a valid {}: {e}", T::NAME))?;
    Ok(value)
}

/// Bytes before the payload: magic, format version, SHA-256 of the payload.
pub const HEADER_BYTES: usize = HEADER;

/// The veil type a deserialization error says the file holds ("… got type veil::X …").
fn other_veil_type(err: &str) -> Option<&str> {
    let rest = &err[err.find("got type veil::")? + "got type ".len()..];
    let end = rest.find(|c: char| !(c.is_alphanumeric() || c == ':' || c == '_')).unwrap_or(rest.len());
    Some(&rest[..end])
}

#[cfg(test)]
mod type_tests {
    #[test]
    fn a_file_of_another_kind_is_named() {
        let e = "On deserialization, expected type veil::EncryptedOutputs, got type veil::EncryptedInputs";
        assert_eq!(super::other_veil_type(e), Some("veil::EncryptedInputs"));
        assert_eq!(super::other_veil_type("buffer underflow"), None);
    }
}
