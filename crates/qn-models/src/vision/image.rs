//! Images to tensors: PNG/JPEG decoding (any colour type: grayscale, 16-bit and CMYK are
//! converted to 8-bit RGB), resize of the shorter side to `size + 32` and centre crop to `size`
//! (the EfficientNet evaluation transform), then per-channel normalisation.

use std::path::Path;

use candle_core::{Device, Tensor};
use image::imageops::FilterType;

use crate::{Error, Result};

/// How pixel values in `[0, 1]` are mapped before the network.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Normalization {
    /// Per-channel mean (RGB), subtracted.
    pub mean: [f32; 3],
    /// Per-channel standard deviation (RGB), divided by.
    pub std: [f32; 3],
}

impl Normalization {
    /// torchvision's ImageNet statistics (EfficientNet-B weights).
    pub const IMAGENET: Self = Self {
        mean: [0.485, 0.456, 0.406],
        std: [0.229, 0.224, 0.225],
    };
    /// `(x - 0.5) / 0.5`, i.e. pixels in `[-1, 1]`: what TensorFlow's EfficientNet-Lite weights
    /// expect (mean 127, std 128 on 0..255 in the Lite reference; found by experiment on the
    /// shared Lite0 weights, see `crates/qn-models/tests/efficientnet.rs`).
    pub const SIGNED_UNIT: Self = Self {
        mean: [0.5, 0.5, 0.5],
        std: [0.5, 0.5, 0.5],
    };
}

/// Decodes `path` and returns a `(3, size, size)` f32 tensor: shorter side resized to
/// `size + 32` (bicubic), centre crop, normalised.
pub fn load_image(
    path: &Path,
    size: usize,
    norm: Normalization,
    device: &Device,
) -> Result<Tensor> {
    let img = image::ImageReader::open(path)
        .map_err(|e| Error::File {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?
        .with_guessed_format()
        .map_err(|e| Error::File {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?
        .decode()
        .map_err(|e| Error::File {
            path: path.display().to_string(),
            reason: format!("cannot decode the image: {e}"),
        })?;
    if img.width() == 0 || img.height() == 0 {
        return Err(Error::File {
            path: path.display().to_string(),
            reason: "the image is empty".into(),
        });
    }
    image_to_tensor(&img.to_rgb8(), size, norm, device)
}

/// The evaluation transform of [`load_image`] on decoded RGB pixels.
pub fn image_to_tensor(
    rgb: &image::RgbImage,
    size: usize,
    norm: Normalization,
    device: &Device,
) -> Result<Tensor> {
    if size == 0 {
        return Err(Error::Input("--image-size must be at least 1".into()));
    }
    let (w, h) = rgb.dimensions();
    let short = (size + 32) as f64;
    let scale = short / w.min(h) as f64;
    let (nw, nh) = (
        ((w as f64 * scale).round() as u32).max(size as u32),
        ((h as f64 * scale).round() as u32).max(size as u32),
    );
    let resized = image::imageops::resize(rgb, nw, nh, FilterType::CatmullRom);
    let (x0, y0) = ((nw - size as u32) / 2, (nh - size as u32) / 2);
    let mut data = vec![0f32; 3 * size * size];
    for y in 0..size {
        for x in 0..size {
            let p = resized.get_pixel(x0 + x as u32, y0 + y as u32);
            for c in 0..3 {
                data[c * size * size + y * size + x] =
                    (p[c] as f32 / 255.0 - norm.mean[c]) / norm.std[c];
            }
        }
    }
    Ok(Tensor::from_vec(data, (3, size, size), device)?)
}
