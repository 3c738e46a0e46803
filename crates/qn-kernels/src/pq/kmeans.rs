//! Lloyd's k-means with the guarantees PQ needs.
//!
//! - Initialisation by `K` distinct random points or by k-means++ (D² sampling).
//! - Every iteration: assign each point to its nearest centroid, record the objective (the exact sum
//!   of squared distances, accumulated in `f64`), move each centroid to the mean of its points.
//! - An empty cluster is re-seeded from the most populated one: it gets that centroid plus a tiny
//!   ± perturbation and takes the points that are now nearer to it. The populated centroid itself is
//!   not moved, so the objective never increases (up to `f32` rounding of the GEMM-form distances).
//! - Results depend only on the seed: work is split into fixed chunks whose partial sums are added
//!   in a fixed order, so 1 thread and 16 threads give bit-identical centroids.
//! - Optional sub-sampling: train on `max_points` random points, then assign all of them.
//!
//! ```
//! use qn_kernels::pq::{kmeans, KMeansConfig};
//! // Two well separated groups in 2-D.
//! let points = [0.0f32, 0.0, 0.1, 0.0, 10.0, 10.0, 10.1, 10.0];
//! let km = kmeans(&points, 2, &KMeansConfig::new(2).with_seed(1), &mut |_| {})?;
//! assert_eq!(km.assignments[0], km.assignments[1]);
//! assert_ne!(km.assignments[0], km.assignments[2]);
//! # Ok::<(), qn_kernels::Error>(())
//! ```

use candle_core::{DType, Device, Tensor};
use rand::{seq::index::sample, Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use super::assign::{assign_nearest, assign_nearest_reference, CentroidTable};
use super::bounds::Hamerly;
use crate::{error::ensure_finite, Error, Result};

/// How the first centroids are chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KMeansInit {
    /// `K` distinct random points (faiss's default).
    RandomColumns,
    /// k-means++: each next centroid drawn with probability proportional to D².
    KMeansPlusPlus,
}

/// k-means settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KMeansConfig {
    /// Number of centroids.
    pub k: usize,
    /// Lloyd iterations (assign + update).
    pub iters: usize,
    /// Initialisation.
    pub init: KMeansInit,
    /// Seed of every random choice.
    pub seed: u64,
    /// Train on at most this many random points (all points are assigned at the end).
    pub max_points: Option<usize>,
    /// Skip the distance pass of points whose centroid provably stays (Hamerly's bounds, CPU
    /// only); the assignments are exactly those of the full pass. Off by default: on PQ's
    /// setting (d = 8, K = 256, Gaussian-like weights) the bounds skip only ~44 % of the passes
    /// and the runner-up tracking they need makes the rest dearer, so it is no faster
    /// (BENCHMARKS.md, "k-means with bounds").
    pub bounds: bool,
}

impl KMeansConfig {
    /// `k` centroids, 20 iterations, random-points init, seed 0, all points, no bounds.
    pub fn new(k: usize) -> Self {
        Self {
            k,
            iters: 20,
            init: KMeansInit::RandomColumns,
            seed: 0,
            max_points: None,
            bounds: false,
        }
    }

    /// With or without Hamerly's bounds.
    pub fn with_bounds(mut self, bounds: bool) -> Self {
        self.bounds = bounds;
        self
    }

    /// With another iteration count.
    pub fn with_iters(mut self, iters: usize) -> Self {
        self.iters = iters;
        self
    }

    /// With another seed.
    pub fn with_seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    /// With another initialisation.
    pub fn with_init(mut self, init: KMeansInit) -> Self {
        self.init = init;
        self
    }

    /// Train on at most `max_points` random points.
    pub fn with_max_points(mut self, max_points: Option<usize>) -> Self {
        self.max_points = max_points;
        self
    }
}

/// Reported after every iteration.
#[derive(Debug, Clone, Copy)]
pub struct KMeansProgress {
    /// Iterations done (1-based).
    pub iter: usize,
    /// Iterations in all.
    pub iters: usize,
    /// Sum of squared distances to the assigned centroids at this iteration's assignment step.
    pub objective: f64,
    /// Empty clusters re-seeded so far.
    pub empty_splits: usize,
}

