//! Matmul straight from PQ codes: `y = x · Wᵀ` for a product-quantized `W` without rebuilding it.
//!
//! For each input row `x`, a table `T[b][k] = ⟨x_b, c_k⟩` holds the dot product of every block `b`
//! of `x` with every centroid `k` (`cols · K` multiply-adds, independent of the output size); then
//! `y[o] = Σ_b T[b][code(b, o)]` is one table lookup per block of `W`. The codes are 1 byte per
//! block (`u8`, K ≤ 256) or 2 (`u16`), so the weight read per call is `rows · cols / d` bytes
//! instead of `4 · rows · cols`: at `d = 8` a 32th of the dense matrix, which is what makes a
//! batch-1 forward faster than dense when the weights are not cache-resident.
//!
//! The lookups run eight outputs at a time with AVX2 gathers when the processor has them (detected
//! at run time) and portable code otherwise; outputs are split in fixed chunks over rayon, each
//! output summed over the blocks in order, so the result does not depend on the thread count.
//! [`pq_matmul_reference`] is the plain twin (decode, then matmul) the tests compare against.
//!
//! ```
//! use candle_core::{Device, Tensor};
//! use qn_kernels::layout::BlockLayout;
//! use qn_kernels::pq::{encode, pq_matmul_reference, KMeansConfig, PqMatmul};
//!
//! let w = Tensor::randn(0f32, 0.02, (48, 64), &Device::Cpu)?;
//! let layout = BlockLayout::linear("fc.weight", w.dims(), 8)?;
//! let codes = encode(&w, &layout, &KMeansConfig::new(32).with_iters(4), &mut |_| {})?;
//! let x = Tensor::randn(0f32, 1.0, (3, 64), &Device::Cpu)?;
//! let y = PqMatmul::new(&codes)?.forward(&x)?;
//! let dense = pq_matmul_reference(&x, &codes)?;
//! let diff = (y - dense)?.abs()?.max_all()?.to_scalar::<f32>()?;
//! assert!(diff < 1e-5, "{diff}");
//! # Ok::<(), qn_kernels::Error>(())
//! ```

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;

use super::codes::{Assignments, PqCodes};
use crate::{
    layout::{BlockLayout, LayerKind},
    Error, Result,
};

/// Outputs per parallel task (a multiple of the 8 SIMD lanes).
const OUT_CHUNK: usize = 256;

/// Input rows up to which [`PqMatmul::forward`] uses the tables; above it, it decodes the weight
/// and runs one dense matmul. Measured with `examples/lut_gemv.rs` (crossover table in
/// BENCHMARKS.md): a table costs `cols · K` multiply-adds and `rows · cols / d` gathers per
/// input row, while the dense path pays the decode once and then runs at GEMM speed.
pub const TABLE_MAX_ROWS: usize = 16;

/// A PQ-coded linear weight `(rows = out, cols = in)` prepared for [`Self::forward`].
#[derive(Debug, Clone)]
pub struct PqMatmul {
    rows: usize,
    cols: usize,
    d: usize,
    k: usize,
    /// Centroids transposed, `[d][k]`: the table of one block is `d` contiguous axpys over `k`.
    centroids_t: Vec<f32>,
    /// Centroids row-major `[k][d]`, for the dense path.
    centroids: Vec<f32>,
    assignments: Arc<Assignments>,
    max_table_rows: usize,
}

impl PqMatmul {
    /// Prepares the codes of a Linear weight (or any 2-D `(out, in)` weight blocked along `in`).
    pub fn new(codes: &PqCodes) -> Result<Self> {
        Self::from_parts(
            &codes.centroids,
            Arc::new(codes.assignments.clone()),
            &codes.layout,
        )
    }

    /// The same from parts a caller keeps (the assignments shared, not copied): centroids
    /// `[K, d]`, one assignment per block in the order `b * rows + o`, and the weight's layout.
    pub fn from_parts(
        centroids: &Tensor,
        assignments: Arc<Assignments>,
        layout: &BlockLayout,
    ) -> Result<Self> {
        if layout.kind() == LayerKind::Conv2d || layout.shape().len() != 2 {
            return Err(Error::shape(
                "pq matmul",
                format!(
                    "a {:?} weight of shape {:?} is not a 2-D (out, in) matrix",
                    layout.kind(),
                    layout.shape()
                ),
            ));
        }
        let (k, d) = centroids.dims2()?;
        if d != layout.block_size() || assignments.len() != layout.n_blocks() {
            return Err(Error::shape(
                "pq matmul",
                format!(
                    "centroids of dimension {d} and {} assignments do not fit blocks of {} in {:?}",
                    assignments.len(),
                    layout.block_size(),
                    layout.shape()
                ),
            ));
        }
        let c = centroids
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let mut centroids_t = vec![0f32; d * k];
        for (ki, row) in c.chunks_exact(d).enumerate() {
            for (j, v) in row.iter().enumerate() {
                centroids_t[j * k + ki] = *v;
            }
        }
        Ok(Self {
            rows: layout.rows(),
            cols: layout.cols(),
            d,
            k,
            centroids_t,
            centroids: c,
            assignments,
            max_table_rows: TABLE_MAX_ROWS,
        })
    }

