//! `QConv2d`: a 2-D convolution (any kernel, stride, padding, groups) with a quant-noise weight.

use candle_core::{ModuleT, Tensor, Var};
use candle_nn::{Conv2dConfig, VarBuilder};
use qn_kernels::conv::{depthwise_conv2d, Padding2d};
use qn_kernels::layout::LayerKind;

use super::QuantNoiseLayer;
use crate::{qweight::QWeight, ActQuant, ActQuantConfig, Result};

/// A convolution with weight `(out, in/groups, kh, kw)`. Noise blocks follow
/// [`qn_kernels::layout`]: whole kernels for k x k, runs of input channels for 1x1, depthwise alike.
#[derive(Debug)]
pub struct QConv2d {
    weight: QWeight,
    bias: Option<Var>,
    config: Conv2dConfig,
    same_padding: bool,
    act_quant: Option<ActQuant>,
}

impl QConv2d {
    /// From a weight, an optional bias `(out)` and the convolution settings.
    pub fn new(name: &str, weight: Var, bias: Option<Var>, config: Conv2dConfig) -> Result<Self> {
        Ok(Self {
            weight: QWeight::new(name, LayerKind::Conv2d, weight)?,
            bias,
            config,
            same_padding: false,
            act_quant: None,
        })
    }

    /// From a weight already built (e.g. [`QWeight::from_coded`]: a layer that runs from its codes,
    /// with no float variable), an optional bias `(out)` and the convolution settings.
    pub fn from_weight(weight: QWeight, bias: Option<Var>, config: Conv2dConfig) -> Self {
        Self {
            weight,
            bias,
            config,
            same_padding: false,
            act_quant: None,
        }
    }

    /// Pads like TensorFlow's "SAME" (computed per input size, asymmetric for even strides) instead
    /// of `config.padding` on every side: what weights trained in TensorFlow expect.
    pub fn with_same_padding(mut self) -> Self {
        self.same_padding = true;
        self
    }

    /// True for a depthwise convolution (one `k x k` kernel per channel), which runs the fused
    /// [`qn_kernels::conv::depthwise_conv2d`] instead of candle's per-group convolutions.
    pub fn is_depthwise(&self) -> bool {
        let d = self.weight.layout().shape();
        self.config.groups > 1 && d[0] == self.config.groups && d[1] == 1 && d[2] == d[3]
    }

    /// Quantizes the layer's output with [`ActQuant`] (`None`: off).
    pub fn set_activation_quant(&mut self, config: Option<ActQuantConfig>) -> Result<()> {
        self.act_quant = config.map(ActQuant::new).transpose()?;
        Ok(())
    }
}

/// A `QConv2d` whose `weight` / `bias` come from `vb` (PyTorch's `nn.Conv2d` names).
pub fn qconv2d(
    in_c: usize,
    out_c: usize,
    kernel: usize,
    bias: bool,
    config: Conv2dConfig,
    vb: VarBuilder,
) -> Result<QConv2d> {
    let fan_in = in_c / config.groups * kernel * kernel;
    let bound = 1.0 / (fan_in as f64).sqrt();
    let init = candle_nn::Init::Uniform {
        lo: -bound,
        up: bound,
    };
    let w = vb.get_with_hints(
        (out_c, in_c / config.groups, kernel, kernel),
        "weight",
        init,
    )?;
    let b = if bias {
        Some(Var::from_tensor(&vb.get_with_hints(out_c, "bias", init)?)?)
    } else {
        None
    };
    QConv2d::new(&vb.prefix(), Var::from_tensor(&w)?, b, config)
}

impl ModuleT for QConv2d {
    fn forward_t(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let w = self.weight.weight_t(train)?;
        let c = &self.config;
        let (_, _, h, wd) = x.dims4()?;
        let k = w.dim(2)?;
        let pad = if self.same_padding && c.dilation == 1 {
            Padding2d::same(h, wd, k, c.stride)
        } else {
            Padding2d::symmetric(c.padding)
        };
        let y = if self.is_depthwise() && c.dilation == 1 {
            depthwise_conv2d(x, &w, c.stride, pad).map_err(candle_core::Error::wrap)?
        } else if pad == Padding2d::symmetric(pad.top) {
            x.conv2d(&w, pad.top, c.stride, c.dilation, c.groups)?
        } else {
            x.pad_with_zeros(2, pad.top, pad.bottom)?
                .pad_with_zeros(3, pad.left, pad.right)?
                .conv2d(&w, 0, c.stride, c.dilation, c.groups)?
        };
        let y = match &self.bias {
            None => y,
            Some(b) => y.broadcast_add(&b.as_tensor().reshape((1, (), 1, 1))?)?,
        };
        match &self.act_quant {
            None => Ok(y),
            Some(q) => Ok(q.forward_t(&y, train, self.weight.aux_seed(1))?),
        }
    }
}

impl QuantNoiseLayer for QConv2d {
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
