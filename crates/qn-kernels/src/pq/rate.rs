//! What one product-quantization choice costs a layer: the relative output error of `K`
//! centroids of dimension `d`, measured on a seeded sample of the layer's rows. A bit budget
//! compares these figures across layers and choices to decide where bytes go.
//!
//! The error is *in-sample*, as in a real stage (k-means fits every block it then encodes); the
//! sample keeps at least 64 points per centroid so that it is not flattered by fitting few points.
//!
//! ```
//! use qn_kernels::pq::{probe_distortion, BlockMetric, KMeansConfig};
//! // 4 block positions of 512 rows, d = 4, Gaussian-like values.
//! let points: Vec<f32> = (0..4 * 512 * 4).map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0).collect();
//! let metric = BlockMetric::identity(4, 512, 4)?;
//! let coarse = probe_distortion(&points, &metric, &KMeansConfig::new(16).with_iters(8), 1 << 16)?;
//! let fine = probe_distortion(&points, &metric, &KMeansConfig::new(256).with_iters(8), 1 << 16)?;
//! assert!(fine < coarse && coarse < 1.0);
//! # Ok::<(), qn_kernels::Error>(())
//! ```

use std::borrow::Cow;

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::{kmeans_weighted, BlockMetric, KMeansConfig};
use crate::{Error, Result};

/// Points per centroid below which a sample would flatter large codebooks.
pub const MIN_POINTS_PER_CENTROID: usize = 64;

/// The relative output error ([`BlockMetric::relative_error`]) of k-means with `cfg` on
/// `points` (in [`crate::layout::BlockLayout`] order, covering `metric`'s positions and rows),
/// fitted on at most about `max_points` points: a seeded draw of whole rows (every block position
/// of a drawn row), never fewer than `64 · K` points when the layer has them.
pub fn probe_distortion(
    points: &[f32],
    metric: &BlockMetric,
    cfg: &KMeansConfig,
    max_points: usize,
) -> Result<f64> {
    let (d, rows, positions) = (metric.d(), metric.rows(), metric.positions());
    let n = positions * rows;
    if points.len() != n * d {
        return Err(Error::config(
            "distortion probe",
            format!(
                "{} values are not the metric's {positions} positions x {rows} rows of {d}",
                points.len()
            ),
        ));
    }
    if cfg.k == 0 || cfg.k > n {
        return Err(Error::config(
            "distortion probe",
            format!("{} centroids for {n} points", cfg.k),
        ));
    }
    let wanted = max_points.max(MIN_POINTS_PER_CENTROID * cfg.k);
    let keep = wanted.div_ceil(positions).clamp(1, rows);
    let (points, metric) = if keep == rows {
        (Cow::Borrowed(points), Cow::Borrowed(metric))
    } else {
        let mut picked: Vec<usize> = (0..rows).collect();
        picked.shuffle(&mut ChaCha8Rng::seed_from_u64(cfg.seed ^ PROBE_SEED));
        picked.truncate(keep);
        picked.sort_unstable();
        let mut sample = Vec::with_capacity(positions * keep * d);
        for b in 0..positions {
            for &r in &picked {
                sample.extend_from_slice(&points[(b * rows + r) * d..][..d]);
            }
        }
        (Cow::Owned(sample), Cow::Owned(metric.select_rows(&picked)?))
    };
    let k = cfg.k.min(points.len() / d);
    let km = kmeans_weighted(&points, &metric, &KMeansConfig { k, ..*cfg }, &mut |_| {})?;
    metric.relative_error(&points, &km.centroids, &km.assignments)
}

/// Keeps the probe's row draw apart from k-means' own draws.
const PROBE_SEED: u64 = 0x9B0B_E5A4_0000_0001;
