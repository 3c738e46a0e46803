//! One transformer layer (post-LayerNorm, as BERT and RoBERTa): self-attention, then the
//! feed-forward block, each followed by dropout, a residual and LayerNorm.

use candle_core::{ModuleT, Tensor, Var};
use candle_nn::VarBuilder;
use qn_train::{kernels::layout::LayerKind, layers::QLinear, NoiseStep};

use crate::coded::CodedWeights;

use super::attention::{self_attention, ProbsDropout};
use super::config::{Activation, EncoderConfig};
use super::ops::{activate, dropout, dropout_add, layer_norm, mask_seed};
use crate::Result;

/// A LayerNorm's parameters.
#[derive(Debug)]
pub struct Norm {
    pub(crate) weight: Var,
    pub(crate) bias: Var,
    pub(crate) eps: f64,
    pub(crate) name: String,
}

impl Norm {
    pub(crate) fn new(dim: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            weight: Var::from_tensor(&vb.get(dim, "weight")?)?,
            bias: Var::from_tensor(&vb.get(dim, "bias")?)?,
            eps,
            name: vb.prefix(),
        })
    }
    pub(crate) fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        layer_norm(x, self.weight.as_tensor(), self.bias.as_tensor(), self.eps)
    }
    pub(crate) fn named_vars(&self) -> [(String, Var); 2] {
        [
            (format!("{}.weight", self.name), self.weight.clone()),
            (format!("{}.bias", self.name), self.bias.clone()),
        ]
    }
}

/// A `QLinear` with Hugging Face's names: its weight from `coded` when it is there (a layer that
/// runs from its codes), else from `vb` (which must hold the tensors).
pub(crate) fn linear(
    in_dim: usize,
    out_dim: usize,
    vb: VarBuilder,
    coded: &CodedWeights,
) -> Result<QLinear> {
    let name = vb.prefix();
    let b = Var::from_tensor(&vb.get(out_dim, "bias")?)?;
    let weight = format!("{name}.weight");
    if let Some(w) = coded.take(&weight, LayerKind::Linear, &[out_dim, in_dim], vb.device())? {
        return Ok(QLinear::from_weight(w, Some(b)));
    }
    let w = Var::from_tensor(&vb.get((out_dim, in_dim), "weight")?)?;
    Ok(QLinear::new(&name, w, Some(b))?)
}

/// Where dropout draws its masks: the run's seed and step, and this site's number.
#[derive(Debug, Clone, Copy)]
pub(crate) struct DropCtx {
    pub seed: u64,
    pub at: NoiseStep,
    pub train: bool,
}

impl DropCtx {
    /// Dropout of the attention probabilities at `site`, when training with `p > 0`.
    pub(crate) fn probs(&self, p: f64, site: u64) -> Option<ProbsDropout> {
        (self.train && p > 0.0).then(|| ProbsDropout {
            p,
            seed: mask_seed(self.seed, self.at, site),
        })
    }

    pub(crate) fn apply(&self, x: &Tensor, p: f64, site: u64) -> candle_core::Result<Tensor> {
        if self.train {
            dropout(x, p, self.seed, self.at, site)
        } else {
            Ok(x.clone())
        }
    }

    /// `dropout(x) + residual`, one graph node when training.
    pub(crate) fn apply_add(
        &self,
        x: &Tensor,
        residual: &Tensor,
        p: f64,
        site: u64,
    ) -> candle_core::Result<Tensor> {
        if self.train {
            dropout_add(x, residual, p, self.seed, self.at, site)
        } else {
            x + residual
        }
    }
}

/// One encoder layer.
#[derive(Debug)]
pub struct EncoderLayer {
    pub(crate) query: QLinear,
    pub(crate) key: QLinear,
    pub(crate) value: QLinear,
    pub(crate) attn_out: QLinear,
    pub(crate) attn_norm: Norm,
    pub(crate) intermediate: QLinear,
    pub(crate) output: QLinear,
    pub(crate) out_norm: Norm,
    heads: usize,
    act: Activation,
    hidden_p: f64,
    attn_p: f64,
    index: u64,
}

impl EncoderLayer {
    pub(crate) fn new(
        cfg: &EncoderConfig,
        index: usize,
        vb: VarBuilder,
        coded: &CodedWeights,
    ) -> Result<Self> {
        let h = cfg.hidden_size;
        let att = vb.pp("attention");
        Ok(Self {
            query: linear(h, h, att.pp("self").pp("query"), coded)?,
            key: linear(h, h, att.pp("self").pp("key"), coded)?,
            value: linear(h, h, att.pp("self").pp("value"), coded)?,
            attn_out: linear(h, h, att.pp("output").pp("dense"), coded)?,
            attn_norm: Norm::new(h, cfg.layer_norm_eps, att.pp("output").pp("LayerNorm"))?,
            intermediate: linear(
                h,
                cfg.intermediate_size,
                vb.pp("intermediate").pp("dense"),
                coded,
            )?,
            output: linear(cfg.intermediate_size, h, vb.pp("output").pp("dense"), coded)?,
            out_norm: Norm::new(h, cfg.layer_norm_eps, vb.pp("output").pp("LayerNorm"))?,
            heads: cfg.num_attention_heads,
            act: cfg.activation().expect("validated"),
            hidden_p: cfg.hidden_dropout_prob,
            attn_p: cfg.attention_probs_dropout_prob,
            index: index as u64,
        })
    }

    /// `x` `(b, l, h)`, `bias` `(b, 1, 1, l)` additive attention mask.
    pub(crate) fn forward(
        &self,
        x: &Tensor,
        bias: &Tensor,
        drop: DropCtx,
    ) -> candle_core::Result<Tensor> {
        // In evaluation each intermediate is cut from the graph (`keep`) and goes out of scope
        // as soon as the next one exists, so a layer holds two or three activations at a time
        // instead of all of them (the weights are variables: every output would keep its inputs).
        let keep = |t: Tensor| if drop.train { t } else { t.detach() };
        let ctx = {
            let q = self.query.forward_t(x, drop.train)?;
            let k = self.key.forward_t(x, drop.train)?;
            let v = self.value.forward_t(x, drop.train)?;
            let probs_drop = drop.probs(self.attn_p, self.site(0));
            keep(self_attention(&q, &k, &v, bias, self.heads, probs_drop)?)
        };
        let a = {
            let o = self.attn_out.forward_t(&ctx, drop.train)?;
            let a = drop.apply_add(&o, x, self.hidden_p, self.site(1))?;
            keep(self.attn_norm.forward(&a)?)
        };
        std::mem::drop(ctx);
        let f = {
            let i = keep(self.intermediate.forward_t(&a, drop.train)?);
            keep(activate(&i, self.act)?)
        };
        let o = self.output.forward_t(&f, drop.train)?;
        std::mem::drop(f);
        self.out_norm
            .forward(&drop.apply_add(&o, &a, self.hidden_p, self.site(2))?)
    }

    fn site(&self, i: u64) -> u64 {
        16 + self.index * 4 + i
    }
}
