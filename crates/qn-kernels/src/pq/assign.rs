//! The hot loop of k-means and of PQ noise: the nearest centroid of every point.
//!
//! [`assign_nearest`] is the CPU kernel: distances in the GEMM form `‖c‖² − 2x·c` (the `‖x‖²` term does
//! not change the argmin). With AVX-512 (detected at run time, so no `target-cpu` flag is needed)
//! sixteen or thirty-two points sit in the lanes and every centroid is broadcast in turn, so no
//! per-point reduction across lanes is left; with AVX2+FMA the centroids are transposed so that
//! the inner loop runs over them eight at a time; portable auto-vectorised code otherwise. All
//! SIMD kernels compute each distance with the same operations in the same order and break ties
//! the same way, so their results are bit-identical. Points are split into
//! fixed chunks run in parallel by rayon; each point's answer depends only on its own data, so results
//! do not depend on the thread count.
//!
//! [`assign_nearest_reference`] computes the same thing with plain candle tensor ops (matmul + argmin)
//! on any device; tests compare the two and the k-means of a CUDA tensor uses it.

use candle_core::{DType, Tensor, D};
use rayon::prelude::*;

use crate::{Error, Result};

/// Lanes the centroid count is padded to; padded centroids have an infinite norm, never chosen.
const LANES: usize = 16;
/// Points per parallel task: fixed so that the split never depends on the thread count.
const CHUNK: usize = 1024;

/// Centroids laid out for the nearest-centroid kernel.
#[derive(Debug, Clone)]
pub struct CentroidTable {
    k: usize,
    d: usize,
    k_padded: usize,
    /// `-2 c[k][j]` stored by blocks of [`LANES`] centroids, `[k / LANES][j][k % LANES]`: the
    /// `d` rows of one block are contiguous, so a kernel walks them with a fixed stride.
    neg2_t: Vec<f32>,
    /// `‖c_k‖²`, `+inf` past `k`.
    norms: Vec<f32>,
}

impl CentroidTable {
    /// Lays out `k` centroids of dimension `d` given row-major in `centroids` (`k * d` values).
    pub fn new(centroids: &[f32], k: usize, d: usize) -> Result<Self> {
        if d == 0 || k == 0 || centroids.len() != k * d {
            return Err(Error::config(
                "centroids",
                format!(
                    "{} values for {k} centroids of dimension {d}",
                    centroids.len()
                ),
            ));
        }
        let k_padded = k.div_ceil(LANES) * LANES;
        let mut neg2_t = vec![0f32; d * k_padded];
        let mut norms = vec![f32::INFINITY; k_padded];
        for (c, row) in centroids.chunks_exact(d).enumerate() {
            norms[c] = row.iter().map(|v| v * v).sum();
            for (j, v) in row.iter().enumerate() {
                neg2_t[Self::slot(d, j, c)] = -2.0 * v;
            }
        }
        Ok(Self {
            k,
            d,
            k_padded,
            neg2_t,
            norms,
        })
    }

    /// The same layout with the norms `‖c_k‖²` replaced by `norms[k]` (e.g. `c_kᵀ H c_k` of a
    /// weighted metric, whose points are then given as `H x`): the kernel computes
    /// `norms[k] − 2 (Hx)·c_k`.
    pub(crate) fn with_norms(centroids: &[f32], norms: &[f32], k: usize, d: usize) -> Result<Self> {
        let mut t = Self::new(centroids, k, d)?;
        if norms.len() != k || norms.iter().any(|v| !v.is_finite()) {
            return Err(Error::config(
                "centroid norms",
                format!("{} finite values needed for {k} centroids", k),
            ));
        }
        t.norms[..k].copy_from_slice(norms);
        Ok(t)
    }

    /// Where coordinate `j` of centroid `c` lives in `neg2_t`.
    fn slot(d: usize, j: usize, c: usize) -> usize {
        (c / LANES) * d * LANES + j * LANES + c % LANES
    }

    /// Number of centroids.
    pub fn k(&self) -> usize {
        self.k
    }

