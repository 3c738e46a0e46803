//! The bench's results as a markdown table and as JSON (the same rows), and the per-seed summary
//! of the headline rows.

use std::fmt::Write as _;
use std::path::PathBuf;

use serde_json::{json, Value};

use super::suite::{Compress, Method, Suite};

/// One measured row: a method's file and its accuracy.
#[derive(Debug, Clone)]
pub struct Row {
    /// What produced it.
    pub method: Method,
    /// The fine-tune's `--noise`.
    pub noise: String,
    /// Seed of the fine-tune, k-means and batches.
    pub seed: u64,
    /// The evaluated file: the `.qnz` (or the fp32 `model.safetensors`).
    pub file: Option<PathBuf>,
    /// Its byte size.
    pub bytes: Option<u64>,
    /// Accuracy (a fraction) reported by `qn eval`.
    pub accuracy: Option<f64>,
    /// Examples `qn eval` scored.
    pub examples: Option<u64>,
    /// Fine-tune + compression + evaluation, seconds (a shared fine-tune counts in every row).
    pub seconds: f64,
    /// Why the row has no result.
    pub error: Option<String>,
}

impl Row {
    /// `int8 (channel, minmax)`, `iPQ (f16 centroids)`, …
    pub fn compression_name(&self) -> String {
        match self.method.compress {
            Compress::None => "none (fp32)".into(),
            Compress::Scalar { bits, histogram } => format!(
                "int{bits} per channel, {}",
                if histogram { "histogram" } else { "min/max" }
            ),
            Compress::Ipq { int8, kd, rate } => format!(
                "iPQ {}, {} centroids{}",
                [
                    "K=256",
                    "budget (low rate)",
                    "budget (mid rate)",
                    "budget (high rate)"
                ][rate.map_or(0, |i| i + 1)],
                if int8 { "int8" } else { "f16" },
                if kd {
                    ", distilled, activation-aware"
                } else {
                    ""
                }
            ),
        }
    }
}

/// Today's date (UTC) as `YYYY-MM-DD`, from the system clock.
pub fn today() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    civil_date((secs / 86_400) as i64)
}

/// Days since 1970-01-01 to a proleptic Gregorian date (H. Hinnant's `civil_from_days`).
fn civil_date(days: i64) -> String {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}

/// The fp32 row of `seed`, against which Δ and compression are measured.
fn fp32_of(rows: &[Row], seed: u64) -> Option<&Row> {
    rows.iter()
        .find(|r| r.method.id == "fp32" && r.seed == seed)
}

/// `(compression ×, Δ accuracy in points)` of `r` against its seed's fp32 row.
pub fn relative(rows: &[Row], r: &Row) -> (Option<f64>, Option<f64>) {
    let base = fp32_of(rows, r.seed);
    let ratio = match (base.and_then(|b| b.bytes), r.bytes) {
        (Some(b), Some(x)) if x > 0 => Some(b as f64 / x as f64),
        _ => None,
    };
    let delta = match (base.and_then(|b| b.accuracy), r.accuracy) {
        (Some(b), Some(a)) => Some((a - b) * 100.0),
        _ => None,
    };
    (ratio, delta)
}

fn opt(v: Option<f64>, f: impl Fn(f64) -> String) -> String {
    v.map(f).unwrap_or_else(|| "—".into())
}

