//! Loading an encoder's weights from `model.safetensors`, whatever prefix the checkpoint was saved
//! with.
//!
//! Names are brought to the `…ForSequenceClassification` layout first: a `BertModel` /
//! `RobertaModel` checkpoint (all-MiniLM-L6-v2 has no prefix) gets `bert.`/`roberta.`, old
//! `LayerNorm.gamma/beta` become `weight/bias`. The model is then built through a recording
//! [`SimpleBackend`], so the model definition is the one list of the tensors it needs: missing
//! encoder tensors and wrong shapes are errors that list them, a missing head is initialised from
//! the seed (with a warning), and tensors nobody asked for are an error unless they are known
//! leftovers (buffers, pre-training heads, RoBERTa's unused pooler), which are a warning.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};

use super::config::{EncoderConfig, Family};
use super::model::Encoder;
use crate::coded::CodedWeights;
use crate::recording::{listed, name_hash, recording_vb, take, InitFn};
use crate::{Error, Result};

/// A loaded encoder and what the user should be told about it.
#[derive(Debug)]
pub struct Loaded {
    /// The model.
    pub model: Encoder,
    /// Things initialised or ignored (one line each).
    pub warnings: Vec<String>,
    /// Whether the classification head came from the seed rather than the file.
    pub head_initialised: bool,
}

/// Reads a safetensors file as f32 tensors on `device`, named in the canonical layout.
pub fn read_weights(
    path: &Path,
    family: Family,
    device: &Device,
) -> Result<HashMap<String, Tensor>> {
    let raw = candle_core::safetensors::load(path, device)
        .map_err(|e| Error::weights(path, format!("cannot read safetensors: {e}")))?;
    let mut out = HashMap::with_capacity(raw.len());
    for (name, t) in raw {
        let t = if t.dtype() == DType::F32 || !t.dtype().is_float() {
            t
        } else {
            t.to_dtype(DType::F32)?
        };
        let canon = canonical_name(&name, family);
        if out.insert(canon.clone(), t).is_some() {
            return Err(Error::weights(
                path,
                format!("tensor `{canon}` appears twice (with and without the prefix)"),
            ));
        }
    }
    Ok(out)
}

/// The `…ForSequenceClassification` name of a checkpoint tensor.
pub fn canonical_name(name: &str, family: Family) -> String {
    let prefix = family.prefix();
    let mut n = name.to_string();
    for (old, new) in [
        ("LayerNorm.gamma", "LayerNorm.weight"),
        ("LayerNorm.beta", "LayerNorm.bias"),
    ] {
        if let Some(stem) = n.strip_suffix(old) {
            n = format!("{stem}{new}");
        }
    }
    let body = ["embeddings.", "encoder.", "pooler."];
    if body.iter().any(|b| n.starts_with(b)) {
        n = format!("{prefix}.{n}");
    }
    n
}

fn is_buffer(name: &str) -> bool {
    name.ends_with(".position_ids") || name.ends_with("embeddings.token_type_ids")
}

fn is_known_leftover(name: &str, family: Family) -> bool {
    name.starts_with("lm_head.")
        || name.starts_with("cls.")
        || (family == Family::Roberta && name.starts_with("roberta.pooler."))
}

fn is_head(name: &str, family: Family) -> bool {
    name.starts_with("classifier.") || (family == Family::Bert && name.starts_with("bert.pooler."))
}

/// Builds an encoder with a `num_labels`-way head from canonical `tensors` (read from
/// `weights_path`, which errors name). A head absent from the file, or one with another number of
/// classes, is initialised from `seed` with a warning.
pub fn build_encoder(
    config: &EncoderConfig,
    tensors: HashMap<String, Tensor>,
    weights_path: &Path,
    num_labels: usize,
    seed: u64,
    device: &Device,
) -> Result<Loaded> {
    build_encoder_coded(
        config,
        tensors,
        CodedWeights::default(),
        weights_path,
        num_labels,
        seed,
        device,
    )
}