    /// Centroid dimension.
    pub fn d(&self) -> usize {
        self.d
    }
}

/// For every point (row-major `n * d` values), the index of its nearest centroid and the partial
/// squared distance `‖c‖² − 2x·c` (add `‖x‖²` for the full distance). Ties go to the lower index.
pub fn assign_nearest(
    points: &[f32],
    table: &CentroidTable,
    index: &mut [u32],
    partial: &mut [f32],
) -> Result<()> {
    let d = table.d;
    let n = points.len() / d;
    if points.len() != n * d || index.len() != n || partial.len() != n {
        return Err(Error::config(
            "points",
            format!(
                "{} values are not {} points of dimension {d} (outputs: {} / {})",
                points.len(),
                index.len(),
                index.len(),
                partial.len()
            ),
        ));
    }
    points
        .par_chunks(CHUNK * d)
        .zip(index.par_chunks_mut(CHUNK))
        .zip(partial.par_chunks_mut(CHUNK))
        .for_each(|((p, i), dist)| chunk::<false>(p, table, i, dist, &mut []));
    Ok(())
}

/// [`assign_nearest`] that also gives each point's second-smallest partial distance (the lower
/// bound of bounds-based k-means). The index and partial distance are bit-identical to
/// [`assign_nearest`]'s: the same sums in the same order, the runner-up tracked beside them.
pub fn assign_nearest_top2(
    points: &[f32],
    table: &CentroidTable,
    index: &mut [u32],
    partial: &mut [f32],
    second: &mut [f32],
) -> Result<()> {
    let d = table.d;
    let n = points.len() / d;
    if points.len() != n * d || index.len() != n || partial.len() != n || second.len() != n {
        return Err(Error::config(
            "points",
            format!(
                "{} values are not {} points of dimension {d} (outputs: {} / {} / {})",
                points.len(),
                index.len(),
                index.len(),
                partial.len(),
                second.len()
            ),
        ));
    }
    points
        .par_chunks(CHUNK * d)
        .zip(index.par_chunks_mut(CHUNK))
        .zip(partial.par_chunks_mut(CHUNK))
        .zip(second.par_chunks_mut(CHUNK))
        .for_each(|(((p, i), dist), sec)| chunk::<true>(p, table, i, dist, sec));
    Ok(())
}

/// The kernel this machine runs for `t.d` — AVX-512, else AVX2+FMA, else portable — on one chunk;
/// with `TOP2` the runner-up goes to `second` (ignored otherwise).
fn chunk<const TOP2: bool>(
    points: &[f32],
    t: &CentroidTable,
    index: &mut [u32],
    dist: &mut [f32],
    second: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    {
        if matches!(t.d, 4 | 8 | 16)
            && std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: AVX-512F, and AVX2 + FMA for the tail, were just detected; `t.d` is the
            // kernel's `D`, and the caller checked the slice lengths.
            unsafe {
                match t.d {
                    4 => avx512::nearest::<4, 2, TOP2>(points, t, index, dist, second),
                    8 => avx512::nearest::<8, 2, TOP2>(points, t, index, dist, second),
                    _ => avx512::nearest::<16, 1, TOP2>(points, t, index, dist, second),
                }
            }
            return;
        }
        if matches!(t.d, 4 | 8 | 16)
            && std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the features the function is compiled for were just detected.
            unsafe {
                match t.d {
                    4 => avx2::nearest_top2::<4, TOP2>(points, t, index, dist, second),
                    8 => avx2::nearest_top2::<8, TOP2>(points, t, index, dist, second),
                    _ => avx2::nearest_top2::<16, TOP2>(points, t, index, dist, second),
                }
            }
            return;
        }
    }
    portable_top2::<TOP2>(points, t, index, dist, second)
}

