//! A model with everything needed to use it — config, label map, tokenizer files, pooling — from a
//! local directory, a hub id or a self-contained `.qnz`.
//!
//! A `.qnz` written by [`qnz_metadata`]'s caller carries, in its header metadata, `hf:config.json`
//! (the classifier's config with its label map), `hf:file:<name>` for each tokenizer and
//! sentence-transformers file (`hf:hex:<name>` for a binary one) — byte for byte, so that a
//! decompressed directory is the source's — and nothing else is needed to evaluate, serve or
//! decompress it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use qn_format::Reader;

use crate::coded::CodedWeights;
use crate::encoder::{build_encoder_coded, read_weights, Encoder, EncoderConfig};
use crate::hub::{resolve, ModelRef};
use crate::text::{LabelMap, TextTokenizer};
use crate::{Error, Result};

/// The metadata key of the config.
pub const CONFIG_KEY: &str = "hf:config.json";
/// The metadata key prefix of a text file.
pub const FILE_KEY: &str = "hf:file:";
/// The metadata key prefix of a binary file (hex).
pub const HEX_KEY: &str = "hf:hex:";

/// How sentence embeddings are pooled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pooling {
    /// Mean over the mask (else the first token).
    pub mean: bool,
    /// L2-normalise.
    pub normalize: bool,
}

/// A loaded model and its companions.
#[derive(Debug)]
pub struct EncoderBundle {
    /// The model.
    pub model: Encoder,
    /// Its config (the label map set).
    pub config: EncoderConfig,
    /// Class names by index.
    pub labels: Vec<String>,
    /// Tokenizer and sentence-transformers files by relative name, byte for byte.
    pub files: Vec<(String, Vec<u8>)>,
    /// Where it came from (for messages).
    pub source: String,
    /// What the user should be told (initialised head, unused tensors).
    pub warnings: Vec<String>,
    /// Whether the classification head came from the seed (the checkpoint had none that fit).
    pub head_initialised: bool,
}

/// What a command wants from the model it loads.
#[derive(Debug, Clone, Default)]
pub struct LoadRequest {
    /// The task's labels: the head is built for them (a saved head of another size is replaced).
    pub labels: Option<LabelMap>,
    /// A `.qnz`'s quantized Linear and Embedding weights stay coded and the layers run from their
    /// codes (evaluation, serving: no dense copy is made). Off, they are decoded to float weights
    /// that training starts from.
    pub keep_codes: bool,
}

/// Whether `spec` names a `.qnz` file.
pub fn is_qnz(spec: &str) -> bool {
    spec.ends_with(".qnz") || Path::new(spec).extension().is_some_and(|e| e == "qnz")
}

/// Loads `spec` (a directory, a hub id, or a `.qnz`).
pub fn load_bundle(
    spec: &str,
    revision: Option<&str>,
    head: &LoadRequest,
    seed: u64,
    device: &Device,
) -> Result<EncoderBundle> {
    if is_qnz(spec) {
        return load_qnz(Path::new(spec), head, seed, device);
    }
    let files = resolve(&ModelRef::parse(spec), revision)?;
    let config = EncoderConfig::from_file(&files.config)?;
    let tensors = read_weights(&files.weights, config.family(), device)?;
    let mut extra = Vec::new();
    for (name, p) in &files.tokenizer_files {
        extra.push((
            name.clone(),
            std::fs::read(p).map_err(|e| Error::file(p, e))?,
        ));
    }
    for (name, p) in [
        ("1_Pooling/config.json", &files.pooling),
        ("modules.json", &files.modules),
    ] {
        if let Some(p) = p {
            extra.push((
                name.to_string(),
                std::fs::read(p).map_err(|e| Error::file(p, e))?,
            ));
        }
    }
    assemble(
        config,
        tensors,
        CodedWeights::default(),
        &files.weights,
        extra,
        files.source,
        head,
        seed,
        device,
    )
}

