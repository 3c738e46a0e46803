//! The EfficientNet network: stem, MBConv blocks (expansion, depthwise convolution,
//! squeeze-and-excitation, projection, stochastic depth), head, classifier. Every convolution and
//! the classifier are quant-noise layers; tensor names are those of EfficientNet-PyTorch
//! (`_conv_stem`, `_blocks.N._depthwise_conv`, `_bn0`, `_fc`, ...), the canonical layout here.
//! Convolutions pad like TensorFlow's "SAME", which the published weights expect.

use std::sync::Mutex;

use candle_core::{ModuleT, Tensor, Var};
use candle_nn::{Conv2dConfig, VarBuilder};
use qn_train::kernels::layout::LayerKind;
use qn_train::layers::{qconv2d, QConv2d, QLinear, QuantNoiseLayer};
use qn_train::{NoiseStep, QuantModel};

use super::activation;
use super::batch_norm::BatchNorm2d;
use super::config::{Act, BlockArgs, ConvPadding, EfficientNetConfig};
use crate::coded::CodedWeights;
use crate::encoder::ops::dropout;
use crate::Result;

/// A convolution named `name` under `vb`: from its codes when `coded` holds its weight (a `.qnz`
/// loaded for inference), else from `vb`.
#[allow(clippy::too_many_arguments)]
fn conv(
    coded: &CodedWeights,
    vb: VarBuilder,
    name: &str,
    (in_c, out_c): (usize, usize),
    k: usize,
    stride: usize,
    groups: usize,
    bias: bool,
    padding: ConvPadding,
) -> Result<QConv2d> {
    let symmetric = padding == ConvPadding::Symmetric;
    let cfg = Conv2dConfig {
        padding: if symmetric { k / 2 } else { 0 },
        stride,
        dilation: 1,
        groups,
        cudnn_fwd_algo: None,
    };
    let vb = vb.pp(name);
    let shape = [out_c, in_c / groups, k, k];
    let weight_name = format!("{}.weight", vb.prefix());
    let c = match coded.take(&weight_name, LayerKind::Conv2d, &shape, vb.device())? {
        Some(w) => {
            let bound = 1.0 / ((in_c / groups * k * k) as f64).sqrt();
            let init = candle_nn::Init::Uniform {
                lo: -bound,
                up: bound,
            };
            let b = if bias {
                Some(Var::from_tensor(&vb.get_with_hints(out_c, "bias", init)?)?)
            } else {
                None
            };
            QConv2d::from_weight(w, b, cfg)
        }
        None => qconv2d(in_c, out_c, k, bias, cfg, vb)?,
    };
    Ok(if symmetric { c } else { c.with_same_padding() })
}

fn activate(x: &Tensor, act: Act) -> candle_core::Result<Tensor> {
    match act {
        Act::Swish => activation::swish(x),
        Act::Relu6 => activation::relu6(x),
    }
}

/// Squeeze-and-excitation: a per-channel gate from the globally pooled features.
#[derive(Debug)]
struct SqueezeExcite {
    reduce: QConv2d,
    expand: QConv2d,
}

/// One inverted-residual block.
#[derive(Debug)]
struct MbConv {
    args: BlockArgs,
    expand: Option<(QConv2d, BatchNorm2d)>,
    depthwise: QConv2d,
    bn1: BatchNorm2d,
    se: Option<SqueezeExcite>,
    project: QConv2d,
    bn2: BatchNorm2d,
    drop_connect: f64,
}

impl MbConv {
    fn new(
        args: BlockArgs,
        cfg: &EfficientNetConfig,
        drop_connect: f64,
        vb: VarBuilder,
        coded: &CodedWeights,
    ) -> Result<Self> {
        let (eps, m) = (cfg.bn_eps, cfg.bn_momentum);
        let pad = cfg.padding;
        let mid = args.input * args.expand;
        let expand = if args.expand != 1 {
            Some((
                conv(
                    coded,
                    vb.clone(),
                    "_expand_conv",
                    (args.input, mid),
                    1,
                    1,
                    1,
                    false,
                    pad,
                )?,
                BatchNorm2d::new(mid, eps, m, vb.pp("_bn0"))?,
            ))
        } else {
            None
        };
        let depthwise = conv(
            coded,
            vb.clone(),
            "_depthwise_conv",
            (mid, mid),
            args.kernel,
            args.stride,
            mid,
            false,
            pad,
        )?;
        let bn1 = BatchNorm2d::new(mid, eps, m, vb.pp("_bn1"))?;
        let se = if args.se_ratio > 0.0 {
            let squeezed = ((args.input as f64 * args.se_ratio) as usize).max(1);
            Some(SqueezeExcite {
                reduce: conv(
                    coded,
                    vb.clone(),
                    "_se_reduce",
                    (mid, squeezed),
                    1,
                    1,
                    1,
                    true,
                    pad,
                )?,
                expand: conv(
                    coded,
                    vb.clone(),
                    "_se_expand",
                    (squeezed, mid),
                    1,
                    1,
                    1,
                    true,
                    pad,
                )?,
            })
        } else {
            None
        };
        let project = conv(
            coded,
            vb.clone(),
            "_project_conv",
            (mid, args.output),
            1,
            1,
            1,
            false,
            pad,
        )?;
        let bn2 = BatchNorm2d::new(args.output, eps, m, vb.pp("_bn2"))?;
        Ok(Self {
            args,
            expand,
            depthwise,
            bn1,
            se,
            project,
            bn2,
            drop_connect,
        })
    }