/// The markdown report: a heading naming the model, task, preset and date, the budget, the table.
pub fn markdown(suite: &Suite, preset: &str, date: &str, command: &str, rows: &[Row]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "### {} on {} — rate against accuracy ({preset}, {date})\n",
        suite.model_name, suite.task_name
    );
    let _ = writeln!(s, "Command: `{command}`.\n");
    let _ = writeln!(s, "Budget: {}.", suite.budget.describe(suite.kind));
    let _ = writeln!(
        s,
        "Size = bytes of the file evaluated (the `.qnz` written by `qn compress`, which also carries \
         the config, labels and tokenizer; for fp32 the fine-tuned `model.safetensors`). Wall time = \
         fine-tune + compression + evaluation of the row, 2 cores (a fine-tune shared by rows counts \
         in each).\n"
    );
    let _ = writeln!(
        s,
        "| model | method | noise (training) | compression | size MB | × smaller | accuracy % | Δ vs fp32 | wall time |"
    );
    let _ = writeln!(s, "|---|---|---|---|---:|---:|---:|---:|---:|");
    for r in rows {
        let (ratio, delta) = relative(rows, r);
        let acc = match (&r.error, r.accuracy) {
            // The whole error is in the JSON and the bench's log; the table keeps its gist.
            (Some(e), _) => {
                let gist: String = e.chars().take(60).collect();
                format!("failed: {}…", gist.replace('|', "/"))
            }
            (None, a) => opt(a, |a| format!("{:.2}", a * 100.0)),
        };
        let _ = writeln!(
            s,
            "| {} | {} ({}) | `{}` | {} | {} | {} | {} | {} | {} |",
            suite.model_name,
            r.method.id,
            r.method.family,
            r.noise,
            r.compression_name(),
            opt(r.bytes.map(|b| b as f64), |b| format!("{:.3}", b / 1e6)),
            opt(ratio, |x| format!("{x:.1}")),
            acc,
            opt(delta, |d| format!("{d:+.2}")),
            format_seconds(r.seconds),
        );
    }
    if preset == "quick" {
        // Its models train for a few steps and sit near chance: a "holds" would mean nothing.
        let _ = writeln!(
            s,
            "\nThe paper's claims are not checked on the quick preset: its models are trained for a \
             few steps and sit near chance. Run the full preset for them."
        );
    } else {
        let _ = writeln!(
            s,
            "\nThe paper's claims on this run (one seed):\n\n{}",
            claims(rows)
        );
    }
    s
}

