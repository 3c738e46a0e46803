//! `config.json` of a BERT-family encoder (BERT, RoBERTa, XLM-RoBERTa), read and checked.
//!
//! Options the encoder does not implement are refused by name (relative position embeddings, a
//! decoder, cross-attention) instead of being ignored.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Which family a checkpoint belongs to: it decides the tensor prefix, the position ids and the head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// BERT (`bert.` prefix, token types, pooler + `classifier`).
    Bert,
    /// RoBERTa and XLM-RoBERTa (`roberta.` prefix, positions from `padding_idx + 1`,
    /// `classifier.dense` + `classifier.out_proj`).
    Roberta,
}

impl Family {
    /// The tensor-name prefix of the `…ForSequenceClassification` state dict.
    pub fn prefix(self) -> &'static str {
        match self {
            Family::Bert => "bert",
            Family::Roberta => "roberta",
        }
    }
    /// The class name Hugging Face gives the classifier.
    pub fn classifier_architecture(self, model_type: &str) -> &'static str {
        match (self, model_type) {
            (Family::Roberta, "xlm-roberta") => "XLMRobertaForSequenceClassification",
            (Family::Roberta, _) => "RobertaForSequenceClassification",
            (Family::Bert, _) => "BertForSequenceClassification",
        }
    }
}

/// The hidden activation of the feed-forward block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `gelu`: the exact, erf-based GELU.
    GeluErf,
    /// `gelu_new` / `gelu_pytorch_tanh`: the tanh approximation.
    GeluTanh,
    /// `relu`.
    Relu,
}

/// The fields of `config.json` the encoder uses; everything else is kept verbatim in `extra` so
/// that a decompressed model's `config.json` carries it back.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EncoderConfig {
    /// `bert`, `roberta` or `xlm-roberta`.
    pub model_type: String,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Hidden size.
    pub hidden_size: usize,
    /// Layers.
    pub num_hidden_layers: usize,
    /// Attention heads.
    pub num_attention_heads: usize,
    /// Feed-forward size.
    pub intermediate_size: usize,
    /// Feed-forward activation name.
    #[serde(default = "default_act")]
    pub hidden_act: String,
    /// Dropout after embeddings, attention output and feed-forward.
    #[serde(default = "default_dropout")]
    pub hidden_dropout_prob: f64,
    /// Dropout on attention probabilities.
    #[serde(default = "default_dropout")]
    pub attention_probs_dropout_prob: f64,
    /// Dropout before the classifier (`null`: `hidden_dropout_prob`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub classifier_dropout: Option<f64>,
    /// Positions the model was trained for.
    pub max_position_embeddings: usize,
    /// Token types (2 for BERT, 1 for RoBERTa).
    #[serde(default = "default_type_vocab")]
    pub type_vocab_size: usize,
    /// LayerNorm epsilon.
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    /// The padding token (RoBERTa's positions start after it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pad_token_id: Option<u32>,
    /// Must be `absolute`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub position_embedding_type: Option<String>,
    /// The classes' names, by index (as strings, as Hugging Face writes them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id2label: Option<BTreeMap<String, String>>,
    /// The classes' indices, by name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label2id: Option<BTreeMap<String, usize>>,
    /// Number of classes (when `id2label` is absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_labels: Option<usize>,
    /// The model classes the checkpoint was saved from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub architectures: Option<Vec<String>>,
    /// Every other field, kept as it was.
    #[serde(flatten)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

fn default_act() -> String {
    "gelu".into()
}
fn default_dropout() -> f64 {
    0.1
}
fn default_type_vocab() -> usize {
    2
}
fn default_eps() -> f64 {
    1e-12
}

