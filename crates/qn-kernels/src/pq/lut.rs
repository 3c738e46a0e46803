//! Matmul straight from PQ codes: `y = x · Wᵀ` for a product-quantized `W` without rebuilding it.
//!
//! For each input row `x`, a table `T[b][k] = ⟨x_b, c_k⟩` holds the dot product of every block `b`
//! of `x` with every centroid `k` (`cols · K` multiply-adds, independent of the output size); then
//! `y[o] = Σ_b T[b][code(b, o)]` is one table lookup per block of `W`. The codes are 1 byte per
//! block (`u8`, K ≤ 256) or 2 (`u16`), so the weight read per call is `rows · cols / d` bytes
//! instead of `4 · rows · cols`: at `d = 8` a 32th of the dense matrix, which is what makes a
//! batch-1 forward faster than dense when the weights are not cache-resident.
//!
//! With AVX-512 (detected at run time) and one-byte codes, a block's table row sits in sixteen
//! registers and sixteen lookups are eight two-register permutes and seven blends; otherwise
//! gathers (AVX-512, AVX2) or portable code. The blocks are cut into fixed groups of 32 whose
//! tables and partial sums are computed in parallel (with the outputs split further when the
//! groups are fewer than the threads) and added group by group in order, so the result does not
//! depend on the thread count.
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

use std::cell::RefCell;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;

use super::codes::{Assignments, PqCodes};
use crate::{
    layout::{BlockLayout, LayerKind},
    Error, Result,
};

