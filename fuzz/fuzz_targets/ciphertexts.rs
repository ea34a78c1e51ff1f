//! Ciphertext payloads (inputs, outputs, training batches and weights), stamped with a
//! valid checksum → a validated value or an error, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;
use veil_runtime::files::{from_bytes, stamp, CIPHERTEXT_LIMIT};
use veil_runtime::{EncryptedBatches, EncryptedInputs, EncryptedOutputs, EncryptedState};

fuzz_target!(|payload: &[u8]| {
    let file = stamp(payload);
    let _ = from_bytes::<EncryptedInputs>(&file, CIPHERTEXT_LIMIT);
    let _ = from_bytes::<EncryptedOutputs>(&file, CIPHERTEXT_LIMIT);
    let _ = from_bytes::<EncryptedBatches>(&file, CIPHERTEXT_LIMIT);
    let _ = from_bytes::<EncryptedState>(&file, CIPHERTEXT_LIMIT);
});
