//! `.npy` in and out. Outputs are written to a temporary file beside the target and renamed
//! into place, so an interrupted run never leaves a half-written file.

use anyhow::{bail, Context, Result};
use ndarray::ArrayD;
use ndarray_npy::{ReadNpyExt, WriteNpyExt};
use std::fs::File;
use std::io::{BufReader, BufWriter};
use std::path::Path;
use veil_ir::Tensor;

/// Largest .npy file read (a guard against pointing veil at the wrong file).
const MAX_NPY_BYTES: u64 = 4 << 30;

/// Read a .npy array as a veil tensor: float32/float64 → f32, integer types → i64.
pub fn read(path: &Path) -> Result<Tensor> {
    let len = std::fs::metadata(path).with_context(|| format!("cannot read {}", path.display()))?.len();
    if len > MAX_NPY_BYTES {
        bail!("{} is {len} bytes, more than the {MAX_NPY_BYTES}-byte limit", path.display());
    }
    let open = || -> Result<BufReader<File>> {
        Ok(BufReader::new(File::open(path).with_context(|| format!("cannot read {}", path.display()))?))
    };
    if let Ok(a) = ArrayD::<f32>::read_npy(open()?) {
        return Ok(Tensor::F32(a));
    }
    if let Ok(a) = ArrayD::<f64>::read_npy(open()?) {
        return Ok(Tensor::F32(a.mapv(|v| v as f32)));
    }
    if let Ok(a) = ArrayD::<i64>::read_npy(open()?) {
        return Ok(Tensor::I64(a));
    }
    if let Ok(a) = ArrayD::<i32>::read_npy(open()?) {
        return Ok(Tensor::I64(a.mapv(|v| v as i64)));
    }
    // Report the real reason for the most common case (float32 expected).
    let err = ArrayD::<f32>::read_npy(open()?).expect_err("read failed above");
    bail!("{} is not a numeric .npy array veil can read (float32/64, int32/64, C order): {err}", path.display())
}

/// Read an input that must be float (a model's features).
pub fn read_f32(path: &Path) -> Result<Tensor> {
    Ok(match read(path)? {
        Tensor::I64(a) => Tensor::F32(a.mapv(|v| v as f32)),
        t => t,
    })
}

/// Every input of a model, by name: an `.npz` holds one array per input name (numpy's
/// `np.savez(path, **{name: array})`); an `.npy` serves a model with a single input. Each
/// is read as model inputs are (float, finite).
pub fn read_model_inputs(path: &Path, names: &[String]) -> Result<Vec<Tensor>> {
    let xs = read_model_inputs_any(path, names)?;
    // samples run along the first axis: an empty one is a mistake, not a batch
    if let Some((name, _)) = names.iter().zip(&xs).find(|(_, x)| x.shape().first() == Some(&0)) {
        bail!("{}: no samples: the first axis (the batch) of input '{name}' is empty", path.display());
    }
    Ok(xs)
}

fn read_model_inputs_any(path: &Path, names: &[String]) -> Result<Vec<Tensor>> {
    let is_npz = path.extension().is_some_and(|e| e == "npz");
    if !is_npz {
        if names.len() > 1 {
            bail!(
                "the model takes {} inputs ({}): give them as one .npz holding an array per input name (numpy: np.savez(\"x.npz\", {}))",
                names.len(),
                names.join(", "),
                names.iter().map(|n| format!("{n}=…")).collect::<Vec<_>>().join(", ")
            );
        }
        return Ok(vec![read_inputs(path)?]);
    }
    let len = std::fs::metadata(path).with_context(|| format!("cannot read {}", path.display()))?.len();
    if len > MAX_NPY_BYTES {
        bail!("{} is {len} bytes, more than the {MAX_NPY_BYTES}-byte limit", path.display());
    }
    let open = || -> Result<ndarray_npy::NpzReader<BufReader<File>>> {
        let f = BufReader::new(File::open(path).with_context(|| format!("cannot read {}", path.display()))?);
        ndarray_npy::NpzReader::new(f).with_context(|| format!("{} is not an .npz archive", path.display()))
    };
    let present = open()?.names().with_context(|| format!("reading {}", path.display()))?;
    names
        .iter()
        .map(|name| {
            if !present.contains(name) {
                bail!("{} has no array named '{name}' (it holds: {})", path.display(), present.join(", "));
            }
            let mut z = open()?;
            let t = if let Ok(a) = z.by_name::<ndarray::OwnedRepr<f32>, ndarray::IxDyn>(name) {
                a
            } else if let Ok(a) = open()?.by_name::<ndarray::OwnedRepr<f64>, ndarray::IxDyn>(name) {
                a.mapv(|v| v as f32)
            } else if let Ok(a) = open()?.by_name::<ndarray::OwnedRepr<i64>, ndarray::IxDyn>(name) {
                a.mapv(|v| v as f32)
            } else if let Ok(a) = open()?.by_name::<ndarray::OwnedRepr<i32>, ndarray::IxDyn>(name) {
                a.mapv(|v| v as f32)
            } else {
                bail!("{}: array '{name}' is not a numeric array veil can read (float32/64, int32/64)", path.display())
            };
            if let Some(at) = first_non_finite(&t) {
                bail!("{} ({name}): {at}; inputs must be finite numbers", path.display());
            }
            Ok(Tensor::F32(t))
        })
        .collect()
}

/// Where the first NaN or infinity of a batch `a` is: "sample 7, element 3 is NaN" for
/// rows of features, "sample 1, element [0, 2, 3] is inf" (the index within the sample)
/// for images and other ranks.
fn first_non_finite(a: &ArrayD<f32>) -> Option<String> {
    use ndarray::Dimension;
    let (ix, v) = a.indexed_iter().find(|(_, v)| !v.is_finite())?;
    let ix = ix.slice();
    let within = match &ix[1.min(ix.len())..] {
        [e] => e.to_string(),
        rest => format!("{rest:?}"),
    };
    Some(format!("sample {}, element {within} is {v}", ix.first().copied().unwrap_or(0)))
}

