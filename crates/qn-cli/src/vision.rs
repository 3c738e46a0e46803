//! `qn predict --image`: the top-5 classes of an image from an EfficientNet checkpoint (a directory
//! holding `model.safetensors`, or the file itself), with ImageNet class names for a 1000-way head.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use candle_core::{Device, D};
use qn_models::vision::{imagenet_classes, load_efficientnet, load_image, Normalization};
use qn_train::QuantModel;

/// Runs an image model over `images`, printing the top 5 of each.
pub fn predict_images(
    model: &str,
    images: &[PathBuf],
    variant: Option<&str>,
    image_size: Option<usize>,
    json: bool,
) -> Result<()> {
    let dir = Path::new(model);
    let weights = if dir.is_dir() {
        dir.join("model.safetensors")
    } else {
        dir.to_path_buf()
    };
    if !weights.is_file() {
        bail!(
            "model `{model}`: no model.safetensors there (an image model is a directory holding one, or the file)"
        );
    }
    let loaded = load_efficientnet(&weights, variant, None, 0, &Device::Cpu)?;
    for w in &loaded.warnings {
        eprintln!("warning: {w}");
    }
    let cfg = loaded.model.config().clone();
    let size = image_size.unwrap_or(cfg.resolution);
    if size < 32 {
        bail!("--image-size {size}: at least 32 pixels are needed");
    }
    let norm = if cfg.lite {
        Normalization::SIGNED_UNIT
    } else {
        Normalization::IMAGENET
    };
    let names = if cfg.num_classes == 1000 {
        imagenet_classes()
    } else {
        Vec::new()
    };
    let mut out = Vec::new();
    for path in images {
        // The error names the file already.
        let x = load_image(path, size, norm, &Device::Cpu)?;
        let logits = loaded.model.forward_t(&x.unsqueeze(0)?, false)?;
        let e = logits
            .broadcast_sub(&logits.max_keepdim(D::Minus1)?)?
            .exp()?;
        let probs = e
            .broadcast_div(&e.sum_keepdim(D::Minus1)?)?
            .squeeze(0)?
            .to_vec1::<f32>()?;
        let mut idx: Vec<usize> = (0..probs.len()).collect();
        idx.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]));
        let top: Vec<(usize, String, f32)> = idx
            .into_iter()
            .take(5)
            .map(|i| {
                let name = names
                    .get(i)
                    .map(|s| s.to_string())
                    .unwrap_or_else(|| i.to_string());
                (i, name, probs[i])
            })
            .collect();
        out.push((path.clone(), top));
    }
    let top_json = |top: &[(usize, String, f32)]| {
        top.iter()
            .map(|(l, n, p)| serde_json::json!({"label": l, "name": n, "prob": p}))
            .collect::<Vec<_>>()
    };
    if json {
        let j = if out.len() == 1 {
            serde_json::json!({"image": out[0].0, "top5": top_json(&out[0].1)})
        } else {
            serde_json::json!({"predictions": out.iter().map(|(p, t)| serde_json::json!({"image": p, "top5": top_json(t)})).collect::<Vec<_>>()})
        };
        println!("{j}");
    } else {
        for (path, top) in &out {
            println!("{}", path.display());
            for (l, n, p) in top {
                println!("  {p:.4}\t{l}\t{n}");
            }
        }
    }
    Ok(())
}
