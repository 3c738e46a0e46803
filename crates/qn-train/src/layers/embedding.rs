//! `QEmbedding`: a lookup table with a quant-noise weight and an exact padding row.

use candle_core::{DType, ModuleT, Tensor, Var};
use candle_nn::VarBuilder;
use qn_kernels::layout::LayerKind;

use super::QuantNoiseLayer;
use crate::qweight::{LinearPlan, QWeight};
use crate::Result;
use qn_kernels::noise::{BlockMask, NoiseRate};

/// An embedding `(num, dim)`. The `padding_idx` row, as in PyTorch, gets no gradient; here it also
/// gets no noise and keeps its exact value after product quantization.
#[derive(Debug)]
pub struct QEmbedding {
    weight: QWeight,
    padding_idx: Option<usize>,
}

impl QEmbedding {
    /// From a weight `(num, dim)`.
    pub fn new(name: &str, weight: Var, padding_idx: Option<usize>) -> Result<Self> {
        let mut w = QWeight::new(name, LayerKind::Embedding, weight)?;
        if let Some(p) = padding_idx {
            w.freeze_row(p)?;
        }
        Ok(Self {
            weight: w,
            padding_idx,
        })
    }

    /// From a weight already built (e.g. [`QWeight::from_coded`]: a table read from a `.qnz`,
    /// whose exact padding row [`QWeight::set_frozen_row`] has set); a padding row not yet kept
    /// is taken from the weight's current value.
    pub fn from_weight(mut weight: QWeight, padding_idx: Option<usize>) -> Result<Self> {
        if let Some(p) = padding_idx {
            if weight.frozen_row().map(|(r, _)| r) != Some(p) {
                weight.freeze_row(p)?;
            }
        }
        Ok(Self {
            weight,
            padding_idx,
        })
    }

    /// The padding row, if any.
    pub fn padding_idx(&self) -> Option<usize> {
        self.padding_idx
    }
}

/// A `QEmbedding` whose `weight` comes from `vb` (PyTorch's `nn.Embedding` name).
pub fn qembedding(
    num: usize,
    dim: usize,
    padding_idx: Option<usize>,
    vb: VarBuilder,
) -> Result<QEmbedding> {
    let w = vb.get_with_hints(
        (num, dim),
        "weight",
        candle_nn::Init::Randn {
            mean: 0.0,
            stdev: 1.0,
        },
    )?;
    QEmbedding::new(&vb.prefix(), Var::from_tensor(&w)?, padding_idx)
}

impl ModuleT for QEmbedding {
    fn forward_t(&self, ids: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let flat = ids.flatten_all()?;
        if !train {
            self.weight.record_rows(&flat)?;
        }
        let rows = match self.weight.gather_plan(train)? {
            LinearPlan::Generic(w) => w.index_select(&flat, 0)?,
            LinearPlan::Exact(w) => self.gather(&w, &flat, None)?,
            LinearPlan::BlockDrop(w, mask, p) => self.gather(&w, &flat, Some((&mask, p)))?,
            // Evaluation of a PQ table: only the rows read are rebuilt from their codes.
            LinearPlan::Codes(m) => {
                let idv = flat.to_dtype(DType::U32)?.to_vec1::<u32>()?;
                let rows = m.gather_rows(&idv).map_err(crate::Error::from)?;
                self.with_frozen_row(rows, &idv, m.cols(), ids.device())?
            }
            // Evaluation of an int-N table: only the rows read are dequantised.
            LinearPlan::Scalar(q) => {
                let idv = flat.to_dtype(DType::U32)?.to_vec1::<u32>()?;
                let rows =
                    qn_kernels::scalar::scalar_gather_rows(&q, &idv).map_err(crate::Error::from)?;
                self.with_frozen_row(rows, &idv, q.codes.dim(1)?, ids.device())?
            }
        };
        let mut shape = ids.dims().to_vec();
        shape.push(rows.dim(1)?);
        rows.reshape(shape)
    }
}