    fn forward(&self, x: &Tensor, act: Act, ctx: &Ctx, site: u64) -> candle_core::Result<Tensor> {
        let train = ctx.train;
        let mut h = x.clone();
        if let Some((c, bn)) = &self.expand {
            h = activate(&bn.forward_t(&c.forward_t(&h, train)?, train)?, act)?;
        }
        h = activate(
            &self
                .bn1
                .forward_t(&self.depthwise.forward_t(&h, train)?, train)?,
            act,
        )?;
        if let Some(se) = &self.se {
            let s = h.mean_keepdim(3)?.mean_keepdim(2)?;
            let s = activation::swish(&se.reduce.forward_t(&s, train)?)?;
            let s = se.expand.forward_t(&s, train)?;
            h = h.broadcast_mul(&candle_nn::ops::sigmoid(&s)?)?;
        }
        h = self
            .bn2
            .forward_t(&self.project.forward_t(&h, train)?, train)?;
        if self.args.stride == 1 && self.args.input == self.args.output {
            if train && self.drop_connect > 0.0 {
                // Stochastic depth: the whole residual branch of a sample dropped, the rest scaled.
                let ones = Tensor::ones((h.dim(0)?, 1, 1, 1), h.dtype(), h.device())?;
                let keep = dropout(&ones, self.drop_connect, ctx.seed, ctx.at, site)?;
                h = h.broadcast_mul(&keep)?;
            }
            h = (h + x)?;
        }
        Ok(h)
    }

    fn layers(&self) -> Vec<&QConv2d> {
        let mut v = Vec::new();
        if let Some((c, _)) = &self.expand {
            v.push(c);
        }
        v.push(&self.depthwise);
        if let Some(se) = &self.se {
            v.push(&se.reduce);
            v.push(&se.expand);
        }
        v.push(&self.project);
        v
    }

    fn layers_mut(&mut self) -> Vec<&mut QConv2d> {
        let mut v = Vec::new();
        if let Some((c, _)) = &mut self.expand {
            v.push(c);
        }
        v.push(&mut self.depthwise);
        if let Some(se) = &mut self.se {
            v.push(&mut se.reduce);
            v.push(&mut se.expand);
        }
        v.push(&mut self.project);
        v
    }

    fn norms(&self) -> Vec<&BatchNorm2d> {
        let mut v = Vec::new();
        if let Some((_, bn)) = &self.expand {
            v.push(bn);
        }
        v.push(&self.bn1);
        v.push(&self.bn2);
        v
    }
}

#[derive(Debug, Clone, Copy)]
struct Ctx {
    seed: u64,
    at: NoiseStep,
    train: bool,
}

/// An EfficientNet classifier.
#[derive(Debug)]
pub struct EfficientNet {
    config: EfficientNetConfig,
    stem: QConv2d,
    bn0: BatchNorm2d,
    blocks: Vec<MbConv>,
    head: QConv2d,
    bn1: BatchNorm2d,
    fc: QLinear,
    seed: u64,
    step: Mutex<NoiseStep>,
}

impl EfficientNet {
    /// Builds the network of `config` from `vb` (EfficientNet-PyTorch names); `seed` keys dropout
    /// and stochastic depth.
    pub fn new(config: &EfficientNetConfig, seed: u64, vb: VarBuilder) -> Result<Self> {
        Self::new_coded(config, seed, vb, &CodedWeights::default())
    }