/// The result of k-means.
#[derive(Debug, Clone)]
pub struct KMeans {
    /// Row-major `k * d` centroids.
    pub centroids: Vec<f32>,
    /// Number of centroids.
    pub k: usize,
    /// Dimension.
    pub d: usize,
    /// Nearest final centroid of every input point.
    pub assignments: Vec<u32>,
    /// The objective at each iteration's assignment step (on the training points).
    pub history: Vec<f64>,
    /// The objective of the final assignment of all points to the final centroids.
    pub objective: f64,
    /// Empty clusters re-seeded during training.
    pub empty_splits: usize,
    /// Points whose distances to every centroid were computed, over all assignment passes
    /// (`(iters + 1) · n` without bounds; fewer with them).
    pub full_passes: usize,
}

/// Backend of the assignment step.
enum Assigner<'a> {
    Cpu,
    Device(&'a Device, Tensor),
}

impl Assigner<'_> {
    fn assign(&self, points: &[f32], centroids: &[f32], k: usize, d: usize) -> Result<Vec<u32>> {
        let n = points.len() / d;
        match self {
            Assigner::Cpu => {
                let table = CentroidTable::new(centroids, k, d)?;
                let mut index = vec![0u32; n];
                let mut partial = vec![0f32; n];
                assign_nearest(points, &table, &mut index, &mut partial)?;
                Ok(index)
            }
            Assigner::Device(device, on_device) => {
                let c = Tensor::from_slice(centroids, (k, d), device)?;
                let (index, _) = assign_nearest_reference(on_device, &c)?;
                Ok(index.to_vec1::<u32>()?)
            }
        }
    }
}

/// Sums, counts and objective of one pass over assigned points.
struct Accumulated {
    sums: Vec<f64>,
    counts: Vec<u64>,
    objective: f64,
}

/// Per-cluster sums of one chunk of points: coordinates, squared coordinates, counts.
struct Moments {
    sums: Vec<f64>,
    squares: Vec<f64>,
    counts: Vec<u64>,
}

impl Moments {
    fn zero(k: usize, d: usize) -> Self {
        Self {
            sums: vec![0.0; k * d],
            squares: vec![0.0; k * d],
            counts: vec![0; k],
        }
    }

    fn add(&mut self, other: &Moments) {
        let pairs = [
            (&mut self.sums, &other.sums),
            (&mut self.squares, &other.squares),
        ];
        for (t, o) in pairs {
            t.iter_mut().zip(o).for_each(|(t, o)| *t += o);
        }
        self.counts
            .iter_mut()
            .zip(&other.counts)
            .for_each(|(t, o)| *t += o);
    }
}

fn chunk_len(k: usize, d: usize) -> usize {
    // Fixed from the problem size only (never the thread count), large enough that the per-chunk
    // partial sums stay small next to the data.
    (8192usize).max(2 * k * d)
}

/// Adds the points `p` (assigned to `idx`) to `m`; `d` of 4, 8 or 16 is unrolled, and vectorised
/// with AVX2 where the processor has it (the same additions in the same order on every path: no
/// FMA contraction, so the sums do not depend on the path taken).
fn moments_of(p: &[f32], idx: &[u32], d: usize, m: &mut Moments) {
    #[cfg(target_arch = "x86_64")]
    if matches!(d, 4 | 8 | 16) && std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: AVX2 was just detected.
        unsafe {
            match d {
                4 => moments_avx2::<4>(p, idx, m),
                8 => moments_avx2::<8>(p, idx, m),
                _ => moments_avx2::<16>(p, idx, m),
            }
        }
        return;
    }
    match d {
        4 => moments_fixed::<4>(p, idx, m),
        8 => moments_fixed::<8>(p, idx, m),
        16 => moments_fixed::<16>(p, idx, m),
        _ => {
            for (x, &a) in p.chunks_exact(d).zip(idx) {
                let a = a as usize;
                m.counts[a] += 1;
                let rows = a * d..(a + 1) * d;
                let (s, q) = (&mut m.sums[rows.clone()], &mut m.squares[rows]);
                for ((s, q), &v) in s.iter_mut().zip(q.iter_mut()).zip(x) {
                    let v = v as f64;
                    *s += v;
                    *q += v * v;
                }
            }
        }
    }
}

