//! EfficientNet B0–B7 and Lite0–4 as one parameterised definition (compound scaling of width,
//! depth and resolution from the B0 block list, as in the TensorFlow reference).

use crate::{Error, Result};

/// One stage of the B0 block list: `repeats` MBConv blocks.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StageArgs {
    /// Blocks in the stage (before depth scaling).
    pub repeats: usize,
    /// Depthwise kernel size.
    pub kernel: usize,
    /// Stride of the stage's first block.
    pub stride: usize,
    /// Expansion ratio of the inverted bottleneck.
    pub expand: usize,
    /// Input channels (before width scaling).
    pub input: usize,
    /// Output channels (before width scaling).
    pub output: usize,
}

/// EfficientNet-B0's stages (Tan & Le 2019, table 1).
pub const B0_STAGES: [StageArgs; 7] = [
    StageArgs {
        repeats: 1,
        kernel: 3,
        stride: 1,
        expand: 1,
        input: 32,
        output: 16,
    },
    StageArgs {
        repeats: 2,
        kernel: 3,
        stride: 2,
        expand: 6,
        input: 16,
        output: 24,
    },
    StageArgs {
        repeats: 2,
        kernel: 5,
        stride: 2,
        expand: 6,
        input: 24,
        output: 40,
    },
    StageArgs {
        repeats: 3,
        kernel: 3,
        stride: 2,
        expand: 6,
        input: 40,
        output: 80,
    },
    StageArgs {
        repeats: 3,
        kernel: 5,
        stride: 1,
        expand: 6,
        input: 80,
        output: 112,
    },
    StageArgs {
        repeats: 4,
        kernel: 5,
        stride: 2,
        expand: 6,
        input: 112,
        output: 192,
    },
    StageArgs {
        repeats: 1,
        kernel: 3,
        stride: 1,
        expand: 6,
        input: 192,
        output: 320,
    },
];

/// Activation of the blocks, stem and head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Act {
    /// `x · sigmoid(x)` (EfficientNet B).
    Swish,
    /// `min(max(x, 0), 6)` (EfficientNet-Lite: quantisation-friendly).
    Relu6,
}

/// Everything that defines an EfficientNet's architecture.
#[derive(Debug, Clone, PartialEq)]
pub struct EfficientNetConfig {
    /// `b0` … `b7`, `lite0` … `lite4`.
    pub variant: String,
    /// Channel multiplier.
    pub width: f64,
    /// Depth multiplier.
    pub depth: f64,
    /// The input resolution the variant was trained at.
    pub resolution: usize,
    /// Dropout before the classifier.
    pub dropout: f64,
    /// Stochastic depth rate of the last block (linearly increasing from 0).
    pub drop_connect: f64,
    /// Lite: no squeeze-and-excitation, ReLU6, stem and head not scaled.
    pub lite: bool,
    /// Classes of the head.
    pub num_classes: usize,
    /// Batch-norm epsilon (TensorFlow's 1e-3).
    pub bn_eps: f64,
    /// Batch-norm momentum in PyTorch's sense (weight of the new batch: TensorFlow's 0.99 decay).
    pub bn_momentum: f64,
    /// How convolutions pad: TensorFlow's "SAME" (the default, as the TensorFlow-trained weights
    /// expect) or PyTorch's symmetric `k / 2` (torchvision, timm's non-`tf_` variants).
    pub padding: ConvPadding,
}

/// Convolution padding convention.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConvPadding {
    /// TensorFlow's "SAME": asymmetric for even strides, the extra row and column at the end.
    TfSame,
    /// `k / 2` on every side.
    Symmetric,
}

/// One block after scaling.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BlockArgs {
    /// Depthwise kernel size.
    pub kernel: usize,
    /// Depthwise stride.
    pub stride: usize,
    /// Expansion ratio.
    pub expand: usize,
    /// Input channels.
    pub input: usize,
    /// Output channels.
    pub output: usize,
    /// Squeeze-and-excitation ratio (of `input`), 0 for none.
    pub se_ratio: f64,
}

