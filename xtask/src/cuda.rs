//! `check-cuda`: compile the `cuda` feature without a GPU or a system CUDA toolkit.
//!
//! Follows `shared/CUDA.md`: NVIDIA's CUDA 13 wheels from PyPI give a toolkit-shaped tree; a
//! directory of links makes it look like `CUDA_HOME` (`bin`, `include`, `nvvm`, `lib64` with the
//! unversioned names the build scripts look for); `CUDA_COMPUTE_CAP=90` stands in for `nvidia-smi`.
//! `cargo check` never links, so no `libcuda.so` is needed.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::{cargo, run, target_dir};

const TOOLKIT: &str = "cuda-toolkit[nvcc,cudart,cublas,curand,nvrtc,cccl]==13.0.3.0";

fn find_cu13(venv: &Path) -> Result<PathBuf> {
    for entry in fs::read_dir(venv.join("lib"))? {
        let p = entry?.path().join("site-packages/nvidia/cu13");
        if p.is_dir() {
            return Ok(p);
        }
    }
    bail!("no site-packages/nvidia/cu13 under {}", venv.display())
}

fn link(target: &Path, at: &Path) -> Result<()> {
    if at.symlink_metadata().is_ok() {
        fs::remove_file(at)?;
    }
    std::os::unix::fs::symlink(target, at)
        .with_context(|| format!("link {} -> {}", at.display(), target.display()))
}

fn cuda_home() -> Result<PathBuf> {
    let base = target_dir()?.join("cuda-toolkit");
    let venv = base.join("venv");
    if !venv.join("bin/python").exists() {
        run(Command::new("python3").args(["-m", "venv"]).arg(&venv))?;
    }
    run(Command::new(venv.join("bin/python")).args(["-m", "pip", "install", "--quiet", TOOLKIT]))?;
    let cu13 = find_cu13(&venv)?;
    let home = base.join("home");
    let lib64 = home.join("lib64");
    fs::create_dir_all(&lib64)?;
    for dir in ["bin", "include", "nvvm"] {
        link(&cu13.join(dir), &home.join(dir))?;
    }
    for entry in fs::read_dir(cu13.join("lib"))? {
        let path = entry?.path();
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        link(&path, &lib64.join(&name))?;
        // libcudart.so.13 -> also libcudart.so
        if let Some(i) = name.find(".so.") {
            link(&path, &lib64.join(&name[..i + 3]))?;
        }
    }
    Ok(home)
}

pub(crate) fn check_cuda(extra: &[String]) -> Result<()> {
    let home = cuda_home()?;
    let path = format!(
        "{}:{}",
        home.join("bin").display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut cmd = cargo();
    cmd.args([
        "check",
        "--package",
        "qn-cli",
        "--features",
        "cuda",
        "--target-dir",
    ])
    .arg(target_dir()?.join("cuda-check"))
    .args(extra)
    .env("CUDA_HOME", &home)
    .env("CUDA_PATH", &home)
    .env("CUDA_ROOT", &home)
    .env(
        "CUDA_COMPUTE_CAP",
        std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".into()),
    )
    .env("LD_LIBRARY_PATH", home.join("lib64"))
    .env("PATH", path);
    run(&mut cmd)
}
