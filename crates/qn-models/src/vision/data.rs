//! Image datasets for training and evaluation: (Fashion-)MNIST IDX files, grayscale made three
//! channels, resized to the network's input and normalised as its weights expect; and image
//! folders (`<dir>/<class>/<image>`, as torchvision's `ImageFolder`).

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
    Ok(Dataset::new(x, raw.y))
}

/// The file endings an image folder's images may have.
const IMAGE_EXTENSIONS: [&str; 3] = ["png", "jpg", "jpeg"];

/// An image-folder dataset as torchvision's `ImageFolder` reads it: `dir/<class>/<image>`, classes
/// in sorted order (label `i` = the `i`-th class), images in sorted order within each class, each
/// decoded, resized and centre-cropped to `size` as [`super::load_image`] does. With `classes`
/// given (the model's label names), every folder must be one of them and takes its label: an
/// evaluation set may hold a subset of the training classes. `limit` keeps a seeded subset.
///
/// Returns the images with their labels and the class names (the given ones, or the folders').
pub fn image_folder(
    dir: &Path,
    size: usize,
    norm: Normalization,
    classes: Option<&[String]>,
    limit: Option<usize>,
    seed: u64,
    device: &Device,
) -> Result<(Dataset, Vec<String>)> {
    let err = |reason: String| Error::Dataset {
        file: dir.display().to_string(),
        reason,
    };
    let entries = std::fs::read_dir(dir).map_err(|e| Error::File {
        path: dir.display().to_string(),
        reason: e.to_string(),
    })?;
    let mut folders: Vec<String> = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| err(e.to_string()))?;
        if entry.path().is_dir() {
            folders.push(entry.file_name().to_string_lossy().into_owned());
        }
    }
    folders.sort();
    if folders.is_empty() {
        return Err(err(
            "no class folders (an image folder is <dir>/<class>/<image>.png|jpg)".into(),
        ));
    }
    let names: Vec<String> = match classes {
        Some(c) => c.to_vec(),
        None => folders.clone(),
    };
    let mut files: Vec<(std::path::PathBuf, u32)> = Vec::new();
    for folder in &folders {
        let Some(label) = names.iter().position(|n| n == folder) else {
            return Err(err(format!(
                "class folder `{folder}` is not one of the model's {} classes ({})",
                names.len(),
                names.iter().take(8).cloned().collect::<Vec<_>>().join(", ")
            )));
        };
        let mut images: Vec<std::path::PathBuf> = std::fs::read_dir(dir.join(folder))
            .map_err(|e| err(format!("{folder}: {e}")))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.extension()
                    .and_then(|e| e.to_str())
                    .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
            })
            .collect();
        images.sort();
        if images.is_empty() {
            return Err(err(format!(
                "class folder `{folder}` has no .png/.jpg images"
            )));
        }
        files.extend(images.into_iter().map(|p| (p, label as u32)));
    }
    if let Some(n) = limit {
        if n == 0 {
            return Err(err("--max-examples 0: no images left".into()));
        }
        if n < files.len() {
            use rand::seq::SliceRandom;
            let mut rng = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(seed);
            files.shuffle(&mut rng);
            files.truncate(n);
        }
    }
    let mut images = Vec::with_capacity(files.len());
    for (path, _) in &files {
        images.push(super::load_image(path, size, norm, device)?);
    }
    let x = Tensor::stack(&images, 0)?;
    let y = Tensor::from_vec(
        files.iter().map(|(_, l)| *l).collect::<Vec<u32>>(),
        files.len(),
        device,
    )?;
    Ok((Dataset::new(x, y), names))
}
