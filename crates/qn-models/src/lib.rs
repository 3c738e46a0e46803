//! # qn-models — encoders with quant-noise layers, loaded from the Hugging Face hub
//!
//! - [`encoder`]: BERT / RoBERTa / XLM-RoBERTa with a sequence-classification head, every Linear
//!   and Embedding a [`qn_train`] quant-noise layer, weights named as in Hugging Face;
//! - [`hub`]: a hub id or a local directory to files, with the cache rules of Hugging Face's own
//!   tools (`HF_HUB_CACHE`, `HF_HOME`, `HF_HUB_OFFLINE`);
//! - [`text`]: the tokenizer (truncation, sentence pairs, dynamic padding) and GLUE-style TSV data;
//! - [`hf_dir`]: writing a fine-tuned or decompressed model back as a Hugging Face directory.
//!
//! ```
//! use candle_core::Device;
//! use qn_models::encoder::{build_encoder, pack_batch, EncoderConfig};
//! use qn_train::QuantModel;
//! let cfg = EncoderConfig::from_json(r#"{"model_type": "bert", "vocab_size": 50, "hidden_size": 8,
//!     "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 16,
//!     "max_position_embeddings": 32}"#, "config.json".as_ref())?;
//! // No weights: everything is initialised from the seed (with warnings saying so).
//! let loaded = build_encoder(&cfg, Default::default(), "none".as_ref(), 2, 0, &Device::Cpu);
//! assert!(loaded.is_err()); // the encoder body is required; only a missing head is tolerated
//! # Ok::<(), qn_models::Error>(())
//! ```

pub mod bundle;
pub mod coded;
pub mod encoder;
mod error;
pub mod hf_dir;
pub mod hub;
mod recording;
pub mod text;
pub mod vision;

pub use error::{Error, Result};
pub use qn_train as train;
