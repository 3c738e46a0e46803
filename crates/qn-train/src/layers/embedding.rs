//! `QEmbedding`: a lookup table with a quant-noise weight and an exact padding row.

use candle_core::{ModuleT, Tensor, Var};
use candle_nn::VarBuilder;
use qn_kernels::layout::LayerKind;

use super::QuantNoiseLayer;
use crate::{qweight::QWeight, Result};

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
        let w = self.weight.weight_t(train)?;
        let mut shape = ids.dims().to_vec();
        shape.push(w.dim(1)?);
        w.index_select(&ids.flatten_all()?, 0)?.reshape(shape)
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
