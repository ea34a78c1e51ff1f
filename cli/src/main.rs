//! `veil`: compile ML models to FHE circuits and run them on encrypted data.

mod npy;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use std::path::{Path, PathBuf};
use std::time::Instant;
use veil_ir::{Graph, Tensor};

#[derive(Parser)]
#[command(name = "veil", version, about = "Compile ML models to FHE circuits and run them on encrypted data")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print a model at a pipeline stage, as text, Graphviz DOT or JSON.
    Inspect {
        /// An ONNX model (.onnx).
        model: PathBuf,
        /// Which stage to show.
        #[arg(long, value_enum, default_value_t = Stage::Float)]
        stage: Stage,
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
        /// Write here instead of standard output.
        #[arg(long, short)]
        output: Option<PathBuf>,
    },
    /// Run a model on the inputs in a .npy file and write its output as .npy.
    Predict {
        /// An ONNX model (.onnx).
        model: PathBuf,
        /// Inputs: float32 [batch, features...].
        #[arg(long, short)]
        input: PathBuf,
        /// The model's first floating-point output (e.g. probabilities) goes here.
        #[arg(long, short)]
        output: PathBuf,
        #[arg(long, value_enum, default_value_t = Mode::Float)]
        mode: Mode,
        /// Also write every output as DIR/NAME.npy.
        #[arg(long)]
        outputs_dir: Option<PathBuf>,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Stage {
    /// The float graph as imported.
    Float,
}

#[derive(Clone, Copy, ValueEnum)]
enum Format {
    Text,
    Dot,
    Json,
}

#[derive(Clone, Copy, ValueEnum)]
enum Mode {
    /// The float model, in the clear (the reference).
    Float,
}

fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Inspect { model, stage, format, output } => inspect(&model, stage, format, output.as_deref()),
        Command::Predict { model, input, output, mode, outputs_dir } => {
            predict(&model, &input, &output, mode, outputs_dir.as_deref())
        }
    }
}

fn load_onnx(path: &Path) -> Result<Graph> {
    veil_frontend::onnx::import_file(path).with_context(|| format!("importing {}", path.display()))
}

fn inspect(model: &Path, stage: Stage, format: Format, output: Option<&Path>) -> Result<()> {
    let graph = match stage {
        Stage::Float => load_onnx(model)?,
    };
    let text = match format {
        Format::Text => veil_ir::print::to_text(&graph),
        Format::Dot => veil_ir::print::to_dot(&graph),
        Format::Json => veil_ir::print::to_json(&graph)?,
    };
    match output {
        Some(path) => npy::write_atomic(path, |w| Ok(std::io::Write::write_all(w, text.as_bytes())?)),
        None => {
            print!("{text}");
            Ok(())
        }
    }
}

fn predict(model: &Path, input: &Path, output: &Path, mode: Mode, outputs_dir: Option<&Path>) -> Result<()> {
    let graph = load_onnx(model)?;
    let x = npy::read_f32(input)?;
    let start = Instant::now();
    let outs = match mode {
        Mode::Float => veil_ir::interp::run(&graph, &[x])
            .with_context(|| format!("running {} on {}", model.display(), input.display()))?,
    };
    let elapsed = start.elapsed();
    let first =
        graph.outputs().iter().zip(&outs).find(|(_, t)| matches!(t, Tensor::F32(_))).map(|(o, t)| (o.name.clone(), t));
    let Some((name, y)) = first else {
        bail!("{} has no floating-point output", model.display());
    };
    npy::write(output, y)?;
    if let Some(dir) = outputs_dir {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        for (o, t) in graph.outputs().iter().zip(&outs) {
            npy::write(&dir.join(format!("{}.npy", npy::file_name(&o.name))), t)?;
        }
    }
    eprintln!("wrote {} ({} {:?}) in {:.1} ms", output.display(), name, y.shape(), elapsed.as_secs_f64() * 1e3);
    Ok(())
}
