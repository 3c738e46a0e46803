//! `qn decompress`: a `.qnz` back to safetensors — each tensor under its name and shape and in the
//! dtype it had before compression (f32, f16 or bf16, as recorded; raw tensors unchanged), exact
//! rows restored by the format's decoder.

use std::path::PathBuf;

use anyhow::{Context, Result};
use half::{bf16, f16};
use qn_format::{header::RawDType, Encoding, Reader};
use safetensors::Dtype;

use crate::input::write_atomic;

/// Arguments of `qn decompress`.
#[derive(clap::Args, Debug)]
pub struct DecompressArgs {
    /// The `.qnz` file.
    file: PathBuf,
    /// The safetensors file to write; for a model written by `qn compress`, a path not ending in
    /// `.safetensors` gets a Hugging Face directory (new, or an existing empty one).
    #[arg(short, long, visible_alias = "out")]
    output: PathBuf,
}

fn safetensors_dtype(d: RawDType) -> Dtype {
    match d {
        RawDType::F32 => Dtype::F32,
        RawDType::F16 => Dtype::F16,
        RawDType::Bf16 => Dtype::BF16,
        RawDType::I64 => Dtype::I64,
        RawDType::I32 => Dtype::I32,
        RawDType::U8 => Dtype::U8,
    }
}

/// `values` as little-endian bytes of `dtype` (a float type).
fn float_bytes(values: &[f32], dtype: RawDType) -> Vec<u8> {
    match dtype {
        RawDType::F16 => values
            .iter()
            .flat_map(|v| f16::from_f32(*v).to_le_bytes())
            .collect(),
        RawDType::Bf16 => values
            .iter()
            .flat_map(|v| bf16::from_f32(*v).to_le_bytes())
            .collect(),
        _ => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
    }
}

/// Runs `qn decompress`.
pub fn run(args: &DecompressArgs) -> Result<()> {
    let reader = Reader::open(&args.file)?;
    let model_file = reader
        .header()
        .metadata
        .contains_key(qn_models::bundle::CONFIG_KEY);
    if model_file && args.output.extension().is_none_or(|e| e != "safetensors") {
        return hf_directory(args);
    }
    let mut tensors: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    for view in reader.views() {
        let e = view.entry;
        // A `<weight>.exact_row` side tensor is applied to its weight by the decoder.
        if reader.is_exact_row_companion(&e.name) {
            continue;
        }
        let (dtype, bytes) = match e.encoding {
            // Raw tensors go back byte for byte.
            Encoding::Raw { dtype } if view.exact_row.is_none() => {
                (safetensors_dtype(dtype), view.record.to_vec())
            }
            _ => {
                let values = view
                    .decode_f32()
                    .with_context(|| format!("{}", args.file.display()))?;
                let dtype = match e.encoding {
                    Encoding::Raw { dtype } => dtype,
                    _ => reader.source_dtype(&e.name).unwrap_or(RawDType::F32),
                };
                (safetensors_dtype(dtype), float_bytes(&values, dtype))
            }
        };
        tensors.push((e.name.clone(), dtype, e.shape.clone(), bytes));
    }
    // An image model goes back to the names of the layout it came in (torchvision, timm).
    let meta = &reader.header().metadata;
    if let Some(name) = meta.get(qn_models::vision::LAYOUT_KEY) {
        use qn_models::vision::layout::{from_canonical, WeightLayout, STAGES_KEY};
        let bad = |what: String| anyhow::anyhow!("{}: {what}", args.file.display());
        let layout = WeightLayout::parse(name).ok_or_else(|| {
            bad(format!(
                "metadata `{}` = `{name}` is not a known layout",
                qn_models::vision::LAYOUT_KEY
            ))
        })?;
        if layout != WeightLayout::EfficientNetPytorch {
            let stages: Vec<usize> = meta
                .get(STAGES_KEY)
                .ok_or_else(|| bad(format!("metadata `{STAGES_KEY}` is missing")))?
                .split(',')
                .map(|n| n.trim().parse::<usize>())
                .collect::<Result<_, _>>()
                .map_err(|e| bad(format!("metadata `{STAGES_KEY}`: {e}")))?;
            let names: Vec<String> = tensors.iter().map(|t| t.0.clone()).collect();
            let map = from_canonical(&names, layout, &stages).map_err(bad)?;
            for t in &mut tensors {
                t.0 = map[&t.0].clone();
            }
        }
    }
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(n, d, s, b)| {
            Ok((
                n.clone(),
                safetensors::tensor::TensorView::new(*d, s.clone(), b)?,
            ))
        })
        .collect::<Result<_, safetensors::SafeTensorError>>()
        .map_err(|e| anyhow::anyhow!("{}: {e}", args.file.display()))?;
    let mut metadata = reader.header().metadata.clone();
    // The conventions were applied; what is left describes the file.
    metadata.retain(|k, _| {
        !k.starts_with(qn_format::EXACT_ROW_KEY) && !k.starts_with(qn_format::SOURCE_DTYPE_KEY)
    });
    metadata.insert("decompressed_from".into(), args.file.display().to_string());
    let bytes = safetensors::tensor::serialize(views, Some(metadata.into_iter().collect()))
        .map_err(|e| anyhow::anyhow!("{}: {e}", args.output.display()))?;
    write_atomic(&args.output, &bytes)?;
    println!(
        "wrote {}: {} tensors, {} bytes",
        args.output.display(),
        tensors.len(),
        bytes.len()
    );
    Ok(())
}

/// A model `.qnz` (from `qn compress` / `qn finetune`) to a Hugging Face directory:
/// `config.json`, `model.safetensors` under the `…ForSequenceClassification` names, and the
/// source's tokenizer files byte for byte.
fn hf_directory(args: &DecompressArgs) -> Result<()> {
    use qn_models::hf_dir::write_dir;
    let spec = args.file.to_string_lossy().to_string();
    let bundle = qn_models::bundle::load_bundle(
        &spec,
        None,
        &Default::default(),
        0,
        &candle_core::Device::Cpu,
    )?;
    let files = bundle.hf_files()?;
    write_dir(&args.output, &files, false)?;
    println!(
        "wrote {}: a Hugging Face {} directory ({} files)",
        args.output.display(),
        bundle
            .config
            .for_classification()
            .architectures
            .unwrap_or_default()
            .join(", "),
        files.len()
    );
    Ok(())
}
