//! Key payloads, stamped with a valid checksum as a crafted file would be (so that the
//! structural validation is reached) → a key or an error, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;
use veil_runtime::files::{from_bytes, stamp, SERVER_KEY_LIMIT};
use veil_runtime::{ClientKey, ServerKey};

fuzz_target!(|payload: &[u8]| {
    let file = stamp(payload);
    let _ = from_bytes::<ClientKey>(&file, SERVER_KEY_LIMIT);
    let _ = from_bytes::<ServerKey>(&file, SERVER_KEY_LIMIT);
});