/// # Safety
///
/// The processor must support AVX2 (the caller checks `is_x86_feature_detected!("avx2")`); the
/// body is safe code.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn moments_avx2<const D: usize>(p: &[f32], idx: &[u32], m: &mut Moments) {
    moments_fixed::<D>(p, idx, m)
}

#[inline(always)]
fn moments_fixed<const D: usize>(p: &[f32], idx: &[u32], m: &mut Moments) {
    for (x, &a) in p.chunks_exact(D).zip(idx) {
        let a = a as usize;
        m.counts[a] += 1;
        let x: &[f32; D] = x.try_into().expect("chunks of D");
        let s: &mut [f64; D] = (&mut m.sums[a * D..(a + 1) * D])
            .try_into()
            .expect("rows of D");
        for j in 0..D {
            s[j] += x[j] as f64;
        }
        let q: &mut [f64; D] = (&mut m.squares[a * D..(a + 1) * D])
            .try_into()
            .expect("rows of D");
        for j in 0..D {
            let v = x[j] as f64;
            q[j] += v * v;
        }
    }
}

/// The objective comes from per-cluster moments, `Σ_i ‖x_i − c‖² = Q − 2 c·S + n ‖c‖²` per
/// coordinate, rather than a distance per point: a point then costs two vector adds into its
/// cluster's rows (a sixth of the time of k-means went to per-point distances), and in f64 the
/// cancellation (the moments are ~3× the within-cluster spread for PQ's data) costs nothing visible.
fn accumulate(points: &[f32], index: &[u32], centroids: &[f32], k: usize, d: usize) -> Accumulated {
    let chunk = chunk_len(k, d);
    let parts: Vec<Moments> = points
        .par_chunks(chunk * d)
        .zip(index.par_chunks(chunk))
        .map(|(p, idx)| {
            let mut m = Moments::zero(k, d);
            moments_of(p, idx, d, &mut m);
            m
        })
        .collect();
    let mut total = Moments::zero(k, d);
    for part in &parts {
        total.add(part);
    }
    let mut objective = 0.0f64;
    for (((&n, c), s), q) in total
        .counts
        .iter()
        .zip(centroids.chunks_exact(d))
        .zip(total.sums.chunks_exact(d))
        .zip(total.squares.chunks_exact(d))
    {
        for ((&c, &s), &q) in c.iter().zip(s).zip(q) {
            let c = c as f64;
            objective += q - 2.0 * c * s + n as f64 * c * c;
        }
    }
    Accumulated {
        sums: total.sums,
        counts: total.counts,
        // Rounding can leave a few ulps below zero when every point sits on its centroid.
        objective: objective.max(0.0),
    }
}

fn squared_distance(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum()
}