/// [`build_encoder`] with some Linear and Embedding weights still coded (read from a `.qnz`):
/// those layers run from their codes. A coded tensor no layer takes is an unexpected tensor.
pub fn build_encoder_coded(
    config: &EncoderConfig,
    tensors: HashMap<String, Tensor>,
    coded: CodedWeights,
    weights_path: &Path,
    num_labels: usize,
    seed: u64,
    device: &Device,
) -> Result<Loaded> {
    if num_labels == 0 {
        return Err(Error::Input("a classifier needs at least one label".into()));
    }
    let family = config.family();
    let std = config
        .extra
        .get("initializer_range")
        .and_then(|v| v.as_f64())
        .unwrap_or(0.02);
    let names: Vec<String> = tensors.keys().cloned().collect();
    // Hugging Face's initialisation for what the file lacks: normal(0, initializer_range)
    // weights, zero biases, unit LayerNorm scales; seeded by the run seed and the name.
    let init: InitFn = Box::new(move |name, dims| {
        let n = dims.iter().product();
        Ok(if name.ends_with("bias") {
            vec![0f32; n]
        } else if name.ends_with("LayerNorm.weight") {
            vec![1f32; n]
        } else {
            let mut rng = ChaCha8Rng::seed_from_u64(seed ^ name_hash(name));
            let normal = Normal::new(0f32, std as f32).map_err(candle_core::Error::wrap)?;
            (0..n).map(|_| normal.sample(&mut rng)).collect()
        })
    });
    let (vb, record) = recording_vb(tensors, init, device);
    let model = Encoder::with_coded(config, num_labels, seed, vb, &coded)?;
    let mut rec = take(&record);
    // A mis-shaped coded weight was asked from `vb` too (and filled by `init`): it is a mismatch,
    // not a missing tensor, as for a float one.
    for (name, message) in coded.take_mismatched() {
        rec.missing.retain(|n| *n != name);
        rec.mismatched.push(message);
    }
    let mut warnings = Vec::new();
    let head_missing: Vec<String> = rec
        .missing
        .iter()
        .filter(|n| is_head(n, family))
        .cloned()
        .collect();
    let body_missing: Vec<String> = rec
        .missing
        .iter()
        .filter(|n| !is_head(n, family))
        .cloned()
        .collect();
    if !body_missing.is_empty() {
        return Err(Error::weights(
            weights_path,
            format!("missing tensors {}", listed(&body_missing)),
        ));
    }
    let (head_mismatch, body_mismatch): (Vec<_>, Vec<_>) = rec
        .mismatched
        .iter()
        .cloned()
        .partition(|m| m.starts_with("`classifier."));
    if !body_mismatch.is_empty() {
        return Err(Error::weights(
            weights_path,
            format!("wrong shapes: {}", body_mismatch.join("; ")),
        ));
    }
    if !head_missing.is_empty() {
        warnings.push(format!(
            "{}: no classification head ({}): initialised from seed {seed} for {num_labels} labels; fine-tune before trusting its predictions",
            weights_path.display(),
            listed(&head_missing)
        ));
    }
    if !head_mismatch.is_empty() {
        warnings.push(format!(
            "{}: the saved head does not fit {num_labels} labels ({}): initialised from seed {seed}",
            weights_path.display(),
            head_mismatch.join("; ")
        ));
    }
    let used: std::collections::HashSet<&String> = rec.used.iter().collect();
    let mut unused: Vec<String> = names.into_iter().filter(|n| !used.contains(n)).collect();
    unused.extend(coded.names());
    unused.sort();
    // Buffers (position ids) are recomputed from the input: not worth a warning.
    unused.retain(|n| !is_buffer(n));
    let (leftover, unexpected): (Vec<_>, Vec<_>) = unused
        .into_iter()
        .partition(|n| is_known_leftover(n, family));
    if !unexpected.is_empty() {
        return Err(Error::weights(
            weights_path,
            format!(
                "unexpected tensors {} (not part of a {} encoder with this config.json)",
                listed(&unexpected),
                config.model_type
            ),
        ));
    }
    if !leftover.is_empty() {
        warnings.push(format!(
            "{}: unused tensors {}",
            weights_path.display(),
            listed(&leftover)
        ));
    }
    Ok(Loaded {
        model,
        warnings,
        head_initialised: !head_missing.is_empty() || !head_mismatch.is_empty(),
    })
}
