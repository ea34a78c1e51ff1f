//! The whole compiler: float graph + calibration data → compiled artifact.

use crate::artifact::{graph_to_json, Artifact};
use crate::error::Result;
use crate::lower::{lower, Lowered};
use crate::params::{optimize, Params};
use crate::proto;
use std::collections::HashMap;
use std::time::Instant;
use veil_ir::{Elem, Graph, NodeId, Op, Tensor};
use veil_passes::bitwidth::{compile as search, Compiled, Metric, SearchOptions};
use veil_passes::digits::split_outputs;
use veil_passes::trees::sums::{split_scores, trees_in_scores, MAX_GROUPS};
use veil_passes::QuantizedModel;

#[derive(Clone, Debug)]
pub struct CompileOptions {
    pub search: SearchOptions,
    /// Failure probability allowed per lookup.
    pub p_error: f64,
    /// If set, the failure probability allowed for a whole sample (split over its lookups).
    pub global_p_error: Option<f64>,
    /// Let lookups of different precisions use different parameter sets when the modelled
    /// cost is lower (see [`crate::partitions`]); false: one set for the whole circuit.
    pub several_sets: bool,
    /// Most partial sums a tree score may be sent as (see `veil_passes::trees::sums`);
    /// 1: whole scores.
    pub max_score_parts: usize,
}

impl Default for CompileOptions {
    fn default() -> Self {
        CompileOptions {
            search: SearchOptions { lookup_cost: crate::params::typical_lookup_cost_ms, ..SearchOptions::default() },
            p_error: 2f64.powi(-40),
            global_p_error: None,
            several_sets: true,
            max_score_parts: MAX_GROUPS,
        }
    }
}

/// Compile a float graph with its calibration inputs.
pub fn compile(float: &Graph, calibration: &[Tensor], opts: &CompileOptions) -> Result<(Artifact, Compiled)> {
    let start = Instant::now();
    let mut search_opts = opts.search.clone();
    search_opts.p_error = opts.global_p_error.map_or(opts.p_error, |g| g.min(opts.p_error));
    let mut compiled = search(float, calibration, &search_opts)?;
    let outputs = match cheapest_outputs(&compiled, calibration, opts) {
        // |x| reads keep accumulators on a linear path whose noise can leave no
        // parameters; tables reset the scale (see `SearchOptions::kink_tables`). If
        // tables fail too, the first error is the one to report.
        Err(e) if !search_opts.kink_tables => {
            let tables = SearchOptions { kink_tables: true, ..search_opts.clone() };
            let (c, o) = search(float, calibration, &tables)
                .map_err(Into::into)
                .and_then(|c| cheapest_outputs(&c, calibration, opts).map(|o| (c, o)))
                .map_err(|_| e)?;
            compiled = c;
            o
        }
        other => other?,
    };
    let Outputs { model, digits, score_parts, mut lowered, mut params } = outputs;
    if opts.several_sets {
        if let Some((l, p)) = partitioned(&model, &lowered, &params, opts)? {
            (lowered, params) = (l, p);
        }
    }
    compiled.model = model;
    let lookups = lowered.circuit.lookups_per_sample();
    let mut report = report(&compiled, lookups, start.elapsed().as_secs_f64(), opts.search.tolerance);
    report.output_digits = digits;
    report.score_parts = score_parts;
    report.accuracy_warning = compiled.below_tolerance.clone().unwrap_or_default();
    let stages = proto::Stages {
        float_json: graph_to_json(float),
        quantized_json: graph_to_json(&compiled.unfused),
        fused_json: graph_to_json(&compiled.model.graph),
    };
    let artifact = Artifact::new(float.name.clone(), params, lowered.circuit, lowered.client, report, stages);
    Ok((artifact, compiled))
}

/// Most digits a decrypted output is split into.
pub const MAX_OUTPUT_DIGITS: u32 = 4;

/// How the decrypted outputs are sent: the model, digits per wide output, partial sums
/// per tree score (1: whole), and its lowering with parameters.
struct Outputs {
    model: QuantizedModel,
    digits: u32,
    score_parts: u32,
    lowered: Lowered,
    params: Params,
}

