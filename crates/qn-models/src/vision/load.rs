//! Loading EfficientNet weights from safetensors: the variant inferred from tensor names and
//! shapes (or given), every tensor checked by name and shape.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Uniform};

use super::config::EfficientNetConfig;
use super::efficientnet::EfficientNet;
use super::layout::{self, WeightLayout};
use crate::coded::CodedWeights;
use crate::recording::{listed, name_hash, recording_vb, take, InitFn};
use crate::{Error, Result};

/// A loaded network and what the user should be told about it.
#[derive(Debug)]
pub struct LoadedImageModel {
    /// The network.
    pub model: EfficientNet,
    /// One line each: what was initialised or ignored.
    pub warnings: Vec<String>,
    /// The layout the weights came in (files written from the model use it again).
    pub layout: WeightLayout,
}

/// The `.qnz` metadata key naming the layout an image model's weights came in.
pub const LAYOUT_KEY: &str = "efficientnet:layout";

/// Reads `path` (safetensors, or a `.qnz` written by `qn compress`, decoded) as f32 tensors under
/// their canonical (EfficientNet-PyTorch) names; integer buffers (`num_batches_tracked`) are
/// dropped.
pub fn read_image_weights(path: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    Ok(read_image_weights_with_layout(path, device)?.0)
}

/// [`read_image_weights`], and the layout the names came in (torchvision and timm names are
/// renamed; a `.qnz` says its layout in its metadata).
pub fn read_image_weights_with_layout(
    path: &Path,
    device: &Device,
) -> Result<(HashMap<String, Tensor>, WeightLayout)> {
    let (tensors, layout) = if path.extension().is_some_and(|e| e == "qnz") {
        read_qnz(path, device)?
    } else {
        let tensors = read_safetensors(path, device)?;
        // A file we wrote says its layout (timm's `tf_` conventions are not in the names).
        let layout = match safetensors_metadata(path)?.get(LAYOUT_KEY) {
            Some(name) => WeightLayout::parse(name).ok_or_else(|| {
                Error::weights(
                    path,
                    format!("metadata `{LAYOUT_KEY}` = `{name}` is not a known layout"),
                )
            })?,
            None => layout::detect(tensors.keys().map(String::as_str)),
        };
        (tensors, layout)
    };
    if layout == WeightLayout::EfficientNetPytorch || path.extension().is_some_and(|e| e == "qnz") {
        return Ok((tensors, layout));
    }
    let names = layout::to_canonical(tensors.keys().map(String::as_str), layout)
        .map_err(|e| Error::weights(path, e))?;
    let renamed = tensors
        .into_iter()
        .map(|(n, t)| (names[&n].clone(), t))
        .collect();
    Ok((renamed, layout))
}

/// The `__metadata__` of a safetensors file (empty when it has none).
fn safetensors_metadata(path: &Path) -> Result<HashMap<String, String>> {
    use std::io::Read;
    let bad = |reason: String| Error::weights(path, reason);
    let mut f = std::fs::File::open(path).map_err(|e| Error::file(path, e.to_string()))?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len)
        .map_err(|_| bad("not a safetensors file (shorter than its header length)".into()))?;
    let len = u64::from_le_bytes(len);
    if len > 100 << 20 {
        return Err(bad(format!("a header of {len} bytes is not plausible")));
    }
    let mut header = vec![0u8; len as usize];
    f.read_exact(&mut header)
        .map_err(|_| bad("the header is cut short".into()))?;
    let json: serde_json::Value =
        serde_json::from_slice(&header).map_err(|e| bad(format!("the header is not JSON: {e}")))?;
    Ok(json
        .get("__metadata__")
        .and_then(|m| m.as_object())
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| v.as_str().map(|v| (k.clone(), v.to_string())))
                .collect()
        })
        .unwrap_or_default())
}

fn read_safetensors(path: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    let raw = candle_core::safetensors::load(path, device)
        .map_err(|e| Error::weights(path, format!("cannot read safetensors: {e}")))?;
    let mut out = HashMap::with_capacity(raw.len());
    for (name, t) in raw {
        if name.ends_with("num_batches_tracked") {
            continue;
        }
        if !t.dtype().is_float() {
            return Err(Error::weights(
                path,
                format!("tensor `{name}` has dtype {:?}, not a float", t.dtype()),
            ));
        }
        out.insert(name, t.to_dtype(DType::F32)?);
    }
    Ok(out)
}

fn read_qnz(path: &Path, device: &Device) -> Result<(HashMap<String, Tensor>, WeightLayout)> {
    let (tensors, layout, _) = read_qnz_coded(path, device, false)?;
    Ok((tensors, layout))
}

