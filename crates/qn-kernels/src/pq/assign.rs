//! The hot loop of k-means and of PQ noise: the nearest centroid of every point.
//!
//! [`assign_nearest`] is the CPU kernel: distances in the GEMM form `‖c‖² − 2x·c` (the `‖x‖²` term does
//! not change the argmin) computed with the centroids transposed so that the inner loop runs over
//! centroids, eight at a time with AVX2+FMA when the processor has them (detected at run time, so no
//! `target-cpu` flag is needed) and with portable auto-vectorised code otherwise. Points are split into
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
    /// `-2 c[k][j]` stored as `[j][k]`.
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
                neg2_t[j * k_padded + c] = -2.0 * v;
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
        .for_each(|((p, i), dist)| nearest_chunk(p, table, i, dist));
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
        .for_each(|(((p, i), dist), sec)| top2_chunk(p, table, i, dist, sec));
    Ok(())
}

fn top2_chunk(
    points: &[f32],
    t: &CentroidTable,
    index: &mut [u32],
    dist: &mut [f32],
    second: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the features the function is compiled for were just detected.
            unsafe {
                match t.d {
                    4 => avx2::nearest_top2::<4, true>(points, t, index, dist, second),
                    8 => avx2::nearest_top2::<8, true>(points, t, index, dist, second),
                    16 => avx2::nearest_top2::<16, true>(points, t, index, dist, second),
                    _ => portable_top2::<true>(points, t, index, dist, second),
                }
            }
            return;
        }
    }
    portable_top2::<true>(points, t, index, dist, second)
}

fn nearest_chunk(points: &[f32], t: &CentroidTable, index: &mut [u32], dist: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the features the function is compiled for were just detected.
            unsafe {
                match t.d {
                    4 => avx2::nearest::<4>(points, t, index, dist),
                    8 => avx2::nearest::<8>(points, t, index, dist),
                    16 => avx2::nearest::<16>(points, t, index, dist),
                    _ => portable_chunk(points, t, index, dist),
                }
            }
            return;
        }
    }
    portable_chunk(points, t, index, dist)
}

fn portable_chunk(points: &[f32], t: &CentroidTable, index: &mut [u32], dist: &mut [f32]) {
    portable_top2::<false>(points, t, index, dist, &mut []);
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
                let row = &t.neg2_t[j * t.k_padded + kb..j * t.k_padded + kb + LANES];
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

    /// Eight centroids per step; `D` is a constant so the point's broadcast coordinates stay in
    /// registers.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn nearest<const D: usize>(
        points: &[f32],
        t: &CentroidTable,
        index: &mut [u32],
        dist: &mut [f32],
    ) {
        // SAFETY (caller): AVX2 and FMA are present.
        unsafe { nearest_top2::<D, false>(points, t, index, dist, &mut []) }
    }

    /// [`nearest`], and with `TOP2` each point's runner-up partial distance in `second`: per lane
    /// the runner-up is the smaller of the old runner-up and the new value, or the old best when
    /// the new value takes its place; the best and its index are computed exactly as without it.
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
                // SAFETY: kb + 8 <= kp and every row of neg2_t has kp values.
                // Two partial sums: one chain of D dependent FMAs would make the loop latency-bound.
                let mut acc = [
                    unsafe { _mm256_loadu_ps(norms.add(kb)) },
                    _mm256_setzero_ps(),
                ];
                for (j, xj) in xb.iter().enumerate() {
                    let c = unsafe { _mm256_loadu_ps(ct.add(j * kp + kb)) };
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