impl EncoderConfig {
    /// Reads and checks `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::file(path, e))?;
        Self::from_json(&text, path)
    }

    /// Parses and checks a `config.json` text; `path` names it in errors.
    pub fn from_json(text: &str, path: &Path) -> Result<Self> {
        let c: EncoderConfig = serde_json::from_str(text).map_err(|e| {
            let msg = e.to_string();
            // serde names the missing field in its message: keep it as the field.
            let field = msg
                .strip_prefix("missing field `")
                .and_then(|r| r.split('`').next())
                .unwrap_or("(json)");
            Error::config(path, field, msg.clone())
        })?;
        c.validate(path)?;
        Ok(c)
    }

    fn validate(&self, path: &Path) -> Result<()> {
        let err = |f: &str, r: String| Err(Error::config(path, f, r));
        if !matches!(self.model_type.as_str(), "bert" | "roberta" | "xlm-roberta") {
            return err(
                "model_type",
                format!(
                    "`{}` is not supported (supported: bert, roberta, xlm-roberta)",
                    self.model_type
                ),
            );
        }
        if let Some(p) = &self.position_embedding_type {
            if p != "absolute" {
                return err(
                    "position_embedding_type",
                    format!("`{p}` is not supported (only absolute position embeddings)"),
                );
            }
        }
        for flag in ["is_decoder", "add_cross_attention"] {
            if self.extra.get(flag).and_then(|v| v.as_bool()) == Some(true) {
                return err(flag, "decoders are not supported (encoders only)".into());
            }
        }
        for (f, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("intermediate_size", self.intermediate_size),
            ("max_position_embeddings", self.max_position_embeddings),
            ("type_vocab_size", self.type_vocab_size),
        ] {
            if v == 0 {
                return err(f, "must be at least 1".into());
            }
        }
        if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return err(
                "num_attention_heads",
                format!(
                    "{} does not divide hidden_size {}",
                    self.num_attention_heads, self.hidden_size
                ),
            );
        }
        if !(self.layer_norm_eps.is_finite() && self.layer_norm_eps > 0.0) {
            return err("layer_norm_eps", "must be a positive number".into());
        }
        for (f, p) in [
            ("hidden_dropout_prob", Some(self.hidden_dropout_prob)),
            (
                "attention_probs_dropout_prob",
                Some(self.attention_probs_dropout_prob),
            ),
            ("classifier_dropout", self.classifier_dropout),
        ] {
            if let Some(p) = p {
                if !(0.0..1.0).contains(&p) {
                    return err(f, format!("{p} is outside [0, 1)"));
                }
            }
        }
        self.activation()
            .map_err(|r| Error::config(path, "hidden_act", r))?;
        if self.family() == Family::Roberta {
            let pad = self.pad_token_id.unwrap_or(1) as usize;
            if pad + 1 >= self.max_position_embeddings {
                return err(
                    "max_position_embeddings",
                    format!(
                        "{} leaves no positions after padding_idx {pad}",
                        self.max_position_embeddings
                    ),
                );
            }
        }
        if let Some(map) = &self.id2label {
            for k in map.keys() {
                if k.parse::<usize>().map_or(true, |i| i >= map.len()) {
                    return err(
                        "id2label",
                        format!("key `{k}` is not a class index below {}", map.len()),
                    );
                }
            }
        }
        Ok(())
    }

    /// The family the `model_type` belongs to.
    pub fn family(&self) -> Family {
        if self.model_type == "bert" {
            Family::Bert
        } else {
            Family::Roberta
        }
    }

    /// The feed-forward activation.
    pub fn activation(&self) -> std::result::Result<Activation, String> {
        match self.hidden_act.as_str() {
            "gelu" => Ok(Activation::GeluErf),
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Ok(Activation::GeluTanh),
            "relu" => Ok(Activation::Relu),
            other => Err(format!(
                "`{other}` is not supported (gelu, gelu_new, gelu_pytorch_tanh, relu)"
            )),
        }
    }

    /// The padding token id (BERT 0, RoBERTa 1 when unset).
    pub fn pad_id(&self) -> u32 {
        self.pad_token_id.unwrap_or(match self.family() {
            Family::Bert => 0,
            Family::Roberta => 1,
        })
    }

    /// The class names by index, when the config has a real label map (not Hugging Face's
    /// placeholder `LABEL_0`, … which every config without one carries).
    pub fn labels(&self) -> Option<Vec<String>> {
        let map = self.id2label.as_ref()?;
        let mut v = vec![String::new(); map.len()];
        for (k, name) in map {
            v[k.parse::<usize>().ok()?] = name.clone();
        }
        Some(v)
    }

    /// Whether the checkpoint was saved with a sequence-classification head.
    pub fn has_classifier_head(&self) -> bool {
        self.architectures
            .iter()
            .flatten()
            .any(|a| a.ends_with("ForSequenceClassification"))
    }

    /// Sets the label map (and `num_labels`), as a fine-tuned model's config records it.
    pub fn set_labels(&mut self, labels: &[String]) {
        self.id2label = Some(
            labels
                .iter()
                .enumerate()
                .map(|(i, l)| (i.to_string(), l.clone()))
                .collect(),
        );
        self.label2id = Some(
            labels
                .iter()
                .enumerate()
                .map(|(i, l)| (l.clone(), i))
                .collect(),
        );
        self.num_labels = Some(labels.len());
    }

    /// The config a `…ForSequenceClassification` checkpoint is saved with.
    pub fn for_classification(&self) -> EncoderConfig {
        let mut c = self.clone();
        c.architectures = Some(vec![self
            .family()
            .classifier_architecture(&self.model_type)
            .to_string()]);
        c
    }

    /// As JSON text (Hugging Face's field names).
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("a config serializes")
    }
}
