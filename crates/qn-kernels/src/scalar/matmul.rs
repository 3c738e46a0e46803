//! Matmul straight from int-N codes: `y = x · Wᵀ` for a scalar-quantized `W (out, in)` with the
//! dequantisation inside the dot products, so no dense copy of `W` is made.
//!
//! With a scale `s` and zero point `z` per group of `G` inputs of a row (the whole row for
//! per-tensor and per-output-channel parameters, `G = size` for per-group ones),
//! `y[o] = Σ_g s(o,g) · (Σ_{i∈g} x_i · q[o,i] − z(o,g) · Σ_{i∈g} x_i)`: the inner sum reads one
//! byte per weight instead of four, and the group sums of `x` are computed once per input row.
//! The dot products run eight codes at a time with AVX2+FMA when the processor has them (detected
//! at run time), portable code otherwise; output rows are split in fixed chunks over rayon.
//! Parameters per input channel (`PerChannel { axis: 1 }`) and inputs of more than
//! [`SCALAR_MAX_ROWS`] rows take the dense path: dequantise a tile of weight rows at a time and
//! multiply it ([`crate::tiled`]), so no dense copy of the whole weight exists there either.
//! [`scalar_matmul_reference`] is the plain twin (dequantise, then matmul).
//!
//! ```
//! use candle_core::{Device, Tensor};
//! use qn_kernels::scalar::{observe, quantize, scalar_matmul, scalar_matmul_reference, ScalarConfig};
//!
//! let w = Tensor::randn(0f32, 0.02, (48, 64), &Device::Cpu)?;
//! let q = quantize(&w, &observe(&w, &ScalarConfig::int8())?)?;
//! let x = Tensor::randn(0f32, 1.0, (3, 64), &Device::Cpu)?;
//! let diff = (scalar_matmul(&x, &q)? - scalar_matmul_reference(&x, &q)?)?
//!     .abs()?.max_all()?.to_scalar::<f32>()?;
//! assert!(diff < 1e-4, "{diff}");
//! # Ok::<(), qn_kernels::Error>(())
//! ```

use candle_core::{DType, Device, Storage, Tensor};
use rayon::prelude::*;

use super::{dequantize, Granularity, QuantizedTensor};
use crate::{Error, Result};

/// Input rows up to which [`scalar_matmul`] works from the codes; above it, it dequantises the
/// weight once and runs one dense matmul: measured with `examples/lut_gemv.rs` on a 3072 × 768
/// layer, codes win up to 32 rows (1.33× at 32) and lose from 64 (0.68×; BENCHMARKS.md).
pub const SCALAR_MAX_ROWS: usize = 32;

/// Output rows per parallel task.
const OUT_CHUNK: usize = 64;

/// `x (.., in) · Wᵀ` for codes `W (out, in)`, on the CPU (other devices: the reference path).
pub fn scalar_matmul(x: &Tensor, q: &QuantizedTensor) -> Result<Tensor> {
    scalar_matmul_with(x, q, SCALAR_MAX_ROWS)
}

