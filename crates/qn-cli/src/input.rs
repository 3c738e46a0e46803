//! Reading a safetensors file: names, dtypes, shapes and `f32` values.

use std::path::Path;

use anyhow::{bail, Context, Result};
use half::{bf16, f16};
use qn_format::header::RawDType;
use safetensors::{Dtype, SafeTensors};

/// Maps `path` and hands its parsed tensors to `f`; errors name the file.
pub fn with_safetensors<R>(
    path: &Path,
    f: impl FnOnce(&SafeTensors<'_>) -> Result<R>,
) -> Result<R> {
    let file =
        std::fs::File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
    // SAFETY: read-only map of a file we do not modify; safetensors validates what it reads.
    let map = unsafe { memmap2::Mmap::map(&file) }
        .with_context(|| format!("{}: cannot map", path.display()))?;
    let st = SafeTensors::deserialize(&map)
        .map_err(|e| anyhow::anyhow!("{}: not a safetensors file ({e})", path.display()))?;
    f(&st)
}

/// The raw dtype a tensor is stored as when it is kept unchanged.
pub fn raw_dtype(name: &str, dtype: Dtype) -> Result<RawDType> {
    Ok(match dtype {
        Dtype::F32 => RawDType::F32,
        Dtype::F16 => RawDType::F16,
        Dtype::BF16 => RawDType::Bf16,
        Dtype::I64 => RawDType::I64,
        Dtype::I32 => RawDType::I32,
        Dtype::U8 => RawDType::U8,
        other => bail!(
            "tensor `{name}`: dtype {other:?} is not supported (f32, f16, bf16, i64, i32, u8 are)"
        ),
    })
}

/// Values of a float tensor as `f32`.
pub fn to_f32(dtype: Dtype, bytes: &[u8]) -> Vec<f32> {
    match dtype {
        Dtype::F32 => bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        Dtype::F16 => bytes
            .chunks_exact(2)
            .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Dtype::BF16 => bytes
            .chunks_exact(2)
            .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        _ => unreachable!("only float tensors are converted"),
    }
}

/// Writes `bytes` to `path` atomically (temporary file + rename).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    Ok(qn_format::write_atomic(path, |f| f.write_all(bytes))?)
}
