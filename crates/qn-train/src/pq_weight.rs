//! A weight stored as trainable centroids and fixed assignments.

use std::sync::{Arc, OnceLock};

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
    assignments: Arc<Assignments>,
    layout: BlockLayout,
    /// The gather index (`u32` per sub-vector) and `1 / count(centroid of block j)` per sub-vector
    /// `(n_blocks, 1)`: 8 bytes per block, built on the first [`Self::weight`] call only, so a
    /// model that runs from its codes ([`Self::matmul`]) never holds them.
    gather: Arc<OnceLock<(Tensor, Tensor)>>,
    reduction: CentroidGrad,
}

impl PqWeight {
    /// Wraps codes; the centroids become a new trainable variable.
    pub fn from_codes(codes: &PqCodes, reduction: CentroidGrad) -> Result<Self> {
        Self::from_parts(
            &codes.centroids,
            Arc::new(codes.assignments.clone()),
            codes.layout.clone(),
            reduction,
        )
    }

    /// The same, taking the codes' assignments without a copy (a model loaded from a file).
    pub fn from_owned_codes(codes: PqCodes, reduction: CentroidGrad) -> Result<Self> {
        Self::from_parts(
            &codes.centroids,
            Arc::new(codes.assignments),
            codes.layout,
            reduction,
        )
    }

    fn from_parts(
        centroids: &Tensor,
        assignments: Arc<Assignments>,
        layout: BlockLayout,
        reduction: CentroidGrad,
    ) -> Result<Self> {
        let centroids = Var::from_tensor(&centroids.to_dtype(DType::F32)?.copy()?)?;
        Ok(Self {
            centroids,
            assignments,
            layout,
            gather: Arc::new(OnceLock::new()),
            reduction,
        })
    }

    fn gather(&self) -> Result<&(Tensor, Tensor)> {
        if let Some(g) = self.gather.get() {
            return Ok(g);
        }
        let device = self.centroids.device();
        let idx = self.assignments.to_u32();
        let k = self.centroids.dim(0)?;
        let mut counts = vec![0u32; k];
        idx.iter().for_each(|&a| counts[a as usize] += 1);
        // Every assigned centroid has count >= 1; unused ones are never gathered, so they get a zero
        // gradient and never a division by zero.
        let scale: Vec<f32> = idx
            .iter()
            .map(|&a| 1.0 / counts[a as usize] as f32)
            .collect();
        let n = idx.len();
        let built = (
            Tensor::from_vec(idx, n, device)?,
            Tensor::from_vec(scale, (n, 1), device)?,
        );
        // A concurrent first call may have won: either value is the same.
        Ok(self.gather.get_or_init(|| built))
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

    /// [`Self::matmul`] for a 1x1 convolution: its weight `(out, in, 1, 1)` cut into runs of input
    /// channels numbers its blocks exactly as the linear weight `(out, in)` does, so the same codes
    /// multiply the pixels' channel vectors. `None` for any other shape.
    pub fn pointwise_matmul(&self) -> Result<Option<PqMatmul>> {
        let &[out, cin, 1, 1] = self.layout.shape() else {
            return Ok(None);
        };
        let matrix = BlockLayout::linear("1x1 conv", &[out, cin], self.layout.block_size())?;
        Ok(Some(PqMatmul::from_parts(
            &self.centroids.as_tensor().detach(),
            self.assignments.clone(),
            &matrix,
        )?))
    }

    /// The weight: each block is its centroid. With [`CentroidGrad::Mean`] the value is unchanged
    /// but each block's gradient reaches its centroid scaled by `1 / count`.
    pub fn weight(&self) -> Result<Tensor> {
        let (index, grad_scale) = self.gather()?;
        let blocks = self.centroids.as_tensor().index_select(index, 0)?;
        let blocks = match self.reduction {
            CentroidGrad::Sum => blocks,
            CentroidGrad::Mean => {
                let scaled = blocks.broadcast_mul(grad_scale)?;
                // `scaled - scaled.detach()` is exactly zero: the value stays `blocks`.
                ((&scaled - scaled.detach())? + blocks.detach())?
            }
        };
        Ok(self.layout.from_subvectors(&blocks)?)
    }
}
