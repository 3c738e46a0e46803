//! Image classifiers with quant noise: EfficientNet B0–B7 and Lite0–4 from one parameterised
//! definition, built from qn-train's `QConv2d` / `QLinear` (depthwise convolutions run the fused
//! kernel of `qn_kernels::conv`), weights in the EfficientNet-PyTorch layout.
//!
//! ```
//! use candle_core::{Device, Tensor};
//! use qn_models::vision::{EfficientNet, EfficientNetConfig};
//! use qn_models::train::QuantModel;
//!
//! // A randomly initialised Lite0 with 10 classes, one 64x64 image.
//! let cfg = EfficientNetConfig::variant("lite0", 10)?;
//! let vb = candle_nn::VarBuilder::zeros(candle_core::DType::F32, &Device::Cpu);
//! let model = EfficientNet::new(&cfg, 0, vb)?;
//! let x = Tensor::zeros((1, 3, 64, 64), candle_core::DType::F32, &Device::Cpu)?;
//! assert_eq!(model.forward_t(&x, false)?.dims(), &[1, 10]);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod activation;
mod batch_norm;
mod batch_norm_op;
mod config;
mod data;
mod efficientnet;
mod image;
pub mod layout;
mod load;

pub use batch_norm::BatchNorm2d;
pub use config::{Act, BlockArgs, ConvPadding, EfficientNetConfig, StageArgs, B0_STAGES};
pub use data::{idx_images, image_folder};
pub use efficientnet::EfficientNet;
pub use image::{image_to_tensor, load_image, Normalization};
pub use load::{
    build_efficientnet, build_efficientnet_coded, infer_variant, load_efficientnet,
    load_efficientnet_with, read_image_weights, read_image_weights_with_layout,
    scratch_efficientnet, LoadedImageModel, LAYOUT_KEY,
};

/// The 1,000 ImageNet-1k class names, line `i` = class `i` (torchvision's list; a copy of
/// `data/imagenet/classes.txt` of the shared data, kept in `assets/imagenet/`).
pub fn imagenet_classes() -> Vec<&'static str> {
    include_str!("../../../../assets/imagenet/classes.txt")
        .lines()
        .collect()
}
