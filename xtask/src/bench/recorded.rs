//! Rows measured by an earlier bench run, read back from its JSON (`--reuse FILE`), so that a run on
//! a fresh machine (whose `bench-results/cache` is empty) does not redo hours of work whose results
//! are already committed, e.g. the seed-0 rows of a `--seeds` run or a seeds run cut off half way.
//!
//! A recorded row stands in for a job only when the file's model, task and budget text are the
//! suite's, and the row's method, noise and seed are the job's; rows with an error are ignored.
//!
//! ```text
//! cargo xtask bench --suite minilm-sst2 --seeds 3 \
//!     --reuse docs/bench/all-MiniLM-L6-v2-sst2.json --reuse docs/bench/all-MiniLM-L6-v2-sst2-seeds.json
//! ```

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde_json::Value;

use super::report::Row;
use super::suite::{Suite, METHODS};

/// The finished rows of `paths` that belong to `suite`; a file for another suite or budget adds none.
pub fn load(paths: &[PathBuf], suite: &Suite) -> Result<Vec<(Row, PathBuf)>> {
    let mut out = Vec::new();
    for p in paths {
        let text = std::fs::read_to_string(p)
            .with_context(|| format!("--reuse: cannot read `{}`", p.display()))?;
        let j: Value = serde_json::from_str(&text)
            .with_context(|| format!("--reuse: `{}` is not JSON", p.display()))?;
        for row in rows_of(&j, suite, p)? {
            out.push((row, p.clone()));
        }
    }
    Ok(out)
}

fn rows_of(j: &Value, suite: &Suite, file: &Path) -> Result<Vec<Row>> {
    let text = |key: &str| j.get(key).and_then(Value::as_str).unwrap_or_default();
    if text("model") != suite.model_name
        || text("task") != suite.task_name
        || text("budget") != suite.budget.describe(suite.kind)
    {
        return Ok(Vec::new());
    }
    // A bench table keeps its rows under `rows`; a seeds summary keeps them under `runs`.
    let key = if j.get("runs").is_some() {
        "runs"
    } else {
        "rows"
    };
    let Some(rows) = j.get(key).and_then(Value::as_array) else {
        anyhow::bail!("--reuse: `{}` has no `{key}` list", file.display());
    };
    let mut out = Vec::new();
    for (i, r) in rows.iter().enumerate() {
        let field = |k: &str| r.get(k).filter(|v| !v.is_null());
        if field("error").is_some() {
            continue;
        }
        let (Some(id), Some(noise), Some(seed), Some(accuracy)) = (
            field("method").and_then(Value::as_str),
            field("noise").and_then(Value::as_str),
            field("seed").and_then(Value::as_u64),
            field("accuracy").and_then(Value::as_f64),
        ) else {
            anyhow::bail!(
                "--reuse: `{}` {key}[{i}] lacks method, noise, seed or accuracy",
                file.display()
            );
        };
        let Some(method) = METHODS.iter().find(|m| m.id == id) else {
            continue; // a method this version no longer runs
        };
        out.push(Row {
            method: *method,
            noise: noise.to_string(),
            seed,
            file: field("file").and_then(Value::as_str).map(PathBuf::from),
            bytes: field("bytes").and_then(Value::as_u64),
            accuracy: Some(accuracy),
            examples: field("examples").and_then(Value::as_u64),
            seconds: field("wall_s").and_then(Value::as_f64).unwrap_or(0.0),
            error: None,
        });
    }
    Ok(out)
}

/// The recorded row standing in for `method` at `noise` and `seed`, with the file it came from.
pub fn find<'a>(
    recorded: &'a [(Row, PathBuf)],
    method: &str,
    noise: &str,
    seed: u64,
) -> Option<&'a (Row, PathBuf)> {
    recorded
        .iter()
        .find(|(r, _)| r.method.id == method && r.noise == noise && r.seed == seed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::suite::test_suite;

    #[test]
    fn only_finished_rows_of_the_same_suite_and_budget_are_reused() {
        let s = test_suite();
        let budget = s.budget.describe(s.kind);
        let dir = std::env::temp_dir().join(format!("qn-recorded-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let table = dir.join("t.json");
        let j = serde_json::json!({
            "model": "M", "task": "T", "budget": budget,
            "rows": [
                {"method": "fp32", "noise": "none", "seed": 0, "accuracy": 0.9, "bytes": 10,
                 "examples": 872, "wall_s": 5.0, "error": null},
                {"method": "ptq-ipq", "noise": "none", "seed": 0, "accuracy": null,
                 "error": "qn compress failed"},
            ]
        });
        std::fs::write(&table, j.to_string()).unwrap();
        let other = dir.join("o.json");
        let mut k = j.clone();
        k["budget"] = "another budget".into();
        std::fs::write(&other, k.to_string()).unwrap();
        let rows = load(&[table.clone(), other], &s).unwrap();
        assert_eq!(rows.len(), 1, "{rows:?}");
        assert!(find(&rows, "fp32", "none", 0).is_some());
        assert!(find(&rows, "fp32", "none", 1).is_none());
        assert!(find(&rows, "ptq-ipq", "none", 0).is_none());

        // A row without its accuracy is a broken file, named in the error.
        let broken = dir.join("b.json");
        let mut b = j.clone();
        b["rows"][0]["accuracy"] = Value::Null;
        b["rows"][0]["error"] = Value::Null;
        std::fs::write(&broken, b.to_string()).unwrap();
        let e = load(&[broken], &s).unwrap_err().to_string();
        assert!(e.contains("b.json") && e.contains("rows[0]"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
