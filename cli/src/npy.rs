//! `.npy` in and out. Outputs are written to a temporary file beside the target and renamed
//! into place, so an interrupted run never leaves a half-written file.

use anyhow::{bail, Context, Result};
use ndarray::ArrayD;
use ndarray_npy::{ReadNpyExt, WriteNpyExt};
use std::fs::File;
use std::io::{BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
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

/// Write through a temporary file in the same directory, then rename into place.
pub fn write_atomic(path: &Path, fill: impl FnOnce(&mut BufWriter<File>) -> Result<()>) -> Result<()> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().with_context(|| format!("{} is not a file path", path.display()))?;
    let tmp: PathBuf = dir.join(format!(".{}.tmp{}", name.to_string_lossy(), std::process::id()));
    let result = (|| -> Result<()> {
        let mut w = BufWriter::new(File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?);
        fill(&mut w)?;
        w.flush()?;
        w.get_ref().sync_all()?;
        Ok(())
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(e.context(format!("writing {}", path.display())));
    }
    std::fs::rename(&tmp, path).with_context(|| format!("cannot move {} into place", path.display()))
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
