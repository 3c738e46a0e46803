//! Writing an encoder back as a Hugging Face directory that `AutoModelForSequenceClassification`
//! and `AutoTokenizer` load as they are: `config.json` (architectures, `model_type`, label maps),
//! `model.safetensors` under the `…ForSequenceClassification` names (`bert.`/`roberta.` prefix),
//! and the source's tokenizer files byte for byte.
//!
//! Every file is written to a temporary name and renamed; a new directory is assembled beside the
//! target and renamed into place, so an interrupted write leaves nothing half-written.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};
use qn_train::QuantModel;

use crate::encoder::{Encoder, EncoderConfig};
use crate::{Error, Result};

/// The model's tensors under their Hugging Face names, every weight dense (PQ and scalar layers
/// decoded), as f32.
pub fn state_dict(model: &Encoder) -> Result<Vec<(String, Tensor)>> {
    let mut out = Vec::new();
    for layer in model.layers() {
        out.push((
            format!("{}.weight", layer.name()),
            layer.qweight().stored()?.to_dtype(DType::F32)?,
        ));
        for b in layer.other_vars() {
            out.push((format!("{}.bias", layer.name()), b.as_tensor().clone()));
        }
    }
    for (n, v) in model.other_vars() {
        out.push((n, v.as_tensor().clone()));
    }
    Ok(out)
}

/// safetensors bytes of `tensors` (f32).
pub fn safetensors_bytes(tensors: &[(String, Tensor)]) -> Result<Vec<u8>> {
    safetensors_bytes_with(tensors, &[])
}

/// [`safetensors_bytes`] with extra `__metadata__` entries.
pub fn safetensors_bytes_with(
    tensors: &[(String, Tensor)],
    metadata: &[(String, String)],
) -> Result<Vec<u8>> {
    let data: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(n, t)| -> Result<_> {
            let v = t.flatten_all()?.to_vec1::<f32>()?;
            Ok((
                n.clone(),
                t.dims().to_vec(),
                v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            ))
        })
        .collect::<Result<_>>()?;
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = data
        .iter()
        .map(|(n, s, b)| {
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                .map(|v| (n.clone(), v))
        })
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| Error::Candle(e.to_string()))?;
    let mut meta = HashMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    meta.extend(metadata.iter().cloned());
    safetensors::tensor::serialize(views, Some(meta)).map_err(|e| Error::Candle(e.to_string()))
}

/// The `config.json` of a fine-tuned classifier with these labels.
pub fn classifier_config(config: &EncoderConfig, labels: &[String]) -> EncoderConfig {
    let mut c = config.for_classification();
    c.set_labels(labels);
    c
}

/// Writes `files` (name → bytes) as the directory `out`. `out` must not exist, or be an empty
/// directory; with `merge`, an existing directory is kept and the files replace theirs one by one
/// (each atomically).
pub fn write_dir(out: &Path, files: &[(String, Vec<u8>)], merge: bool) -> Result<()> {
    if merge && out.is_dir() {
        for (name, bytes) in files {
            let p = out.join(name);
            if let Some(d) = p.parent() {
                std::fs::create_dir_all(d).map_err(|e| Error::file(d, e))?;
            }
            write_file_atomic(&p, bytes)?;
        }
        return Ok(());
    }
    if out.exists() {
        let empty = out.is_dir()
            && std::fs::read_dir(out)
                .map_err(|e| Error::file(out, e))?
                .next()
                .is_none();
        if !empty {
            return Err(Error::file(
                out,
                "exists and is not an empty directory (choose a new --output)",
            ));
        }
    }
    let parent = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(|e| Error::file(parent, e))?;
    let stage: PathBuf = parent.join(format!(
        ".{}.partial-{}",
        out.file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default(),
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&stage);
    let result = (|| -> Result<()> {
        for (name, bytes) in files {
            let p = stage.join(name);
            if let Some(d) = p.parent() {
                std::fs::create_dir_all(d).map_err(|e| Error::file(d, e))?;
            }
            std::fs::write(&p, bytes).map_err(|e| Error::file(&p, e))?;
        }
        if out.is_dir() {
            std::fs::remove_dir(out).map_err(|e| Error::file(out, e))?;
        }
        std::fs::rename(&stage, out).map_err(|e| Error::file(out, e))
    })();
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&stage);
    }
    result
}

/// Writes one file through a temporary name in its directory.
pub fn write_file_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    qn_format::write_atomic(path, |f| std::io::Write::write_all(f, bytes))
        .map_err(|e| Error::file(path, e))
}