/// The paper's claims checked on `rows` (one seed): at the same compression, Quant-Noise against
/// QAT and post-training for iPQ and int4, and the best iPQ model against fp32. Each line says
/// whether the claim holds here, with the numbers.
pub fn claims(rows: &[Row]) -> String {
    let best = |pred: &dyn Fn(&Row) -> bool| -> Option<&Row> {
        rows.iter()
            .filter(|r| r.seed == 0 && r.accuracy.is_some() && pred(r))
            .max_by(|a, b| {
                a.accuracy
                    .unwrap_or(0.0)
                    .total_cmp(&b.accuracy.unwrap_or(0.0))
            })
    };
    let pct = |r: Option<&Row>| match r {
        Some(r) => format!(
            "{:.2} % ({})",
            r.accuracy.unwrap_or(0.0) * 100.0,
            r.method.id
        ),
        None => "not run".into(),
    };
    let mut out = String::new();
    for (what, is_kind) in [
        (
            "iPQ",
            // The default plan's rows: one size for every family.
            (|r: &Row| {
                matches!(
                    r.method.compress,
                    Compress::Ipq {
                        int8: false,
                        rate: None,
                        ..
                    }
                )
            }) as fn(&Row) -> bool,
        ),
        ("int4", |r: &Row| {
            matches!(r.method.compress, Compress::Scalar { bits: 4, .. })
        }),
    ] {
        let qn = best(&|r| is_kind(r) && r.method.family.starts_with("Quant-Noise"));
        let qat = best(&|r| is_kind(r) && r.method.family == "QAT");
        let ptq = best(&|r| is_kind(r) && r.method.family.starts_with("post-training"));
        let verdict = match (qn, qat, ptq) {
            (Some(q), Some(a), Some(p)) => {
                let (q, a, p) = (
                    q.accuracy.unwrap_or(0.0),
                    a.accuracy.unwrap_or(0.0),
                    p.accuracy.unwrap_or(0.0),
                );
                if q >= a && q >= p {
                    "holds"
                } else {
                    "does not hold"
                }
            }
            _ => "cannot be checked (a method did not run)",
        };
        let _ = writeln!(
            out,
            "- {what}: Quant-Noise ≥ QAT and ≥ post-training at the same size — **{verdict}**: \
             Quant-Noise {}, QAT {}, post-training {}.",
            pct(qn),
            pct(qat),
            pct(ptq)
        );
    }
    // Pareto: an iPQ file no larger than int4's must be at least as accurate.
    let int4 = best(&|r| matches!(r.method.compress, Compress::Scalar { bits: 4, .. }));
    let size = |r: &Row| r.bytes.unwrap_or(u64::MAX);
    let ipq_small = int4.and_then(|f| {
        best(&|r| matches!(r.method.compress, Compress::Ipq { .. }) && size(r) <= size(f))
    });
    let verdict = match (int4, ipq_small) {
        (Some(f), Some(i)) if i.accuracy >= f.accuracy => "holds",
        (Some(_), Some(_)) => "does not hold",
        (Some(_), None) => "cannot be checked (no iPQ file is as small as int4's)",
        (None, _) => "cannot be checked (int4 did not run)",
    };
    let _ =
        writeln!(
        out,
        "- at int4's size, iPQ at least as accurate as int4 — **{verdict}**: int4 {} ({} bytes), \
         iPQ {} ({} bytes).",
        pct(int4),
        int4.and_then(|r| r.bytes).map_or("—".into(), |b| b.to_string()),
        pct(ipq_small),
        ipq_small.and_then(|r| r.bytes).map_or("—".into(), |b| b.to_string()),
    );
    let fp32 = rows.iter().find(|r| r.method.id == "fp32" && r.seed == 0);
    let ipq = best(&|r| matches!(r.method.compress, Compress::Ipq { .. }));
    if let (Some(f), Some(i)) = (fp32, ipq) {
        let (ratio, delta) = relative(rows, i);
        let (ratio, delta) = (ratio.unwrap_or(0.0), delta.unwrap_or(f64::NAN));
        let verdict = |x: f64, pts: f64| {
            // As displayed (two decimals): a point difference of exactly -1.00 is within 1.0.
            if ratio >= x && delta >= -pts - 1e-9 {
                "holds"
            } else {
                "does not hold"
            }
        };
        let _ = writeln!(
            out,
            "- best iPQ model against fp32 ({:.2} %): {} at {ratio:.1}× smaller, Δ {delta:+.2} \
             points — ≥ 15× within 1.5 points **{}**; goal ≥ 20× within 1.0 point **{}**.",
            f.accuracy.unwrap_or(0.0) * 100.0,
            pct(Some(i)),
            verdict(15.0, 1.5),
            verdict(20.0, 1.0)
        );
    }
    out
}

fn format_seconds(s: f64) -> String {
    if s >= 90.0 {
        format!("{:.1} min", s / 60.0)
    } else {
        format!("{s:.0} s")
    }
}

/// The same rows as JSON, with the files named and sized.
pub fn to_json(suite: &Suite, preset: &str, date: &str, rows: &[Row]) -> Value {
    json!({
        "model": suite.model_name,
        "model_source": suite.model,
        "task": suite.task_name,
        "preset": preset,
        "date": date,
        "budget": suite.budget.describe(suite.kind),
        "rows": rows.iter().map(|r| row_json(rows, r)).collect::<Vec<_>>(),
    })
}

/// One row as JSON, as a table and a seeds summary record it (and `--reuse` reads it back).
fn row_json(rows: &[Row], r: &Row) -> Value {
    let (ratio, delta) = relative(rows, r);
    json!({
        "method": r.method.id,
        "family": r.method.family,
        "label": r.method.label,
        "noise": r.noise,
        "compression": r.compression_name(),
        "seed": r.seed,
        "file": r.file.as_ref().map(|p| p.display().to_string()),
        "bytes": r.bytes,
        "size_mb": r.bytes.map(|b| b as f64 / 1e6),
        "compression_ratio": ratio,
        "accuracy": r.accuracy,
        "examples": r.examples,
        "delta_points": delta,
        "wall_s": r.seconds,
        "error": r.error,
    })
}