/// Lower and choose parameters with outputs whole, wide outputs split into 2..=4 digits
/// (see `veil_passes::digits`) and tree scores split into partial sums over 2, 4, …
/// groups of trees (see `veil_passes::trees::sums`); keep the variant with the cheapest
/// lookups (fewer parts on a tie). Splitting only helps when an output's noise bound
/// forces the lookups feeding it onto costlier parameters.
fn cheapest_outputs(compiled: &Compiled, calibration: &[Tensor], opts: &CompileOptions) -> Result<Outputs> {
    let price = |model: QuantizedModel, digits: u32, score_parts: u32| -> Result<(f64, Outputs)> {
        let mut lowered = lower(&model, compiled.precision)?;
        let lookups = lowered.circuit.lookups_per_sample();
        lowered.requirements.p_error = per_lookup_p_error(lookups, opts);
        let params = optimize(&lowered.requirements)?;
        let cost = lookups as f64 * params.pbs_cost_ms;
        Ok((cost, Outputs { model, digits, score_parts, lowered, params }))
    };
    let mut best: Option<(f64, Outputs)> = None;
    let mut first_err = None;
    // keep a variant only if clearly cheaper than the best so far; Some(false): priced,
    // not cheaper; None: no parameters fit it
    let mut consider = |v: Result<(f64, Outputs)>, best: &mut Option<(f64, Outputs)>| -> Option<bool> {
        match v {
            Ok((cost, o)) if best.as_ref().is_none_or(|b| cost < b.0 * 0.99) => {
                *best = Some((cost, o));
                Some(true)
            }
            Ok(_) => Some(false),
            Err(e) => {
                first_err.get_or_insert(e);
                None
            }
        }
    };
    consider(price(compiled.model.clone(), 1, 1), &mut best);
    for digits in 2..=MAX_OUTPUT_DIGITS {
        let Some(m) = split_outputs(&compiled.model, digits, calibration, opts.search.range_margin)? else { break };
        if consider(price(m, digits, 1), &mut best) == Some(false) {
            break; // more digits only narrow the outputs further: no gain past the first none
        }
    }
    if let Some(trees) = trees_in_scores(&compiled.model) {
        // 2, 4, 8, … groups, then one per tree; a coarser split may stay on the same
        // parameters while a finer one drops a level, so every count is priced
        let most = trees.min(opts.max_score_parts).min(MAX_GROUPS);
        let mut counts: Vec<usize> = (1..).map(|k| 1usize << k).take_while(|&g| g < most).collect();
        counts.push(most);
        for groups in counts.into_iter().filter(|&g| g >= 2) {
            if let Some(m) = split_scores(&compiled.model, groups)? {
                let parts = groups.min(trees) as u32;
                consider(price(m, 1, parts), &mut best);
            }
        }
    }
    match best {
        Some((_, o)) => Ok(o),
        None => Err(first_err.expect("whole outputs are always tried")),
    }
}

/// The failure probability per lookup for a circuit of `lookups` lookups.
fn per_lookup_p_error(lookups: usize, opts: &CompileOptions) -> f64 {
    match opts.global_p_error {
        // Union bound: lookups × p ≤ g.
        Some(g) if lookups > 0 => (g / lookups as f64).min(opts.p_error),
        Some(g) => g.min(opts.p_error),
        None => opts.p_error,
    }
}

/// Lookup nodes whose outputs meet in a linear map must share a large key, so a
/// partition holds whole groups: each lookup node's group (a representative node id).
/// Maxima and saturations add their operand to their lookup's output, so they join their
/// operands' group too.
fn lookup_groups(g: &Graph, order: &[NodeId]) -> HashMap<NodeId, usize> {
    let size = order.iter().map(|id| id.index() + 1).max().unwrap_or(0);
    let mut groups = petgraph::unionfind::UnionFind::<usize>::new(size);
    for &id in order {
        let starts_key = matches!(g.node(id).op, Op::Tlu(_));
        if starts_key || !matches!(g.node(id).ty.elem, Elem::Enc(_)) {
            continue;
        }
        for o in g.operands(id) {
            if matches!(g.node(o).ty.elem, Elem::Enc(_)) {
                groups.union(o.index(), id.index());
            }
        }
    }
    order
        .iter()
        .filter(|&&id| veil_passes::bitwidth::max_precision_of(g, id) > 0)
        .map(|&id| (id, groups.find(id.index())))
        .collect()
}

