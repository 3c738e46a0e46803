//! Product quantization: k-means over weight sub-vectors, codes, and decoding.
//!
//! A weight is cut into sub-vectors by a [`crate::layout::BlockLayout`], k-means learns `K` centroids
//! of dimension `d = block_size`, and each sub-vector is replaced by the index of its nearest centroid
//! (`u8` when `K <= 256`, `u16` up to 65,536). At 1 bit per weight (`d = 8`, `K = 256`) a Gaussian
//! weight lands between the Shannon bound (0.25 relative MSE) and Lloyd-Max scalar quantization
//! (0.363).
//!
//! ```
//! use candle_core::{Device, Tensor};
//! use qn_kernels::layout::BlockLayout;
//! use qn_kernels::pq::{encode, KMeansConfig};
//!
//! let w = Tensor::randn(0f32, 0.02, (64, 128), &Device::Cpu)?;
//! let layout = BlockLayout::linear("fc.weight", w.dims(), 8)?;
//! let codes = encode(&w, &layout, &KMeansConfig::new(64).with_iters(10), &mut |_| {})?;
//! assert_eq!(codes.assignments.len(), layout.n_blocks());
//! let rebuilt = codes.decode()?;
//! assert_eq!(rebuilt.dims(), w.dims());
//! // 6 index bits per 8 weights: Shannon's bound for Gaussian data is 2^-1.5 = 0.35.
//! let rel = codes.relative_mse(&w)?;
//! assert!(rel > 0.2 && rel < 0.5, "{rel}");
//! # Ok::<(), qn_kernels::Error>(())
//! ```

mod assign;
mod bounds;
mod codes;
mod kmeans;
mod lut;
mod rate;
mod weighted;

pub use assign::{assign_nearest, assign_nearest_reference, assign_nearest_top2, CentroidTable};
pub use codes::{encode, encode_weighted, Assignments, PqCodes};
pub use kmeans::{
    kmeans, kmeans_reference, kmeans_tensor, KMeans, KMeansConfig, KMeansInit, KMeansProgress,
};
pub use lut::{pq_matmul_reference, PqMatmul};
pub use rate::{probe_distortion, MIN_POINTS_PER_CENTROID};
pub use weighted::{kmeans_weighted, BlockMetric, InputMoments};
