//! The compile report: per layer bit widths and lookups, and the crypto parameters.

use serde_json::{json, Value};
use std::fmt::Write;
use veil_backend::artifact::Artifact;

/// The compile report; `trials` adds every configuration the bit-width search scored.
pub fn text(a: &Artifact, trials: bool) -> String {
    let r = &a.report;
    let p = &a.params;
    let mut s = String::new();
    if a.training.is_some() {
        let _ = writeln!(
            s,
            "model {}: one SGD step, {} lookups per step, widest lookup {} bits; features {} b, weights {} b, errors {} b",
            a.model_name, r.lookups_per_sample, r.max_precision, r.input_bits, r.weight_bits, r.act_bits
        );
    } else {
        // activation widths are those of table outputs: say so only when there are tables
        let tables = r.layers.iter().any(|l| l.op == "tlu" && l.lookups > 0);
        let acts = if tables { format!(", activations {} b", r.act_bits) } else { String::new() };
        let widest = if r.lookups_per_sample > 0 {
            format!("widest lookup {} bits", r.max_precision)
        } else {
            "no lookups".into()
        };
        let _ = writeln!(
            s,
            "model {}: {} lookups/sample (before fusion {}), {widest}; inputs {} b, weights {} b{acts}",
            a.model_name, r.lookups_per_sample, r.lookups_before_fusion, r.input_bits, r.weight_bits
        );
    }
    match &a.training {
        Some(t) => {
            let sp = &t.spec;
            let _ = writeln!(
                s,
                "training: {} features, classes {:?}, batch {}, learning rate {}, L2 {}; features in [{}, {}] as ±{} levels, weights ±{} steps of {:.4}, errors in 1/{}, logits saturate at ±{}, stochastic rounding at 1/{}",
                sp.features,
                sp.classes,
                sp.batch,
                sp.learning_rate,
                sp.l2,
                sp.feature_range.0,
                sp.feature_range.1,
                sp.x_levels,
                t.weight_levels,
                t.weight_scale,
                sp.error_levels,
                sp.logit_bound,
                1u64 << t.dither_bits
            );
        }
        None => {
            // the calibration rows' own agreement when measured (the search's score may be
            // the smaller of it and the near-boundary rows')
            let calib = r.calibration_agreement.unwrap_or(r.calibration_score);
            let _ = writeln!(s, "calibration: {calib:.4} {}", r.metric);
            if let Some(near) = r.near_boundary_score {
                let goal = 1.0 - r.accuracy_tolerance;
                let how = if r.near_boundary_short {
                    format!(
                        "below the {goal:.4} the tolerance asks: the most agreeing result among lookups costing at most twice the calibration-only choice; --score-near-boundary searches wider lookups"
                    )
                } else if r.scored_near_boundary && r.accuracy_warning.is_empty() {
                    "the search met the tolerance on both sets, each on its own".to_string()
                } else if r.scored_near_boundary {
                    "the search scored both sets, each on its own".to_string()
                } else if r.accuracy_tolerance > 0.0 && near >= goal - 1e-12 {
                    "within the tolerance too".to_string()
                } else {
                    "calibration rows are usually training rows: expect agreement on new data between the two figures; --score-near-boundary makes the search meet the tolerance on each set, at any cost".to_string()
                };
                let _ = writeln!(
                    s,
                    "near decision boundaries: {:.4} on rows mixed from pairs of calibration rows of different classes ({how})",
                    near
                );
            }
        }
    }
    if !r.accuracy_warning.is_empty() {
        let _ = writeln!(s, "warning: {}", r.accuracy_warning);
    }
    if r.output_bits > 0 {
        let _ = write!(s, "outputs read to {} significant bits", r.output_bits);
        if r.output_digits > 1 {
            let _ = write!(s, ", sent as {} digits each", r.output_digits);
        }
        if r.score_parts > 1 {
            let _ = write!(s, ", tree scores sent as {} partial sums over groups of trees", r.score_parts);
        }
        let _ = writeln!(s);
    }
    if r.layers.iter().any(|l| l.op == "abs_enc") {
        let _ = writeln!(
            s,
            "(abs_enc: |x| by one lookup on the whole torus; ReLUs are computed as (x + |x|)/2 and maxima as (a + b + |a − b|)/2 with it, so a ReLU shows as the abs_enc of its input, a max pool as the abs_enc of its taps' differences)"
        );
    }
    let _ =
        writeln!(s, "(range: each layer's integer output range; dropped: low bits a lookup's input loses to rounding)");
    let _ = writeln!(s, "{:<40} {:<8} {:>22} {:>8} {:>5} {:>8}", "layer", "op", "range", "lookups", "bits", "dropped");
    // runs of like layers (a tree score's partial sums, a forest's comparisons on one
    // feature: the same name but for a trailing number) print once, with their count
    let kind = |l: &veil_backend::proto::Layer| {
        (l.name.trim_end_matches(|c: char| c.is_ascii_digit()).to_string(), l.op.clone(), l.lo, l.hi, l.lookups)
    };
    let mut i = 0;
    while i < r.layers.len() {
        let l = &r.layers[i];
        let run = r.layers[i..].iter().take_while(|m| kind(m) == kind(l) && m.precision == l.precision).count();
        let name = if run > 1 { format!("{} (×{run})", short_name(&l.name, 33)) } else { short_name(&l.name, 40) };
        let range = format!("{}..{}", l.lo, l.hi);
        if l.lookups > 0 {
            let lookups: u32 = r.layers[i..i + run].iter().map(|m| m.lookups).sum();
            let _ =
                writeln!(s, "{name:<40} {:<8} {range:>22} {:>8} {:>5} {:>8}", l.op, lookups, l.precision, l.rounding);
        } else {
            let _ = writeln!(s, "{name:<40} {:<8} {range:>22}", l.op);
        }
        i += run;
    }
    if p.has_lookups() {
        let per_sample = if a.training.is_some() {
            // training tolerates failed lookups: say how many to expect, not a probability ≈ 1
            format!("≈{:.1} failed lookups expected per step", p.p_error * r.lookups_per_sample as f64)
        } else {
            format!("failure probability 2^{:.1} per sample", p.global_p_error.log2())
        };
        let lookups = a.circuit.lookups_per_partition();
        for q in 0..p.set_count() {
            let set = p.set(q);
            let name = if p.set_count() == 1 {
                "crypto:".to_string()
            } else {
                format!("set {q}: {}-bit lookups, {} per sample;", set.precision, lookups.get(q).copied().unwrap_or(0))
            };
            let _ = writeln!(
                s,
                "{name} n={} k={} N={} PBS 2^{}×{} KS 2^{}×{}; p_error 2^{:.1} per lookup; ≈{:.0} ms per lookup on one core",
                set.lwe_dimension,
                set.glwe_dimension,
                set.polynomial_size,
                set.pbs_base_log,
                set.pbs_level,
                set.ks_base_log,
                set.ks_level,
                set.p_error.log2(),
                set.pbs_cost_ms,
            );
        }
        if p.set_count() > 1 {
            let conv: Vec<String> = p
                .conversions
                .iter()
                .map(|c| format!("set {} → set {}: KS 2^{}×{}", c.from, c.to, c.base_log, c.level))
                .collect();
            let _ = writeln!(s, "keyswitching between sets: {}", conv.join(", "));
        }
        let (bsk, ksk) = p.total_key_bytes();
        let _ = writeln!(
            s,
            "{per_sample}; evaluation keys in memory: bootstrap {:.0} MB, keyswitch {:.0} MB",
            bsk as f64 / 1e6,
            ksk as f64 / 1e6,
        );
    } else {
        let _ = writeln!(
            s,
            "crypto: no lookups — inputs and outputs under a dimension-{} LWE key; p_error 2^{:.1} per decryption",
            p.polynomial_size,
            p.p_error.log2()
        );
    }
    if trials && !r.trials.is_empty() {
        let _ = writeln!(s, "bit-width search ({} trial(s), in order; score = {}):", r.trials.len(), r.metric);
        let _ = writeln!(
            s,
            "  (✓: within the tolerance on the rows that pass scored: the calibration rows, or with near-boundary rows the smaller of the two agreements; ← the widths compiled)"
        );
        let _ = writeln!(
            s,
            "  {:>4} {:>6} {:>7} {:>4} {:>4}  {:<11} {:>7} {:>7}",
            "bits", "inputs", "weights", "acts", "outs", "order", "lookups", "score"
        );
        // the order of maxima and lookups is only a choice in models with a max
        let both_orders = r.trials.iter().any(|t| t.commute_max) && r.trials.iter().any(|t| !t.commute_max);
        // the compiled widths: the last accepted trial that has them
        let chosen = r.trials.iter().rposition(|t| {
            t.accepted
                && (t.precision, t.input_bits, t.weight_bits, t.act_bits, t.output_bits)
                    == (r.max_precision, r.input_bits, r.weight_bits, r.act_bits, r.output_bits)
        });
        for (i, t) in r.trials.iter().enumerate() {
            let maxima = match t.commute_max {
                _ if !both_orders => "-",
                true => "max→lookup",
                false => "lookup→max",
            };
            let score = if t.lookups == 0 && t.score == 0.0 { "no fit".to_string() } else { format!("{:.4}", t.score) };
            let _ = writeln!(
                s,
                "  {:>4} {:>6} {:>7} {:>4} {:>4}  {:<11} {:>7} {:>7} {}",
                t.precision,
                t.input_bits,
                t.weight_bits,
                t.act_bits,
                t.output_bits,
                maxima,
                t.lookups,
                score,
                match (t.accepted, chosen == Some(i)) {
                    (true, true) => "✓ ←",
                    (true, false) => "✓",
                    (false, true) => "←",
                    (false, false) => "",
                }
            );
        }
    } else if !r.trials.is_empty() {
        let _ = writeln!(
            s,
            "bit-width search: {} trial(s) (veil inspect MODEL.veil --stage report lists them)",
            r.trials.len()
        );
    }
    s
}