/// Mean and sample standard deviation.
pub fn mean_std(xs: &[f64]) -> (f64, f64) {
    let n = xs.len() as f64;
    let mean = xs.iter().sum::<f64>() / n;
    let var = if xs.len() > 1 {
        xs.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / (n - 1.0)
    } else {
        0.0
    };
    (mean, var.sqrt())
}

/// Per-seed accuracies of the headline rows with their mean ± standard deviation (markdown, JSON);
/// `expected` runs make it whole, fewer make it a partial summary that says so. The JSON keeps every
/// run under `runs` for `--reuse`.
pub fn seeds_summary(
    suite: &Suite,
    date: &str,
    rows: &[Row],
    seeds: u64,
    expected: usize,
) -> (String, Value) {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "### {} on {} — headline rows over {seeds} seeds ({date})\n",
        suite.model_name, suite.task_name
    );
    let _ = writeln!(s, "Budget: {}.\n", suite.budget.describe(suite.kind));
    if rows.len() < expected {
        let _ = writeln!(
            s,
            "**Partial: {} of {expected} runs finished** (rerun with `--reuse` of this summary's \
             JSON to go on).\n",
            rows.len()
        );
    }
    let _ = writeln!(
        s,
        "| method | size MB | accuracy % per seed | mean ± std | Δ mean vs fp32 |"
    );
    let _ = writeln!(s, "|---|---:|---|---:|---:|");
    let mut ids: Vec<&str> = Vec::new();
    for r in rows {
        if !ids.contains(&r.method.id) {
            ids.push(r.method.id);
        }
    }
    let fp32: Vec<f64> = rows
        .iter()
        .filter(|r| r.method.id == "fp32")
        .filter_map(|r| r.accuracy)
        .collect();
    let fp32_mean = (!fp32.is_empty()).then(|| mean_std(&fp32).0);
    let mut out = Vec::new();
    for id in ids {
        let these: Vec<&Row> = rows.iter().filter(|r| r.method.id == id).collect();
        let accs: Vec<f64> = these.iter().filter_map(|r| r.accuracy).collect();
        let per_seed: Vec<String> = these
            .iter()
            .map(|r| opt(r.accuracy, |a| format!("{:.2}", a * 100.0)))
            .collect();
        let size = these.iter().find_map(|r| r.bytes);
        let (mean, std) = if accs.is_empty() {
            (f64::NAN, f64::NAN)
        } else {
            mean_std(&accs)
        };
        let delta = fp32_mean.map(|f| (mean - f) * 100.0);
        let _ = writeln!(
            s,
            "| {id} | {} | {} | {:.2} ± {:.2} | {} |",
            opt(size.map(|b| b as f64), |b| format!("{:.3}", b / 1e6)),
            per_seed.join(", "),
            mean * 100.0,
            std * 100.0,
            opt(delta, |d| format!("{d:+.2}")),
        );
        out.push(json!({
            "method": id,
            "bytes": size,
            "accuracy_per_seed": these.iter().map(|r| r.accuracy).collect::<Vec<_>>(),
            "seeds": these.iter().map(|r| r.seed).collect::<Vec<_>>(),
            "mean": mean,
            "std": std,
            "delta_mean_points": delta,
        }));
    }
    let j = json!({
        "model": suite.model_name,
        "task": suite.task_name,
        "date": date,
        "budget": suite.budget.describe(suite.kind),
        "seeds": seeds,
        "complete": rows.len() >= expected,
        "rows": out,
        "runs": rows.iter().map(|r| row_json(rows, r)).collect::<Vec<_>>(),
    });
    (s, j)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates() {
        assert_eq!(civil_date(0), "1970-01-01");
        assert_eq!(civil_date(11_016), "2000-02-29");
        assert_eq!(civil_date(20_784), "2026-11-27");
    }

    fn row(id: &str, acc: f64, bytes: u64) -> Row {
        let method = *crate::bench::suite::METHODS
            .iter()
            .find(|m| m.id == id)
            .unwrap();
        Row {
            method,
            noise: method.noise.into(),
            seed: 0,
            file: None,
            bytes: Some(bytes),
            accuracy: Some(acc),
            examples: Some(872),
            seconds: 1.0,
            error: None,
        }
    }

    #[test]
    fn claims_say_which_hold_with_their_numbers() {
        let rows = vec![
            row("fp32", 0.90, 90_000_000),
            row("ptq-ipq", 0.80, 4_000_000),
            row("qat-ipq", 0.82, 4_000_000),
            row("qn-block-0.1", 0.89, 4_000_000),
            row("ptq-int4", 0.88, 12_000_000),
            row("qat-int4", 0.87, 12_000_000),
            row("qn-int4", 0.86, 12_000_000),
        ];
        let text = claims(&rows);
        let lines: Vec<&str> = text.lines().collect();
        assert!(
            lines[0].starts_with("- iPQ") && lines[0].contains("**holds**"),
            "{text}"
        );
        assert!(lines[0].contains("89.00 % (qn-block-0.1)"), "{text}");
        assert!(
            lines[1].starts_with("- int4") && lines[1].contains("**does not hold**"),
            "{text}"
        );
        // qn-block-0.1's file is smaller than int4's and more accurate.
        assert!(
            lines[2].starts_with("- at int4's size") && lines[2].contains("**holds**"),
            "{text}"
        );
        assert!(
            lines[2].contains("89.00 % (qn-block-0.1) (4000000 bytes)"),
            "{text}"
        );
        // 22.5x smaller, 1 point below: the requirement holds, the goal (1.0 point) just does.
        assert!(
            lines[3].contains("22.5×") && lines[3].contains("-1.00"),
            "{text}"
        );
        assert!(!lines[3].contains("does not hold"), "{text}");
        // A budget row at another size is no rival at the default plan's size, and an iPQ file
        // as small as int4's but less accurate fails the Pareto check.
        let mut more = rows.clone();
        more.push(row("ipq-kd-high", 0.95, 3_000_000));
        let text = claims(&more);
        assert!(text.lines().next().unwrap().contains("**holds**"), "{text}");
        let pareto = vec![
            row("ptq-int4", 0.88, 12_000_000),
            row("ipq-kd-low", 0.85, 9_000_000),
            row("ptq-ipq", 0.90, 13_000_000),
        ];
        let text = claims(&pareto);
        let line = text.lines().nth(2).unwrap();
        assert!(
            line.contains("**does not hold**") && line.contains("(ipq-kd-low)"),
            "{text}"
        );
        // A method that did not run is said so.
        let text = claims(&rows[..3]);
        assert!(text.contains("cannot be checked"), "{text}");
    }

    #[test]
    fn a_partial_seeds_summary_says_so_and_keeps_its_runs() {
        let suite = crate::bench::suite::test_suite();
        let mut second = row("fp32", 0.80, 90_000_000);
        second.seed = 1;
        let rows = vec![row("fp32", 0.90, 90_000_000), second];
        let (md, j) = seeds_summary(&suite, "2026-01-01", &rows, 3, 3);
        assert!(md.contains("Partial: 2 of 3 runs"), "{md}");
        assert!(
            md.contains("90.00, 80.00") && md.contains("85.00 ± 7.07"),
            "{md}"
        );
        assert_eq!(j["complete"], false);
        assert_eq!(j["runs"].as_array().unwrap().len(), 2);
        assert_eq!(j["runs"][1]["seed"], 1);
        let (md, j) = seeds_summary(&suite, "2026-01-01", &rows, 2, 2);
        assert!(!md.contains("Partial"), "{md}");
        assert_eq!(j["complete"], true);
    }

    #[test]
    fn mean_and_sample_std() {
        let (m, s) = mean_std(&[1.0, 2.0, 3.0]);
        assert!((m - 2.0).abs() < 1e-12 && (s - 1.0).abs() < 1e-12);
        assert_eq!(mean_std(&[4.0]), (4.0, 0.0));
    }
}
