//! The command-line tool's file readers as a library, so that the fuzz targets in
//! `fuzz/` read `.npy`/`.npz` exactly as `veil` does.

pub mod npy;
