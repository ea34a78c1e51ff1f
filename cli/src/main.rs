//! `veil`: compile ML models to FHE circuits and run them on encrypted data.

mod bench;
mod bench_train;
mod fhe;
mod history;
mod model;
use veil_cli::npy;
mod remote;
mod report;
mod train;
mod train_files;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use std::path::{Path, PathBuf};
use std::time::Instant;
use veil_backend::pipeline::CompileOptions;
use veil_ir::Tensor;
use veil_passes::SearchOptions;

#[derive(Parser)]
#[command(name = "veil", version, about = "Compile ML models to FHE circuits and run them on encrypted data")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Compile an ONNX model into an FHE circuit (quantize, fuse, choose bit widths and
    /// crypto parameters).
    Compile {
        model: PathBuf,
        /// Representative float inputs [batch, features...] (a few hundred samples or more):
        /// an .npy, or for a model with several inputs an .npz with one array per input name.
        #[arg(long)]
        calib: PathBuf,
        #[arg(long, short)]
        output: PathBuf,
        #[command(flatten)]
        opts: CompileArgs,
    },
    /// Print a model at a pipeline stage, as text, Graphviz DOT or JSON.
    Inspect {
        /// An ONNX model (float stage only) or a compiled .veil model.
        model: PathBuf,
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
        /// An ONNX model (float mode) or a compiled .veil model (any mode).
        model: PathBuf,
        /// Inputs: float32 [batch, features...] as .npy, or an .npz with one array per input
        /// name for a model with several inputs.
        #[arg(long, short)]
        input: PathBuf,
        /// The model's first floating-point output (e.g. probabilities) goes here.
        #[arg(long, short)]
        output: PathBuf,
        /// float: the original model; clear: the integer circuit's semantics, unencrypted;
        /// simulate: the circuit on plaintexts with the noise encryption would add;
        /// execute: really encrypted (keys generated in memory). Default: float for ONNX,
        /// clear for .veil.
        #[arg(long, value_enum)]
        mode: Option<Mode>,
        /// Also write every output as DIR/NAME.npy.
        #[arg(long)]
        outputs_dir: Option<PathBuf>,
        /// Make inputs that leave the compiled ranges (clipped inputs, saturated lookups,
        /// overflowing accumulators) an error instead of a warning.
        #[arg(long)]
        strict_ranges: bool,
    },
    /// Generate keys for a compiled model: client.key (secret) and server.key.
    Keygen {
        model: PathBuf,
        #[arg(long)]
        out_dir: PathBuf,
    },
    /// Quantize and encrypt inputs with the client key.
    Encrypt {
        model: PathBuf,
        #[arg(long)]
        client_key: PathBuf,
        /// Inputs as .npy (or .npz, one array per input name).
        #[arg(long, short)]
        input: PathBuf,
        #[arg(long, short)]
        output: PathBuf,
        /// Refuse inputs that leave the compiled ranges instead of warning.
        #[arg(long)]
        strict_ranges: bool,
    },
    /// Evaluate the model on encrypted inputs with the server key (no secret needed).
    Run {
        model: PathBuf,
        #[arg(long)]
        server_key: PathBuf,
        #[arg(long, short)]
        input: PathBuf,
        #[arg(long, short)]
        output: PathBuf,
    },
    /// Decrypt and decode encrypted outputs with the client key.
    Decrypt {
        model: PathBuf,
        #[arg(long)]
        client_key: PathBuf,
        #[arg(long, short)]
        input: PathBuf,
        #[arg(long, short)]
        output: PathBuf,
        #[arg(long)]
        outputs_dir: Option<PathBuf>,
    },
    /// Train a logistic regression by SGD on encrypted data, all roles in this process.
    ///
    /// One-vs-rest for 3+ classes; clear, simulate or execute; writes the model as ONNX.
    Train {
        /// Features: float32 [samples, features], within --feature-range.
        #[arg(long)]
        data: PathBuf,
        /// Class labels: integers [samples] (two or more classes).
        #[arg(long)]
        labels: PathBuf,
        /// clear: the circuit's integers unencrypted; simulate: with the noise encryption
        /// adds; execute: really encrypted (keys made in memory).
        #[arg(long, value_enum, default_value_t = train::TrainMode::Simulate)]
        mode: train::TrainMode,
        /// The trained model (ONNX: ai.onnx.ml LinearClassifier).
        #[arg(long, short)]
        output: PathBuf,
        /// Passes over the data.
        #[arg(long, default_value_t = 1)]
        epochs: usize,
        /// Use only the first K batches of each epoch.
        #[arg(long)]
        max_batches: Option<usize>,
        /// Test data for the accuracy curve (else accuracy is on the training data).
        #[arg(long, requires = "test_labels")]
        test_data: Option<PathBuf>,
        /// Class labels of the test data.
        #[arg(long, requires = "test_data")]
        test_labels: Option<PathBuf>,
        /// Accuracy after every step, timings and settings, as JSON.
        #[arg(long)]
        history: Option<PathBuf>,
        /// The accuracy curve (ours and float SGD's) as SVG.
        #[arg(long)]
        plot: Option<PathBuf>,
        /// Also write DIR/weights.npy [features, scores] and DIR/bias.npy [scores].
        #[arg(long)]
        weights_dir: Option<PathBuf>,
        /// Seed for the rounding dither (and the simulated noise).
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[command(flatten)]
        spec: train::SpecArgs,
    },
    /// Data owner: compile the encrypted training step (for the data's shape) into TRAIN.veil.
    TrainCompile {
        /// Read the number of features and the classes from the data …
        #[arg(long, requires = "labels")]
        data: Option<PathBuf>,
        #[arg(long, requires = "data")]
        labels: Option<PathBuf>,
        /// … or give them.
        #[arg(long, conflicts_with = "data")]
        features: Option<usize>,
        #[arg(long, value_delimiter = ',', allow_hyphen_values = true, conflicts_with = "data")]
        classes: Option<Vec<i64>>,
        #[arg(long, short)]
        output: PathBuf,
        #[command(flatten)]
        spec: train::SpecArgs,
    },
    /// Data owner: encrypt the training data into batches, and optionally zero starting weights.
    TrainEncrypt {
        /// The training model (from train-compile).
        model: PathBuf,
        /// The secret key (from keygen).
        #[arg(long)]
        client_key: PathBuf,
        /// Features: float32 [samples, features].
        #[arg(long)]
        data: PathBuf,
        /// Class labels: integers [samples].
        #[arg(long)]
        labels: PathBuf,
        /// Encrypted batches (for the server).
        #[arg(long, short)]
        output: PathBuf,
        /// Also write encrypted zero weights to start from.
        #[arg(long)]
        initial_weights: Option<PathBuf>,
        /// Seed of the rounding dither (default: random).
        #[arg(long)]
        seed: Option<u64>,
    },
    /// Server: run training epochs on encrypted batches, from encrypted weights to new
    /// ones, with the server key only.
    TrainRun {
        /// The training model (from train-compile).
        model: PathBuf,
        /// The evaluation keys (from keygen; no secret).
        #[arg(long)]
        server_key: PathBuf,
        /// Encrypted batches; several files are one epoch in order (data in parts).
        #[arg(long, required = true)]
        batches: Vec<PathBuf>,
        /// Encrypted weights to start from.
        #[arg(long)]
        weights: PathBuf,
        /// Encrypted weights after training (written after every epoch).
        #[arg(long, short)]
        output: PathBuf,
        #[arg(long, default_value_t = 1)]
        epochs: usize,
    },
    /// Data owner: decrypt trained weights into an ONNX model (and .npy weights).
    TrainDecrypt {
        /// The training model (from train-compile).
        model: PathBuf,
        /// The secret key (from keygen).
        #[arg(long)]
        client_key: PathBuf,
        /// Encrypted weights (from train-run).
        #[arg(long)]
        weights: PathBuf,
        /// The trained model (ONNX: ai.onnx.ml LinearClassifier).
        #[arg(long, short)]
        output: PathBuf,
        /// Also write DIR/weights.npy [features, scores] and DIR/bias.npy [scores].
        #[arg(long)]
        weights_dir: Option<PathBuf>,
        /// Print the accuracy on test data.
        #[arg(long, requires = "test_labels")]
        test_data: Option<PathBuf>,
        #[arg(long, requires = "test_data")]
        test_labels: Option<PathBuf>,
    },
    /// Compile a model from models/, encrypt a few test inputs, run them encrypted, and
    /// compare the decrypted outputs with the clear ones.
    Demo {
        /// A folder under models/.
        #[arg(long, default_value = "mlp_digits")]
        model: String,
        #[arg(long, default_value_t = 4)]
        samples: usize,
        #[arg(long, default_value_os_t = bench::default_models_dir())]
        models_dir: PathBuf,
    },
    /// Serve compiled models over HTTP: data owners register a server key once, then send
    /// ciphertexts (synchronously or as jobs). Keys and jobs persist in --data-dir.
    Serve {
        /// Compiled models (.veil), each served under its file name without extension.
        #[arg(required = true)]
        models: Vec<PathBuf>,
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: String,
        #[arg(long, default_value = "veil-data")]
        data_dir: PathBuf,
        /// Largest request other than a key upload (MB).
        #[arg(long, default_value_t = 256)]
        max_request_mb: usize,
        /// Server keys kept loaded (each ~100–200 MB in memory).
        #[arg(long, default_value_t = 4)]
        cached_keys: usize,
        /// Queue jobs in PostgreSQL (postgres://user:password@host/db) for `veil worker`
        /// processes instead of evaluating them here. --data-dir must then be shared with
        /// the workers. VEIL_QUEUE keeps the password out of `ps`.
        #[arg(long, env = "VEIL_QUEUE", hide_env_values = true)]
        queue: Option<String>,
        /// With --queue: split each job into tasks of this many samples.
        #[arg(long, default_value_t = 1)]
        samples_per_task: usize,
        /// Delete finished jobs and their files this long after they end (0: keep them
        /// until a client deletes them).
        #[arg(long, default_value_t = 72.0)]
        keep_jobs_hours: f64,
    },
    /// Evaluate jobs from a `veil serve --queue postgres://…` service: take tasks from the
    /// queue, evaluate them with the server keys in the shared --data-dir, until Ctrl-C
    /// or SIGTERM (the task in hand is finished first). Run as many as you have machines.
    Worker {
        /// The compiled models the service serves (the same files).
        #[arg(required = true)]
        models: Vec<PathBuf>,
        /// The service's queue: postgres://user:password@host/db (add ?sslmode=require for
        /// TLS; percent-encode special characters in the password).
        #[arg(long, env = "VEIL_QUEUE", hide_env_values = true)]
        queue: String,
        /// The service's data directory (shared: keys and job inputs are read from it,
        /// outputs written to it).
        #[arg(long, default_value = "veil-data")]
        data_dir: PathBuf,
        /// Server keys kept loaded (each ~100–200 MB in memory).
        #[arg(long, default_value_t = 4)]
        cached_keys: usize,
        /// A task whose worker stops renewing its lease for this long goes to another
        /// worker (the lease is renewed every third of it).
        #[arg(long, default_value_t = 30.0)]
        lease_seconds: f64,
        /// The name recorded on the tasks this worker claims (default: host-pid).
        #[arg(long)]
        name: Option<String>,
    },
    /// Use a `veil serve` service: register a server key, run ciphertexts remotely.
    Remote {
        #[command(subcommand)]
        action: RemoteAction,
    },
    /// Measure every model in models/: compile, keygen, key size, lookups, precision,
    /// encrypted latency and accuracy (float / clear / simulate / execute); and every
    /// training set: lookups and seconds per batch, keys, accuracy per epoch vs float SGD.
    Bench {
        /// Model folders to run (default: the models directly under models/).
        #[arg(long, value_delimiter = ',')]
        models: Vec<String>,
        /// Test samples run encrypted per model.
        #[arg(long, default_value_t = 10)]
        samples: usize,
        /// Training batches run encrypted per training set (timing; accuracy is simulated).
        #[arg(long, default_value_t = 3)]
        train_batches: usize,
        #[arg(long)]
        json: Option<PathBuf>,
        #[arg(long, default_value_os_t = bench::default_models_dir())]
        models_dir: PathBuf,
    },
}

