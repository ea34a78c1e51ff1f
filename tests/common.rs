//! Helpers shared by the end-to-end tests: where the models are, and reading their data.

use ndarray::ArrayD;
use ndarray_npy::ReadNpyExt;
use std::fs::File;
use std::path::{Path, PathBuf};
use veil_ir::Tensor;

/// The repository's `models/` folder.
pub fn models_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join("models")
}

/// Every model folder (one holding `model.onnx`), sorted, including `models/extra/*`.
pub fn model_dirs() -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![models_dir()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).expect("models dir is readable").flatten() {
            let p = e.path();
            if p.is_dir() {
                if p.join("model.onnx").exists() {
                    out.push(p);
                } else {
                    stack.push(p);
                }
            }
        }
    }
    out.sort();
    out
}

/// A .npy file as a tensor: float32/float64 → F32, int32/int64 → I64.
pub fn read_npy(path: &Path) -> Tensor {
    let open = || File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    if let Ok(a) = ArrayD::<f32>::read_npy(open()) {
        return Tensor::F32(a);
    }
    if let Ok(a) = ArrayD::<i64>::read_npy(open()) {
        return Tensor::I64(a);
    }
    if let Ok(a) = ArrayD::<f64>::read_npy(open()) {
        return Tensor::F32(a.mapv(|v| v as f32));
    }
    if let Ok(a) = ArrayD::<i32>::read_npy(open()) {
        return Tensor::I64(a.mapv(|v| v as i64));
    }
    panic!("{}: not a float or integer .npy array", path.display())
}

/// A model folder's meta.json.
pub fn meta(dir: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(dir.join("meta.json")).expect("meta.json exists");
    serde_json::from_str(&text).expect("meta.json parses")
}

/// Largest difference between two float tensors, relative to the reference's range.
pub fn relative_error(ours: &Tensor, reference: &Tensor) -> f64 {
    let (a, b) = (ours.values_f64(), reference.values_f64());
    assert_eq!(ours.shape(), reference.shape(), "shapes differ");
    let lo = b.iter().cloned().fold(f64::INFINITY, f64::min);
    let hi = b.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let range = if hi > lo { hi - lo } else { hi.abs().max(1.0) };
    a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max) / range
}

/// `n` numbers in [0, 1) from a fixed linear congruential generator (Knuth's MMIX
/// constants): reproducible test data without a random-number crate.
pub fn uniform(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (s >> 40) as f32 / (1u64 << 24) as f32
        })
        .collect()
}
