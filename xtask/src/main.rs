//! Project automation, in Rust rather than shell: `cargo xtask <command>`.
//!
//! ```text
//! cargo xtask test [--fuzz-cases N]     the whole suite, as CI runs it (cheapest checks first):
//!                                       fmt, the layering check, clippy -D warnings, tests,
//!                                       bench build; `--fuzz-cases 1000000` for a long fuzz
//! cargo xtask demo [ARGS]               quantize a real weight shipped in assets/ (int8, int4, PQ)
//! cargo xtask bench [--quick] [--suite S] [--methods M] [--seeds N] [--model … --task …]
//!                                       the rate-accuracy comparison (fp32, post-training, QAT,
//!                                       Quant-Noise; int8/int4/iPQ) with the `qn` binary: table,
//!                                       JSON and plot in bench-results/ (see `bench` module)
//! cargo xtask bench-kernels [--vs-faiss] [--rounds N]
//!                                       criterion benches of the kernels; with --vs-faiss, k-means
//!                                       against faiss-cpu in one run (installs numpy + faiss-cpu
//!                                       into .venv)
//! cargo xtask bench-format [--vs-numpy] criterion benches of the format's decoders; with
//!                                       --vs-numpy, PQ decode against numpy's gather in one run
//! cargo xtask check-cuda                `cargo check --features cuda` with NVIDIA's CUDA 13 wheels
//!                                       from PyPI (no GPU or system toolkit needed)
//! ```
//!
//! xtask depends on `anyhow`, `serde_json` (the bench reads `qn --json`) and `plotters` (the bench's
//! plot); everything heavy runs as a child `cargo` or `qn` process.

mod bench;
mod cuda;
mod faiss;

use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, Context, Result};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (cmd, rest) = args
        .split_first()
        .map(|(c, r)| (c.as_str(), r))
        .unwrap_or(("help", &[]));
    match cmd {
        "test" => test(rest),
        "demo" => demo(rest),
        "bench" => bench::bench(rest),
        "bench-kernels" => bench_kernels(rest),
        "bench-format" => faiss::bench_format(rest),
        "check-cuda" => cuda::check_cuda(rest),
        "help" | "--help" | "-h" => {
            println!("usage: cargo xtask <test | demo | bench [--quick] | bench-kernels [--vs-faiss] [--rounds N] | bench-format [--vs-numpy] | check-cuda>");
            Ok(())
        }
        other => bail!("unknown xtask command `{other}`; try `cargo xtask help`"),
    }
}

/// The workspace root (xtask lives one level below it).
pub(crate) fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask is inside the workspace")
        .to_path_buf()
}

/// Runs a command from the workspace root, failing with its command line when it fails.
pub(crate) fn run(cmd: &mut Command) -> Result<()> {
    cmd.current_dir(root());
    let line = format!("{cmd:?}");
    eprintln!("xtask: {line}");
    let status = cmd
        .status()
        .with_context(|| format!("could not start {line}"))?;
    if !status.success() {
        bail!("{line} failed with {status}");
    }
    Ok(())
}

pub(crate) fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

/// Cargo's target directory (`CARGO_TARGET_DIR`, a config file or `target/`), as cargo reports it.
pub(crate) fn target_dir() -> Result<PathBuf> {
    let out = cargo()
        .current_dir(root())
        .args(["metadata", "--format-version", "1", "--no-deps"])
        .output()
        .context("could not start cargo metadata")?;
    if !out.status.success() {
        bail!(
            "cargo metadata failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let key = "\"target_directory\":\"";
    let start = text
        .find(key)
        .context("cargo metadata reports no target_directory")?
        + key.len();
    let end = text[start..]
        .find('"')
        .context("cargo metadata: unterminated target_directory")?;
    Ok(PathBuf::from(
        text[start..start + end].replace("\\\\", "\\"),
    ))
}

fn test(extra: &[String]) -> Result<()> {
    let mut fuzz_cases = None;
    let mut rest = Vec::new();
    let mut it = extra.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--fuzz-cases" => {
                let n: u64 = it
                    .next()
                    .context("--fuzz-cases needs a number")?
                    .parse()
                    .context("--fuzz-cases needs a number")?;
                fuzz_cases = Some(n);
            }
            other => rest.push(other.to_string()),
        }
    }
    run(cargo().args(["fmt", "--all", "--", "--check"]))?;
    layering_check()?;
    run(cargo().args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--quiet",
        "--",
        "-D",
        "warnings",
    ]))?;
    // One optimised build serves the tests and the benches (candle unoptimised is 10-20x slower).
    // The end-to-end tests in tests/ run the `qn` binary, built here first.
    build_qn()?;
    let mut t = cargo();
    t.args(["test", "--workspace", "--release"]).args(&rest);
    if let Some(n) = fuzz_cases {
        t.env("QN_FUZZ_CASES", n.to_string());
    }
    run(&mut t)?;
    run(cargo().args(["bench", "--workspace", "--no-run"]))?;
    Ok(())
}

/// Builds the release `qn` binary and returns its path.
pub(crate) fn build_qn() -> Result<PathBuf> {
    run(cargo().args([
        "build",
        "--release",
        "--quiet",
        "-p",
        "qn-cli",
        "--bin",
        "qn",
    ]))?;
    Ok(target_dir()?.join("release").join("qn"))
}

/// Architecture invariant: `qn-format` knows no tensor library (checked with `cargo tree`).
fn layering_check() -> Result<()> {
    let out = cargo()
        .current_dir(root())
        .args([
            "tree",
            "-p",
            "qn-format",
            "-e",
            "normal",
            "--prefix",
            "none",
        ])
        .output()
        .context("could not start cargo tree")?;
    if !out.status.success() {
        bail!(
            "cargo tree failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let tree = String::from_utf8_lossy(&out.stdout);
    if let Some(line) = tree.lines().find(|l| l.starts_with("candle")) {
        bail!("layering: qn-format depends on `{line}`; the format crate must not know candle");
    }
    eprintln!("xtask: layering ok (qn-format does not depend on candle)");
    Ok(())
}

fn demo(extra: &[String]) -> Result<()> {
    run(cargo()
        .args([
            "run",
            "--release",
            "--quiet",
            "--package",
            "qn-cli",
            "--",
            "demo",
        ])
        .args(extra))
}

fn bench_kernels(args: &[String]) -> Result<()> {
    let mut vs_faiss = false;
    let mut rounds = 3usize;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--vs-faiss" => vs_faiss = true,
            "--rounds" => {
                rounds = it
                    .next()
                    .context("--rounds needs a number")?
                    .parse()
                    .context("--rounds needs a number")?
            }
            other => bail!("bench-kernels: unknown argument `{other}`"),
        }
    }
    if vs_faiss {
        faiss::compare(rounds)
    } else {
        run(cargo().args(["bench", "--package", "qn-kernels"]))
    }
}