#[allow(clippy::too_many_arguments)]
fn assemble(
    mut config: EncoderConfig,
    tensors: HashMap<String, Tensor>,
    coded: CodedWeights,
    weights: &Path,
    files: Vec<(String, Vec<u8>)>,
    source: String,
    head: &LoadRequest,
    seed: u64,
    device: &Device,
) -> Result<EncoderBundle> {
    let labels: Vec<String> = match (&head.labels, config.labels()) {
        (Some(l), _) => l.names().to_vec(),
        (None, Some(l)) if config.has_classifier_head() => l,
        (None, _) => {
            let n = config.num_labels.unwrap_or(2).max(1);
            (0..n).map(|i| format!("LABEL_{i}")).collect()
        }
    };
    let loaded = build_encoder_coded(&config, tensors, coded, weights, labels.len(), seed, device)?;
    config = crate::hf_dir::classifier_config(&config, &labels);
    Ok(EncoderBundle {
        model: loaded.model,
        config,
        labels,
        files,
        source,
        warnings: loaded.warnings,
        head_initialised: loaded.head_initialised,
    })
}

fn load_qnz(path: &Path, head: &LoadRequest, seed: u64, device: &Device) -> Result<EncoderBundle> {
    let reader = Reader::open(path).map_err(|e| {
        // qn-format's message already starts with the path: say it once.
        let text = e.to_string();
        let prefix = format!("{}: ", path.display());
        Error::file(path, text.strip_prefix(&prefix).unwrap_or(&text))
    })?;
    let meta = &reader.header().metadata;
    let config_text = meta.get(CONFIG_KEY).ok_or_else(|| {
        Error::file(
            path,
            format!("holds no `{CONFIG_KEY}`: it is a bare tensor file (from `qn quantize`), not a model written by `qn compress` or `qn finetune`"),
        )
    })?;
    let config = EncoderConfig::from_json(config_text, &path.join(CONFIG_KEY))?;
    let mut files = Vec::new();
    for (k, v) in meta {
        if let Some(name) = k.strip_prefix(FILE_KEY) {
            files.push((name.to_string(), v.as_bytes().to_vec()));
        } else if let Some(name) = k.strip_prefix(HEX_KEY) {
            files.push((
                name.to_string(),
                from_hex(v)
                    .ok_or_else(|| Error::file(path, format!("metadata `{k}` is not hex")))?,
            ));
        }
    }
    // Quantized matrices (Linear and Embedding weights) stay coded: the layers run from their
    // codes and no dense copy of them is made. Everything else is decoded.
    let mut tensors = HashMap::new();
    let coded = CodedWeights::default();
    for view in reader.views() {
        let name = &view.entry.name;
        if reader.is_exact_row_companion(name) {
            continue;
        }
        let canonical = crate::encoder::canonical_name(name, config.family());
        let shape = view.entry.shape.clone();
        if head.keep_codes && shape.len() == 2 && canonical.ends_with(".weight") {
            let codes = view.codes().map_err(|e| Error::file(path, e))?;
            let tensor = qn_train::kernels::import::coded_tensor(&canonical, &shape, codes, device)
                .map_err(|e| Error::file(path, e))?;
            if let Some(tensor) = tensor {
                let exact = view.exact_row_values().map_err(|e| Error::file(path, e))?;
                coded.insert(canonical, tensor, exact);
                continue;
            }
        }
        let values = view.decode_f32().map_err(|e| Error::file(path, e))?;
        let t = Tensor::from_vec(values, shape, device)?;
        tensors.insert(canonical, t);
    }
    let head = if head.labels.is_some() {
        head.clone()
    } else {
        LoadRequest::default()
    };
    assemble(
        config,
        tensors,
        coded,
        path,
        files,
        path.display().to_string(),
        &head,
        seed,
        device,
    )
}

/// The header metadata that makes a `.qnz` of this bundle self-contained.
pub fn qnz_metadata(bundle: &EncoderBundle) -> Vec<(String, String)> {
    let mut m = vec![(CONFIG_KEY.to_string(), bundle.config.to_json())];
    for (name, bytes) in &bundle.files {
        match std::str::from_utf8(bytes) {
            Ok(s) => m.push((format!("{FILE_KEY}{name}"), s.to_string())),
            Err(_) => m.push((format!("{HEX_KEY}{name}"), to_hex(bytes))),
        }
    }
    m
}

