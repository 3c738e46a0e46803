//! Runs `qn` jobs for the bench, each at most once: a job's output lives in the cache under a
//! name hashed from every argument that defines it (the input path included, so a compression is
//! keyed by its fine-tune), and a finished job leaves a `.done.json` beside it with its wall time
//! and its stdout. An interrupted job is simply rerun: `qn finetune` continues from its last
//! checkpoint and `qn compress` from its work directory, so an interrupted bench resumes.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

/// Bumped when a change to the bench makes old cache entries wrong.
const CACHE_VERSION: &str = "qn-bench-1";

/// The outcome of a finished job.
#[derive(Debug, Clone)]
pub struct Done {
    /// Wall time of the run that produced it, in seconds.
    pub seconds: f64,
    /// What the job printed on stdout.
    pub stdout: String,
}

/// Runs jobs with one `qn` binary and one cache directory.
pub struct Runner {
    qn: PathBuf,
    cache: PathBuf,
    threads: Option<usize>,
}

/// FNV-1a, 64 bits: stable across runs and platforms (std's hasher is not).
pub fn stable_hash(parts: &[String]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in std::iter::once(CACHE_VERSION).chain(parts.iter().map(String::as_str)) {
        for b in p.bytes().chain(std::iter::once(0)) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

impl Runner {
    /// A runner of `qn` caching into `cache` (created).
    pub fn new(qn: PathBuf, cache: PathBuf, threads: Option<usize>) -> Result<Self> {
        std::fs::create_dir_all(&cache)
            .with_context(|| format!("cannot create the bench cache `{}`", cache.display()))?;
        Ok(Self { qn, cache, threads })
    }

    /// Where the job `stem` with identity `args` writes (`ext`: "" for a directory, else an
    /// extension with its dot).
    pub fn output_path(&self, stem: &str, args: &[String], ext: &str) -> PathBuf {
        self.cache
            .join(format!("{stem}-{:016x}{ext}", stable_hash(args)))
    }

    /// Runs `qn <args> <out_flag> <output>` unless a finished run of it is cached; `args` define
    /// the result (threads are added here and are not part of the key).
    pub fn job(
        &self,
        what: &str,
        output: &Path,
        args: &[String],
        out_flag: Option<&str>,
    ) -> Result<Done> {
        let marker = done_marker(output);
        if let Ok(text) = std::fs::read_to_string(&marker) {
            let v: Value = serde_json::from_str(&text)
                .with_context(|| format!("{}: not a bench record; delete it", marker.display()))?;
            eprintln!("bench: {what}: cached ({})", output.display());
            return Ok(Done {
                seconds: v["seconds"].as_f64().unwrap_or(0.0),
                stdout: v["stdout"].as_str().unwrap_or_default().to_string(),
            });
        }
        let mut cmd = Command::new(&self.qn);
        cmd.args(args);
        if let Some(flag) = out_flag {
            cmd.arg(flag).arg(output);
        }
        if let Some(t) = self.threads {
            cmd.arg("--threads").arg(t.to_string());
        }
        let line = format!("qn {}", shell_words(&cmd));
        eprintln!("bench: {what}: {line}");
        let start = Instant::now();
        let out = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .output()
            .with_context(|| format!("could not start {}", self.qn.display()))?;
        let seconds = start.elapsed().as_secs_f64();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if !out.status.success() {
            bail!(
                "`{line}` failed ({}); rerun the bench to resume{}",
                out.status,
                if stdout.trim().is_empty() {
                    String::new()
                } else {
                    format!(": {}", stdout.trim())
                }
            );
        }
        let record = json!({ "seconds": seconds, "args": args, "stdout": stdout });
        write_atomic(&marker, record.to_string().as_bytes())?;
        Ok(Done { seconds, stdout })
    }
}

/// `<output>.done.json`.
fn done_marker(output: &Path) -> PathBuf {
    let mut p = output.as_os_str().to_owned();
    p.push(".done.json");
    PathBuf::from(p)
}

/// The command's arguments, quoted where a shell would need it.
fn shell_words(cmd: &Command) -> String {
    cmd.get_args()
        .map(|a| {
            let s = a.to_string_lossy();
            if s.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_./=:,".contains(c))
            {
                s.into_owned()
            } else {
                format!("'{}'", s.replace('\'', "'\\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Writes `bytes` to a temporary file beside `path`, then renames it into place, so a reader never
/// sees half a file.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    std::fs::write(&tmp, bytes).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path)
        .with_context(|| format!("cannot rename {} to {}", tmp.display(), path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_separates_arguments() {
        let a = stable_hash(&["ab".into(), "c".into()]);
        let b = stable_hash(&["a".into(), "bc".into()]);
        assert_ne!(a, b);
        assert_eq!(a, stable_hash(&["ab".into(), "c".into()]));
    }

    #[test]
    fn a_finished_job_is_not_run_again() {
        let dir = std::env::temp_dir().join(format!("qn-bench-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        // `true` stands in for qn: it succeeds and prints nothing.
        let r = Runner::new(PathBuf::from("true"), dir.clone(), None).unwrap();
        let args = vec!["eval".to_string()];
        let out = r.output_path("x", &args, ".json");
        r.job("test", &out, &args, None).unwrap();
        // A failing command: the finished job is not run again, a new one fails naming itself
        // and leaves no record.
        let r = Runner::new(PathBuf::from("false"), dir.clone(), None).unwrap();
        r.job("test", &out, &args, None).unwrap();
        let out = r.output_path("y", &args, ".json");
        let err = r.job("test", &out, &args, None).unwrap_err().to_string();
        assert!(err.contains("qn eval") && err.contains("resume"), "{err}");
        assert!(!done_marker(&out).exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
