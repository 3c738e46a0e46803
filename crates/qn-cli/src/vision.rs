//! `qn predict --image`: the top-5 classes of an image from an EfficientNet checkpoint (a directory
//! holding `model.safetensors`, or the file itself), with ImageNet class names for a 1000-way head.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{Device, D};
use qn_models::vision::layout::{from_canonical, WeightLayout, STAGES_KEY};
use qn_models::vision::{
    build_efficientnet, idx_images, image_folder, imagenet_classes, infer_variant,
    load_efficientnet, load_efficientnet_with, load_image, read_image_weights_with_layout,
    scratch_efficientnet, EfficientNetConfig, Normalization, LAYOUT_KEY,
};
use qn_train::data::Dataset;

use crate::encoder::AnyTask;
use qn_train::QuantModel;

/// Runs an image model over `images`, printing the top 5 of each.
pub fn predict_images(
    model: &str,
    images: &[PathBuf],
    variant: Option<&str>,
    image_size: Option<usize>,
    json: bool,
) -> Result<()> {
    let weights = weights_path(model)?;
    // Inference: a `.qnz` runs from its codes.
    let loaded = load_efficientnet_with(&weights, variant, None, 0, &Device::Cpu, true)?;
    for w in &loaded.warnings {
        eprintln!("warning: {w}");
    }
    let cfg = loaded.model.config().clone();
    let size = image_size.unwrap_or(cfg.resolution);
    if size < 32 {
        bail!("--image-size {size}: at least 32 pixels are needed");
    }
    let norm = normalization(&cfg);
    let names: Vec<String> = match saved_classes(&weights)? {
        Some(names) => names,
        None if cfg.num_classes == 1000 => {
            imagenet_classes().into_iter().map(str::to_string).collect()
        }
        None => Vec::new(),
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
                let name = names.get(i).cloned().unwrap_or_else(|| i.to_string());
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

/// The weights file of an image model given as a directory or the file itself.
fn weights_path(model: &str) -> Result<PathBuf> {
    let p = Path::new(model);
    let w = if p.is_dir() {
        p.join("model.safetensors")
    } else {
        p.to_path_buf()
    };
    if !w.is_file() {
        bail!(
            "model `{model}`: no model.safetensors there (an image model is a directory holding one, or the file)"
        );
    }
    Ok(w)
}

fn normalization(cfg: &EfficientNetConfig) -> Normalization {
    if cfg.lite {
        Normalization::SIGNED_UNIT
    } else {
        Normalization::IMAGENET
    }
}

/// Where an image model's weights come from: a checkpoint, or a variant name to train from scratch.
enum ImageSource {
    Weights(PathBuf),
    Scratch(EfficientNetConfig),
}

fn image_source(model: &str) -> Result<ImageSource> {
    let lower = model.to_ascii_lowercase();
    if !Path::new(model).exists() && lower.starts_with("efficientnet") {
        return match EfficientNetConfig::variant(model, 1000) {
            Ok(cfg) => Ok(ImageSource::Scratch(cfg)),
            Err(_) => bail!(
                "model `{model}`: no such file or directory, and not a variant to train from scratch (efficientnet-b0 … b7, efficientnet-lite0 … lite4)"
            ),
        };
    }
    Ok(ImageSource::Weights(weights_path(model)?))
}

/// The class names saved with an image model (`classes.txt` beside its weights, or a `.qnz`'s
/// `image:classes` metadata), if any: an image-folder model's labels.
fn saved_classes(weights: &Path) -> Result<Option<Vec<String>>> {
    if weights.extension().is_some_and(|e| e == "qnz") {
        let reader = qn_format::Reader::open(weights)?;
        return match reader.header().metadata.get(CLASSES_KEY) {
            None => Ok(None),
            Some(text) => Ok(Some(serde_json::from_str(text).with_context(|| {
                format!(
                    "{}: metadata `{CLASSES_KEY}` is not a list of names",
                    weights.display()
                )
            })?)),
        };
    }
    let path = weights.with_file_name("classes.txt");
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&path).with_context(|| path.display().to_string())?;
    Ok(Some(text.lines().map(str::to_string).collect()))
}

/// The `.qnz` metadata key of an image model's class names (a JSON list).
const CLASSES_KEY: &str = "image:classes";

/// One split of the image data of `task`: IDX (`split` is `train` or `t10k`; the first `limit`
/// images) or an image folder (labels by `classes` when the model has them; a seeded subset).
#[allow(clippy::too_many_arguments)]
fn read_images(
    task: AnyTask,
    path: &Path,
    split: &str,
    limit: Option<usize>,
    seed: u64,
    size: usize,
    norm: Normalization,
    classes: Option<&[String]>,
) -> Result<(Dataset, Option<Vec<String>>)> {
    match task {
        AnyTask::ImageFolder => {
            let (data, names) = image_folder(path, size, norm, classes, limit, seed, &Device::Cpu)?;
            Ok((data, Some(names)))
        }
        _ => Ok((
            idx_images(path, split, limit, size, norm, &Device::Cpu)?,
            None,
        )),
    }
}

/// The metadata that records an image model's layout and stage sizes.
fn layout_metadata(layout: WeightLayout, config: &EfficientNetConfig) -> Vec<(String, String)> {
    let stages: Vec<String> = config
        .blocks_per_stage()
        .iter()
        .map(|n| n.to_string())
        .collect();
    vec![
        (LAYOUT_KEY.to_string(), layout.as_str().to_string()),
        (STAGES_KEY.to_string(), stages.join(",")),
    ]
}

/// Canonically named tensors renamed to `layout`'s names, with the metadata saying so.
#[allow(clippy::type_complexity)]
fn in_layout(
    tensors: Vec<(String, candle_core::Tensor)>,
    layout: WeightLayout,
    config: &EfficientNetConfig,
) -> Result<(Vec<(String, candle_core::Tensor)>, Vec<(String, String)>)> {
    let names: Vec<String> = tensors.iter().map(|(n, _)| n.clone()).collect();
    let map = from_canonical(&names, layout, &config.blocks_per_stage())
        .map_err(|e| anyhow::anyhow!("writing {} names: {e}", layout.as_str()))?;
    let renamed = tensors
        .into_iter()
        .map(|(n, t)| (map[&n].clone(), t))
        .collect();
    Ok((renamed, layout_metadata(layout, config)))
}

/// `qn finetune --task idx|imagefolder`: fine-tunes an EfficientNet (or trains one from scratch
/// when `--model` names a variant, e.g. `efficientnet-b0`) and writes `model.safetensors`
/// (EfficientNet-PyTorch names, running statistics included), `classes.txt` for an image folder,
/// with `metrics.jsonl` and resumable checkpoints in the output directory.
pub fn finetune_images(args: &crate::encoder::finetune::FinetuneArgs) -> Result<()> {
    use crate::encoder::finetune::{check, noise_and_config, train_or_pause};
    let (pattern, plan) = check(args, ".")?;
    // Read once: the variant (inferred from the tensors) fixes the normalisation of the data, and
    // the data fixes the number of classes of the head the network is then built with.
    let source = image_source(&args.model.model)?;
    let from_scratch = matches!(source, ImageSource::Scratch(_));
    let verb = if from_scratch {
        "trained"
    } else {
        "fine-tuned"
    };
    let (variant, tensors, weights, layout) = match source {
        ImageSource::Weights(weights) => {
            let (tensors, layout) = read_image_weights_with_layout(&weights, &Device::Cpu)?;
            let variant = layout.conventions(infer_variant(&tensors, &weights)?);
            (variant, Some(tensors), Some(weights), layout)
        }
        ImageSource::Scratch(cfg) => {
            eprintln!(
                "note: no weights for `{}`: training EfficientNet-{} from scratch (seed {})",
                args.model.model, cfg.variant, args.seed
            );
            (cfg, None, None, WeightLayout::EfficientNetPytorch)
        }
    };
    let norm = normalization(&variant);
    let size = args.image_size as usize;
    let limit = args.max_examples.map(|n| n as usize);
    let (train, names) = read_images(
        args.task,
        &args.train,
        "train",
        limit,
        args.seed,
        size,
        norm,
        None,
    )?;
    let (eval, _) = read_images(
        args.task,
        &args.eval,
        "t10k",
        args.max_eval_examples.map(|n| n as usize),
        args.seed,
        size,
        norm,
        names.as_deref(),
    )?;
    let classes = match &names {
        Some(n) => n.len(),
        None => train.y.max(0)?.to_scalar::<u32>()? as usize + 1,
    };
    let config = EfficientNetConfig {
        num_classes: classes,
        ..variant
    };
    let mut model = match (tensors, weights) {
        (Some(tensors), Some(weights)) => {
            let loaded = build_efficientnet(&config, tensors, &weights, args.seed, &Device::Cpu)?;
            for w in &loaded.warnings {
                eprintln!("warning: {w}");
            }
            loaded.model
        }
        _ => scratch_efficientnet(&config, args.seed, &Device::Cpu)?,
    };
    let mut cfg = noise_and_config(args, &pattern, &model, &plan, train.len(), None)?;
    // The running statistics lag the network at the end of any image fine-tune, not only a noisy
    // one: with momentum 0.01, 200 steps leave 13 % of the pretrained (ImageNet) statistics, and
    // a network from scratch remembers its first steps' activations. Measured on Lite0 /
    // Fashion-MNIST without noise: 83.70 % -> 87.20 % once re-estimated (BENCHMARKS.md). So every
    // stage ends with `--bn-recalibrate` noise-free batches.
    cfg.recalibrate_always = true;
    let Some(report) = train_or_pause(args, &mut model, &train, &eval, &plan, &cfg)? else {
        return Ok(());
    };
    let mut tensors: Vec<(String, candle_core::Tensor)> = qn_train::named_vars(&model)
        .into_iter()
        .map(|(n, v)| (n, v.as_tensor().detach()))
        .collect();
    tensors.extend(model.buffers());
    if let Some(names) = &names {
        let text = names.join("\n") + "\n";
        qn_models::hf_dir::write_file_atomic(&args.output.join("classes.txt"), text.as_bytes())?;
    }
    // Written in the layout the weights came in, so the file loads where they came from.
    let (tensors, meta) = in_layout(tensors, layout, model.config())?;
    let bytes = qn_models::hf_dir::safetensors_bytes_with(&tensors, &meta)?;
    qn_models::hf_dir::write_file_atomic(&args.output.join("model.safetensors"), &bytes)?;
    println!(
        "{} EfficientNet-{} {} steps on {} images at {size} px; eval accuracy {:.2} % on {} images; wrote {}",
        verb,
        model.config().variant,
        report.steps,
        train.len(),
        report.stage_accuracy.last().copied().unwrap_or(f64::NAN) * 100.0,
        eval.len(),
        args.output.display()
    );
    Ok(())
}

/// `qn eval --task idx|imagefolder`: accuracy of an image model on the `t10k` split of an IDX
/// `--data`, or on an image folder (labels by the model's saved class names when it has them).
pub fn eval_images(args: &crate::encoder::eval::EvalArgs) -> Result<()> {
    let start = std::time::Instant::now();
    let weights = weights_path(&args.model.model)?;
    // Inference: a `.qnz` runs from its codes.
    let loaded = load_efficientnet_with(&weights, None, None, 0, &Device::Cpu, true)?;
    for w in &loaded.warnings {
        eprintln!("warning: {w}");
    }
    let norm = normalization(loaded.model.config());
    let classes = saved_classes(&weights)?;
    let (data, _) = read_images(
        args.task,
        &args.data,
        "t10k",
        args.max_examples.map(|n| n as usize),
        args.seed,
        args.image_size as usize,
        norm,
        classes.as_deref(),
    )?;
    let pred = crate::encoder::eval::predict_all(&loaded.model, &data.x, args.batch_size as usize)?;
    let gold = data.y.to_vec1::<u32>()?;
    let correct = pred.iter().zip(&gold).filter(|(p, g)| p == g).count();
    let accuracy = correct as f64 / gold.len().max(1) as f64;
    let seconds = start.elapsed().as_secs_f64();
    if args.json {
        println!(
            "{}",
            serde_json::json!({"accuracy": accuracy, "examples": gold.len(), "seconds": seconds})
        );
    } else {
        println!(
            "accuracy {:.2} % ({correct} / {}) in {seconds:.1} s",
            accuracy * 100.0,
            gold.len()
        );
    }
    Ok(())
}

/// The default iPQ schedule for EfficientNet (committed as `crates/qn-cli/plans/efficientnet-ipq.toml`).
const DEFAULT_IMAGE_PLAN: &str = include_str!("../plans/efficientnet-ipq.toml");

/// `qn compress --task idx|imagefolder`: an EfficientNet to a `.qnz` by iPQ with centroid fine-tuning on
/// (Fashion-)MNIST (stages of `--plan`, default [`DEFAULT_IMAGE_PLAN`]), or post-training
/// int8/int4. The file holds every tensor under EfficientNet-PyTorch names (running statistics
/// included), so `qn eval`/`predict` take it alone.
pub fn compress_images(args: &crate::encoder::compress::CompressArgs) -> Result<()> {
    use crate::encoder::compress::{
        ipq_stages_and_export, quantize_scalar_layers, scalar_config, stage_plan, DistillMode,
        IpqData, Method,
    };
    use qn_format::header::CodebookKind;
    use qn_train::trainer::{export_qnz_with, StagePlan};
    let weights = weights_path(&args.model.model)?;
    let loaded = load_efficientnet(&weights, None, None, args.seed, &Device::Cpu)?;
    for w in &loaded.warnings {
        eprintln!("warning: {w}");
    }
    let mut model = loaded.model;
    let classes = saved_classes(&weights)?;
    let mut meta = vec![(
        "efficientnet:variant".to_string(),
        model.config().variant.clone(),
    )];
    meta.extend(layout_metadata(loaded.layout, model.config()));
    if let Some(names) = &classes {
        meta.push((CLASSES_KEY.to_string(), serde_json::to_string(names)?));
    }
    let bits = match args.method {
        Method::Int8 => Some(8),
        Method::Int4 => Some(4),
        Method::Ipq => None,
    };
    if let Some(bits) = bits {
        let kept = quantize_scalar_layers(&mut model, &scalar_config(args, bits)?);
        let bytes = export_qnz_with(&model, &args.output, CodebookKind::F16, &meta)?;
        println!(
            "wrote {} ({bytes} bytes, int{bits}, {} layers quantized)",
            args.output.display(),
            qn_train::QuantModel::layers(&model).len() - kept.len()
        );
        return Ok(());
    }
    let Some(train_path) = &args.train else {
        bail!("--method ipq fine-tunes centroids on task data: give --train");
    };
    if args.distill == DistillMode::Hidden {
        bail!("--distill hidden compares an encoder's layers; an image model takes --distill logits or none");
    }
    let plan = stage_plan(args, || {
        StagePlan::from_toml(DEFAULT_IMAGE_PLAN).context("the default EfficientNet plan")
    })?;
    let norm = normalization(model.config());
    let size = args.image_size as usize;
    let task = args.task.unwrap_or(AnyTask::Idx);
    let limit = args.max_examples.map(|n| n as usize);
    let names = classes.as_deref();
    let (train, _) = read_images(
        task, train_path, "train", limit, args.seed, size, norm, names,
    )?;
    let eval = match &args.eval {
        Some(e) => Some(read_images(task, e, "t10k", Some(1000), args.seed, size, norm, names)?.0),
        None => None,
    };
    let teacher = match (&args.teacher, args.distill) {
        (Some(t), DistillMode::Logits) => {
            let loaded = load_efficientnet(&weights_path(t)?, None, None, args.seed, &Device::Cpu)
                .with_context(|| format!("--teacher `{t}`"))?;
            Some(Box::new(loaded.model) as Box<dyn qn_train::QuantModel>)
        }
        _ => None,
    };
    let data = IpqData {
        train,
        eval,
        teacher,
    };
    ipq_stages_and_export(args, &mut model, data, &plan, &meta)
}