impl QEmbedding {
    /// Rows rebuilt from codes (`ids.len() × cols` values) as a tensor, the padding row at its
    /// exact value.
    fn with_frozen_row(
        &self,
        rows: Vec<f32>,
        ids: &[u32],
        cols: usize,
        device: &candle_core::Device,
    ) -> candle_core::Result<Tensor> {
        let mut rows = Tensor::from_vec(rows, (ids.len(), cols), device)?;
        if let Some((row, value)) = self.weight.frozen_row() {
            let hit: Vec<u8> = ids.iter().map(|&i| u8::from(i as usize == row)).collect();
            let hit = Tensor::from_vec(hit, (ids.len(), 1), device)?.broadcast_as(rows.shape())?;
            let value = value
                .to_dtype(DType::F32)?
                .reshape((1, cols))?
                .broadcast_as(rows.shape())?;
            rows = hit.where_cond(&value, &rows)?;
        }
        Ok(rows)
    }

    /// The rows of the float weight `w` that `ids` name, with block drop and the padding row applied
    /// to those rows only. Applying them to the whole table first (as [`QWeight::weight_t`] does)
    /// gives the same values and gradients but costs a pass over the table, its gradient and a
    /// weight-sized `where` per step: on a 30,522 × 384 vocabulary that was most of block drop's
    /// cost on an encoder step.
    fn gather(
        &self,
        w: &Tensor,
        ids: &Tensor,
        noise: Option<(&BlockMask, NoiseRate)>,
    ) -> candle_core::Result<Tensor> {
        let rows = w.index_select(ids, 0)?;
        let frozen = self.weight.frozen_row();
        if noise.is_none() && frozen.is_none() {
            return Ok(rows);
        }
        let dim = w.dim(1)?;
        let ids = ids.to_dtype(DType::U32)?.to_vec1::<u32>()?;
        let frozen = match frozen {
            Some((row, value)) => Some((row, value.to_dtype(DType::F32)?.to_vec1::<f32>()?)),
            None => None,
        };
        // `rows · keep + fill`: keep is 0 on dropped blocks and on padding tokens (whose row then
        // gets no gradient, as in PyTorch), 1/(1-p) on kept blocks; fill holds the exact padding row.
        let mut keep = vec![1f32; ids.len() * dim];
        let mut fill = frozen.as_ref().map(|_| vec![0f32; ids.len() * dim]);
        for (t, &id) in ids.iter().enumerate() {
            let k = &mut keep[t * dim..(t + 1) * dim];
            if let (Some((row, value)), Some(fill)) = (&frozen, fill.as_mut()) {
                if id as usize == *row {
                    k.fill(0.0);
                    fill[t * dim..(t + 1) * dim].copy_from_slice(value);
                    continue;
                }
            }
            if let Some((mask, p)) = noise {
                let bs = mask.layout().block_size();
                let bpr = dim / bs;
                let flags = &mask.noised()[id as usize * bpr..(id as usize + 1) * bpr];
                let scale = if p.get() >= 1.0 {
                    0.0
                } else {
                    (1.0 / (1.0 - p.get())) as f32
                };
                for (block, &dropped) in k.chunks_exact_mut(bs).zip(flags) {
                    block.fill(if dropped { 0.0 } else { scale });
                }
            }
        }
        let n = ids.len();
        let keep = Tensor::from_vec(keep, (n, dim), w.device())?.to_dtype(w.dtype())?;
        let out = rows.mul(&keep)?;
        match fill {
            None => Ok(out),
            Some(fill) => {
                out.add(&Tensor::from_vec(fill, (n, dim), w.device())?.to_dtype(w.dtype())?)
            }
        }
    }
}

impl QuantNoiseLayer for QEmbedding {
    fn qweight(&self) -> &QWeight {
        &self.weight
    }
    fn qweight_mut(&mut self) -> &mut QWeight {
        &mut self.weight
    }
    fn other_vars(&self) -> Vec<Var> {
        Vec::new()
    }
}