    /// [`Self::new`], with the convolutions and classifier whose weights `coded` holds built
    /// from their codes (no float copy: a `.qnz` run for inference); `coded` keeps what did not
    /// fit (its `take_mismatched` names the shapes) and what was not asked for.
    pub fn new_coded(
        config: &EfficientNetConfig,
        seed: u64,
        vb: VarBuilder,
        coded: &CodedWeights,
    ) -> Result<Self> {
        let (eps, m) = (config.bn_eps, config.bn_momentum);
        let pad = config.padding;
        let stem_c = config.stem_channels();
        let stem = conv(
            coded,
            vb.clone(),
            "_conv_stem",
            (3, stem_c),
            3,
            2,
            1,
            false,
            pad,
        )?;
        let bn0 = BatchNorm2d::new(stem_c, eps, m, vb.pp("_bn0"))?;
        let args = config.blocks();
        let n = args.len();
        let mut blocks = Vec::with_capacity(n);
        for (i, a) in args.iter().enumerate() {
            let rate = config.drop_connect * i as f64 / n as f64;
            blocks.push(MbConv::new(
                *a,
                config,
                rate,
                vb.pp(format!("_blocks.{i}")),
                coded,
            )?);
        }
        let last = args.last().map(|a| a.output).unwrap_or(stem_c);
        let head_c = config.head_channels();
        let head = conv(
            coded,
            vb.clone(),
            "_conv_head",
            (last, head_c),
            1,
            1,
            1,
            false,
            pad,
        )?;
        let bn1 = BatchNorm2d::new(head_c, eps, m, vb.pp("_bn1"))?;
        let fcb = vb.pp("_fc");
        let bound = 1.0 / (head_c as f64).sqrt();
        let init = candle_nn::Init::Uniform {
            lo: -bound,
            up: bound,
        };
        let fc_shape = [config.num_classes, head_c];
        let fc = match coded.take("_fc.weight", LayerKind::Linear, &fc_shape, vb.device())? {
            Some(w) => {
                let b = Var::from_tensor(&fcb.get_with_hints(config.num_classes, "bias", init)?)?;
                QLinear::from_weight(w, Some(b))
            }
            None => {
                let w = Var::from_tensor(&fcb.get_with_hints(
                    (config.num_classes, head_c),
                    "weight",
                    init,
                )?)?;
                let b = Var::from_tensor(&fcb.get_with_hints(config.num_classes, "bias", init)?)?;
                QLinear::new("_fc", w, Some(b))?
            }
        };
        Ok(Self {
            config: config.clone(),
            stem,
            bn0,
            blocks,
            head,
            bn1,
            fc,
            seed,
            step: Mutex::new(NoiseStep::default()),
        })
    }

    /// The architecture.
    pub fn config(&self) -> &EfficientNetConfig {
        &self.config
    }

    /// Pooled features before the classifier, `(batch, head channels)`.
    pub fn features(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let at = *self.step.lock().expect("step lock");
        let ctx = Ctx {
            seed: self.seed,
            at,
            train,
        };
        let act = self.config.act();
        let mut h = activate(
            &self.bn0.forward_t(&self.stem.forward_t(x, train)?, train)?,
            act,
        )?;
        for (i, b) in self.blocks.iter().enumerate() {
            h = b.forward(&h, act, &ctx, i as u64)?;
        }
        h = activate(
            &self
                .bn1
                .forward_t(&self.head.forward_t(&h, train)?, train)?,
            act,
        )?;
        h.mean(3)?.mean(2)
    }

    /// Every batch norm, in order.
    pub fn norms(&self) -> Vec<&BatchNorm2d> {
        let mut v = vec![&self.bn0];
        for b in &self.blocks {
            v.extend(b.norms());
        }
        v.push(&self.bn1);
        v
    }

    /// The running statistics of every batch norm (PyTorch buffer names), for saving.
    pub fn buffers(&self) -> Vec<(String, Tensor)> {
        self.norms().iter().flat_map(|n| n.buffers()).collect()
    }
}

impl QuantModel for EfficientNet {
    fn forward_t(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let f = self.features(x, train)?;
        let at = *self.step.lock().expect("step lock");
        let f = if train && self.config.dropout > 0.0 {
            dropout(&f, self.config.dropout, self.seed, at, 1 << 20)?
        } else {
            f
        };
        self.fc.forward_t(&f, train)
    }

    fn layers(&self) -> Vec<&dyn QuantNoiseLayer> {
        let mut v: Vec<&dyn QuantNoiseLayer> = vec![&self.stem];
        for b in &self.blocks {
            v.extend(b.layers().into_iter().map(|l| l as &dyn QuantNoiseLayer));
        }
        v.push(&self.head);
        v.push(&self.fc);
        v
    }

    fn layers_mut(&mut self) -> Vec<&mut dyn QuantNoiseLayer> {
        let mut v: Vec<&mut dyn QuantNoiseLayer> = vec![&mut self.stem];
        for b in &mut self.blocks {
            v.extend(
                b.layers_mut()
                    .into_iter()
                    .map(|l| l as &mut dyn QuantNoiseLayer),
            );
        }
        v.push(&mut self.head);
        v.push(&mut self.fc);
        v
    }

    fn other_vars(&self) -> Vec<(String, Var)> {
        self.norms().iter().flat_map(|n| n.vars()).collect()
    }

    fn set_step(&self, at: NoiseStep) {
        *self.step.lock().expect("step lock") = at;
    }

    fn buffers(&self) -> Vec<(String, Tensor)> {
        EfficientNet::buffers(self)
    }

    fn set_buffer(&self, name: &str, value: &Tensor) -> candle_core::Result<()> {
        for bn in self.norms() {
            if bn.set_buffer(name, value)? {
                return Ok(());
            }
        }
        candle_core::bail!("EfficientNet has no buffer `{name}`")
    }
}
