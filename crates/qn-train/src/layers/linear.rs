//! `QLinear`: `y = x Wᵀ + b` with a quant-noise weight.

use candle_core::{ModuleT, Tensor, Var};
use candle_nn::VarBuilder;
use qn_kernels::{
    layout::LayerKind,
    noise::{block_drop_matmul_bias, linear_matmul_bias},
};

use super::QuantNoiseLayer;
use crate::{
    qweight::{LinearPlan, QWeight},
    ActQuant, ActQuantConfig, Result,
};

/// A linear layer whose weight `(out, in)` can be noised or product-quantized.
#[derive(Debug)]
pub struct QLinear {
    weight: QWeight,
    bias: Option<Var>,
    act_quant: Option<ActQuant>,
}

impl QLinear {
    /// From a weight `(out, in)` and an optional bias `(out)`.
    pub fn new(name: &str, weight: Var, bias: Option<Var>) -> Result<Self> {
        Ok(Self {
            weight: QWeight::new(name, LayerKind::Linear, weight)?,
            bias,
            act_quant: None,
        })
    }

    /// From a weight already built (e.g. [`QWeight::from_coded`]: a layer read from a `.qnz`).
    pub fn from_weight(weight: QWeight, bias: Option<Var>) -> Self {
        Self {
            weight,
            bias,
            act_quant: None,
        }
    }

    /// Quantizes the layer's output with [`ActQuant`] (`None`: off).
    pub fn set_activation_quant(&mut self, config: Option<ActQuantConfig>) -> Result<()> {
        self.act_quant = config.map(ActQuant::new).transpose()?;
        Ok(())
    }
}

/// A `QLinear` whose `weight` and `bias` come from `vb` (PyTorch's `nn.Linear` names).
pub fn qlinear(in_dim: usize, out_dim: usize, bias: bool, vb: VarBuilder) -> Result<QLinear> {
    let bound = 1.0 / (in_dim as f64).sqrt();
    let init = candle_nn::Init::Uniform {
        lo: -bound,
        up: bound,
    };
    let w = vb.get_with_hints((out_dim, in_dim), "weight", init)?;
    let b = if bias {
        Some(Var::from_tensor(
            &vb.get_with_hints(out_dim, "bias", init)?,
        )?)
    } else {
        None
    };
    QLinear::new(&vb.prefix(), Var::from_tensor(&w)?, b)
}

impl ModuleT for QLinear {
    fn forward_t(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        // Leading dimensions are flattened so that the weight enters one 2-D matmul: candle_nn's
        // Linear broadcasts it over the batch instead, and the backward of that broadcast
        // materialises one weight-sized gradient per batch element.
        let dims = x.dims();
        let (lead, inp) = dims.split_at(dims.len() - 1);
        let x2 = x.reshape((lead.iter().product::<usize>(), inp[0]))?;
        if !train {
            self.weight.record_inputs(&x2)?;
        }
        let bias = self.bias.as_ref().map(|b| b.as_tensor());
        // The fused plans add the bias inside their node; the others get it added below.
        let (mut y, out, bias_added) = match self.weight.linear_plan(train)? {
            // Block drop fused into the matmul: the dropped weight never becomes a graph node
            // (nor does the product before the bias).
            LinearPlan::BlockDrop(w, mask, p) => (
                block_drop_matmul_bias(&x2, &w, bias, &mask, p).map_err(crate::Error::from)?,
                w.dim(0)?,
                true,
            ),
            // The same kernel without the mask: a noisy and a noise-free step differ by the noise.
            LinearPlan::Exact(w) => (
                linear_matmul_bias(&x2, &w, bias).map_err(crate::Error::from)?,
                w.dim(0)?,
                true,
            ),
            LinearPlan::Generic(w) => (x2.matmul(&w.t()?)?, w.dim(0)?, false),
            // Evaluation of a PQ weight: from its codes (tables for a few rows, else one decode).
            LinearPlan::Codes(m) => (m.forward(&x2).map_err(crate::Error::from)?, m.rows(), false),
            // Evaluation of an int-N weight: dequantised inside the dot products.
            LinearPlan::Scalar(q) => (
                qn_kernels::scalar::scalar_matmul(&x2, &q).map_err(crate::Error::from)?,
                q.codes.dim(0)?,
                false,
            ),
        };
        if let (Some(b), false) = (bias, bias_added) {
            y = qn_kernels::bias::add_bias(&y, b).map_err(crate::Error::from)?;
        }
        let mut shape = lead.to_vec();
        shape.push(out);
        let y = y.reshape(shape)?;
        match &self.act_quant {
            None => Ok(y),
            Some(q) => Ok(q.forward_t(&y, train, self.weight.aux_seed(1))?),
        }
    }
}

impl QuantNoiseLayer for QLinear {
    fn qweight(&self) -> &QWeight {
        &self.weight
    }
    fn qweight_mut(&mut self) -> &mut QWeight {
        &mut self.weight
    }
    fn other_vars(&self) -> Vec<Var> {
        self.bias.iter().cloned().collect()
    }
}
