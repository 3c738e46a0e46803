//! # qn-models — encoders and EfficientNet with quant-noise layers
//!
//! This crate will hold RoBERTa/BERT-family encoders and EfficientNet built from the layers of
//! [`qn_train`], loading Hugging Face / PyTorch weights from a hub id or a local directory.
//!
//! Status: not written yet; it re-exports the layer crate it will stand on.
//!
//! ```
//! let _ = qn_models::train::kernels::noise::NoiseRate::new(0.0).unwrap();
//! ```

pub use qn_train as train;
