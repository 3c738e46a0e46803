//! `qn decompress`: a `.qnz` back to safetensors — float tensors as dequantized `f32`, integer
//! tensors unchanged, same names and shapes.

use std::path::PathBuf;

use anyhow::{Context, Result};
use qn_format::{header::RawDType, Encoding, Reader};
use safetensors::Dtype;

use crate::input::write_atomic;

/// Arguments of `qn decompress`.
#[derive(clap::Args, Debug)]
pub struct DecompressArgs {
    /// The `.qnz` file.
    file: PathBuf,
    /// The safetensors file to write.
    #[arg(short, long)]
    output: PathBuf,
}

/// Runs `qn decompress`.
pub fn run(args: &DecompressArgs) -> Result<()> {
    let reader = Reader::open(&args.file)?;
    let mut tensors: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    for view in reader.views() {
        let e = view.entry;
        let (dtype, bytes) = match e.encoding {
            Encoding::Raw { dtype } if !dtype.is_float() => {
                let d = match dtype {
                    RawDType::I64 => Dtype::I64,
                    RawDType::I32 => Dtype::I32,
                    _ => Dtype::U8,
                };
                (d, view.record.to_vec())
            }
            _ => {
                let values = view
                    .decode_f32()
                    .with_context(|| format!("{}", args.file.display()))?;
                (
                    Dtype::F32,
                    values.iter().flat_map(|v| v.to_le_bytes()).collect(),
                )
            }
        };
        tensors.push((e.name.clone(), dtype, e.shape.clone(), bytes));
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
