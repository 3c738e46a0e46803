//! Checkpoints of a staged training run: every variable, PQ assignments, optimizer moments, and the
//! position (stage, step), written atomically (`latest.json` is replaced last and names the tensors).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Where a run stands.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Position {
    /// Index of the stage being trained.
    pub stage: usize,
    /// Steps done within it.
    pub step_in_stage: usize,
    /// Steps done in all.
    pub global_step: usize,
    /// Optimizer updates of the current stage.
    pub optimizer_steps: u64,
    /// Product-quantized layers: (name, block size).
    pub pq_layers: Vec<(String, usize)>,
    /// The tensors file beside `latest.json`.
    pub tensors: String,
    /// Evaluation accuracy at the end of each finished stage.
    #[serde(default)]
    pub stage_accuracy: Vec<f64>,
    /// Warnings of the finished stages (layers left float).
    #[serde(default)]
    pub warnings: Vec<String>,
    /// What defines the run ([`crate::trainer::fingerprint`]).
    #[serde(default)]
    pub fingerprint: crate::trainer::Fingerprint,
}

fn io(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::file(path, e)
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    qn_format::write_atomic(path, |f| f.write_all(bytes)).map_err(|e| match e {
        qn_format::Error::Io { source, .. } => io(path, source),
        other => io(path, other),
    })
}

/// The tensors as a safetensors file (f32 and u32 tensors; sorted names, so the bytes are a
/// function of the values).
fn serialize(tensors: &HashMap<String, Tensor>) -> Result<Vec<u8>> {
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    let mut owned = Vec::with_capacity(names.len());
    for name in names {
        let t = &tensors[name];
        let flat = t.flatten_all()?;
        let (dtype, bytes): (safetensors::Dtype, Vec<u8>) = match t.dtype() {
            DType::U32 => (
                safetensors::Dtype::U32,
                flat.to_vec1::<u32>()?
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect(),
            ),
            _ => (
                safetensors::Dtype::F32,
                flat.to_dtype(DType::F32)?
                    .to_vec1::<f32>()?
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect(),
            ),
        };
        owned.push((name.clone(), dtype, t.dims().to_vec(), bytes));
    }
    let views = owned
        .iter()
        .map(|(n, d, s, b)| {
            safetensors::tensor::TensorView::new(*d, s.clone(), b).map(|v| (n.clone(), v))
        })
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| Error::config("checkpoint", e.to_string()))?;
    safetensors::tensor::serialize(views, None)
        .map_err(|e| Error::config("checkpoint", e.to_string()))
}

/// Saves `tensors` and `position` into `dir`; the previous checkpoint is removed only after the new
/// one is complete.
pub fn save(dir: &Path, position: &Position, tensors: &HashMap<String, Tensor>) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
    let previous = load_position(dir)?.map(|p| dir.join(p.tensors));
    let name = format!(
        "ckpt-{:08}-{}.safetensors",
        position.global_step, position.stage
    );
    let file = dir.join(&name);
    write_atomic(&file, &serialize(tensors)?)?;
    let position = Position {
        tensors: name,
        ..position.clone()
    };
    let json = serde_json::to_vec_pretty(&position).map_err(|e| io(dir, e))?;
    write_atomic(&dir.join("latest.json"), &json)?;
    if let Some(prev) = previous.filter(|p| *p != file) {
        let _ = std::fs::remove_file(prev);
    }
    Ok(())
}

/// The position of the latest checkpoint in `dir`, if any.
pub fn load_position(dir: &Path) -> Result<Option<Position>> {
    let path = dir.join("latest.json");
    if !path.exists() {
        return Ok(None);
    }
    let text = std::fs::read(&path).map_err(|e| io(&path, e))?;
    serde_json::from_slice(&text).map(Some).map_err(|e| {
        io(
            &path,
            format!("not a checkpoint ({e}); remove it to start afresh"),
        )
    })
}

/// The latest checkpoint's position and tensors.
pub fn load(dir: &Path, device: &Device) -> Result<Option<(Position, HashMap<String, Tensor>)>> {
    let Some(position) = load_position(dir)? else {
        return Ok(None);
    };
    let file: PathBuf = dir.join(&position.tensors);
    let tensors = candle_core::safetensors::load(&file, device).map_err(|e| io(&file, e))?;
    Ok(Some((position, tensors)))
}

/// `u32` assignments as a tensor that safetensors can hold.
pub(crate) fn index_tensor(index: Vec<u32>, device: &Device) -> Result<Tensor> {
    let n = index.len();
    Ok(Tensor::from_vec(index, n, device)?)
}

pub(crate) fn index_vec(t: &Tensor) -> Result<Vec<u32>> {
    Ok(t.to_dtype(DType::U32)?.to_vec1::<u32>()?)
}
