//! .npy bytes → a tensor or an error, through the reader `veil` uses.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = std::env::temp_dir().join(format!("veil-fuzz-{}.npy", std::process::id()));
    if std::fs::write(&path, data).is_ok() {
        let _ = veil_cli::npy::read(&path);
    }
});