/// A `.qnz`'s tensors; with `keep_codes`, the quantized convolution and classifier weights stay
/// coded (returned apart, never decoded) and everything else is decoded.
fn read_qnz_coded(
    path: &Path,
    device: &Device,
    keep_codes: bool,
) -> Result<(HashMap<String, Tensor>, WeightLayout, CodedWeights)> {
    let reader = qn_format::Reader::open(path).map_err(|e| {
        let text = e.to_string();
        let prefix = format!("{}: ", path.display());
        Error::file(path, text.strip_prefix(&prefix).unwrap_or(&text))
    })?;
    let layout = match reader.header().metadata.get(LAYOUT_KEY) {
        None => WeightLayout::EfficientNetPytorch,
        Some(name) => WeightLayout::parse(name).ok_or_else(|| {
            Error::file(
                path,
                format!("metadata `{LAYOUT_KEY}` = `{name}` is not a known layout"),
            )
        })?,
    };
    let mut out = HashMap::new();
    let coded = CodedWeights::default();
    for view in reader.views() {
        let name = &view.entry.name;
        if reader.is_exact_row_companion(name) {
            continue;
        }
        let shape = view.entry.shape.clone();
        if keep_codes && matches!(shape.len(), 2 | 4) && name.ends_with(".weight") {
            let codes = view.codes().map_err(|e| Error::file(path, e))?;
            let tensor = qn_train::kernels::import::coded_tensor(name, &shape, codes, device)
                .map_err(|e| Error::file(path, e))?;
            if let Some(tensor) = tensor {
                coded.insert(name.clone(), tensor, None);
                continue;
            }
        }
        let values = view.decode_f32().map_err(|e| Error::file(path, e))?;
        out.insert(name.clone(), Tensor::from_vec(values, shape, device)?);
    }
    Ok((out, layout, coded))
}

/// Every tensor's shape by name: the float ones and the coded ones.
fn shapes_of(
    tensors: &HashMap<String, Tensor>,
    coded: &CodedWeights,
) -> HashMap<String, Vec<usize>> {
    let mut shapes: HashMap<String, Vec<usize>> = tensors
        .iter()
        .map(|(n, t)| (n.clone(), t.dims().to_vec()))
        .collect();
    shapes.extend(coded.shapes());
    shapes
}

/// A width and depth multiplier (0.05 to 4, in steps of 0.05 and 0.01) whose network has exactly
/// these tensors' shapes: checkpoints of scaled-down models (torchvision's and timm's
/// `width_mult` / `channel_multiplier`). Any match is the same architecture.
fn infer_custom(
    shapes: &HashMap<String, Vec<usize>>,
    classes: usize,
    lite: bool,
    blocks: usize,
) -> Option<EfficientNetConfig> {
    let dims = |n: String| shapes.get(&n).cloned();
    let stem = dims("_conv_stem.weight".into())?;
    for wi in 1..=80 {
        let width = wi as f64 * 0.05;
        let probe = EfficientNetConfig::custom(width, 1.0, lite, classes).ok()?;
        if vec![probe.stem_channels(), 3, 3, 3] != stem {
            continue;
        }
        for di in 5..=400 {
            let cfg = EfficientNetConfig::custom(width, di as f64 * 0.01, lite, classes).ok()?;
            let args = cfg.blocks();
            if args.len() != blocks {
                continue;
            }
            let fits = args.iter().enumerate().all(|(i, a)| {
                let mid = a.input * a.expand;
                dims(format!("_blocks.{i}._depthwise_conv.weight"))
                    == Some(vec![mid, 1, a.kernel, a.kernel])
                    && dims(format!("_blocks.{i}._project_conv.weight"))
                        == Some(vec![a.output, mid, 1, 1])
            }) && dims("_conv_head.weight".into())
                == Some(vec![cfg.head_channels(), args.last()?.output, 1, 1]);
            if fits {
                return Some(cfg);
            }
        }
    }
    None
}

/// The variant whose architecture the tensors describe: Lite when there is no squeeze-and-excitation,
/// then the one with the same number of blocks and the same head and block shapes.
pub fn infer_variant(tensors: &HashMap<String, Tensor>, path: &Path) -> Result<EfficientNetConfig> {
    infer_variant_of(&shapes_of(tensors, &CodedWeights::default()), path)
}