/// The model lowered in two partitions — lookup groups (see [`lookup_groups`]) whose
/// widest lookup has at most t bits, and the rest — for the split t with the lowest
/// modelled cost, when some split beats the single set `single` (see
/// [`crate::partitions`]). Circuits with products of encrypted values keep one set.
fn partitioned(
    model: &QuantizedModel,
    single_lowered: &Lowered,
    single: &Params,
    opts: &CompileOptions,
) -> Result<Option<(Lowered, Params)>> {
    let g = &model.graph;
    let order = g.topo_order().unwrap_or_default();
    if order.iter().any(|&id| matches!(g.node(id).op, Op::MatMulEnc)) || !single.has_lookups() {
        return Ok(None);
    }
    let groups = lookup_groups(g, &order);
    let mut group_bits: HashMap<usize, u32> = HashMap::new();
    for (&id, &grp) in &groups {
        let b = group_bits.entry(grp).or_insert(0);
        *b = (*b).max(veil_passes::bitwidth::max_precision_of(g, id));
    }
    let mut widths: Vec<u32> = group_bits.values().copied().collect();
    widths.sort_unstable();
    widths.dedup();
    let Some(&widest) = widths.last() else { return Ok(None) };
    let mut best: Option<(f64, Lowered, Params)> = None;
    for &t in &widths[..widths.len() - 1] {
        let part_of = |id| groups.get(&id).map_or(0, |grp| usize::from(group_bits[grp] > t));
        let Ok(mut lowered) = crate::lower::lower_partitioned(model, &part_of, &[t, widest]) else { continue };
        if lowered.circuit.lookups_per_sample() != single_lowered.circuit.lookups_per_sample() {
            continue; // a split changing what bootstraps share is not the same circuit
        }
        lowered.requirements.p_error = per_lookup_p_error(lowered.circuit.lookups_per_sample(), opts);
        if let Some((params, cost)) = crate::partitions::optimize(&lowered.requirements, single) {
            if best.as_ref().is_none_or(|b| cost < b.0) {
                best = Some((cost, lowered, params));
            }
        }
    }
    Ok(best.map(|(_, l, p)| (l, p)))
}

/// Per-layer bit widths and lookup counts of the final integer graph.
fn report(c: &Compiled, lookups: usize, seconds: f64, tolerance: f64) -> proto::Report {
    let g = &c.model.graph;
    let mut layers = Vec::new();
    for id in g.topo_order().unwrap_or_default() {
        let node = g.node(id);
        let Elem::Enc(r) = node.ty.elem else { continue };
        let (count, precision, rounding) = match &node.op {
            Op::Tlu(t) => (node.ty.shape.fixed_volume(), t.input_bits(), t.rounding),
            Op::MaxEnc { rounding, .. } | Op::AbsEnc { rounding, .. } => {
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
            Metric::ArgmaxAgreement => format!("argmax agreement with the float model ({})", c.metric_source),
            Metric::R2 => format!("R² against the float model, worst output ({})", c.metric_source),
        },
        calibration_score: c.score,
        compile_seconds: seconds,
        layers,
        lookups_before_fusion: c.fuse.lookups_before as u32,
        output_bits: c.output_bits,
        output_digits: 1,
        score_parts: 1,
        accuracy_warning: String::new(),
        near_boundary_score: c.near_boundary,
        scored_near_boundary: c.scored_near_boundary,
        near_boundary_short: c.near_boundary_short,
        calibration_agreement: c.calibration_agreement,
        accuracy_tolerance: tolerance,
        trials: c
            .trials
            .iter()
            .map(|t| proto::Trial {
                precision: t.precision,
                input_bits: t.config.input_bits,
                weight_bits: t.config.weight_bits,
                act_bits: t.config.act_bits,
                output_bits: t.output_bits,
                commute_max: t.commute_max,
                lookups: t.lookups as u32,
                score: t.score,
                accepted: t.accepted,
            })
            .collect(),
    }
}
