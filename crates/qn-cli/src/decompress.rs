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
    let meta = &reader.header().metadata;
    for view in reader.views() {
        let e = view.entry;
        // `<weight>.exact_row` tensors are applied to their weight below, not written themselves.
        if e.name.ends_with(".exact_row")
            && meta.contains_key(&format!(
                "exact_row:{}",
                e.name.trim_end_matches(".exact_row")
            ))
        {
            continue;
        }
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
                let mut values = view
                    .decode_f32()
                    .with_context(|| format!("{}", args.file.display()))?;
                restore_exact_row(&reader, &e.name, &e.shape, &mut values)
                    .with_context(|| format!("{}: tensor `{}`", args.file.display(), e.name))?;
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

/// Puts back the row a quantized weight keeps exactly (metadata `exact_row:<name>` = row, tensor
/// `<name>.exact_row`; see docs/format.md).
fn restore_exact_row<B: AsRef<[u8]>>(
    reader: &Reader<B>,
    name: &str,
    shape: &[usize],
    values: &mut [f32],
) -> Result<()> {
    let Some(row) = reader.header().metadata.get(&format!("exact_row:{name}")) else {
        return Ok(());
    };
    let row: usize = row
        .parse()
        .with_context(|| format!("metadata exact_row `{row}` is not a row index"))?;
    let exact = reader.tensor(&format!("{name}.exact_row"))?.decode_f32()?;
    let cols = values.len() / shape.first().copied().unwrap_or(1).max(1);
    if row >= shape.first().copied().unwrap_or(0) || exact.len() != cols {
        anyhow::bail!(
            "exact row {row} ({} values) does not fit shape {shape:?}",
            exact.len()
        );
    }
    values[row * cols..(row + 1) * cols].copy_from_slice(&exact);
    Ok(())
}
