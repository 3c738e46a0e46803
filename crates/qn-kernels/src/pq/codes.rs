//! PQ codes of one weight: centroids, compact assignments and the layout to rebuild it.

use candle_core::{DType, Device, Tensor};

use super::kmeans::{kmeans_tensor, KMeansConfig, KMeansProgress};
use super::weighted::{kmeans_weighted, BlockMetric};
use crate::{layout::BlockLayout, Error, Result};

/// Centroid index per sub-vector, in the narrowest integer that holds `K - 1`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Assignments {
    /// `K <= 256`.
    U8(Vec<u8>),
    /// `256 < K <= 65,536`.
    U16(Vec<u16>),
}

impl Assignments {
    /// Narrows `u32` indices for `k` centroids; errors when an index is `>= k` or `k > 65,536`.
    pub fn from_u32(index: &[u32], k: usize) -> Result<Self> {
        if let Some(bad) = index.iter().find(|&&i| i as usize >= k) {
            return Err(Error::config(
                "assignments",
                format!("index {bad} is out of range for {k} centroids"),
            ));
        }
        match k {
            0..=256 => Ok(Assignments::U8(index.iter().map(|&i| i as u8).collect())),
            257..=65536 => Ok(Assignments::U16(index.iter().map(|&i| i as u16).collect())),
            _ => Err(Error::config(
                "centroids",
                format!("{k} centroids exceed the 65,536 that u16 codes hold"),
            )),
        }
    }

    /// Number of sub-vectors.
    pub fn len(&self) -> usize {
        match self {
            Assignments::U8(v) => v.len(),
            Assignments::U16(v) => v.len(),
        }
    }

    /// Whether there are no sub-vectors.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The centroid of sub-vector `j`.
    pub fn get(&self, j: usize) -> usize {
        match self {
            Assignments::U8(v) => v[j] as usize,
            Assignments::U16(v) => v[j] as usize,
        }
    }

    /// Widened to `u32` (the index type of candle's gathers).
    pub fn to_u32(&self) -> Vec<u32> {
        match self {
            Assignments::U8(v) => v.iter().map(|&i| i as u32).collect(),
            Assignments::U16(v) => v.iter().map(|&i| i as u32).collect(),
        }
    }
}

/// A product-quantized weight.
#[derive(Debug, Clone)]
pub struct PqCodes {
    /// `f32 [K, d]` on the weight's device.
    pub centroids: Tensor,
    /// One centroid index per sub-vector, order `j = b * rows + o`.
    pub assignments: Assignments,
    /// Shape, layer kind and block size.
    pub layout: BlockLayout,
}

/// Runs k-means over `weight`'s sub-vectors and returns its codes.
pub fn encode(
    weight: &Tensor,
    layout: &BlockLayout,
    config: &KMeansConfig,
    progress: &mut dyn FnMut(&KMeansProgress),
) -> Result<PqCodes> {
    let sub = layout.to_subvectors(&weight.to_dtype(DType::F32)?)?;
    if config.k > layout.n_blocks() {
        return Err(Error::shape(
            "weight",
            format!("{} centroids need at least as many sub-vectors, shape {:?} with block size {} has {}",
                config.k, layout.shape(), layout.block_size(), layout.n_blocks()),
        ));
    }
    let km = kmeans_tensor(&sub, config, progress)?;
    let centroids = Tensor::from_vec(km.centroids, (km.k, km.d), weight.device())?;
    PqCodes::new(
        centroids,
        Assignments::from_u32(&km.assignments, km.k)?,
        layout.clone(),
    )
}