pub fn json(a: &Artifact) -> Value {
    let r = &a.report;
    let p = &a.params;
    json!({
        "model": a.model_name,
        "lookups_per_sample": r.lookups_per_sample,
        "lookups_before_fusion": r.lookups_before_fusion,
        "max_precision": r.max_precision,
        "input_bits": r.input_bits,
        "weight_bits": r.weight_bits,
        "act_bits": r.act_bits,
        "output_bits": r.output_bits,
        "output_digits": r.output_digits,
        "score_parts": r.score_parts.max(1),
        "metric": r.metric,
        "calibration_score": r.calibration_score,
        "near_boundary_score": r.near_boundary_score,
        "scored_near_boundary": r.scored_near_boundary,
        "near_boundary_short": r.near_boundary_short,
        "calibration_agreement": r.calibration_agreement,
        "accuracy_tolerance": r.accuracy_tolerance,
        "accuracy_warning": r.accuracy_warning,
        "compile_seconds": r.compile_seconds,
        "layers": r.layers.iter().map(|l| json!({
            "name": l.name, "op": l.op, "lo": l.lo, "hi": l.hi,
            "lookups": l.lookups, "precision": l.precision, "rounding": l.rounding,
        })).collect::<Vec<_>>(),
        "trials": r.trials.iter().map(|t| json!({
            "precision": t.precision, "input_bits": t.input_bits, "weight_bits": t.weight_bits,
            "act_bits": t.act_bits, "output_bits": t.output_bits, "commute_max": t.commute_max,
            "lookups": t.lookups, "score": t.score, "accepted": t.accepted,
        })).collect::<Vec<_>>(),
        "params": p,
        "training": a.training,
        "fingerprint": a.fingerprint.iter().map(|b| format!("{b:02x}")).collect::<String>(),
    })
}

/// A file size for people: KB under a megabyte, MB above.
pub fn bytes(n: u64) -> String {
    if n < 1_000_000 {
        format!("{:.1} KB", n as f64 / 1e3)
    } else {
        format!("{:.1} MB", n as f64 / 1e6)
    }
}

/// At most `width` characters of a layer name: its start and its end around an ellipsis
/// (the end tells layers of one op apart).
fn short_name(name: &str, width: usize) -> String {
    let chars: Vec<char> = name.chars().collect();
    if chars.len() <= width {
        return name.to_string();
    }
    let head = width / 2 - 1;
    let tail = width - head - 1;
    chars[..head].iter().chain(std::iter::once(&'…')).chain(&chars[chars.len() - tail..]).collect()
}
