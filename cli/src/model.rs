//! Loading what a user points veil at: an ONNX model or a compiled `.veil` artifact.

use anyhow::{bail, Context, Result};
use std::path::Path;
use veil_backend::artifact::Artifact;
use veil_ir::Graph;

pub enum Model {
    Onnx(Graph),
    Compiled(Box<Artifact>),
}

/// Load by content: a `.veil` file is a protobuf artifact, anything else is read as ONNX.
pub fn load(path: &Path) -> Result<Model> {
    if path.extension().is_some_and(|e| e == "veil") {
        let a = Artifact::read(path).with_context(|| format!("loading {}", path.display()))?;
        return Ok(Model::Compiled(Box::new(a)));
    }
    let g = veil_frontend::onnx::import_file(path).with_context(|| format!("importing {}", path.display()))?;
    Ok(Model::Onnx(g))
}

/// A compiled model, or an error telling the user to compile first.
pub fn load_compiled(path: &Path) -> Result<Artifact> {
    match load(path)? {
        Model::Compiled(a) => Ok(*a),
        Model::Onnx(_) => bail!(
            "{} is an ONNX model; compile it first: veil compile {} --calib CALIB.npy --output MODEL.veil",
            path.display(),
            path.display()
        ),
    }
}

/// A compiled inference model: a training artifact is an error saying which commands take it.
pub fn load_inference(path: &Path) -> Result<Artifact> {
    let a = load_compiled(path)?;
    if a.training.is_some() {
        bail!(
            "{} is a training model: use veil train-encrypt, train-run and train-decrypt (or veil train) with it",
            path.display()
        );
    }
    Ok(a)
}

impl Model {
    /// The float graph (stored in artifacts too).
    pub fn float_graph(&self) -> Result<Graph> {
        match self {
            Model::Onnx(g) => Ok(g.clone()),
            Model::Compiled(a) => Ok(veil_backend::artifact::graph_from_json(&a.stages.float_json, "float")?),
        }
    }
}
