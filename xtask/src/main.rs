//! Project automation, in Rust rather than shell: `cargo xtask <command>`.
//!
//! ```text
//! cargo xtask test                      the whole suite, as CI runs it (cheapest checks first)
//! cargo xtask demo [ARGS]               quantize a real weight shipped in assets/ (int8, int4, PQ)
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
//! xtask depends on nothing but `anyhow`; everything heavy runs as a child `cargo` process.

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
        "bench-kernels" => bench_kernels(rest),
        "bench-format" => faiss::bench_format(rest),
        "check-cuda" => cuda::check_cuda(rest),
        "help" | "--help" | "-h" => {
            println!("usage: cargo xtask <test | demo | bench-kernels [--vs-faiss] [--rounds N] | bench-format [--vs-numpy] | check-cuda>");
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

fn test(extra: &[String]) -> Result<()> {
    run(cargo().args(["fmt", "--all", "--", "--check"]))?;
    // One optimised build serves the tests and the benches (candle unoptimised is 10-20x slower).
    run(cargo()
        .args(["test", "--workspace", "--release"])
        .args(extra))?;
    run(cargo().args(["bench", "--workspace", "--no-run"]))?;
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