#[derive(clap::Args, Clone)]
struct CompileArgs {
    /// Fix input, weight and activation bit widths instead of searching them.
    #[arg(long)]
    n_bits: Option<u32>,
    /// Allowed disagreement with the float model on the calibration set (1 − argmax
    /// agreement for classifiers, 1 − R² for regressors).
    #[arg(long, default_value_t = 0.01)]
    accuracy_tolerance: f64,
    /// Failure probability per table lookup [default: 2^-40, unless --global-p-error is
    /// given].
    #[arg(long)]
    p_error: Option<f64>,
    /// Failure probability per sample, all its lookups together: each lookup gets this
    /// divided by the lookups per sample (with --p-error too, the stricter of the two).
    #[arg(long)]
    global_p_error: Option<f64>,
    /// Run every lookup with one parameter set. By default lookups of different
    /// precisions may use different sets (keyswitching between them) when that models at
    /// least 10% cheaper; `veil inspect --stage report` lists the sets.
    #[arg(long)]
    one_parameter_set: bool,
    /// Widest lookup precision allowed (bits).
    #[arg(long, default_value_t = veil_passes::bitwidth::MAX_PRECISION)]
    max_precision: u32,
    /// Tree ensembles: most partial sums over groups of trees a score may be sent as
    /// (the client adds them). More parts can take a bootstrap level off every leaf
    /// lookup but multiply the download; 1 sends whole scores.
    #[arg(long, default_value_t = veil_passes::trees::sums::MAX_GROUPS)]
    max_score_parts: usize,
    /// What the outputs are, which decides how faithfulness is scored: classification
    /// (argmax agreement) or regression (R² per output; also for element-wise maps).
    /// Default: from the model, else from its output's shape.
    #[arg(long, value_enum)]
    task: Option<TaskArg>,
    /// Refuse to compile when no quantization meets the tolerance (by default the best one
    /// found is compiled, with a warning saying how far it is).
    #[arg(long)]
    strict_tolerance: bool,
    /// Classifiers: judge the tolerance on the calibration rows and, separately, on as
    /// many rows mixed from pairs of them near the decision boundaries, instead of the
    /// calibration rows alone. Calibration rows are usually training rows, on which
    /// agreement overstates agreement on new data; this tracks it better, and may choose
    /// wider lookups. By default the search does so within twice the lookup time. The
    /// report gives the agreement on the mixed rows either way.
    #[arg(long)]
    score_near_boundary: bool,
    /// Keep trailing non-linear ops (activations, sigmoid) on the server as lookups, so
    /// the client never sees pre-activation values (costs lookups). Softmax, argmax and
    /// label mapping always run on the client.
    #[arg(long)]
    server_activations: bool,
    /// Tree ensembles: who computes the threshold tests. `client` (default): the client
    /// sends each test's bit, one ciphertext per threshold, and the server only does the
    /// leaf lookups. `server`: the client sends each feature's rank among the trees'
    /// thresholds and the server compares, one lookup per distinct (feature, threshold):
    /// 2–4× slower, a smaller upload. Either way the client's model file holds the
    /// thresholds, so neither reveals more to the client.
    #[arg(long, value_enum, default_value_t = TreeTests::Client)]
    tree_tests: TreeTests,
}

