//! `QConv2d`: a 2-D convolution (any kernel, stride, padding, groups) with a quant-noise weight.

use candle_core::{ModuleT, Tensor, Var};
use candle_nn::{Conv2dConfig, VarBuilder};
use qn_kernels::conv::{depthwise_conv2d, pointwise_conv_pq, pointwise_conv_scalar, Padding2d};
use qn_kernels::layout::{BlockLayout, LayerKind};
use qn_kernels::noise::{block_drop_matmul, linear_matmul, BlockMask};

use super::QuantNoiseLayer;
use crate::{
    qweight::{LinearPlan, QWeight},
    ActQuant, ActQuantConfig, Result,
};

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

/// A 1x1 convolution (stride 1, no padding, one group) from the codes, on the activations as they
/// lie: a tile of decoded output channels at a time, PQ tables or int-N dot products for a
/// one-pixel map; `None` for any other plan.
fn pointwise_from_codes(x: &Tensor, plan: LinearPlan) -> candle_core::Result<Option<Tensor>> {
    let y = match plan {
        LinearPlan::Codes(m) => pointwise_conv_pq(x, &m),
        LinearPlan::Scalar(q) => pointwise_conv_scalar(x, &q),
        _ => return Ok(None),
    };
    Ok(Some(y.map_err(crate::Error::from)?))
}

/// A 1x1 convolution (one group, stride 1, no padding) in training, as a linear layer over the
/// batch's pixels: `x` laid out pixel-major `(batch · pixels, in)`, then the plan a `QLinear` runs
/// (block drop fused into the matmul, the same kernel without it, or the built weight). candle
/// derives a convolution's kernel gradient from a convolution whose "kernel" is the whole output
/// gradient, run as one dot product per output (~15 % of an EfficientNet-Lite0 training step); a
/// matmul's backward is two GEMMs, and the fused plans keep the noisy and the noise-free step the
/// same but for the mask. The layout changes cost a transpose copy each way.
fn pointwise_train(x: &Tensor, weight: &QWeight) -> candle_core::Result<Tensor> {
    let (n, cin, h, wd) = x.dims4()?;
    let cout = weight.layout().rows();
    let pixels = x
        .reshape((n, cin, h * wd))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((n * h * wd, cin))?;
    let matrix = |w: &Tensor| w.reshape((cout, cin));
    let y = match weight.linear_plan(true)? {
        LinearPlan::BlockDrop(w, mask, p) => {
            let layout =
                BlockLayout::linear(weight.name(), &[cout, cin], mask.layout().block_size())
                    .map_err(crate::Error::from)?;
            let mask =
                BlockMask::from_vec(&layout, mask.noised().to_vec()).map_err(crate::Error::from)?;
            block_drop_matmul(&pixels, &matrix(&w)?, &mask, p).map_err(crate::Error::from)?
        }
        LinearPlan::Exact(w) => linear_matmul(&pixels, &matrix(&w)?).map_err(crate::Error::from)?,
        LinearPlan::Generic(w) => pixels.matmul(&matrix(&w)?.t()?)?,
        // Codes are an evaluation plan; training never gets one, but the built weight is exact.
        LinearPlan::Codes(_) | LinearPlan::Scalar(_) => {
            pixels.matmul(&matrix(&weight.weight_t(true)?)?.t()?)?
        }
    };
    y.reshape((n, h * wd, cout))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((n, cout, h, wd))
}

impl QConv2d {
    /// One group, stride 1 and no padding (TensorFlow's "SAME" pads a 1x1 kernel by nothing at
    /// stride 1): a 1x1 kernel then maps each pixel's channels alone.
    fn pointwise_geometry(&self) -> bool {
        let c = &self.config;
        c.groups == 1 && c.stride == 1 && (self.same_padding || c.padding == 0)
    }

    /// True when evaluation multiplies by the codes themselves (a product-quantized or int-N 1x1
    /// convolution on the CPU) instead of rebuilding the float weight each forward.
    pub fn evaluates_from_codes(&self) -> bool {
        self.pointwise_geometry() && matches!(self.weight.pointwise_plan(false), Ok(Some(_)))
    }

    /// The convolution's output before bias, from the codes where the weight allows it (a 1x1
    /// convolution in evaluation), else with the weight [`QWeight::weight_t`] builds: a k x k or
    /// depthwise kernel is at most a few hundred KB (EfficientNet's largest, 1152x1x5x5, is 115 KB),
    /// small next to the activations it convolves.
    fn convolve(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let c = &self.config;
        let (_, _, h, wd) = x.dims4()?;
        let shape = self.weight.layout().shape();
        let k = shape[2];
        let pad = if self.same_padding && c.dilation == 1 {
            Padding2d::same(h, wd, k, c.stride)
        } else {
            Padding2d::symmetric(c.padding)
        };
        if self.pointwise_geometry() && k == 1 && !train {
            // A 1x1 kernel is a Linear layer over each pixel's channels: its calibration inputs
            // are the pixels (a no-op unless a calibration runs).
            let (n, cin, _, _) = x.dims4()?;
            if self.weight.is_calibrating() {
                let pixels = x.permute((0, 2, 3, 1))?.reshape((n * h * wd, cin))?;
                self.weight
                    .record_inputs(&pixels)
                    .map_err(candle_core::Error::wrap)?;
            }
        }
        if self.pointwise_geometry() {
            if let Some(plan) = self.weight.pointwise_plan(train)? {
                if let Some(y) = pointwise_from_codes(x, plan)? {
                    return Ok(y);
                }
            }
        }
        if self.pointwise_geometry() && k == 1 && train {
            return pointwise_train(x, &self.weight);
        }
        let w = self.weight.weight_t(train)?;
        if self.is_depthwise() && c.dilation == 1 {
            depthwise_conv2d(x, &w, c.stride, pad).map_err(candle_core::Error::wrap)
        } else if pad == Padding2d::symmetric(pad.top) {
            x.conv2d(&w, pad.top, c.stride, c.dilation, c.groups)
        } else {
            x.pad_with_zeros(2, pad.top, pad.bottom)?
                .pad_with_zeros(3, pad.left, pad.right)?
                .conv2d(&w, 0, c.stride, c.dilation, c.groups)
        }
    }
}

impl ModuleT for QConv2d {
    fn forward_t(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let y = self.convolve(x, train)?;
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
