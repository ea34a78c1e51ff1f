//! ONNX bytes → veil IR: an error or a verified graph, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = veil_frontend::onnx::import_bytes(data, "fuzz.onnx", "fuzz");
});