fn to_hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn from_hex(s: &str) -> Option<Vec<u8>> {
    (0..s.len())
        .step_by(2)
        .map(|i| s.get(i..i + 2).and_then(|h| u8::from_str_radix(h, 16).ok()))
        .collect()
}

impl EncoderBundle {
    /// The tokenizer (`tokenizer.json` is required for text).
    pub fn tokenizer(&self, max_len: Option<usize>) -> Result<TextTokenizer> {
        let bytes = self
            .files
            .iter()
            .find(|(n, _)| n == "tokenizer.json")
            .map(|(_, b)| b)
            .ok_or_else(|| Error::File {
                path: format!("{}/tokenizer.json", self.source),
                reason: "missing: the model has no tokenizer.json (a fast tokenizer is required)"
                    .into(),
            })?;
        let path = PathBuf::from(format!("{}/tokenizer.json", self.source));
        // A requested length beyond the model's positions is cut to what the model holds.
        let max_len = max_len.map(|m| m.min(self.max_tokens()));
        TextTokenizer::from_bytes(bytes, &path, max_len, self.config.pad_id())
    }

    /// The longest input the model's position table holds (RoBERTa's positions start after the
    /// padding index).
    pub fn max_tokens(&self) -> usize {
        let c = &self.config;
        match c.family() {
            crate::encoder::Family::Bert => c.max_position_embeddings,
            crate::encoder::Family::Roberta => c.max_position_embeddings - c.pad_id() as usize - 1,
        }
    }

    /// The files of the model as a Hugging Face directory: `config.json`, `model.safetensors`
    /// (dense, Hugging Face names) and the tokenizer files byte for byte.
    pub fn hf_files(&self) -> Result<Vec<(String, Vec<u8>)>> {
        use crate::hf_dir::{safetensors_bytes, state_dict};
        let mut files = vec![
            (
                "config.json".to_string(),
                self.config.to_json().into_bytes(),
            ),
            (
                "model.safetensors".to_string(),
                safetensors_bytes(&state_dict(&self.model)?)?,
            ),
        ];
        files.extend(self.files.iter().cloned());
        Ok(files)
    }

    /// The label map (class names; data files may write them or their indices for SST-2).
    pub fn label_map(&self) -> LabelMap {
        LabelMap::new(self.labels.clone())
    }

    /// sentence-transformers' pooling when the model has its files, else mean + normalise.
    pub fn pooling(&self) -> Pooling {
        let file = |n: &str| {
            self.files
                .iter()
                .find(|(f, _)| f == n)
                .and_then(|(_, b)| serde_json::from_slice::<serde_json::Value>(b).ok())
        };
        let mean = file("1_Pooling/config.json")
            .map(|v| v["pooling_mode_mean_tokens"].as_bool().unwrap_or(true))
            .unwrap_or(true);
        let normalize = match file("modules.json") {
            Some(v) => v
                .as_array()
                .into_iter()
                .flatten()
                .any(|m| m["type"].as_str().is_some_and(|t| t.ends_with("Normalize"))),
            None => true,
        };
        Pooling { mean, normalize }
    }

    /// Sentence embeddings `(b, h)` of a packed batch.
    pub fn embed(&self, x: &Tensor) -> Result<Tensor> {
        let (ids, types, mask) = Encoder::unpack(x)?;
        let h = self.model.hidden_states(&ids, &types, &mask, false)?;
        let p = self.pooling();
        if p.mean {
            self.model.mean_pooled(&h, &mask, p.normalize)
        } else {
            let first = h.narrow(1, 0, 1)?.squeeze(1)?;
            if p.normalize {
                let n = first
                    .sqr()?
                    .sum_keepdim(1)?
                    .sqrt()?
                    .clamp(1e-12, f64::MAX)?;
                Ok(first.broadcast_div(&n)?)
            } else {
                Ok(first)
            }
        }
    }
}