#[derive(Clone, Copy, ValueEnum, PartialEq)]
enum TreeTests {
    Server,
    Client,
}

#[derive(Subcommand)]
enum RemoteAction {
    /// Upload a server key for a served model once; writes a session file (server, key
    /// id, access token) that `veil remote run` uses.
    Register {
        /// The service, e.g. http://127.0.0.1:8080
        #[arg(long)]
        server: String,
        /// The model's name on the service (its file name without .veil).
        #[arg(long)]
        model: String,
        #[arg(long)]
        server_key: PathBuf,
        /// Where to write the session (it holds the access token: keep it private).
        #[arg(long, short = 'o')]
        session: PathBuf,
    },
    /// Send a ciphertext file (from veil encrypt); write the encrypted outputs (for veil
    /// decrypt).
    Run {
        #[arg(long)]
        session: PathBuf,
        #[arg(long, short = 'i')]
        input: PathBuf,
        #[arg(long, short = 'o')]
        output: PathBuf,
        /// Submit as a job and poll until done, instead of one long request (the job is
        /// deleted on the server once its result is fetched).
        #[arg(long)]
        job: bool,
    },
    /// Wait for a job submitted earlier (`veil remote run --job` prints its id) and write
    /// its encrypted outputs; the job is then deleted on the server.
    Fetch {
        /// The session file written by `veil remote register`.
        #[arg(long)]
        session: PathBuf,
        /// The job's id.
        #[arg(long)]
        job: String,
        /// Where to write the encrypted outputs (for veil decrypt).
        #[arg(long, short = 'o')]
        output: PathBuf,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum TaskArg {
    Classification,
    Regression,
}

impl CompileArgs {
    fn options(&self) -> Result<CompileOptions> {
        if !(0.0..1.0).contains(&self.accuracy_tolerance) {
            bail!("--accuracy-tolerance must be in [0, 1)");
        }
        for (name, p) in [("--p-error", self.p_error), ("--global-p-error", self.global_p_error)] {
            if let Some(p) = p {
                if !(p > 0.0 && p < 1.0) {
                    bail!("{name} must be a probability in (0, 1)");
                }
            }
        }
        if let Some(n) = self.n_bits {
            if !(2..=16).contains(&n) {
                bail!("--n-bits must be between 2 and 16");
            }
        }
        if !(2..=8).contains(&self.max_precision) {
            bail!("--max-precision must be between 2 and 8");
        }
        if !(1..=veil_passes::trees::sums::MAX_GROUPS).contains(&self.max_score_parts) {
            bail!("--max-score-parts must be between 1 and {}", veil_passes::trees::sums::MAX_GROUPS);
        }
        Ok(CompileOptions {
            search: SearchOptions {
                n_bits: self.n_bits,
                tolerance: self.accuracy_tolerance,
                max_precision: self.max_precision,
                strict: self.strict_tolerance,
                near_boundary: self.score_near_boundary,
                server_tail: self.server_activations,
                client_tree_tests: self.tree_tests == TreeTests::Client,
                task: self.task.map(|t| match t {
                    TaskArg::Classification => veil_ir::Task::Classification,
                    TaskArg::Regression => veil_ir::Task::Regression,
                }),
                ..CompileOptions::default().search
            },
            // With only a per-sample bound, it alone constrains each lookup.
            p_error: match (self.p_error, self.global_p_error) {
                (Some(p), _) => p,
                (None, Some(_)) => 1.0,
                (None, None) => CompileOptions::default().p_error,
            },
            global_p_error: self.global_p_error,
            several_sets: !self.one_parameter_set,
            max_score_parts: self.max_score_parts,
        })
    }
}

#[derive(Clone, Copy, ValueEnum, PartialEq)]
enum Stage {
    /// The float graph as imported.
    Float,
    /// The integer graph the quantizer made, before fusion.
    Quantized,
    /// The final integer graph: fused, with compiled ranges and roundings.
    Fused,
    /// The compile report and crypto parameters.
    Report,
}

#[derive(Clone, Copy, ValueEnum)]
enum Format {
    Text,
    Dot,
    Json,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Debug)]
pub enum Mode {
    Float,
    Clear,
    Simulate,
    Execute,
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
        Command::Compile { model, calib, output, opts } => compile(&model, &calib, &output, &opts),
        Command::Inspect { model, stage, format, output } => inspect(&model, stage, format, output.as_deref()),
        Command::Predict { model, input, output, mode, outputs_dir, strict_ranges } => {
            predict(&model, &input, &output, mode, outputs_dir.as_deref(), strict_ranges)
        }
        Command::Keygen { model, out_dir } => fhe::keygen_cmd(&model, &out_dir),
        Command::Encrypt { model, client_key, input, output, strict_ranges } => {
            fhe::encrypt_cmd(&model, &client_key, &input, &output, strict_ranges)
        }
        Command::Run { model, server_key, input, output } => fhe::run_cmd(&model, &server_key, &input, &output),
        Command::Decrypt { model, client_key, input, output, outputs_dir } => {
            fhe::decrypt_cmd(&model, &client_key, &input, &output, outputs_dir.as_deref())
        }
        Command::Train {
            data,
            labels,
            mode,
            output,
            epochs,
            max_batches,
            test_data,
            test_labels,
            history,
            plot,
            weights_dir,
            seed,
            spec,
        } => train::train(&train::TrainCmd {
            data,
            labels,
            mode,
            output,
            epochs,
            max_batches,
            test: test_data.zip(test_labels),
            history,
            plot,
            weights_dir,
            seed,
            spec,
        }),
        Command::TrainCompile { data, labels, features, classes, output, spec } => {
            train_files::compile_cmd(&train_files::Shape { data: data.zip(labels), features, classes }, &spec, &output)
        }
        Command::TrainEncrypt { model, client_key, data, labels, output, initial_weights, seed } => {
            train_files::encrypt_cmd(&train_files::EncryptCmd {
                model,
                client_key,
                data,
                labels,
                output,
                initial_weights,
                seed,
            })
        }
        Command::TrainRun { model, server_key, batches, weights, output, epochs } => {
            train_files::run_cmd(&train_files::RunCmd { model, server_key, batches, weights, output, epochs })
        }
        Command::TrainDecrypt { model, client_key, weights, output, weights_dir, test_data, test_labels } => {
            train_files::decrypt_cmd(&train_files::DecryptCmd {
                model,
                client_key,
                weights,
                output,
                weights_dir,
                test: test_data.zip(test_labels),
            })
        }
        Command::Demo { model, samples, models_dir } => bench::demo(&models_dir, &model, samples),
        Command::Serve {
            models,
            listen,
            data_dir,
            max_request_mb,
            cached_keys,
            queue,
            samples_per_task,
            keep_jobs_hours,
        } => {
            let mut config = veil_service::Config::new(models, data_dir);
            config.max_request_bytes = max_request_mb << 20;
            config.cached_keys = cached_keys;
            // an empty VEIL_QUEUE means the embedded queue
            config.queue = queue.filter(|q| !q.trim().is_empty());
            if samples_per_task == 0 {
                anyhow::bail!("--samples-per-task must be at least 1");
            }
            if config.queue.is_none() && samples_per_task != 1 {
                eprintln!(
                    "warning: --samples-per-task only applies with --queue (the embedded queue runs each job whole)"
                );
            }
            config.samples_per_task = samples_per_task;
            if !(keep_jobs_hours.is_finite() && keep_jobs_hours >= 0.0) {
                anyhow::bail!("--keep-jobs-hours must be a number of hours ≥ 0 (got {keep_jobs_hours})");
            }
            config.keep_jobs =
                (keep_jobs_hours > 0.0).then(|| std::time::Duration::from_secs_f64(keep_jobs_hours * 3600.0));
            remote::serve(config, &listen)
        }
        Command::Worker { models, queue, data_dir, cached_keys, lease_seconds, name } => {
            let mut config = veil_service::worker::WorkerConfig::new(models, data_dir, queue);
            config.cached_keys = cached_keys;
            if !(lease_seconds.is_finite() && lease_seconds >= 1.0) {
                anyhow::bail!("--lease-seconds must be at least 1 (got {lease_seconds})");
            }
            config.lease = std::time::Duration::from_secs_f64(lease_seconds);
            if let Some(name) = name {
                config.name = name;
            }
            remote::worker(config)
        }
        Command::Remote { action: RemoteAction::Register { server, model, server_key, session } } => {
            remote::register(&server, &model, &server_key, &session)
        }
        Command::Remote { action: RemoteAction::Run { session, input, output, job } } => {
            remote::run(&session, &input, &output, job)
        }
        Command::Remote { action: RemoteAction::Fetch { session, job, output } } => {
            remote::fetch(&session, &job, &output)
        }
        Command::Bench { models, samples, train_batches, json, models_dir } => {
            bench::bench(&models_dir, &models, samples, train_batches, json.as_deref())
        }
    }
}