/// Input rows up to which [`PqMatmul::forward`] uses the tables; above it, it decodes the weight
/// and runs one dense matmul. Measured with `examples/lut_gemv.rs` (crossover table in
/// BENCHMARKS.md): a table costs `cols · K` multiply-adds and `rows · cols / d` lookups per
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
        let xs = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let mut y = vec![0f32; n * self.rows];
        if n > self.max_table_rows {
            self.forward_dense(&xs, n, &mut y);
        } else {
            self.forward_slice(&xs, n, &mut y);
        }
        let mut out_dims = lead.to_vec();
        out_dims.push(self.rows);
        Ok(Tensor::from_vec(y, out_dims, &Device::Cpu)?.to_dtype(x.dtype())?)
    }

    /// `y (n × rows) = x (n × cols) · Wᵀ` on slices by decode + GEMM a tile of rows at a time
    /// ([`crate::tiled::matmul_t`]): never more than a tile of the weight per thread.
    pub fn forward_dense(&self, x: &[f32], n: usize, y: &mut [f32]) {
        crate::tiled::matmul_t(x, n, self.rows, self.cols, y, &|o0, out| {
            self.decode_rows(o0, out)
        });
    }

    /// Rows `o0 ..` of the dense weight, as many as `out` holds (whole rows of `cols`).
    pub fn decode_rows(&self, o0: usize, out: &mut [f32]) {
        let (c, d, rows, cols) = (&self.centroids[..], self.d, self.rows, self.cols);
        match &*self.assignments {
            Assignments::U8(a) => qn_format::decode::pq_gather_rows(c, d, rows, cols, a, o0, out),
            Assignments::U16(a) => qn_format::decode::pq_gather_rows(c, d, rows, cols, a, o0, out),
        }
    }

    /// The dense `(rows, cols)` weight.
    pub fn decode(&self) -> Vec<f32> {
        let n = self.rows * self.cols;
        let mut w: Vec<f32> = Vec::with_capacity(n);
        let out = &mut w.spare_capacity_mut()[..n];
        match &*self.assignments {
            Assignments::U8(a) => qn_format::decode::pq_gather_uninit(
                &self.centroids,
                self.d,
                self.rows,
                self.cols,
                a,
                out,
            ),
            Assignments::U16(a) => qn_format::decode::pq_gather_uninit(
                &self.centroids,
                self.d,
                self.rows,
                self.cols,
                a,
                out,
            ),
        }
        // SAFETY: `pq_gather_uninit` wrote all `n = rows * cols` values (it asserts the size).
        unsafe { w.set_len(n) };
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
        if self.rows == 0 || self.cols == 0 {
            y.fill(0.0);
            return;
        }
        let plan = Plan::new(self.cols / self.d, self.rows, self.k);
        thread_local! {
            static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
        }
        crate::tiled::with_scratch(&SCRATCH, plan.scratch, |scratch| {
            self.forward_rows(&plan, x, y, scratch)
        });
    }

    /// [`Self::forward_slice`] with its scratch: per input row one parallel region whose tasks
    /// each fill the tables of one group of blocks and look up one range of outputs into that
    /// group's partial sums, which are then added group by group in order.
    fn forward_rows(&self, plan: &Plan, x: &[f32], y: &mut [f32], scratch: &mut [f32]) {
        let (d, k, rows) = (self.d, self.k, self.rows);
        let (tables, partials) = scratch.split_at_mut(plan.tasks() * GROUP_BLOCKS * k);
        for (xr, yr) in x.chunks_exact(self.cols).zip(y.chunks_exact_mut(rows)) {
            let mut tasks: Vec<(usize, usize, &mut [f32], &mut [f32])> = Vec::new();
            let mut slots = tables.chunks_mut(GROUP_BLOCKS * k);
            for (g, part) in partials.chunks_mut(rows).enumerate() {
                for (c, out) in part.chunks_mut(plan.chunk_rows).enumerate() {
                    let slot = slots.next().expect("a table slot per task");
                    tasks.push((g, c * plan.chunk_rows, slot, out));
                }
            }
            tasks.into_par_iter().for_each(|(g, o0, slot, out)| {
                let b0 = g * GROUP_BLOCKS;
                let b1 = (b0 + GROUP_BLOCKS).min(plan.blocks);
                let table = &mut slot[..(b1 - b0) * k];
                self.fill_table(&xr[b0 * d..b1 * d], table);
                match &*self.assignments {
                    Assignments::U8(a) => lookup(table, k, &a[b0 * rows..], rows, o0, out),
                    Assignments::U16(a) => lookup(table, k, &a[b0 * rows..], rows, o0, out),
                }
            });
            let mut groups = partials.chunks_exact(rows);
            yr.copy_from_slice(groups.next().expect("at least one group"));
            for part in groups {
                yr.iter_mut().zip(part).for_each(|(y, p)| *y += p);
            }
        }
    }

    /// `T[b][k] = ⟨x_b, c_k⟩` for the blocks of `x`, on this thread.
    fn fill_table(&self, x: &[f32], table: &mut [f32]) {
        let (d, k) = (self.d, self.k);
        let ct = &self.centroids_t;
        #[cfg(target_arch = "x86_64")]
        {
            let fma = std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma");
            if fma && std::arch::is_x86_feature_detected!("avx512f") {
                // SAFETY: AVX-512F and FMA were just detected.
                unsafe { fill_avx512(x, ct, d, k, table) };
                return;
            }
            if fma {
                // SAFETY: AVX2 and FMA were just detected.
                unsafe { fill_fma(x, ct, d, k, table) };
                return;
            }
        }
        fill_rows::<false, 32>(x, ct, d, k, table);
    }
}

/// Blocks per group: the unit of table filling and of the partial sums of [`PqMatmul`]'s
/// lookups. Fixed (never from the thread count), so a result does not depend on the threads.
const GROUP_BLOCKS: usize = 32;

/// How [`PqMatmul::forward_slice`] splits one input row.
struct Plan {
    blocks: usize,
    groups: usize,
    /// Outputs per task: all of them when there are groups enough for the threads, else a
    /// share (a group's table is then filled once per share, cheap when groups are few).
    chunk_rows: usize,
    chunks: usize,
    /// Floats of scratch: a table slot per task, then one row of partial sums per group.
    scratch: usize,
}

