//! The whole compiler: float graph + calibration data → compiled artifact.

use crate::artifact::{graph_to_json, Artifact};
use crate::error::Result;
use crate::lower::lower;
use crate::params::optimize;
use crate::proto;
use std::time::Instant;
use veil_ir::{Elem, Graph, Op, Tensor};
use veil_passes::bitwidth::{compile as search, Compiled, Metric, SearchOptions};

#[derive(Clone, Debug)]
pub struct CompileOptions {
    pub search: SearchOptions,
    /// Failure probability allowed per lookup.
    pub p_error: f64,
    /// If set, the failure probability allowed for a whole sample (split over its lookups).
    pub global_p_error: Option<f64>,
}

impl Default for CompileOptions {
    fn default() -> Self {
        CompileOptions { search: SearchOptions::default(), p_error: 2f64.powi(-40), global_p_error: None }
    }
}

/// Compile a float graph with its calibration inputs.
pub fn compile(float: &Graph, calibration: &[Tensor], opts: &CompileOptions) -> Result<(Artifact, Compiled)> {
    let start = Instant::now();
    let mut search_opts = opts.search.clone();
    search_opts.p_error = opts.global_p_error.map_or(opts.p_error, |g| g.min(opts.p_error));
    let compiled = search(float, calibration, &search_opts)?;
    let mut lowered = lower(&compiled.model, compiled.precision)?;
    let lookups = lowered.circuit.lookups_per_sample();
    lowered.requirements.p_error = match opts.global_p_error {
        Some(g) if lookups > 0 => g / lookups as f64,
        Some(g) => g,
        None => opts.p_error,
    };
    let params = optimize(&lowered.requirements)?;
    let report = report(&compiled, lookups, start.elapsed().as_secs_f64());
    let stages = proto::Stages {
        float_json: graph_to_json(float),
        quantized_json: graph_to_json(&compiled.unfused),
        fused_json: graph_to_json(&compiled.model.graph),
    };
    let artifact = Artifact::new(float.name.clone(), params, lowered.circuit, lowered.client, report, stages);
    Ok((artifact, compiled))
}

/// Per-layer bit widths and lookup counts of the final integer graph.
fn report(c: &Compiled, lookups: usize, seconds: f64) -> proto::Report {
    let g = &c.model.graph;
    let mut layers = Vec::new();
    for id in g.topo_order().unwrap_or_default() {
        let node = g.node(id);
        let Elem::Enc(r) = node.ty.elem else { continue };
        let (count, precision, rounding) = match &node.op {
            Op::Tlu(t) => (node.ty.shape.fixed_volume(), t.input_bits(), t.rounding),
            Op::MaxEnc { rounding, .. } => {
                (node.ty.shape.fixed_volume(), veil_passes::bitwidth::max_precision_of(g, id), *rounding)
            }
            Op::Linear(_) | Op::Input { .. } => (0, 0, 0),
            _ => continue,
        };
        layers.push(proto::Layer {
            name: node.name.clone(),
            op: node.op.mnemonic().into(),
            lo: r.lo,
            hi: r.hi,
            lookups: count as u32,
            precision,
            rounding,
        });
    }
    proto::Report {
        input_bits: c.config.input_bits,
        weight_bits: c.config.weight_bits,
        act_bits: c.config.act_bits,
        max_precision: c.precision,
        lookups_per_sample: lookups as u32,
        metric: match c.metric {
            Metric::ArgmaxAgreement => "argmax agreement with the float model".into(),
            Metric::R2 => "R² against the float model".into(),
        },
        calibration_score: c.score,
        compile_seconds: seconds,
        layers,
        lookups_before_fusion: c.fuse.lookups_before as u32,
        output_bits: c.output_bits,
    }
}