    /// With another crossover: inputs of more than `rows` rows take the dense path.
    pub fn with_max_table_rows(mut self, rows: usize) -> Self {
        self.max_table_rows = rows;
        self
    }

    /// Output features.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Input features.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Bytes of weight data one call reads: the codes and the centroids.
    pub fn weight_bytes(&self) -> usize {
        let per_code = match *self.assignments {
            Assignments::U8(_) => 1,
            Assignments::U16(_) => 2,
        };
        self.assignments.len() * per_code + self.centroids_t.len() * 4
    }

    /// `x · Wᵀ` for `x` of shape `(..., cols)`, on the CPU: from the tables for up to
    /// [`TABLE_MAX_ROWS`] input rows, else by decoding the weight for one dense matmul (dropped
    /// after the call). Other devices are refused (they decode and use their own matmul).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if !x.device().is_cpu() {
            return Err(Error::shape(
                "pq matmul",
                "the table kernel runs on the CPU; decode the weight on other devices",
            ));
        }
        let dims = x.dims().to_vec();
        let Some((&last, lead)) = dims.split_last() else {
            return Err(Error::shape("pq matmul", "a scalar input has no features"));
        };
        if last != self.cols {
            return Err(Error::shape(
                "pq matmul",
                format!(
                    "input of shape {dims:?} has {last} features, the weight takes {}",
                    self.cols
                ),
            ));
        }
        let n: usize = lead.iter().product();
        if n > self.max_table_rows {
            let w = Tensor::from_vec(self.decode(), (self.rows, self.cols), &Device::Cpu)?;
            let x2 = x.to_dtype(DType::F32)?.reshape((n, self.cols))?;
            let mut out_dims = lead.to_vec();
            out_dims.push(self.rows);
            // The float layers' matmul (gemm on `W` as stored, no transposed view): the dense
            // path costs a decode more than a float layer, and nothing else.
            let y = crate::noise::linear_matmul(&x2, &w)?;
            return Ok(y.reshape(out_dims)?.to_dtype(x.dtype())?);
        }
        let xs = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let mut y = vec![0f32; n * self.rows];
        self.forward_slice(&xs, n, &mut y);
        let mut out_dims = lead.to_vec();
        out_dims.push(self.rows);
        Ok(Tensor::from_vec(y, out_dims, &Device::Cpu)?.to_dtype(x.dtype())?)
    }

    /// The dense `(rows, cols)` weight.
    pub fn decode(&self) -> Vec<f32> {
        let mut w = vec![0f32; self.rows * self.cols];
        match &*self.assignments {
            Assignments::U8(a) => qn_format::decode::pq_gather(
                &self.centroids,
                self.d,
                self.rows,
                self.cols,
                a,
                &mut w,
            ),
            Assignments::U16(a) => qn_format::decode::pq_gather(
                &self.centroids,
                self.d,
                self.rows,
                self.cols,
                a,
                &mut w,
            ),
        }
        w
    }

    /// Rows `ids` of the weight (an embedding lookup), rebuilt from their codes only:
    /// `n × cols` values. An id past the last row is an error naming it.
    pub fn gather_rows(&self, ids: &[u32]) -> Result<Vec<f32>> {
        if let Some(bad) = ids.iter().find(|&&i| i as usize >= self.rows) {
            return Err(Error::shape(
                "ids",
                format!("id {bad} is out of range for {} rows", self.rows),
            ));
        }
        let (d, blocks) = (self.d, self.cols / self.d);
        let mut out = vec![0f32; ids.len() * self.cols];
        for (row, &id) in out.chunks_exact_mut(self.cols).zip(ids) {
            for (b, dst) in row.chunks_exact_mut(d).enumerate().take(blocks) {
                let c = match &*self.assignments {
                    Assignments::U8(a) => a[b * self.rows + id as usize] as usize,
                    Assignments::U16(a) => a[b * self.rows + id as usize] as usize,
                };
                dst.copy_from_slice(&self.centroids[c * d..(c + 1) * d]);
            }
        }
        Ok(out)
    }

    /// `y (n × rows) = x (n × cols) · Wᵀ` on slices, always from the tables.
    pub fn forward_slice(&self, x: &[f32], n: usize, y: &mut [f32]) {
        assert_eq!(x.len(), n * self.cols, "x is n x cols");
        assert_eq!(y.len(), n * self.rows, "y is n x rows");
        let blocks = self.cols / self.d;
        let mut table = vec![0f32; blocks * self.k];
        for (xr, yr) in x.chunks_exact(self.cols).zip(y.chunks_exact_mut(self.rows)) {
            self.fill_table(xr, &mut table);
            yr.par_chunks_mut(OUT_CHUNK)
                .enumerate()
                .for_each(|(ci, out)| {
                    let o0 = ci * OUT_CHUNK;
                    match &*self.assignments {
                        Assignments::U8(a) => lookup(&table, self.k, a, self.rows, o0, out),
                        Assignments::U16(a) => lookup(&table, self.k, a, self.rows, o0, out),
                    }
                });
        }
    }

    /// `T[b][k] = ⟨x_b, c_k⟩`, 64 blocks per parallel task.
    fn fill_table(&self, x: &[f32], table: &mut [f32]) {
        let (d, k) = (self.d, self.k);
        let ct = &self.centroids_t;
        #[cfg(target_arch = "x86_64")]
        let fma = std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma");
        #[cfg(not(target_arch = "x86_64"))]
        let fma = false;
        table
            .par_chunks_mut(k * 64)
            .enumerate()
            .for_each(|(bi, t)| {
                let xs = &x[bi * 64 * d..];
                #[cfg(target_arch = "x86_64")]
                if fma {
                    // SAFETY: AVX2 and FMA were detected above.
                    unsafe { fill_fma(xs, ct, d, k, t) };
                    return;
                }
                let _ = fma;
                fill_rows::<false>(xs, ct, d, k, t);
            });
    }
}

