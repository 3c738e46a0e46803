//! `metrics.jsonl`: one JSON object per training step (and one per stage end), each with its global
//! `step`. A resumed run first cuts the file back to the checkpoint's step, so every step is logged
//! exactly once however often the run was interrupted.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// The metrics log of a run (or nothing, for a run without an output directory).
pub(crate) struct Metrics(Option<(PathBuf, std::io::BufWriter<std::fs::File>)>);

impl Metrics {
    /// Opens `dir/metrics.jsonl` keeping the lines of steps `..= keep_through` (all of a fresh run's
    /// old lines go: `keep_through = None`).
    pub(crate) fn open(dir: Option<&Path>, keep_through: Option<usize>) -> Result<Self> {
        let Some(dir) = dir else {
            return Ok(Metrics(None));
        };
        std::fs::create_dir_all(dir).map_err(|e| Error::file(dir, e))?;
        let path = dir.join("metrics.jsonl");
        let kept = match (keep_through, std::fs::read_to_string(&path)) {
            (Some(last), Ok(text)) => text
                .lines()
                .filter(|l| {
                    serde_json::from_str::<serde_json::Value>(l)
                        .ok()
                        .and_then(|v| v["step"].as_u64())
                        .is_some_and(|s| s as usize <= last)
                })
                .map(|l| format!("{l}\n"))
                .collect::<String>(),
            _ => String::new(),
        };
        qn_format::write_atomic(&path, |f| f.write_all(kept.as_bytes()))
            .map_err(|e| Error::file(&path, e))?;
        let f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .map_err(|e| Error::file(&path, e))?;
        Ok(Metrics(Some((path, std::io::BufWriter::new(f)))))
    }

    pub(crate) fn log(&mut self, line: serde_json::Value) -> Result<()> {
        if let Some((path, w)) = &mut self.0 {
            writeln!(w, "{line}")
                .and_then(|_| w.flush())
                .map_err(|e| Error::file(path, e))?;
        }
        Ok(())
    }
}