/// Nearest centroid, and with `TOP2` the runner-up's partial distance, of each point.
fn portable_top2<const TOP2: bool>(
    points: &[f32],
    t: &CentroidTable,
    index: &mut [u32],
    dist: &mut [f32],
    second: &mut [f32],
) {
    let mut acc = [0f32; LANES];
    for (p, (x, (i, out))) in points
        .chunks_exact(t.d)
        .zip(index.iter_mut().zip(dist.iter_mut()))
        .enumerate()
    {
        let (mut best, mut best_k, mut runner_up) = (f32::INFINITY, 0usize, f32::INFINITY);
        for kb in (0..t.k_padded).step_by(LANES) {
            acc.copy_from_slice(&t.norms[kb..kb + LANES]);
            for (j, &xj) in x.iter().enumerate() {
                let at = CentroidTable::slot(t.d, j, kb);
                let row = &t.neg2_t[at..at + LANES];
                for l in 0..LANES {
                    acc[l] += xj * row[l];
                }
            }
            for (l, &v) in acc.iter().enumerate() {
                if v < best {
                    runner_up = best;
                    best = v;
                    best_k = kb + l;
                } else if TOP2 && v < runner_up {
                    runner_up = v;
                }
            }
        }
        *i = best_k as u32;
        *out = best;
        if TOP2 {
            second[p] = runner_up;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::CentroidTable;
    use std::arch::x86_64::*;

    /// Eight centroids per step (`D` a constant so the point's broadcast coordinates stay in
    /// registers), and with `TOP2` each point's runner-up partial distance in `second`: per lane
    /// the runner-up is the smaller of the old runner-up and the new value, or the old best when
    /// the new value takes its place; the best and its index are computed exactly as without it.
    ///
    /// # Safety
    ///
    /// The processor must support AVX2 and FMA (checked at run time by the dispatcher), and
    /// `t.d() == D`: the table's rows are read by raw pointer for `t.k_padded` centroids of `D`
    /// coordinates, which `CentroidTable::new` lays out. `points` holds `index.len()` points of
    /// `D`, `dist` as many values, and `second` as many when `TOP2`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn nearest_top2<const D: usize, const TOP2: bool>(
        points: &[f32],
        t: &CentroidTable,
        index: &mut [u32],
        dist: &mut [f32],
        second: &mut [f32],
    ) {
        let kp = t.k_padded;
        let norms = t.norms.as_ptr();
        let ct = t.neg2_t.as_ptr();
        let step = _mm256_set1_epi32(8);
        for (p, ((x, i), out)) in points
            .chunks_exact(D)
            .zip(index.iter_mut())
            .zip(dist.iter_mut())
            .enumerate()
        {
            let xb: [__m256; D] = std::array::from_fn(|j| _mm256_set1_ps(x[j]));
            let mut best = _mm256_set1_ps(f32::INFINITY);
            let mut runner_up = _mm256_set1_ps(f32::INFINITY);
            let mut best_k = _mm256_setzero_si256();
            let mut k_vec = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
            let mut kb = 0;
            while kb < kp {
                // SAFETY: kb + 8 <= kp; the block of kb holds D rows of LANES = 16 values, and
                // kb % 16 + 8 <= 16.
                // Two partial sums: one chain of D dependent FMAs would make the loop latency-bound.
                let mut acc = [
                    unsafe { _mm256_loadu_ps(norms.add(kb)) },
                    _mm256_setzero_ps(),
                ];
                let block = unsafe { ct.add((kb / 16) * D * 16 + kb % 16) };
                for (j, xj) in xb.iter().enumerate() {
                    let c = unsafe { _mm256_loadu_ps(block.add(j * 16)) };
                    acc[j % 2] = _mm256_fmadd_ps(*xj, c, acc[j % 2]);
                }
                let acc = _mm256_add_ps(acc[0], acc[1]);
                let lt = _mm256_cmp_ps::<_CMP_LT_OQ>(acc, best);
                if TOP2 {
                    runner_up = _mm256_blendv_ps(_mm256_min_ps(runner_up, acc), best, lt);
                }
                best = _mm256_blendv_ps(best, acc, lt);
                best_k = _mm256_blendv_epi8(best_k, k_vec, _mm256_castps_si256(lt));
                k_vec = _mm256_add_epi32(k_vec, step);
                kb += 8;
            }
            let mut vals = [0f32; 8];
            let mut ks = [0u32; 8];
            let mut seconds = [0f32; 8];
            unsafe {
                _mm256_storeu_ps(vals.as_mut_ptr(), best);
                _mm256_storeu_si256(ks.as_mut_ptr().cast(), best_k);
                _mm256_storeu_ps(seconds.as_mut_ptr(), runner_up);
            }
            let (mut bv, mut bk, mut bl) = (vals[0], ks[0], 0);
            for l in 1..8 {
                if vals[l] < bv || (vals[l] == bv && ks[l] < bk) {
                    bv = vals[l];
                    bk = ks[l];
                    bl = l;
                }
            }
            *i = bk;
            *out = bv;
            if TOP2 {
                // The runner-up overall: the other lanes' bests and every lane's runner-up.
                let mut r = f32::INFINITY;
                for l in 0..8 {
                    r = r.min(seconds[l]);
                    if l != bl {
                        r = r.min(vals[l]);
                    }
                }
                second[p] = r;
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::CentroidTable;
    use std::arch::x86_64::*;

    /// One running minimum over blocks of sixteen centroids: per lane the best value, its index
    /// and (with `TOP2`) the runner-up.
    #[derive(Clone, Copy)]
    struct Chain {
        best: __m512,
        best_k: __m512i,
        runner_up: __m512,
    }

    /// The AVX-512 kernel: [`by_points`] on whole groups of `16 * H` points, [`nearest_top2`] on
    /// the rest; bit-identical to each other (and to the AVX2 kernel). `H` vectors of points per
    /// step share each centroid's broadcasts; `H * D` of them must stay in registers (2 for
    /// `D` ≤ 8, 1 for 16).
    ///
    /// # Safety
    ///
    /// The processor must support AVX-512F, AVX2 and FMA (checked at run time by the
    /// dispatcher: the tail runs `avx2::nearest_top2`), with that function's conditions on `t`,
    /// `points`, `dist` and `second`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn nearest<const D: usize, const H: usize, const TOP2: bool>(
        points: &[f32],
        t: &CentroidTable,
        index: &mut [u32],
        dist: &mut [f32],
        second: &mut [f32],
    ) {
        let n = index.len();
        let whole = n / (16 * H) * (16 * H);
        // SAFETY: the caller detected AVX-512F, AVX2 and FMA (this function's `# Safety`); `whole`
        // splits the slices at a multiple of `16 * H` points, as `by_points` needs.
        unsafe {
            by_points::<D, H, TOP2>(
                &points[..whole * D],
                t,
                &mut index[..whole],
                &mut dist[..whole],
                if TOP2 { &mut second[..whole] } else { &mut [] },
            );
            nearest_top2::<D, TOP2>(
                &points[whole * D..],
                t,
                &mut index[whole..],
                &mut dist[whole..],
                if TOP2 { &mut second[whole..] } else { &mut [] },
            );
        }
    }

    /// The nearest centroid of `16 * H` points at a time, one point per lane, against every
    /// centroid in turn (its coordinates broadcast). Per point and centroid it is the same sequence
    /// of operations as [`nearest_top2`] (the norm, FMAs alternating between two sums by
    /// coordinate parity, their sum) and the running minimum visits centroids in increasing
    /// order with a strict `<`, so ties go to the lowest index and every output is bit-identical.
    /// Why: with points in lanes there is no per-point reduction across lanes, no padded
    /// centroids and no index vector to build, which leaves the FMAs most of the work.
    /// `points.len()` must be a multiple of `16 * H * D`.
    ///
    /// # Safety
    ///
    /// The processor must support AVX-512F; `t.d() == D`; `points.len()` is a multiple of
    /// `16 * H * D` and `index`, `dist` (and `second` when `TOP2`) hold one value per point.
    #[target_feature(enable = "avx512f")]
    unsafe fn by_points<const D: usize, const H: usize, const TOP2: bool>(
        points: &[f32],
        t: &CentroidTable,
        index: &mut [u32],
        dist: &mut [f32],
        second: &mut [f32],
    ) {
        let norms = &t.norms[..t.k];
        let ct = t.neg2_t.as_ptr();
        let inf = _mm512_set1_ps(f32::INFINITY);
        for (g, ((xs, i), out)) in points
            .chunks_exact(16 * H * D)
            .zip(index.chunks_exact_mut(16 * H))
            .zip(dist.chunks_exact_mut(16 * H))
            .enumerate()
        {
            // Coordinate j of the points of vector h, one point per lane.
            let mut cols = [[[0f32; 16]; D]; H];
            for (p, x) in xs.chunks_exact(D).enumerate() {
                for (j, &v) in x.iter().enumerate() {
                    cols[p / 16][j][p % 16] = v;
                }
            }
            // SAFETY: each row holds 16 values.
            let x: [[__m512; D]; H] = std::array::from_fn(|h| {
                std::array::from_fn(|j| unsafe { _mm512_loadu_ps(cols[h][j].as_ptr()) })
            });
            let mut best = [inf; H];
            let mut runner_up = [inf; H];
            let mut best_k = [_mm512_setzero_si512(); H];
            for (c, &norm) in norms.iter().enumerate() {
                // SAFETY: c < k <= k_padded; coordinate j of centroid c is at this offset.
                let col = unsafe { ct.add((c / 16) * D * 16 + c % 16) };
                let cj: [__m512; D] =
                    std::array::from_fn(|j| _mm512_set1_ps(unsafe { *col.add(j * 16) }));
                let kv = _mm512_set1_epi32(c as i32);
                for h in 0..H {
                    let mut acc = [_mm512_set1_ps(norm), _mm512_setzero_ps()];
                    for j in 0..D {
                        acc[j % 2] = _mm512_fmadd_ps(x[h][j], cj[j], acc[j % 2]);
                    }
                    let v = _mm512_add_ps(acc[0], acc[1]);
                    let lt = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(v, best[h]);
                    if TOP2 {
                        runner_up[h] =
                            _mm512_mask_blend_ps(lt, _mm512_min_ps(runner_up[h], v), best[h]);
                    }
                    best[h] = _mm512_mask_blend_ps(lt, best[h], v);
                    best_k[h] = _mm512_mask_blend_epi32(lt, best_k[h], kv);
                }
            }
            for h in 0..H {
                // SAFETY: each output chunk holds 16 * H values.
                unsafe {
                    _mm512_storeu_ps(out.as_mut_ptr().add(16 * h), best[h]);
                    _mm512_storeu_si512(i.as_mut_ptr().add(16 * h).cast(), best_k[h]);
                    if TOP2 {
                        _mm512_storeu_ps(
                            second.as_mut_ptr().add(g * 16 * H + 16 * h),
                            runner_up[h],
                        );
                    }
                }
            }
        }
    }

    /// [`super::avx2::nearest_top2`] sixteen centroids per step, in two independent chains (even
    /// and odd blocks) so that the compare → blend dependency does not bound the loop. Each
    /// centroid's value is the same sequence of operations as there (its norm, then FMAs
    /// alternating between two sums by coordinate parity, then their sum), and ties still go to
    /// the lowest index, so the results are bit-identical to the AVX2 kernel's.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn nearest_top2<const D: usize, const TOP2: bool>(
        points: &[f32],
        t: &CentroidTable,
        index: &mut [u32],
        dist: &mut [f32],
        second: &mut [f32],
    ) {
        let kp = t.k_padded;
        let norms = t.norms.as_ptr();
        let ct = t.neg2_t.as_ptr();
        let lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
        let inf = _mm512_set1_ps(f32::INFINITY);
        for (p, ((x, i), out)) in points
            .chunks_exact(D)
            .zip(index.iter_mut())
            .zip(dist.iter_mut())
            .enumerate()
        {
            let xb: [__m512; D] = std::array::from_fn(|j| _mm512_set1_ps(x[j]));
            // The values of the block at kb.
            let values = |kb: usize| {
                // SAFETY: kb + 16 <= kp (kp is a multiple of 16); the block of kb holds D rows
                // of 16 values.
                let mut acc = [
                    unsafe { _mm512_loadu_ps(norms.add(kb)) },
                    _mm512_setzero_ps(),
                ];
                let block = unsafe { ct.add(kb * D) };
                for (j, xj) in xb.iter().enumerate() {
                    let c = unsafe { _mm512_loadu_ps(block.add(j * 16)) };
                    acc[j % 2] = _mm512_fmadd_ps(*xj, c, acc[j % 2]);
                }
                _mm512_add_ps(acc[0], acc[1])
            };
            let step = |ch: &mut Chain, v: __m512, kb: usize| {
                let lt = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(v, ch.best);
                if TOP2 {
                    ch.runner_up =
                        _mm512_mask_blend_ps(lt, _mm512_min_ps(ch.runner_up, v), ch.best);
                }
                ch.best = _mm512_mask_blend_ps(lt, ch.best, v);
                let k = _mm512_add_epi32(lane, _mm512_set1_epi32(kb as i32));
                ch.best_k = _mm512_mask_blend_epi32(lt, ch.best_k, k);
            };
            let fresh = Chain {
                best: inf,
                best_k: _mm512_setzero_si512(),
                runner_up: inf,
            };
            let (mut even, mut odd) = (fresh, fresh);
            let mut kb = 0;
            while kb + 32 <= kp {
                let (v0, v1) = (values(kb), values(kb + 16));
                step(&mut even, v0, kb);
                step(&mut odd, v1, kb + 16);
                kb += 32;
            }
            if kb < kp {
                let v = values(kb);
                step(&mut even, v, kb);
            }
            // Merge the chains lane by lane: the smaller value wins, on a tie the lower index;
            // the loser's best is a runner-up candidate.
            let odd_wins = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(odd.best, even.best)
                | (_mm512_cmp_ps_mask::<_CMP_EQ_OQ>(odd.best, even.best)
                    & _mm512_cmplt_epu32_mask(odd.best_k, even.best_k));
            let best = _mm512_mask_blend_ps(odd_wins, even.best, odd.best);
            let best_k = _mm512_mask_blend_epi32(odd_wins, even.best_k, odd.best_k);
            // Across lanes: the smallest value, and the lowest index holding it.
            let bv = _mm512_reduce_min_ps(best);
            let at_min = _mm512_cmp_ps_mask::<_CMP_EQ_OQ>(best, _mm512_set1_ps(bv));
            let bk = _mm512_mask_reduce_min_epu32(at_min, best_k);
            *i = bk;
            *out = bv;
            if TOP2 {
                let loser = _mm512_mask_blend_ps(odd_wins, odd.best, even.best);
                let runners = _mm512_min_ps(_mm512_min_ps(even.runner_up, odd.runner_up), loser);
                // The other lanes' bests (every lane holds a different index).
                let others = _mm512_cmpneq_epu32_mask(best_k, _mm512_set1_epi32(bk as i32));
                let r = _mm512_reduce_min_ps(runners).min(_mm512_mask_reduce_min_ps(others, best));
                second[p] = r;
            }
        }
    }
}

/// The same assignment with plain tensor ops on any device: `(index u32 [n], partial f32 [n])`.
pub fn assign_nearest_reference(points: &Tensor, centroids: &Tensor) -> Result<(Tensor, Tensor)> {
    let points = points.to_dtype(DType::F32)?;
    let centroids = centroids.to_dtype(DType::F32)?;
    let norms = centroids.sqr()?.sum(D::Minus1)?;
    let n = points.dim(0)?;
    // Rows in slices keep the n x K distance matrix to a bounded size.
    let rows_per_slice = (1 << 24) / centroids.dim(0)?.max(1);
    let mut idx = Vec::new();
    let mut val = Vec::new();
    let mut start = 0;
    while start < n {
        let len = rows_per_slice.min(n - start);
        let x = points.narrow(0, start, len)?;
        let partial = x
            .matmul(&centroids.t()?)?
            .affine(-2.0, 0.0)?
            .broadcast_add(&norms.unsqueeze(0)?)?;
        let best = partial.argmin_keepdim(D::Minus1)?;
        val.push(partial.gather(&best, D::Minus1)?.squeeze(D::Minus1)?);
        idx.push(best.squeeze(D::Minus1)?);
        start += len;
    }
    Ok((Tensor::cat(&idx, 0)?, Tensor::cat(&val, 0)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A kernel run writing index, distance and runner-up.
    type Run<'a> = &'a dyn Fn(&mut [u32], &mut [f32], &mut [f32]);

    /// Where the processor has both, the AVX-512 and AVX2 kernels give bit-identical indices,
    /// distances and runner-ups (the same operations per centroid, the same tie rule), so a
    /// k-means result does not depend on which one ran; the portable kernel agrees on the index.
    #[test]
    fn simd_kernels_agree_bit_for_bit() {
        for (d, k, n) in [(8usize, 256usize, 500usize), (4, 37, 300), (16, 100, 200)] {
            let points: Vec<f32> = (0..n * d)
                .map(|i| ((i * 7919 % 997) as f32 / 997.0) - 0.5)
                .collect();
            let centroids: Vec<f32> = (0..k * d)
                .map(|i| ((i * 104_729 % 991) as f32 / 991.0) - 0.5)
                .collect();
            let t = CentroidTable::new(&centroids, k, d).unwrap();
            let run = |f: Run<'_>| {
                let (mut i, mut v, mut s) = (vec![0u32; n], vec![0f32; n], vec![0f32; n]);
                f(&mut i, &mut v, &mut s);
                (i, v, s)
            };
            let portable = run(&|i, v, s| portable_top2::<true>(&points, &t, i, v, s));
            #[cfg(target_arch = "x86_64")]
            {
                let has = |f: &str| match f {
                    "avx2" => {
                        std::arch::is_x86_feature_detected!("avx2")
                            && std::arch::is_x86_feature_detected!("fma")
                    }
                    // The AVX-512 kernels run their tail on the AVX2 + FMA kernel.
                    _ => {
                        std::arch::is_x86_feature_detected!("avx512f")
                            && std::arch::is_x86_feature_detected!("avx2")
                            && std::arch::is_x86_feature_detected!("fma")
                    }
                };
                // SAFETY: each kernel runs only where its features were detected.
                let avx2 = has("avx2").then(|| {
                    run(&|i, v, s| unsafe {
                        match d {
                            4 => avx2::nearest_top2::<4, true>(&points, &t, i, v, s),
                            8 => avx2::nearest_top2::<8, true>(&points, &t, i, v, s),
                            _ => avx2::nearest_top2::<16, true>(&points, &t, i, v, s),
                        }
                    })
                });
                let avx512 = has("avx512f").then(|| {
                    run(&|i, v, s| unsafe {
                        match d {
                            4 => avx512::nearest_top2::<4, true>(&points, &t, i, v, s),
                            8 => avx512::nearest_top2::<8, true>(&points, &t, i, v, s),
                            _ => avx512::nearest_top2::<16, true>(&points, &t, i, v, s),
                        }
                    })
                });
                // The points-in-lanes kernel (whole groups of 32, then the per-point one).
                let avx512_lanes = has("avx512f").then(|| {
                    run(&|i, v, s| unsafe {
                        match d {
                            4 => avx512::nearest::<4, 2, true>(&points, &t, i, v, s),
                            8 => avx512::nearest::<8, 2, true>(&points, &t, i, v, s),
                            _ => avx512::nearest::<16, 1, true>(&points, &t, i, v, s),
                        }
                    })
                });
                if let (Some(a), Some(b)) = (&avx512, &avx512_lanes) {
                    assert_eq!(a, b, "d {d}: AVX-512 by points and by centroids differ");
                }
                if let (Some(a), Some(b)) = (&avx2, &avx512) {
                    assert_eq!(a, b, "d {d}: AVX2 and AVX-512 differ");
                }
                for r in [&avx2, &avx512].into_iter().flatten() {
                    assert_eq!(r.0, portable.0, "d {d}: index");
                }
            }
            let _ = portable;
        }
    }
}
