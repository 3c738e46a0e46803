//! Peer comparisons in one run: `bench-kernels --vs-faiss` (k-means against faiss-cpu) and
//! `bench-format --vs-numpy` (PQ decode against numpy's gather).

use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::{cargo, root, run, target_dir};

const ROWS: usize = 1024;
const COLS: usize = 4096;
const D: usize = 8;
const K: usize = 256;
const ITERS: usize = 20;

/// A virtualenv in `.venv` with numpy and faiss-cpu; returns its python.
pub(crate) fn venv(packages: &[&str]) -> Result<std::path::PathBuf> {
    let venv = root().join(".venv");
    let python = venv.join("bin/python");
    if !python.exists() {
        run(Command::new("python3").args(["-m", "venv"]).arg(&venv))?;
    }
    run(Command::new(&python)
        .args(["-m", "pip", "install", "--quiet"])
        .args(packages))?;
    Ok(python)
}

fn json_number(line: &str, key: &str) -> Result<f64> {
    let pat = format!("\"{key}\": ");
    let start = line
        .find(&pat)
        .with_context(|| format!("no `{key}` in `{line}`"))?
        + pat.len();
    let rest = &line[start..];
    let end = rest.find([',', '}']).unwrap_or(rest.len());
    rest[..end]
        .trim()
        .parse()
        .with_context(|| format!("`{key}` is not a number in `{line}`"))
}

fn output(cmd: &mut Command) -> Result<String> {
    let line = format!("{cmd:?}");
    let out = cmd
        .current_dir(root())
        .output()
        .with_context(|| format!("could not start {line}"))?;
    if !out.status.success() {
        bail!("{line} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

pub(crate) fn compare(rounds: usize) -> Result<()> {
    let python = venv(&["numpy", "faiss-cpu==1.15.1"])?;
    run(cargo().args([
        "build",
        "--release",
        "--quiet",
        "--package",
        "qn-kernels",
        "--example",
        "kmeans_vs_faiss",
    ]))?;
    let data = target_dir()?.join("kmeans-bench.f32");
    let dims = [ROWS, COLS].map(|v| v.to_string());
    run(Command::new(&python)
        .arg("scripts/faiss_kmeans.py")
        .arg("make")
        .arg(&data)
        .args(&dims)
        .arg("0"))?;
    let params = [ROWS, COLS, D, K, ITERS].map(|v| v.to_string());
    let ours_bin = target_dir()?.join("release/examples/kmeans_vs_faiss");
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    let (mut ours_mse, mut theirs_mse) = (0.0, 0.0);
    for round in 1..=rounds.max(1) {
        // Some machines set OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE to dodge old OpenBLAS bugs; they
        // slow a current build, so the peer runs without them (as a user's machine would).
        let f = output(
            Command::new(&python)
                .env_remove("OPENBLAS_CORETYPE")
                .env_remove("OPENBLAS_L2_SIZE")
                .arg("scripts/faiss_kmeans.py")
                .arg("run")
                .arg(&data)
                .args(&params),
        )?;
        let o = output(Command::new(&ours_bin).arg(&data).args(&params[..]))?;
        eprintln!("round {round}: faiss {f}\nround {round}: ours  {o}");
        theirs.push(json_number(&f, "seconds")?);
        ours.push(json_number(&o, "seconds")?);
        theirs_mse = json_number(&f, "relative_mse")?;
        ours_mse = json_number(&o, "relative_mse")?;
    }
    let (o, t) = (median(ours), median(theirs));
    println!(
        "k-means {ROWS}x{COLS}, d = {D}, K = {K}, {ITERS} iterations, all {} sub-vectors",
        ROWS * COLS / D
    );
    println!("| | seconds (median of {rounds}) | relative MSE |");
    println!("|---|---|---|");
    println!("| qn-kernels | {o:.3} | {ours_mse:.4} |");
    println!("| faiss-cpu 1.15.1 | {t:.3} | {theirs_mse:.4} |");
    println!(
        "time ratio ours/faiss = {:.2}; MSE difference = {:+.2} %",
        o / t,
        (ours_mse / theirs_mse - 1.0) * 100.0
    );
    Ok(())
}

/// `bench-format [--vs-numpy]`.
pub(crate) fn bench_format(args: &[String]) -> Result<()> {
    match args {
        [] => run(cargo().args(["bench", "--package", "qn-format"])),
        [flag] if flag == "--vs-numpy" => decode_vs_numpy(),
        _ => bail!("bench-format: expected no argument or --vs-numpy"),
    }
}

fn decode_vs_numpy() -> Result<()> {
    let python = venv(&["numpy"])?;
    run(cargo().args([
        "build",
        "--release",
        "--quiet",
        "--package",
        "qn-format",
        "--example",
        "decode_vs_numpy",
    ]))?;
    let dir = target_dir()?.join("decode-bench");
    std::fs::create_dir_all(&dir)?;
    let dims = [ROWS, COLS, D].map(|v| v.to_string());
    run(Command::new(&python)
        .arg("scripts/numpy_gather.py")
        .arg("make")
        .arg(&dir)
        .args(&dims)
        .args([K.to_string(), "0".into()]))?;
    let ours_bin = target_dir()?.join("release/examples/decode_vs_numpy");
    let mut rows = Vec::new();
    for round in 1..=3 {
        let n = output(
            Command::new(&python)
                .env_remove("OPENBLAS_CORETYPE")
                .env_remove("OPENBLAS_L2_SIZE")
                .arg("scripts/numpy_gather.py")
                .arg("run")
                .arg(&dir)
                .args(&dims)
                .arg("20"),
        )?;
        let ours = |threads: Option<&str>| {
            let mut c = Command::new(&ours_bin);
            if let Some(t) = threads {
                c.env("RAYON_NUM_THREADS", t);
            }
            output(
                c.arg(dir.join("centroids.f32"))
                    .arg(dir.join("assign.u8"))
                    .args(&dims)
                    .arg("20"),
            )
        };
        let (one, all) = (ours(Some("1"))?, ours(None)?);
        eprintln!("round {round}: numpy {n}\nround {round}: ours 1 thread {one}\nround {round}: ours all threads {all}");
        rows.push((
            json_number(&one, "gbps")?,
            json_number(&all, "gbps")?,
            json_number(&n, "gather_gbps")?,
            json_number(&n, "layout_gbps")?,
        ));
    }
    let med = |f: fn(&(f64, f64, f64, f64)) -> f64| median(rows.iter().map(f).collect());
    let (one, all, gather, layout) = (med(|r| r.0), med(|r| r.1), med(|r| r.2), med(|r| r.3));
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!("PQ decode {ROWS}x{COLS}, d = {D}, K = {K}, GB/s of f32 written (median of 3 rounds, best of 20 each)");
    println!("numpy's take is single-threaded; ours runs on 1 thread and on all {threads}.");
    println!("| decoder | GB/s | ours 1 thread / it | ours {threads} threads / it |");
    println!("|---|---|---|---|");
    println!("| qn-format decode_into, 1 thread | {one:.2} | 1.00 | |");
    println!("| qn-format decode_into, {threads} threads | {all:.2} | | 1.00 |");
    println!(
        "| numpy take (sub-vector order only) | {gather:.2} | {:.2} | {:.2} |",
        one / gather,
        all / gather
    );
    println!(
        "| numpy take + transpose to the weight layout | {layout:.2} | {:.2} | {:.2} |",
        one / layout,
        all / layout
    );
    Ok(())
}