/// [`scalar_matmul`] with another crossover: inputs of more than `max_rows` rows take the dense
/// path (for measuring it).
pub fn scalar_matmul_with(x: &Tensor, q: &QuantizedTensor, max_rows: usize) -> Result<Tensor> {
    let (rows, cols) = q.codes.dims2().map_err(|_| {
        Error::shape(
            "scalar matmul",
            format!("codes of shape {:?} are not a matrix", q.codes.dims()),
        )
    })?;
    let dims = x.dims().to_vec();
    let Some((&last, lead)) = dims.split_last() else {
        return Err(Error::shape(
            "scalar matmul",
            "a scalar input has no features",
        ));
    };
    if last != cols {
        return Err(Error::shape(
            "scalar matmul",
            format!("input of shape {dims:?} has {last} features, the weight takes {cols}"),
        ));
    }
    let n: usize = lead.iter().product();
    let group = match q.params.config.granularity {
        Granularity::PerTensor | Granularity::PerChannel { axis: 0 } => Some(cols),
        Granularity::PerGroup { size } => Some(size),
        Granularity::PerChannel { .. } => None,
    };
    if !x.device().is_cpu() || !q.codes.device().is_cpu() {
        return scalar_matmul_reference(x, q);
    }
    let (Some(group), true) = (group, n <= max_rows) else {
        // Many rows (or parameters per input channel): dequantise a tile of weight rows at a
        // time and multiply it (`tiled::matmul_t`), never the whole weight at once.
        let xs = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let mut y = vec![0f32; n * rows];
        with_row_decoder(q, |decode| {
            crate::tiled::matmul_t(&xs, n, rows, cols, &mut y, decode)
        })?;
        let mut out_dims = lead.to_vec();
        out_dims.push(rows);
        return Ok(Tensor::from_vec(y, out_dims, &Device::Cpu)?.to_dtype(x.dtype())?);
    };
    let per_tensor = q.params.config.granularity == Granularity::PerTensor;
    let scales = q.params.scale.flatten_all()?.to_vec1::<f32>()?;
    let zps = q.params.zero_point.flatten_all()?.to_vec1::<f32>()?;
    let xs = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let codes = q.codes.contiguous()?;
    let (storage, layout) = codes.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        return scalar_matmul_reference(x, q);
    };
    let all = cpu.as_slice::<u8>()?;
    let codes = &all[layout.start_offset()..layout.start_offset() + rows * cols];
    let groups = cols / group;
    // Σ x over each group, per input row.
    let sums: Vec<f32> = xs
        .chunks_exact(group)
        .map(|g| g.iter().sum::<f32>())
        .collect();
    let param = |o: usize, g: usize| if per_tensor { 0 } else { o * groups + g };
    let mut yt = vec![0f32; rows * n];
    yt.par_chunks_mut(OUT_CHUNK * n)
        .enumerate()
        .for_each(|(chunk, out)| {
            for (i, y_o) in out.chunks_exact_mut(n).enumerate() {
                let o = chunk * OUT_CHUNK + i;
                let row = &codes[o * cols..(o + 1) * cols];
                for (r, y) in y_o.iter_mut().enumerate() {
                    let x = &xs[r * cols..(r + 1) * cols];
                    let mut acc = 0f32;
                    for g in 0..groups {
                        let span = g * group..(g + 1) * group;
                        let p = param(o, g);
                        let dot = dot_u8(&x[span.clone()], &row[span]);
                        acc += scales[p] * (dot - zps[p] * sums[r * groups + g]);
                    }
                    *y = acc;
                }
            }
        });
    let mut y = vec![0f32; n * rows];
    for (o, col) in yt.chunks_exact(n).enumerate() {
        for (r, &v) in col.iter().enumerate() {
            y[r * rows + o] = v;
        }
    }
    let mut out_dims = lead.to_vec();
    out_dims.push(rows);
    Ok(Tensor::from_vec(y, out_dims, &Device::Cpu)?.to_dtype(x.dtype())?)
}

/// Rows `ids` of a scalar-coded matrix `(rows, cols)` (an embedding lookup), dequantised from
/// their codes only: `ids.len() × cols` values. An id past the last row is an error naming it.
pub fn scalar_gather_rows(q: &QuantizedTensor, ids: &[u32]) -> Result<Vec<f32>> {
    let (rows, cols) = matrix_dims(q, "scalar gather")?;
    if let Some(bad) = ids.iter().find(|&&i| i as usize >= rows) {
        return Err(Error::shape(
            "ids",
            format!("id {bad} is out of range for {rows} rows"),
        ));
    }
    if !q.codes.device().is_cpu() {
        let idx = Tensor::from_vec(ids.to_vec(), ids.len(), q.codes.device())?;
        let picked = dequantize(q)?.index_select(&idx, 0)?;
        return Ok(picked.flatten_all()?.to_vec1::<f32>()?);
    }
    let mut out = vec![0f32; ids.len() * cols];
    with_row_decoder(q, |decode| {
        for (dst, &id) in out.chunks_exact_mut(cols).zip(ids) {
            decode(id as usize, dst);
        }
    })?;
    Ok(out)
}

/// `(rows, cols)` of int-N codes that must be a matrix; the error names `what`.
pub(crate) fn matrix_dims(q: &QuantizedTensor, what: &str) -> Result<(usize, usize)> {
    q.codes.dims2().map_err(|_| {
        Error::shape(
            what,
            format!("codes of shape {:?} are not a matrix", q.codes.dims()),
        )
    })
}

/// Calls `f` with a decoder of whole rows of the int-N matrix `q` `(rows, cols)` on the CPU:
/// `decode(o0, out)` dequantises rows `o0 ..` (as many as `out` holds) from their codes, so that
/// a caller can rebuild a tile of rows at a time instead of the whole weight.
pub(crate) fn with_row_decoder<R>(
    q: &QuantizedTensor,
    f: impl FnOnce(&(dyn Fn(usize, &mut [f32]) + Sync)) -> R,
) -> Result<R> {
    let (rows, cols) = matrix_dims(q, "scalar rows")?;
    let scales = q.params.scale.flatten_all()?.to_vec1::<f32>()?;
    let zps = q.params.zero_point.flatten_all()?.to_vec1::<f32>()?;
    let granularity = q.params.config.granularity;
    let codes = q.codes.contiguous()?;
    let (storage, layout) = codes.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        return Err(Error::shape("scalar rows", "the codes are not on the CPU"));
    };
    let all = cpu.as_slice::<u8>()?;
    let codes = &all[layout.start_offset()..layout.start_offset() + rows * cols];
    // Runs that share one (scale, zero point) are dequantised by a loop the compiler vectorises.
    let run = |dst: &mut [f32], src: &[u8], p: usize| {
        let (z, s) = (zps[p], scales[p]);
        for (v, &c) in dst.iter_mut().zip(src) {
            *v = (c as f32 - z) * s;
        }
    };
    let decode = |o0: usize, out: &mut [f32]| {
        for (k, dst) in out.chunks_exact_mut(cols).enumerate() {
            let o = o0 + k;
            let src = &codes[o * cols..(o + 1) * cols];
            match granularity {
                Granularity::PerTensor => run(dst, src, 0),
                Granularity::PerChannel { axis: 0 } => run(dst, src, o),
                Granularity::PerGroup { size } => {
                    let groups = cols / size;
                    for (g, (d, c)) in dst
                        .chunks_exact_mut(size)
                        .zip(src.chunks_exact(size))
                        .enumerate()
                    {
                        run(d, c, o * groups + g);
                    }
                }
                Granularity::PerChannel { .. } => {
                    for (i, (v, &c)) in dst.iter_mut().zip(src).enumerate() {
                        *v = (c as f32 - zps[i]) * scales[i];
                    }
                }
            }
        }
    };
    Ok(f(&decode))
}