/// [`infer_variant`] from the tensors' shapes alone.
fn infer_variant_of(
    shapes: &HashMap<String, Vec<usize>>,
    path: &Path,
) -> Result<EfficientNetConfig> {
    let fc = shapes.get("_fc.weight").ok_or_else(|| {
        let sample: Vec<String> = {
            let mut k: Vec<String> = shapes.keys().cloned().collect();
            k.sort();
            k.into_iter().take(4).collect()
        };
        Error::weights(
            path,
            format!(
                "no `_fc.weight`: not an EfficientNet in the EfficientNet-PyTorch layout (first names: {})",
                listed(&sample)
            ),
        )
    })?;
    let classes = fc[0];
    let lite = !shapes.keys().any(|k| k.contains("_se_reduce"));
    let blocks = (0..)
        .take_while(|i| shapes.contains_key(&format!("_blocks.{i}._depthwise_conv.weight")))
        .count();
    let dims = |n: &str| shapes.get(n).cloned();
    let candidates: &[&str] = if lite {
        &["lite0", "lite1", "lite2", "lite3", "lite4"]
    } else {
        &["b0", "b1", "b2", "b3", "b4", "b5", "b6", "b7"]
    };
    for v in candidates {
        let cfg = EfficientNetConfig::variant(v, classes)?;
        let args = cfg.blocks();
        if args.len() != blocks {
            continue;
        }
        let last = args.last().expect("blocks").output;
        let fits = dims("_conv_head.weight") == Some(vec![cfg.head_channels(), last, 1, 1])
            && dims("_conv_stem.weight") == Some(vec![cfg.stem_channels(), 3, 3, 3]);
        if fits {
            return Ok(cfg);
        }
    }
    if let Some(cfg) = infer_custom(shapes, classes, lite, blocks) {
        return Ok(cfg);
    }
    Err(Error::weights(
        path,
        format!(
            "{blocks} blocks{} match no EfficientNet {} variant; pass --variant to see which shapes differ",
            if lite { " without squeeze-excitation" } else { "" },
            if lite { "Lite" } else { "B" }
        ),
    ))
}

/// What a file lacks starts as PyTorch would: batch norms at identity (scale 1, shift 0, running
/// mean 0, variance 1), convolutions and the classifier U(±1/sqrt(fan_in)), seeded by the run seed
/// and the tensor's name.
fn pytorch_init(seed: u64) -> InitFn {
    Box::new(move |name, dims| {
        let n: usize = dims.iter().product();
        let is_bn = name.starts_with("_bn") || name.contains("._bn");
        if is_bn || name.ends_with("running_mean") || name.ends_with("running_var") {
            let one = name.ends_with("running_var") || name.ends_with(".weight");
            return Ok(vec![if one { 1f32 } else { 0f32 }; n]);
        }
        // fan_in: everything but the output dimension (the bias's layer is not known: use 1/n).
        let fan_in = if dims.len() > 1 { n / dims[0] } else { n };
        let bound = 1.0 / (fan_in.max(1) as f32).sqrt();
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ name_hash(name));
        let u = Uniform::new_inclusive(-bound, bound).map_err(candle_core::Error::wrap)?;
        Ok((0..n).map(|_| u.sample(&mut rng)).collect())
    })
}

/// A randomly initialised EfficientNet (PyTorch's default initialisation, seeded): training from
/// scratch, e.g. `qn finetune --model efficientnet-b0`.
pub fn scratch_efficientnet(
    config: &EfficientNetConfig,
    seed: u64,
    device: &Device,
) -> Result<EfficientNet> {
    let (vb, _) = recording_vb(HashMap::new(), pytorch_init(seed), device);
    EfficientNet::new(config, seed, vb)
}

/// Builds `config`'s network from `tensors` (EfficientNet-PyTorch names, read from `path`, which
/// errors name). Missing, mis-shaped and unexpected tensors are errors that list them, except a
/// classifier of another size, which is initialised from `seed` with a warning.
pub fn build_efficientnet(
    config: &EfficientNetConfig,
    tensors: HashMap<String, Tensor>,
    path: &Path,
    seed: u64,
    device: &Device,
) -> Result<LoadedImageModel> {
    build_efficientnet_coded(config, tensors, CodedWeights::default(), path, seed, device)
}