fn compile(model: &Path, calib: &Path, output: &Path, args: &CompileArgs) -> Result<()> {
    let opts = args.options()?;
    npy::check_writable(output, "the compiled model")?;
    let g = match model::load(model)? {
        model::Model::Onnx(g) => g,
        model::Model::Compiled(_) => bail!("{} is already compiled", model.display()),
    };
    let names = input_names(&g);
    let xs = npy::read_model_inputs(calib, &names)?;
    let has_trees = g.node_ids().any(|id| matches!(g.node(id).op, veil_ir::Op::TreeEnsemble(_)));
    let tree_flags =
        args.tree_tests != TreeTests::Client || args.max_score_parts != veil_passes::trees::sums::MAX_GROUPS;
    if tree_flags && !has_trees {
        eprintln!(
            "warning: --tree-tests and --max-score-parts apply to tree ensembles; {} has none, so they change nothing",
            model.display()
        );
    }
    let start = Instant::now();
    let (artifact, _) = veil_backend::pipeline::compile(&g, &xs, &opts)
        .with_context(|| format!("compiling {} with calibration data {}", model.display(), calib.display()))?;
    artifact.write(output)?;
    eprint!("{}", report::text(&artifact, false));
    let near = artifact.report.near_boundary_score;
    if args.score_near_boundary && near.is_none() {
        eprintln!(
            "warning: --score-near-boundary applies to classifiers whose bit widths are searched; {} is scored otherwise (a regressor or a tree ensemble), so it changes nothing",
            model.display()
        );
    }
    eprintln!("compiled {} in {:.2} s → {}", model.display(), start.elapsed().as_secs_f64(), output.display());
    Ok(())
}