/// The tables of consecutive blocks: `t[b][k] = Σ_j x[b·d + j] · ct[j][k]`, as `d` axpys over
/// `k` per block (vectorised by the compiler; fused multiply-adds with `FMA`).
#[inline(always)]
fn fill_rows<const FMA: bool>(x: &[f32], ct: &[f32], d: usize, k: usize, t: &mut [f32]) {
    for (b, tb) in t.chunks_exact_mut(k).enumerate() {
        tb.fill(0.0);
        for j in 0..d {
            let xv = x[b * d + j];
            for (t, c) in tb.iter_mut().zip(&ct[j * k..(j + 1) * k]) {
                *t = if FMA { xv.mul_add(*c, *t) } else { *t + xv * c };
            }
        }
    }
}

/// [`fill_rows`] compiled for AVX2 + FMA.
///
/// # Safety
/// AVX2 and FMA must be present.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn fill_fma(x: &[f32], ct: &[f32], d: usize, k: usize, t: &mut [f32]) {
    fill_rows::<true>(x, ct, d, k, t)
}

/// A code that indexes a table row.
trait Code: Copy + Send + Sync {
    fn index(self) -> usize;
    #[cfg(target_arch = "x86_64")]
    const U8: bool;
}

impl Code for u8 {
    fn index(self) -> usize {
        self as usize
    }
    #[cfg(target_arch = "x86_64")]
    const U8: bool = true;
}

impl Code for u16 {
    fn index(self) -> usize {
        self as usize
    }
    #[cfg(target_arch = "x86_64")]
    const U8: bool = false;
}

/// `out[i] = Σ_b table[b][codes[b * rows + o0 + i]]`, blocks summed in order.
fn lookup<C: Code>(table: &[f32], k: usize, codes: &[C], rows: usize, o0: usize, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY (both): the features are present (checked); indices are < k by construction of
        // the codes (`Assignments::from_u32` checks them), so every gather stays in the table.
        if std::arch::is_x86_feature_detected!("avx512f") {
            unsafe { avx512::lookup(table, k, codes, rows, o0, out) };
            return;
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            unsafe { avx2::lookup(table, k, codes, rows, o0, out) };
            return;
        }
    }
    lookup_portable(table, k, codes, rows, o0, out);
}

