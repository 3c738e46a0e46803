//! Image datasets for training and evaluation: (Fashion-)MNIST IDX files, grayscale made three
//! channels, resized to the network's input and normalised as its weights expect.

use std::path::Path;

use candle_core::{Device, Tensor};
use qn_train::data::{fashion_mnist, Dataset};

use super::image::Normalization;
use crate::{Error, Result};

/// The `split` (`train` or `t10k`) of the IDX files in `dir` (`<split>-images-idx3-ubyte.gz` and
/// `<split>-labels-idx1-ubyte.gz`), the first `limit` examples, as `(n, 3, size, size)` images
/// (nearest-neighbour resize of the 28x28 grayscale, copied to three channels, normalised).
pub fn idx_images(
    dir: &Path,
    split: &str,
    limit: Option<usize>,
    size: usize,
    norm: Normalization,
    device: &Device,
) -> Result<Dataset> {
    if size < 8 {
        return Err(Error::Input(format!(
            "--image-size {size}: at least 8 pixels are needed"
        )));
    }
    let raw = fashion_mnist(dir, split, limit, device)?;
    let (n, pixels) = raw.x.dims2()?;
    let side = (pixels as f64).sqrt() as usize;
    if side * side != pixels {
        return Err(Error::Dataset {
            file: dir.display().to_string(),
            reason: format!("images of {pixels} pixels are not square"),
        });
    }
    let gray = raw.x.reshape((n, 1, side, side))?;
    let resized = if size == side {
        gray
    } else {
        gray.upsample_nearest2d(size, size)?
    };
    let mut channels = Vec::with_capacity(3);
    for c in 0..3 {
        channels.push(((&resized - norm.mean[c] as f64)? / norm.std[c] as f64)?);
    }
    let x = Tensor::cat(&channels, 1)?;
    Ok(Dataset { x, y: raw.y })
}