/// A float graph's input names, in order.
pub fn input_names(g: &veil_ir::Graph) -> Vec<String> {
    g.inputs().iter().map(|&i| g.node(i).name.clone()).collect()
}

fn inspect(path: &Path, stage: Stage, format: Format, output: Option<&Path>) -> Result<()> {
    let m = model::load(path)?;
    let text = if stage == Stage::Report {
        let model::Model::Compiled(a) = &m else {
            bail!("the report belongs to a compiled model; compile {} first", path.display())
        };
        match format {
            Format::Json => serde_json::to_string_pretty(&report::json(a))?,
            _ => report::text(a, true),
        }
    } else {
        let graph = match (stage, &m) {
            (Stage::Float, m) => m.float_graph()?,
            (Stage::Quantized, model::Model::Compiled(a)) => {
                veil_backend::artifact::graph_from_json(&a.stages.quantized_json, "quantized")?
            }
            (Stage::Fused, model::Model::Compiled(a)) => a.integer_graph()?,
            (_, model::Model::Onnx(_)) => {
                bail!("an ONNX file only has the float stage; compile it to see the integer stages")
            }
            (Stage::Report, _) => unreachable!(),
        };
        match format {
            Format::Text => veil_ir::print::to_text(&graph),
            Format::Dot => veil_ir::print::to_dot(&graph),
            Format::Json => veil_ir::print::to_json(&graph)?,
        }
    };
    match output {
        Some(p) => npy::write_atomic(p, |w| Ok(std::io::Write::write_all(w, text.as_bytes())?)),
        None => {
            print!("{text}");
            Ok(())
        }
    }
}