fn lookup_portable<C: Code>(
    table: &[f32],
    k: usize,
    codes: &[C],
    rows: usize,
    o0: usize,
    out: &mut [f32],
) {
    out.fill(0.0);
    let blocks = table.len() / k;
    for b in 0..blocks {
        let tb = &table[b * k..(b + 1) * k];
        let cb = &codes[b * rows + o0..b * rows + o0 + out.len()];
        for (y, c) in out.iter_mut().zip(cb) {
            *y += tb[c.index()];
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::Code;

    /// Eight outputs per gather; a tail of fewer than eight is summed the portable way, in the
    /// same block order.
    ///
    /// # Safety
    /// AVX2 must be present; `codes` holds `blocks * rows` codes, each `< k`, and
    /// `o0 + out.len() <= rows`.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn lookup<C: Code>(
        table: &[f32],
        k: usize,
        codes: &[C],
        rows: usize,
        o0: usize,
        out: &mut [f32],
    ) {
        let blocks = table.len() / k;
        let len = out.len();
        let full = len / 8 * 8;
        let (tp, cp, op) = (table.as_ptr(), codes.as_ptr(), out.as_mut_ptr());
        let mut i = 0;
        // Four groups of eight outputs per pass over the blocks: four independent gathers in
        // flight hide their latency.
        while i + 32 <= full {
            let mut acc = [_mm256_setzero_ps(); 4];
            for b in 0..blocks {
                for (g, a) in acc.iter_mut().enumerate() {
                    // SAFETY: outputs o0 + i + 8g .. + 8 are inside this chunk (i + 32 <= full),
                    // so the eight codes exist; each is < k, so the gather stays in block b's row.
                    unsafe {
                        let idx = load8(cp.add(b * rows + o0 + i + 8 * g));
                        *a = _mm256_add_ps(*a, _mm256_i32gather_ps::<4>(tp.add(b * k), idx));
                    }
                }
            }
            for (g, a) in acc.iter().enumerate() {
                // SAFETY: i + 8g + 8 <= full <= out.len().
                unsafe { _mm256_storeu_ps(op.add(i + 8 * g), *a) };
            }
            i += 32;
        }
        while i < full {
            let mut acc = _mm256_setzero_ps();
            for b in 0..blocks {
                // SAFETY: as above, for the eight outputs i .. i + 8 <= full.
                unsafe {
                    let idx = load8(cp.add(b * rows + o0 + i));
                    acc = _mm256_add_ps(acc, _mm256_i32gather_ps::<4>(tp.add(b * k), idx));
                }
            }
            // SAFETY: i + 8 <= full <= out.len().
            unsafe { _mm256_storeu_ps(op.add(i), acc) };
            i += 8;
        }
        // The last few outputs the portable way (the same additions in the same order).
        super::lookup_portable(table, k, codes, rows, o0 + full, &mut out[full..]);
    }

    /// Eight codes widened to i32 lanes.
    ///
    /// # Safety
    /// Eight codes are readable at `p`.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn load8<C: Code>(p: *const C) -> __m256i {
        // SAFETY (caller): eight codes, 8 or 16 bytes, are readable at `p`.
        unsafe {
            if C::U8 {
                _mm256_cvtepu8_epi32(_mm_loadl_epi64(p as *const __m128i))
            } else {
                _mm256_cvtepu16_epi32(_mm_loadu_si128(p as *const __m128i))
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::Code;

    /// [`super::avx2::lookup`] sixteen outputs per gather, two gathers in flight.
    ///
    /// # Safety
    /// AVX-512F must be present; `codes` holds `blocks * rows` codes, each `< k`, and
    /// `o0 + out.len() <= rows`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn lookup<C: Code>(
        table: &[f32],
        k: usize,
        codes: &[C],
        rows: usize,
        o0: usize,
        out: &mut [f32],
    ) {
        let blocks = table.len() / k;
        let len = out.len();
        let full = len / 16 * 16;
        let (tp, cp, op) = (table.as_ptr(), codes.as_ptr(), out.as_mut_ptr());
        let mut i = 0;
        while i + 32 <= full {
            let mut acc = [_mm512_setzero_ps(); 2];
            for b in 0..blocks {
                for (g, a) in acc.iter_mut().enumerate() {
                    // SAFETY: outputs o0 + i + 16g .. + 16 are inside this chunk, so the sixteen
                    // codes exist; each is < k, so the gather stays in block b's row.
                    unsafe {
                        let idx = load16(cp.add(b * rows + o0 + i + 16 * g));
                        *a = _mm512_add_ps(*a, _mm512_i32gather_ps::<4>(idx, tp.add(b * k).cast()));
                    }
                }
            }
            for (g, a) in acc.iter().enumerate() {
                // SAFETY: i + 16g + 16 <= full <= out.len().
                unsafe { _mm512_storeu_ps(op.add(i + 16 * g), *a) };
            }
            i += 32;
        }
        while i < full {
            let mut acc = _mm512_setzero_ps();
            for b in 0..blocks {
                // SAFETY: as above, for the sixteen outputs i .. i + 16 <= full.
                unsafe {
                    let idx = load16(cp.add(b * rows + o0 + i));
                    acc = _mm512_add_ps(acc, _mm512_i32gather_ps::<4>(idx, tp.add(b * k).cast()));
                }
            }
            // SAFETY: i + 16 <= full <= out.len().
            unsafe { _mm512_storeu_ps(op.add(i), acc) };
            i += 16;
        }
        // The last few outputs the portable way (the same additions in the same order).
        super::lookup_portable(table, k, codes, rows, o0 + full, &mut out[full..]);
    }

    /// Sixteen codes widened to i32 lanes.
    ///
    /// # Safety
    /// Sixteen codes are readable at `p`.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn load16<C: Code>(p: *const C) -> __m512i {
        // SAFETY (caller): sixteen codes, 16 or 32 bytes, are readable at `p`.
        unsafe {
            if C::U8 {
                _mm512_cvtepu8_epi32(_mm_loadu_si128(p as *const __m128i))
            } else {
                _mm512_cvtepu16_epi32(_mm256_loadu_si256(p as *const __m256i))
            }
        }
    }
}

/// The plain twin of [`PqMatmul::forward`]: decode the weight, then `x · Wᵀ` with candle's matmul,
/// on any device.
pub fn pq_matmul_reference(x: &Tensor, codes: &PqCodes) -> Result<Tensor> {
    let w = codes.decode_reference()?.to_dtype(x.dtype())?;
    Ok(x.broadcast_matmul(&w.t()?)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The SIMD lookups equal the portable ones bit for bit (same additions in the same order),
    /// for both code widths and every tail length.
    #[test]
    fn simd_lookup_matches_portable_exactly() {
        let (k, blocks, rows) = (37usize, 11usize, 77usize);
        let table: Vec<f32> = (0..k * blocks)
            .map(|i| ((i * 7919 % 1000) as f32 - 500.0) * 1e-3)
            .collect();
        let u8s: Vec<u8> = (0..blocks * rows).map(|i| (i * 31 % k) as u8).collect();
        let u16s: Vec<u16> = u8s.iter().map(|&c| c as u16).collect();
        for (o0, len) in [(0, 77), (0, 32), (5, 40), (64, 13), (70, 7)] {
            let mut a = vec![0f32; len];
            let mut b = vec![0f32; len];
            lookup(&table, k, &u8s, rows, o0, &mut a);
            lookup_portable(&table, k, &u8s, rows, o0, &mut b);
            assert_eq!(a, b, "u8 o0 {o0} len {len}");
            lookup(&table, k, &u16s, rows, o0, &mut a);
            assert_eq!(a, b, "u16 o0 {o0} len {len}");
            // Each SIMD width the processor has, not only the one `lookup` picks.
            #[cfg(target_arch = "x86_64")]
            {
                if std::arch::is_x86_feature_detected!("avx2") {
                    // SAFETY: AVX2 detected; codes < k; o0 + len <= rows.
                    unsafe { avx2::lookup(&table, k, &u8s, rows, o0, &mut a) };
                    assert_eq!(a, b, "avx2 u8 o0 {o0} len {len}");
                    unsafe { avx2::lookup(&table, k, &u16s, rows, o0, &mut a) };
                    assert_eq!(a, b, "avx2 u16 o0 {o0} len {len}");
                }
                if std::arch::is_x86_feature_detected!("avx512f") {
                    // SAFETY: AVX-512F detected; as above.
                    unsafe { avx512::lookup(&table, k, &u8s, rows, o0, &mut a) };
                    assert_eq!(a, b, "avx512 u8 o0 {o0} len {len}");
                    unsafe { avx512::lookup(&table, k, &u16s, rows, o0, &mut a) };
                    assert_eq!(a, b, "avx512 u16 o0 {o0} len {len}");
                }
            }
        }
    }
}
