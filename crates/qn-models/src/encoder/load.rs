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
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::{var_builder::SimpleBackend, Init, VarBuilder};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};

use super::config::{EncoderConfig, Family};
use super::model::Encoder;
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

#[derive(Default)]
struct Record {
    used: Vec<String>,
    missing: Vec<String>,
    mismatched: Vec<String>,
}

struct Recording {
    tensors: HashMap<String, Tensor>,
    record: Arc<Mutex<Record>>,
    seed: u64,
    std: f64,
}

impl SimpleBackend for Recording {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _h: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let mut rec = self.record.lock().expect("record lock");
        rec.used.push(name.to_string());
        if let Some(t) = self.tensors.get(name) {
            if t.shape() == &s {
                return t.to_dtype(dtype)?.to_device(dev);
            }
            rec.mismatched.push(format!(
                "`{name}` is {:?}, the config needs {:?}",
                t.dims(),
                s.dims()
            ));
        } else {
            rec.missing.push(name.to_string());
        }
        // Hugging Face's initialisation: normal(0, initializer_range) weights, zero biases, unit
        // LayerNorm scales; seeded by the run seed and the name so that reruns agree.
        let n = s.elem_count();
        let values = if name.ends_with("bias") {
            vec![0f32; n]
        } else if name.ends_with("LayerNorm.weight") {
            vec![1f32; n]
        } else {
            let h = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
                (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
            });
            let mut rng = ChaCha8Rng::seed_from_u64(self.seed ^ h);
            let normal = Normal::new(0f32, self.std as f32).map_err(candle_core::Error::wrap)?;
            (0..n).map(|_| normal.sample(&mut rng)).collect()
        };
        Tensor::from_vec(values, s, dev)?.to_dtype(dtype)
    }
    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.tensors
            .get(name)
            .ok_or_else(|| candle_core::Error::CannotFindTensor { path: name.into() })?
            .to_dtype(dtype)?
            .to_device(dev)
    }
    fn contains_tensor(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }
}

fn listed(names: &[String]) -> String {
    let shown: Vec<_> = names.iter().take(8).map(|n| format!("`{n}`")).collect();
    let more = names.len().saturating_sub(8);
    if more > 0 {
        format!("{} and {more} more", shown.join(", "))
    } else {
        shown.join(", ")
    }
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
    let record = Arc::new(Mutex::new(Record::default()));
    let backend = Recording {
        tensors,
        record: record.clone(),
        seed,
        std,
    };
    let backend: Box<dyn SimpleBackend> = Box::new(backend);
    let vb = VarBuilder::from_backend(backend, DType::F32, device.clone());
    let model = Encoder::new(config, num_labels, seed, vb)?;
    let rec = std::mem::take(&mut *record.lock().expect("record lock"));
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