/// [`encode`] with the sub-vectors clustered under `metric` ([`kmeans_weighted`]): codebooks that
/// minimise the layer's output error on the inputs the metric was measured on. The metric must
/// cover the layout's blocks (`rows` points per block position).
pub fn encode_weighted(
    weight: &Tensor,
    layout: &BlockLayout,
    config: &KMeansConfig,
    metric: &BlockMetric,
    progress: &mut dyn FnMut(&KMeansProgress),
) -> Result<PqCodes> {
    if config.k > layout.n_blocks() {
        return encode(weight, layout, config, progress);
    }
    if metric.d() != layout.block_size() || metric.rows() != layout.rows() {
        return Err(Error::shape(
            "k-means metric",
            format!(
                "blocks of {} over {} rows do not fit the layout's blocks of {} over {} rows",
                metric.d(),
                metric.rows(),
                layout.block_size(),
                layout.rows()
            ),
        ));
    }
    let sub = layout.to_subvectors(&weight.to_dtype(DType::F32)?)?;
    let host = sub.flatten_all()?.to_vec1::<f32>()?;
    let km = kmeans_weighted(&host, metric, config, progress)?;
    let centroids = Tensor::from_vec(km.centroids, (km.k, km.d), weight.device())?;
    PqCodes::new(
        centroids,
        Assignments::from_u32(&km.assignments, km.k)?,
        layout.clone(),
    )
}

impl PqCodes {
    /// Checks that the parts agree with each other.
    pub fn new(centroids: Tensor, assignments: Assignments, layout: BlockLayout) -> Result<Self> {
        let (k, d) = centroids.dims2()?;
        if d != layout.block_size() {
            return Err(Error::shape(
                "centroids",
                format!(
                    "dimension {d} differs from block size {}",
                    layout.block_size()
                ),
            ));
        }
        if assignments.len() != layout.n_blocks() {
            return Err(Error::shape(
                "assignments",
                format!(
                    "{} entries for {} sub-vectors",
                    assignments.len(),
                    layout.n_blocks()
                ),
            ));
        }
        let bad = match &assignments {
            Assignments::U8(v) => v.iter().map(|&a| a as usize).find(|&a| a >= k),
            Assignments::U16(v) => v.iter().map(|&a| a as usize).find(|&a| a >= k),
        };
        if let Some(a) = bad {
            return Err(Error::config(
                "assignments",
                format!("index {a} is out of range for {k} centroids"),
            ));
        }
        Ok(Self {
            centroids,
            assignments,
            layout,
        })
    }

    /// Number of centroids.
    pub fn k(&self) -> usize {
        self.centroids.dim(0).unwrap_or(0)
    }

    /// Index bits per weight: `log2(K) / d` (codebook excluded).
    pub fn index_bits_per_weight(&self) -> f64 {
        (self.k() as f64).log2().ceil() / self.layout.block_size() as f64
    }

    /// Rebuilds the `f32` weight. On the CPU this is a direct gather into the final layout; on other
    /// devices it runs [`Self::decode_reference`] there.
    pub fn decode(&self) -> Result<Tensor> {
        if !matches!(self.centroids.device(), Device::Cpu) {
            return self.decode_reference();
        }
        let d = self.layout.block_size();
        let c = self
            .centroids
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let (rows, cols) = (self.layout.rows(), self.layout.cols());
        let mut out = vec![0f32; self.layout.numel()];
        // The format crate owns the gather, so that a file decodes exactly like the tensor.
        match &self.assignments {
            Assignments::U8(a) => qn_format::decode::pq_gather(&c, d, rows, cols, a, &mut out),
            Assignments::U16(a) => qn_format::decode::pq_gather(&c, d, rows, cols, a, &mut out),
        }
        Ok(Tensor::from_vec(out, self.layout.shape(), &Device::Cpu)?)
    }

    /// The same weight with plain tensor ops (gather + transpose) on the centroids' device.
    pub fn decode_reference(&self) -> Result<Tensor> {
        let device = self.centroids.device();
        let index = Tensor::from_vec(self.assignments.to_u32(), self.assignments.len(), device)?;
        let sub = self
            .centroids
            .to_dtype(DType::F32)?
            .index_select(&index, 0)?;
        self.layout.from_subvectors(&sub)
    }

    /// `‖W − decode()‖² / ‖W‖²`.
    pub fn relative_mse(&self, original: &Tensor) -> Result<f64> {
        crate::relative_mse(original, &self.decode()?)
    }
}
