//! Compiled-model file bytes → an artifact (validated) or an error; a file that reads is
//! then rebuilt into its clear-execution model.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(a) = veil_backend::artifact::Artifact::from_bytes(data, "fuzz.veil") {
        let _ = a.quantized_model();
    }
});