impl Plan {
    fn new(blocks: usize, rows: usize, k: usize) -> Self {
        let groups = blocks.div_ceil(GROUP_BLOCKS).max(1);
        let want = (2 * rayon::current_num_threads()).div_ceil(groups);
        let chunk_rows = rows.div_ceil(want.max(1)).next_multiple_of(16).max(16);
        let chunks = rows.div_ceil(chunk_rows).max(1);
        Self {
            blocks,
            groups,
            chunk_rows,
            chunks,
            scratch: groups * chunks * GROUP_BLOCKS * k + groups * rows,
        }
    }

    fn tasks(&self) -> usize {
        self.groups * self.chunks
    }
}

/// The tables of consecutive blocks: `t[b][k] = Σ_j x[b·d + j] · ct[j][k]`, `W` entries at a
/// time summed in registers over `j` in order (fused multiply-adds with `FMA`), the last
/// `k % W` one by one with the same operations. Why registers: the row-at-a-time form (`d`
/// axpys over the row) loads and stores every entry `d` times and made the tables, not the
/// lookups, most of a batch-1 forward.
#[inline(always)]
fn fill_rows<const FMA: bool, const W: usize>(
    x: &[f32],
    ct: &[f32],
    d: usize,
    k: usize,
    t: &mut [f32],
) {
    let step = |acc: f32, xv: f32, c: f32| {
        if FMA {
            xv.mul_add(c, acc)
        } else {
            acc + xv * c
        }
    };
    for (tb, xb) in t.chunks_exact_mut(k).zip(x.chunks_exact(d)) {
        let whole = k / W * W;
        for (kc, out) in (0..whole).step_by(W).zip(tb.chunks_exact_mut(W)) {
            let mut acc = [0f32; W];
            for (j, &xv) in xb.iter().enumerate() {
                let c: &[f32; W] = ct[j * k + kc..j * k + kc + W]
                    .try_into()
                    .expect("W centroids");
                for (a, &c) in acc.iter_mut().zip(c) {
                    *a = step(*a, xv, c);
                }
            }
            out.copy_from_slice(&acc);
        }
        for (kk, out) in tb.iter_mut().enumerate().skip(whole) {
            *out = xb
                .iter()
                .enumerate()
                .fold(0.0, |acc, (j, &xv)| step(acc, xv, ct[j * k + kk]));
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
    fill_rows::<true, 32>(x, ct, d, k, t)
}

/// [`fill_rows`] compiled for AVX-512 (the same fused multiply-adds, wider registers).
///
/// # Safety
/// AVX-512F and FMA must be present.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
unsafe fn fill_avx512(x: &[f32], ct: &[f32], d: usize, k: usize, t: &mut [f32]) {
    fill_rows::<true, 64>(x, ct, d, k, t)
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

    /// Eight outputs per gather, up to 64 outputs (eight accumulators) per pass over the blocks
    /// (see [`super::avx512`] for why); a tail of fewer than eight is summed the portable way, in
    /// the same block order.
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
        let len = out.len();
        let full = len / 8 * 8;
        let mut i = 0;
        // SAFETY (both): each sweep covers outputs i .. i + 8 G <= full of this chunk.
        while i + 64 <= full {
            unsafe { sweep::<C, 8>(table, k, codes, rows, o0 + i, &mut out[i..i + 64]) };
            i += 64;
        }
        while i < full {
            unsafe { sweep::<C, 1>(table, k, codes, rows, o0 + i, &mut out[i..i + 8]) };
            i += 8;
        }
        // The last few outputs the portable way (the same additions in the same order).
        super::lookup_portable(table, k, codes, rows, o0 + full, &mut out[full..]);
    }

    /// `8 G` outputs from `o0` summed over every block in order, `G` gathers per block.
    ///
    /// # Safety
    /// AVX2 must be present; `out` holds `8 G` values; `codes` holds `blocks * rows` codes,
    /// each `< k`, and `o0 + 8 G <= rows`.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn sweep<C: Code, const G: usize>(
        table: &[f32],
        k: usize,
        codes: &[C],
        rows: usize,
        o0: usize,
        out: &mut [f32],
    ) {
        let blocks = table.len() / k;
        let (tp, cp) = (table.as_ptr(), codes.as_ptr());
        let mut acc = [_mm256_setzero_ps(); G];
        for b in 0..blocks {
            // SAFETY (caller): the 8 G codes of block b from o0 exist and are < k.
            unsafe {
                let (t, c) = (tp.add(b * k), cp.add(b * rows + o0));
                for (g, a) in acc.iter_mut().enumerate() {
                    *a = _mm256_add_ps(*a, _mm256_i32gather_ps::<4>(t, load8(c.add(8 * g))));
                }
            }
        }
        for (g, a) in acc.iter().enumerate() {
            // SAFETY: out holds 8 G values.
            unsafe { _mm256_storeu_ps(out.as_mut_ptr().add(8 * g), *a) };
        }
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

    /// [`super::avx2::lookup`] sixteen outputs per gather, up to 256 outputs (sixteen
    /// accumulators) per pass over the blocks.
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
        let len = out.len();
        let full = len / 16 * 16;
        let mut i = 0;
        if C::U8 && k <= 256 && std::arch::is_x86_feature_detected!("avx512bw") {
            // SAFETY: as for the gathers; AVX-512BW detected.
            while i + 128 <= full {
                unsafe { permute::<C, 8>(table, k, codes, rows, o0 + i, &mut out[i..i + 128]) };
                i += 128;
            }
            while i < full {
                unsafe { permute::<C, 1>(table, k, codes, rows, o0 + i, &mut out[i..i + 16]) };
                i += 16;
            }
        }
        // SAFETY (all three): each sweep covers outputs i .. i + 16 G <= full of this chunk.
        while i + 256 <= full {
            unsafe { sweep::<C, 16>(table, k, codes, rows, o0 + i, &mut out[i..i + 256]) };
            i += 256;
        }
        while i + 64 <= full {
            unsafe { sweep::<C, 4>(table, k, codes, rows, o0 + i, &mut out[i..i + 64]) };
            i += 64;
        }
        while i < full {
            unsafe { sweep::<C, 1>(table, k, codes, rows, o0 + i, &mut out[i..i + 16]) };
            i += 16;
        }
        // The last few outputs the portable way (the same additions in the same order).
        super::lookup_portable(table, k, codes, rows, o0 + full, &mut out[full..]);
    }

    /// `16 G` outputs from `o0` summed over every block in order, `G` gathers per block. Why
    /// many accumulators: the table (`blocks · K` floats, 512 KB for 4,096 inputs) is then
    /// swept once per `16 G` outputs, and each block's row (1 KB) serves `G` gathers from L1.
    ///
    /// # Safety
    /// AVX-512F must be present; `out` holds `16 G` values; `codes` holds `blocks * rows`
    /// codes, each `< k`, and `o0 + 16 G <= rows`.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn sweep<C: Code, const G: usize>(
        table: &[f32],
        k: usize,
        codes: &[C],
        rows: usize,
        o0: usize,
        out: &mut [f32],
    ) {
        let blocks = table.len() / k;
        let (tp, cp) = (table.as_ptr(), codes.as_ptr());
        let mut acc = [_mm512_setzero_ps(); G];
        for b in 0..blocks {
            // SAFETY (caller): the 16 G codes of block b from o0 exist and are < k, so every
            // gather stays in block b's row of the table.
            unsafe {
                let (t, c) = (tp.add(b * k).cast(), cp.add(b * rows + o0));
                for (g, a) in acc.iter_mut().enumerate() {
                    *a = _mm512_add_ps(*a, _mm512_i32gather_ps::<4>(load16(c.add(16 * g)), t));
                }
            }
        }
        for (g, a) in acc.iter().enumerate() {
            // SAFETY: out holds 16 G values.
            unsafe { _mm512_storeu_ps(out.as_mut_ptr().add(16 * g), *a) };
        }
    }

    /// [`sweep`] without gathers, for one-byte codes and `k` ≤ 256: a block's table row sits in
    /// sixteen registers and each lookup of sixteen codes is eight two-register permutes (the
    /// code's low five bits) and seven blends (its bits 5, 6 and 7). Why: gathers run at about
    /// 33 cycles per sixteen lookups on the measured machine; the permutes at about a third of
    /// that. The values looked up and the order of the sums are those of [`sweep`].
    ///
    /// # Safety
    /// AVX-512F and AVX-512BW must be present; `out` holds `16 G` values; `codes` holds
    /// `blocks * rows` one-byte codes, each `< k <= 256`, and `o0 + 16 G <= rows`.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn permute<C: Code, const G: usize>(
        table: &[f32],
        k: usize,
        codes: &[C],
        rows: usize,
        o0: usize,
        out: &mut [f32],
    ) {
        let blocks = table.len() / k;
        let (tp, cp) = (table.as_ptr(), codes.as_ptr());
        let bit = |b: i32| _mm512_set1_epi32(1 << b);
        let (b5, b6, b7) = (bit(5), bit(6), bit(7));
        let mut acc = [_mm512_setzero_ps(); G];
        for b in 0..blocks {
            // Register r holds entries 16r .. 16r + 16 of the row; past k, zeros (never indexed).
            let t: [__m512; 16] = std::array::from_fn(|r| {
                let have = k.saturating_sub(16 * r).min(16);
                let mask = ((1u32 << have) - 1) as __mmask16;
                // SAFETY: the mask covers entries 16r .. min(16r + 16, k) of block b's row.
                // A register past k loads nothing (mask 0), so its address is never read.
                unsafe { _mm512_maskz_loadu_ps(mask, tp.wrapping_add(b * k + 16 * r)) }
            });
            for (g, a) in acc.iter_mut().enumerate() {
                // SAFETY (caller): the sixteen codes of block b at o0 + 16 g exist.
                let idx = unsafe { load16(cp.add(b * rows + o0 + 16 * g)) };
                let pair = |r: usize| _mm512_permutex2var_ps(t[r], idx, t[r + 1]);
                let (m5, m6, m7) = (
                    _mm512_test_epi32_mask(idx, b5),
                    _mm512_test_epi32_mask(idx, b6),
                    _mm512_test_epi32_mask(idx, b7),
                );
                let low = _mm512_mask_blend_ps(
                    m6,
                    _mm512_mask_blend_ps(m5, pair(0), pair(2)),
                    _mm512_mask_blend_ps(m5, pair(4), pair(6)),
                );
                let high = _mm512_mask_blend_ps(
                    m6,
                    _mm512_mask_blend_ps(m5, pair(8), pair(10)),
                    _mm512_mask_blend_ps(m5, pair(12), pair(14)),
                );
                *a = _mm512_add_ps(*a, _mm512_mask_blend_ps(m7, low, high));
            }
        }
        for (g, a) in acc.iter().enumerate() {
            // SAFETY: out holds 16 G values.
            unsafe { _mm512_storeu_ps(out.as_mut_ptr().add(16 * g), *a) };
        }
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
        // K = 37 leaves the last table register partial; K = 256 uses every code bit.
        for k in [37usize, 256] {
            let (blocks, rows) = (11usize, 333usize);
            let table: Vec<f32> = (0..k * blocks)
                .map(|i| ((i * 7919 % 1000) as f32 - 500.0) * 1e-3)
                .collect();
            let u8s: Vec<u8> = (0..blocks * rows).map(|i| (i * 31 % k) as u8).collect();
            let u16s: Vec<u16> = u8s.iter().map(|&c| c as u16).collect();
            // Lengths that take every sweep width (256, 64, 16 / 64, 8 outputs) and the tails.
            for (o0, len) in [
                (0, 333),
                (0, 256),
                (5, 327),
                (3, 77),
                (0, 32),
                (5, 40),
                (64, 13),
                (70, 7),
            ] {
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
}