/// [`build_efficientnet`] with some weights still coded (layers built from their codes); a coded
/// weight is checked by name and shape like a float one.
pub fn build_efficientnet_coded(
    config: &EfficientNetConfig,
    tensors: HashMap<String, Tensor>,
    coded: CodedWeights,
    path: &Path,
    seed: u64,
    device: &Device,
) -> Result<LoadedImageModel> {
    let names: Vec<String> = tensors.keys().cloned().collect();
    let init = pytorch_init(seed);
    let (vb, record) = recording_vb(tensors, init, device);
    let model = EfficientNet::new_coded(config, seed, vb, &coded)?;
    let mut rec = take(&record);
    let is_head = |n: &str| n.starts_with("_fc.") || n.starts_with("`_fc.");
    // Coded weights the network did not take: of the wrong shape (which the network then also
    // found missing as a float tensor: the shape is the error to report), or not part of it.
    for (name, why) in coded.take_mismatched() {
        rec.missing.retain(|n| *n != name);
        rec.mismatched.push(why);
    }
    let coded_unexpected = coded.names();
    let body_missing: Vec<String> = rec
        .missing
        .iter()
        .filter(|n| !is_head(n))
        .cloned()
        .collect();
    if !body_missing.is_empty() {
        return Err(Error::weights(
            path,
            format!(
                "missing tensors {} for EfficientNet-{}",
                listed(&body_missing),
                config.variant
            ),
        ));
    }
    let (head_bad, body_bad): (Vec<String>, Vec<String>) =
        rec.mismatched.iter().cloned().partition(|m| is_head(m));
    if !body_bad.is_empty() {
        return Err(Error::weights(
            path,
            format!(
                "wrong shapes for EfficientNet-{}: {}",
                config.variant,
                body_bad.join("; ")
            ),
        ));
    }
    let mut warnings = Vec::new();
    let head_missing: Vec<String> = rec.missing.iter().filter(|n| is_head(n)).cloned().collect();
    if !head_missing.is_empty() || !head_bad.is_empty() {
        warnings.push(format!(
            "{}: the classifier ({}) is initialised from seed {seed} for {} classes; fine-tune before trusting its predictions",
            path.display(),
            if head_bad.is_empty() { listed(&head_missing) } else { head_bad.join("; ") },
            config.num_classes
        ));
    }
    let used: HashSet<&String> = rec.used.iter().collect();
    let mut unexpected: Vec<String> = names.into_iter().filter(|n| !used.contains(n)).collect();
    unexpected.extend(coded_unexpected);
    unexpected.sort();
    if !unexpected.is_empty() {
        return Err(Error::weights(
            path,
            format!(
                "unexpected tensors {} (not part of EfficientNet-{})",
                listed(&unexpected),
                config.variant
            ),
        ));
    }
    Ok(LoadedImageModel {
        model,
        warnings,
        layout: WeightLayout::EfficientNetPytorch,
    })
}

/// Reads `path` and builds its network: the variant inferred unless `variant` names one, the
/// classifier sized by `num_classes` (default: the file's).
pub fn load_efficientnet(
    path: &Path,
    variant: Option<&str>,
    num_classes: Option<usize>,
    seed: u64,
    device: &Device,
) -> Result<LoadedImageModel> {
    load_efficientnet_with(path, variant, num_classes, seed, device, false)
}

/// [`load_efficientnet`]; with `keep_codes`, a `.qnz`'s quantized convolutions and classifier
/// run from their codes (inference: `qn eval`, `qn predict`) instead of being decoded to float
/// (training and compression need the float weights).
pub fn load_efficientnet_with(
    path: &Path,
    variant: Option<&str>,
    num_classes: Option<usize>,
    seed: u64,
    device: &Device,
    keep_codes: bool,
) -> Result<LoadedImageModel> {
    let (tensors, mut layout, coded) = if keep_codes && path.extension().is_some_and(|e| e == "qnz")
    {
        read_qnz_coded(path, device, true)?
    } else {
        let (t, l) = read_image_weights_with_layout(path, device)?;
        (t, l, CodedWeights::default())
    };
    let shapes = shapes_of(&tensors, &coded);
    if let (WeightLayout::Timm { .. }, Some(v)) = (layout, variant) {
        // timm's names are the same for its `tf_` variants, which keep TensorFlow's conventions.
        layout = WeightLayout::Timm {
            tf_conventions: v.to_ascii_lowercase().starts_with("tf_"),
        };
    }
    let mut cfg = match variant {
        Some(v) => {
            let classes = shapes.get("_fc.weight").map(|s| s[0]).unwrap_or(1000);
            EfficientNetConfig::variant(v, classes)?
        }
        None => infer_variant_of(&shapes, path)?,
    };
    if let Some(n) = num_classes {
        cfg = EfficientNetConfig {
            num_classes: n,
            ..cfg
        };
    }
    let cfg = layout.conventions(cfg);
    let mut loaded = build_efficientnet_coded(&cfg, tensors, coded, path, seed, device)?;
    loaded.layout = layout;
    Ok(loaded)
}