/// Read model inputs: float, every value finite. A NaN or an infinity would be quantized
/// to an arbitrary integer and give a wrong result, so it is an error naming the sample
/// and the element (its index within the sample).
pub fn read_inputs(path: &Path) -> Result<Tensor> {
    let t = read_f32(path)?;
    if let Tensor::F32(a) = &t {
        if let Some(at) = first_non_finite(a) {
            bail!("{}: {at}; inputs must be finite numbers", path.display());
        }
    }
    Ok(t)
}

/// Write a tensor as .npy (float32 or int64), atomically.
pub fn write(path: &Path, t: &Tensor) -> Result<()> {
    write_atomic(path, |w| {
        match t {
            Tensor::F32(a) => a.write_npy(w)?,
            Tensor::I64(a) => a.write_npy(w)?,
        }
        Ok(())
    })
}

/// Check, before any work, that `path` can be written: its directory exists and it is not
/// a directory itself. Long runs (training) then never fail only at the end.
pub fn check_writable(path: &Path, what: &str) -> Result<()> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    if !dir.is_dir() {
        bail!("cannot write {what} {}: the directory {} does not exist", path.display(), dir.display());
    }
    if path.is_dir() {
        bail!("cannot write {what} {}: it is a directory", path.display());
    }
    Ok(())
}

/// Write through a temporary file in the same directory, then rename into place (the one
/// helper for every file veil writes: `veil_backend::files::write_atomic`).
pub fn write_atomic(path: &Path, fill: impl FnOnce(&mut BufWriter<File>) -> Result<()>) -> Result<()> {
    let mut failure: Option<anyhow::Error> = None;
    let result = veil_backend::files::write_atomic(path, |w| {
        fill(w).map_err(|e| {
            let io = std::io::Error::other(format!("{e:#}"));
            failure = Some(e);
            io
        })
    });
    match (result, failure) {
        (Ok(()), _) => Ok(()),
        (Err(_), Some(e)) => Err(e.context(format!("writing {}", path.display()))),
        (Err(e), None) => Err(anyhow::anyhow!("cannot write {}: {e}", path.display())),
    }
}

/// A tensor name made safe as a file name.
pub fn file_name(name: &str) -> String {
    let s: String =
        name.chars().map(|c| if c.is_ascii_alphanumeric() || "-_.".contains(c) { c } else { '_' }).collect();
    if s.is_empty() || s.starts_with('.') {
        format!("output{s}")
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_non_finite_value_is_named_by_sample_and_index_within_it() {
        let mut rows = ndarray::ArrayD::<f32>::zeros(ndarray::IxDyn(&[20, 64]));
        rows[[7, 3]] = f32::NAN;
        assert_eq!(super::first_non_finite(&rows).unwrap(), "sample 7, element 3 is NaN");
        let mut images = ndarray::ArrayD::<f32>::zeros(ndarray::IxDyn(&[2, 1, 8, 8]));
        images[[1, 0, 2, 3]] = f32::INFINITY;
        assert_eq!(super::first_non_finite(&images).unwrap(), "sample 1, element [0, 2, 3] is inf");
        assert_eq!(super::first_non_finite(&ndarray::ArrayD::<f32>::zeros(ndarray::IxDyn(&[3]))), None);
    }

    use super::*;
    use proptest::prelude::*;

    fn valid_npy() -> Vec<u8> {
        let a = ndarray::Array2::<f32>::from_shape_fn((3, 4), |(i, j)| (i * 4 + j) as f32 / 7.0).into_dyn();
        let mut bytes = Vec::new();
        a.write_npy(&mut bytes).unwrap();
        bytes
    }

    proptest! {
        #![proptest_config(ProptestConfig {
            cases: 512,
            failure_persistence: Some(Box::new(proptest::test_runner::FileFailurePersistence::Off)),
            // reproducible in CI (tests/fuzz_readers.rs explains VEIL_FUZZ_SEED)
            rng_seed: proptest::test_runner::RngSeed::Fixed(0x5eed),
            ..ProptestConfig::default()
        })]

        /// Bounded fuzzing of the .npy reader (and the .npz one, which reads arrays the
        /// same way): bytes overwritten, words set to edge values (a shape of 2^32
        /// elements in a tiny file), cuts and insertions give an error, not a panic or an
        /// allocation the file cannot back.
        #[test]
        fn mutated_npy_files_read_or_fail_cleanly(
            edits in prop::collection::vec((0usize..200, any::<u8>(), any::<bool>()), 1..6),
            cut in proptest::option::of(0usize..200),
        ) {
            let mut b = valid_npy();
            for (at, v, digit) in edits {
                let i = at.min(b.len() - 1);
                // Digits land in the header's shape more often than random bytes would.
                b[i] = if digit { b'0' + v % 10 } else { v };
            }
            if let Some(c) = cut {
                b.truncate(c.min(b.len()));
            }
            let dir = std::env::temp_dir().join(format!("veil-npy-fuzz-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            let path = dir.join(format!("{:x}.npy", rand_name(&b)));
            std::fs::write(&path, &b).unwrap();
            let _ = read(&path);
            let _ = read_model_inputs(&path, &["x".to_string()]);
            let _ = std::fs::remove_file(&path);
        }
    }

    fn rand_name(b: &[u8]) -> u64 {
        b.iter().fold(0xcbf29ce484222325u64, |h, &x| (h ^ x as u64).wrapping_mul(0x100000001b3))
    }
}