impl EfficientNetConfig {
    /// The variant by name, with `num_classes` outputs.
    pub fn variant(name: &str, num_classes: usize) -> Result<Self> {
        let lower = name.to_ascii_lowercase();
        let key = lower
            .trim_start_matches("tf_")
            .trim_start_matches("efficientnet-")
            .trim_start_matches("efficientnet_");
        let (w, d, r, p, lite) = match key {
            "b0" => (1.0, 1.0, 224, 0.2, false),
            "b1" => (1.0, 1.1, 240, 0.2, false),
            "b2" => (1.1, 1.2, 260, 0.3, false),
            "b3" => (1.2, 1.4, 300, 0.3, false),
            "b4" => (1.4, 1.8, 380, 0.4, false),
            "b5" => (1.6, 2.2, 456, 0.4, false),
            "b6" => (1.8, 2.6, 528, 0.5, false),
            "b7" => (2.0, 3.1, 600, 0.5, false),
            "lite0" => (1.0, 1.0, 224, 0.2, true),
            "lite1" => (1.0, 1.1, 240, 0.2, true),
            "lite2" => (1.1, 1.2, 260, 0.3, true),
            "lite3" => (1.2, 1.4, 280, 0.3, true),
            "lite4" => (1.4, 1.8, 300, 0.3, true),
            _ => {
                return Err(Error::Config {
                    file: "--variant".into(),
                    field: "variant".into(),
                    reason: format!("`{name}` is not one of b0..b7, lite0..lite4"),
                })
            }
        };
        if num_classes == 0 {
            return Err(Error::Input("a classifier needs at least one class".into()));
        }
        Ok(Self {
            variant: key.to_string(),
            width: w,
            depth: d,
            resolution: r,
            dropout: p,
            drop_connect: 0.2,
            lite,
            num_classes,
            bn_eps: 1e-3,
            bn_momentum: 0.01,
            padding: ConvPadding::TfSame,
        })
    }

    /// A network outside the named variants (a small one for tests or training from scratch):
    /// B0's stages scaled by `width` and `depth`, with Lite's rules when `lite`.
    pub fn custom(width: f64, depth: f64, lite: bool, num_classes: usize) -> Result<Self> {
        for (field, v) in [("width", width), ("depth", depth)] {
            if !(v.is_finite() && v > 0.0 && v <= 16.0) {
                return Err(Error::Config {
                    file: "EfficientNet".into(),
                    field: field.into(),
                    reason: format!("{v} is not in (0, 16]"),
                });
            }
        }
        let base = Self::variant(if lite { "lite0" } else { "b0" }, num_classes)?;
        Ok(Self {
            variant: format!("custom(width={width}, depth={depth})"),
            width,
            depth,
            ..base
        })
    }

    /// Channels after width scaling, rounded to a multiple of 8 (never down by more than 10 %).
    pub fn round_filters(&self, filters: usize) -> usize {
        let f = filters as f64 * self.width;
        let mut new = ((f + 4.0) as usize / 8 * 8).max(8);
        if (new as f64) < 0.9 * f {
            new += 8;
        }
        new
    }

    /// Stem output channels (fixed at 32 for Lite).
    pub fn stem_channels(&self) -> usize {
        if self.lite {
            32
        } else {
            self.round_filters(32)
        }
    }

    /// Head channels (fixed at 1280 for Lite).
    pub fn head_channels(&self) -> usize {
        if self.lite {
            1280
        } else {
            self.round_filters(1280)
        }
    }

    /// Blocks in each of the seven stages after depth scaling (Lite keeps the first and last
    /// stage's repeats, as TensorFlow's `fix_head_stem`).
    pub fn blocks_per_stage(&self) -> Vec<usize> {
        let last = B0_STAGES.len() - 1;
        B0_STAGES
            .iter()
            .enumerate()
            .map(|(i, st)| {
                if self.lite && (i == 0 || i == last) {
                    st.repeats
                } else {
                    (self.depth * st.repeats as f64).ceil() as usize
                }
            })
            .collect()
    }

    /// The blocks in order, after width and depth scaling.
    pub fn blocks(&self) -> Vec<BlockArgs> {
        let mut out = Vec::new();
        let per_stage = self.blocks_per_stage();
        for (i, st) in B0_STAGES.iter().enumerate() {
            let repeats = per_stage[i];
            let input = if i == 0 {
                self.stem_channels()
            } else {
                self.round_filters(st.input)
            };
            let output = self.round_filters(st.output);
            for r in 0..repeats {
                out.push(BlockArgs {
                    kernel: st.kernel,
                    stride: if r == 0 { st.stride } else { 1 },
                    expand: st.expand,
                    input: if r == 0 { input } else { output },
                    output,
                    se_ratio: if self.lite { 0.0 } else { 0.25 },
                });
            }
        }
        out
    }

    /// The activation.
    pub fn act(&self) -> Act {
        if self.lite {
            Act::Relu6
        } else {
            Act::Swish
        }
    }
}