fn predict(
    path: &Path,
    input: &Path,
    output: &Path,
    mode: Option<Mode>,
    outputs_dir: Option<&Path>,
    strict_ranges: bool,
) -> Result<()> {
    npy::check_writable(output, "the predictions")?;
    let m = model::load(path)?;
    if let model::Model::Compiled(a) = &m {
        if a.training.is_some() {
            bail!(
                "{} is a training model; it has no predictions (train it: veil train-encrypt, train-run, train-decrypt)",
                path.display()
            );
        }
    }
    let names = match &m {
        model::Model::Onnx(g) => input_names(g),
        model::Model::Compiled(a) => a.client.model_inputs.clone(),
    };
    let xs = npy::read_model_inputs(input, &names)?;
    let mode = mode.unwrap_or(match m {
        model::Model::Onnx(_) => Mode::Float,
        model::Model::Compiled(_) => Mode::Clear,
    });
    let start = Instant::now();
    let (names, outs) = match (&m, mode) {
        (m, Mode::Float) => {
            let g = m.float_graph()?;
            let outs = veil_ir::interp::run(&g, &xs)
                .with_context(|| format!("running {} on {}", path.display(), input.display()))?;
            (g.outputs().iter().map(|o| o.name.clone()).collect::<Vec<_>>(), outs)
        }
        (model::Model::Onnx(_), _) => bail!(
            "{} is an ONNX model: only --mode float runs it; compile it for clear, simulate and execute",
            path.display()
        ),
        (model::Model::Compiled(a), mode) => {
            let outs = fhe::run_checked(a, &xs, mode, strict_ranges)
                .with_context(|| format!("running {} on {}", path.display(), input.display()))?;
            (a.client.model_outputs.clone(), outs)
        }
    };
    write_outputs(output, outputs_dir, &names, &outs)?;
    eprintln!(
        "{mode:?} run of {} sample(s) in {:.3} s → {}",
        xs.first().map_or(0, |x| x.shape()[0]),
        start.elapsed().as_secs_f64(),
        output.display()
    );
    Ok(())
}

/// Write the first floating-point output to `output` and, optionally, every output.
pub fn write_outputs(output: &Path, outputs_dir: Option<&Path>, names: &[String], outs: &[Tensor]) -> Result<()> {
    let (_, y) = names
        .iter()
        .zip(outs)
        .find(|(_, t)| matches!(t, Tensor::F32(_)))
        .context("the model has no floating-point output")?;
    npy::write(output, y)?;
    if let Some(dir) = outputs_dir {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        for (name, t) in names.iter().zip(outs) {
            npy::write(&dir.join(format!("{}.npy", npy::file_name(name))), t)?;
        }
    }
    Ok(())
}
