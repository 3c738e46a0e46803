//! # qn-train — training with quantization noise
//!
//! This crate will hold the quant-noise layers (`QLinear`, `QEmbedding`, `QConv2d`), centroid
//! fine-tuning, the iterative-PQ stage runner and the trainer. It builds on the noise primitives of
//! [`qn_kernels::noise`], which already exist.
//!
//! Status: not written yet (see the qn-train issue); it re-exports the kernels it will stand on.
//!
//! ```
//! let p = qn_train::kernels::noise::NoiseRate::new(0.1).unwrap();
//! assert_eq!(p.get(), 0.1);
//! ```

pub use qn_kernels as kernels;