/// The twin of [`scalar_matmul`]: dequantise, then matmul.
pub fn scalar_matmul_reference(x: &Tensor, q: &QuantizedTensor) -> Result<Tensor> {
    let w = dequantize(q)?.to_dtype(x.dtype())?;
    let dims = x.dims().to_vec();
    let cols = *dims.last().unwrap_or(&0);
    let n = x.elem_count() / cols.max(1);
    let mut out_dims = dims[..dims.len().saturating_sub(1)].to_vec();
    out_dims.push(w.dim(0)?);
    let y = crate::noise::linear_matmul(&x.reshape((n, cols))?, &w)?;
    Ok(y.reshape(out_dims)?)
}

/// `Σ x_i · q_i`.
fn dot_u8(x: &[f32], q: &[u8]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
        // SAFETY: the features were just detected.
        return unsafe { dot_u8_avx2(x, q) };
    }
    dot_u8_portable(x, q)
}

fn dot_u8_portable(x: &[f32], q: &[u8]) -> f32 {
    // Eight running sums, so the compiler can keep them in one vector register.
    let mut acc = [0f32; 8];
    let mut xc = x.chunks_exact(8);
    let mut qc = q.chunks_exact(8);
    for (xs, qs) in (&mut xc).zip(&mut qc) {
        for l in 0..8 {
            acc[l] += xs[l] * qs[l] as f32;
        }
    }
    let tail: f32 = xc
        .remainder()
        .iter()
        .zip(qc.remainder())
        .map(|(a, &b)| a * b as f32)
        .sum();
    acc.iter().sum::<f32>() + tail
}

/// # Safety
///
/// The processor must support AVX2 and FMA (the caller checks at run time). Any slice lengths
/// are sound: reads stop at the shorter slice's length.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_u8_avx2(x: &[f32], q: &[u8]) -> f32 {
    // SAFETY: every pointer read is below `n`, the shorter slice's length.
    unsafe {
        use std::arch::x86_64::*;
        let n = x.len().min(q.len());
        let (xp, qp) = (x.as_ptr(), q.as_ptr());
        // Four independent chains hide the FMA latency.
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut i = 0;
        while i + 32 <= n {
            for (j, a) in acc.iter_mut().enumerate() {
                let at = i + 8 * j;
                let codes = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(
                    qp.add(at) as *const __m128i
                )));
                *a = _mm256_fmadd_ps(_mm256_loadu_ps(xp.add(at)), codes, *a);
            }
            i += 32;
        }
        while i + 8 <= n {
            let codes = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(
                qp.add(i) as *const __m128i
            )));
            acc[0] = _mm256_fmadd_ps(_mm256_loadu_ps(xp.add(i)), codes, acc[0]);
            i += 8;
        }
        let s = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
        let half = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
        let quad = _mm_add_ps(half, _mm_movehl_ps(half, half));
        let one = _mm_add_ss(quad, _mm_shuffle_ps(quad, quad, 1));
        let mut total = _mm_cvtss_f32(one);
        while i < n {
            total += *xp.add(i) * *qp.add(i) as f32;
            i += 1;
        }
        total
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn simd_and_portable_dots_agree() {
        let x: Vec<f32> = (0..77).map(|i| (i as f32 * 0.37).sin()).collect();
        let q: Vec<u8> = (0..77).map(|i| (i * 37 % 251) as u8).collect();
        let exact: f64 = x.iter().zip(&q).map(|(a, &b)| *a as f64 * b as f64).sum();
        for got in [dot_u8(&x, &q), dot_u8_portable(&x, &q)] {
            assert!((got as f64 - exact).abs() < 1e-3, "{got} vs {exact}");
        }
    }
}
