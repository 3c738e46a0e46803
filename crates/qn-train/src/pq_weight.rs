//! A weight stored as trainable centroids and fixed assignments.

use std::sync::Arc;

use candle_core::{DType, Tensor, Var};
use qn_kernels::{
    layout::BlockLayout,
    pq::{Assignments, PqCodes, PqMatmul},
};

use crate::Result;

/// How the gradient of a centroid combines the gradients of the blocks assigned to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CentroidGrad {
    /// The mean over its blocks (the paper's fine-tuning rule; scale-independent of cluster size).
    #[default]
    Mean,
    /// The sum over its blocks (plain autograd through the gather).
    Sum,
}

/// Centroids (a [`Var`]) and assignments; the weight is rebuilt on every forward pass.
#[derive(Debug, Clone)]
pub struct PqWeight {
    centroids: Var,
    index: Tensor,
    assignments: Arc<Assignments>,
    layout: BlockLayout,
    /// `1 / count(centroid of block j)` per sub-vector, shape `(n_blocks, 1)`.
    grad_scale: Tensor,
    reduction: CentroidGrad,
}

impl PqWeight {
    /// Wraps codes; the centroids become a new trainable variable.
    pub fn from_codes(codes: &PqCodes, reduction: CentroidGrad) -> Result<Self> {
        let device = codes.centroids.device();
        let centroids = Var::from_tensor(&codes.centroids.to_dtype(DType::F32)?.copy()?)?;
        let idx = codes.assignments.to_u32();
        let mut counts = vec![0u32; codes.k()];
        idx.iter().for_each(|&a| counts[a as usize] += 1);
        // Every assigned centroid has count >= 1; unused ones are never gathered, so they get a zero
        // gradient and never a division by zero.
        let scale: Vec<f32> = idx
            .iter()
            .map(|&a| 1.0 / counts[a as usize] as f32)
            .collect();
        let n = idx.len();
        Ok(Self {
            centroids,
            index: Tensor::from_vec(idx, n, device)?,
            assignments: Arc::new(codes.assignments.clone()),
            layout: codes.layout.clone(),
            grad_scale: Tensor::from_vec(scale, (n, 1), device)?,
            reduction,
        })
    }

    /// The trainable centroids `[K, d]`.
    pub fn centroids(&self) -> &Var {
        &self.centroids
    }

    /// The block layout.
    pub fn layout(&self) -> &BlockLayout {
        &self.layout
    }

    /// The current codes (centroids detached), e.g. for export.
    pub fn codes(&self) -> Result<PqCodes> {
        Ok(PqCodes::new(
            self.centroids.as_tensor().detach(),
            (*self.assignments).clone(),
            self.layout.clone(),
        )?)
    }

    /// The matmul that runs from the codes (CPU; `x · Wᵀ` without rebuilding `W` for small
    /// inputs), with the current centroids.
    pub fn matmul(&self) -> Result<PqMatmul> {
        Ok(PqMatmul::from_parts(
            &self.centroids.as_tensor().detach(),
            self.assignments.clone(),
            &self.layout,
        )?)
    }

    /// The weight: each block is its centroid. With [`CentroidGrad::Mean`] the value is unchanged
    /// but each block's gradient reaches its centroid scaled by `1 / count`.
    pub fn weight(&self) -> Result<Tensor> {
        let blocks = self.centroids.as_tensor().index_select(&self.index, 0)?;
        let blocks = match self.reduction {
            CentroidGrad::Sum => blocks,
            CentroidGrad::Mean => {
                let scaled = blocks.broadcast_mul(&self.grad_scale)?;
                // `scaled - scaled.detach()` is exactly zero: the value stays `blocks`.
                ((&scaled - scaled.detach())? + blocks.detach())?
            }
        };
        Ok(self.layout.from_subvectors(&blocks)?)
    }
}