pub(crate) fn init_centroids(
    points: &[f32],
    d: usize,
    cfg: &KMeansConfig,
    rng: &mut ChaCha8Rng,
) -> Vec<f32> {
    let n = points.len() / d;
    let row = |i: usize| &points[i * d..(i + 1) * d];
    match cfg.init {
        KMeansInit::RandomColumns => {
            let mut picked = sample(rng, n, cfg.k).into_vec();
            picked.sort_unstable();
            picked
                .iter()
                .flat_map(|&i| row(i).iter().copied())
                .collect()
        }
        KMeansInit::KMeansPlusPlus => {
            let mut centroids = Vec::with_capacity(cfg.k * d);
            centroids.extend_from_slice(row(rng.random_range(0..n)));
            let mut nearest = vec![f32::INFINITY; n];
            let chunk = 8192;
            for c in 1..cfg.k {
                let last = &centroids[(c - 1) * d..c * d];
                let sums: Vec<f64> = nearest
                    .par_chunks_mut(chunk)
                    .zip(points.par_chunks(chunk * d))
                    .map(|(near, p)| {
                        let mut s = 0.0f64;
                        for (m, x) in near.iter_mut().zip(p.chunks_exact(d)) {
                            *m = m.min(squared_distance(x, last));
                            s += *m as f64;
                        }
                        s
                    })
                    .collect();
                let total: f64 = sums.iter().sum();
                let pick = if total > 0.0 {
                    let mut r = rng.random::<f64>() * total;
                    let mut chosen = n - 1;
                    'outer: for (ci, s) in sums.iter().enumerate() {
                        if r >= *s {
                            r -= s;
                            continue;
                        }
                        let base = ci * chunk;
                        for (off, &m) in nearest[base..(base + chunk).min(n)].iter().enumerate() {
                            r -= m as f64;
                            if r < 0.0 {
                                chosen = base + off;
                                break 'outer;
                            }
                        }
                    }
                    chosen
                } else {
                    rng.random_range(0..n)
                };
                centroids.extend_from_slice(row(pick));
            }
            centroids
        }
    }
}

/// Re-seeds every empty cluster from the most populated one; returns how many were re-seeded.
pub(crate) fn split_empty(
    points: &[f32],
    index: &mut [u32],
    counts: &mut [u64],
    centroids: &mut [f32],
    d: usize,
    scale: f32,
    rng: &mut ChaCha8Rng,
) -> usize {
    let k = counts.len();
    let mut splits = 0;
    for empty in 0..k {
        if counts[empty] != 0 {
            continue;
        }
        let big = (0..k)
            .max_by_key(|&c| (counts[c], std::cmp::Reverse(c)))
            .unwrap_or(0);
        if counts[big] < 2 {
            break;
        }
        for j in 0..d {
            let c = centroids[big * d + j];
            let step = c.abs().max(scale) / 1024.0;
            let sign = if rng.random::<bool>() { 1.0 } else { -1.0 };
            centroids[empty * d + j] = c + sign * step;
        }
        let (cb, ce) = (
            &centroids[big * d..(big + 1) * d],
            &centroids[empty * d..(empty + 1) * d],
        );
        for (x, a) in points.chunks_exact(d).zip(index.iter_mut()) {
            if *a as usize == big && squared_distance(x, ce) < squared_distance(x, cb) {
                *a = empty as u32;
                counts[big] -= 1;
                counts[empty] += 1;
            }
        }
        splits += 1;
    }
    splits
}

pub(crate) fn check(points: &[f32], d: usize, cfg: &KMeansConfig) -> Result<usize> {
    if d == 0 || !points.len().is_multiple_of(d) {
        return Err(Error::config(
            "k-means dimension",
            format!(
                "{} values are not a whole number of {d}-vectors",
                points.len()
            ),
        ));
    }
    let n = points.len() / d;
    if cfg.k == 0 || cfg.k > n {
        return Err(Error::config(
            "centroids",
            format!("k = {} needs 1..={n} points, the input has {n}", cfg.k),
        ));
    }
    if cfg.k > 1 << 16 {
        return Err(Error::config(
            "centroids",
            format!("k = {} exceeds the 65,536 that u16 codes hold", cfg.k),
        ));
    }
    if let Some(m) = cfg.max_points {
        if m < cfg.k {
            return Err(Error::config(
                "max_points",
                format!("{m} training points cannot fit k = {} centroids", cfg.k),
            ));
        }
    }
    ensure_finite("k-means input", points)?;
    Ok(n)
}

/// k-means of `n = points.len() / d` row-major points on the CPU.
pub fn kmeans(
    points: &[f32],
    d: usize,
    cfg: &KMeansConfig,
    progress: &mut dyn FnMut(&KMeansProgress),
) -> Result<KMeans> {
    run(points, d, cfg, &Assigner::Cpu, progress)
}

/// k-means of the rows of a 2-D tensor on its own device: on the CPU the optimised kernel runs; on
/// other devices the assignment step runs there as tensor ops and the (cheap) update on the host.
pub fn kmeans_tensor(
    points: &Tensor,
    cfg: &KMeansConfig,
    progress: &mut dyn FnMut(&KMeansProgress),
) -> Result<KMeans> {
    if !points.device().is_cpu() {
        return kmeans_reference(points, cfg, progress);
    }
    let (_, d) = points.dims2()?;
    let host = points
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    run(&host, d, cfg, &Assigner::Cpu, progress)
}

/// The plain twin of [`kmeans_tensor`]: the assignment step always runs as candle tensor ops
/// (matmul + argmin), on any device. This is the path a CUDA tensor takes; tests run it on the CPU
/// against the optimised kernel.
pub fn kmeans_reference(
    points: &Tensor,
    cfg: &KMeansConfig,
    progress: &mut dyn FnMut(&KMeansProgress),
) -> Result<KMeans> {
    let (_, d) = points.dims2()?;
    let host = points
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let on_device = points.to_dtype(DType::F32)?;
    run(
        &host,
        d,
        cfg,
        &Assigner::Device(points.device(), on_device),
        progress,
    )
}

fn run(
    points: &[f32],
    d: usize,
    cfg: &KMeansConfig,
    assigner: &Assigner<'_>,
    progress: &mut dyn FnMut(&KMeansProgress),
) -> Result<KMeans> {
    let n = check(points, d, cfg)?;
    let k = cfg.k;
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);

    // Sub-sampling only applies to the CPU backend; a device backend always trains on all points.
    let subset: Option<Vec<f32>> = match (cfg.max_points, assigner) {
        (Some(m), Assigner::Cpu) if m < n => {
            let mut picked = sample(&mut rng, n, m).into_vec();
            picked.sort_unstable();
            Some(
                picked
                    .iter()
                    .flat_map(|&i| points[i * d..(i + 1) * d].iter().copied())
                    .collect(),
            )
        }
        _ => None,
    };
    let train = subset.as_deref().unwrap_or(points);

    let rms = (train.iter().map(|v| (*v as f64) * (*v as f64)).sum::<f64>() / train.len() as f64)
        .sqrt() as f32;
    let mut centroids = init_centroids(train, d, cfg, &mut rng);
    let mut history = Vec::with_capacity(cfg.iters);
    let mut empty_splits = 0;
    let mut bounds =
        (cfg.bounds && matches!(assigner, Assigner::Cpu)).then(|| Hamerly::new(train, d));
    for iter in 0..cfg.iters {
        let mut index = match &mut bounds {
            Some(b) => b.assign(train, &centroids, k, d)?,
            None => assigner.assign(train, &centroids, k, d)?,
        };
        let acc = accumulate(train, &index, &centroids, k, d);
        history.push(acc.objective);
        let mut counts = acc.counts;
        for c in 0..k {
            if counts[c] > 0 {
                for j in 0..d {
                    centroids[c * d + j] = (acc.sums[c * d + j] / counts[c] as f64) as f32;
                }
            }
        }
        let splits = split_empty(
            train,
            &mut index,
            &mut counts,
            &mut centroids,
            d,
            rms,
            &mut rng,
        );
        if splits > 0 {
            // The split moved points by itself: the next pass starts from scratch.
            if let Some(b) = &mut bounds {
                b.invalidate();
            }
        }
        empty_splits += splits;
        progress(&KMeansProgress {
            iter: iter + 1,
            iters: cfg.iters,
            objective: acc.objective,
            empty_splits,
        });
    }
    // Trained on every point: the bounds carry over to the final assignment.
    let assignments = match &mut bounds {
        Some(b) if subset.is_none() => b.assign(points, &centroids, k, d)?,
        _ => assigner.assign(points, &centroids, k, d)?,
    };
    let full_passes = match &bounds {
        Some(b) if subset.is_none() => b.full_passes(),
        Some(b) => b.full_passes() + n,
        None => cfg.iters * train.len() / d + n,
    };
    let objective = accumulate(points, &assignments, &centroids, k, d).objective;
    Ok(KMeans {
        centroids,
        k,
        d,
        assignments,
        history,
        objective,
        empty_splits,
        full_passes,
    })
}
