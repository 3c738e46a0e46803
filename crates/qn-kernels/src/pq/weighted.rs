//! Activation-aware k-means: codebooks that minimise a layer's *output* error, not its weight error.
//!
//! A Linear layer's output error over calibration inputs `X` is `‖X (W − Ŵ)ᵀ‖²`. Keeping only the
//! diagonal `d × d` blocks of `H = XᵀX / m` (the blocks of inputs that one sub-vector multiplies),
//! it is `Σ_j (w_j − c_{a(j)})ᵀ H_{b(j)} (w_j − c_{a(j)})` over sub-vectors `j` at block position
//! `b(j)` — GPTVQ's and AQLM's objective without their cross-block terms. Lloyd's two steps become:
//!
//! - assign: `a(j) = argmin_k (w_j − c_k)ᵀ H_b (w_j − c_k) = argmin_k c_kᵀH_b c_k − 2 c_k·(H_b w_j)`,
//!   which is the plain nearest-centroid kernel run on the points `H_b w_j` with the norms
//!   `c_kᵀ H_b c_k` (one table per block position);
//! - update: `c_k = (Σ_{j∈k} s_j H_{b(j)})⁻¹ Σ_{j∈k} s_j H_{b(j)} w_j`, a `d × d` solve per centroid.
//!
//! `s_j` is an optional weight per row (an embedding's token frequencies: a row never read costs
//! nothing). Every `H_b` is damped to `H_b + λ · mean(diag H_b) · I` (λ = [`BlockMetric::ridge`],
//! 0.01 by default, GPTQ's damping), so that an input that never varies cannot make a solve
//! singular. When every `H_b` is the same multiple of the identity and the rows are unweighted the
//! objective is plain k-means', and [`kmeans_weighted`] runs [`kmeans`] itself: the result is
//! bit-identical.
//!
//! Sub-vectors are numbered as [`crate::layout::BlockLayout`] numbers them (`j = b · rows + o`), so
//! the points of one block position are a contiguous run of `rows` points.
//!
//! ```
//! use qn_kernels::pq::{kmeans_weighted, BlockMetric, KMeansConfig};
//! // Two block positions of 3 rows, d = 2: the second input is 100x louder at position 0.
//! let points = [0.0f32, 0.0, 0.0, 1.0, 0.0, 2.0, 1.0, 0.0, 2.0, 0.0, 3.0, 0.0];
//! let h = vec![1.0, 0.0, 0.0, 100.0, 1.0, 0.0, 0.0, 1.0];
//! let metric = BlockMetric::new(2, 3, h, None)?;
//! let km = kmeans_weighted(&points, &metric, &KMeansConfig::new(2).with_seed(0), &mut |_| {})?;
//! assert_eq!(km.assignments.len(), 6);
//! # Ok::<(), qn_kernels::Error>(())
//! ```

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use super::assign::{assign_nearest, CentroidTable};
use super::kmeans::{
    check, init_centroids, kmeans, split_empty, KMeans, KMeansConfig, KMeansProgress,
};
use crate::{Error, Result};

/// The metric of weighted k-means: one `d × d` second-moment block per block position, and
/// optionally a weight per row.
#[derive(Debug, Clone, PartialEq)]
pub struct BlockMetric {
    d: usize,
    rows: usize,
    hessians: Vec<f32>,
    row_weights: Option<Vec<f32>>,
    ridge: f64,
}

impl BlockMetric {
    /// `hessians`: `positions × d × d` row-major blocks (symmetrised here); `rows`: points per
    /// block position; `row_weights`: one non-negative weight per row, or none.
    pub fn new(
        d: usize,
        rows: usize,
        hessians: Vec<f32>,
        row_weights: Option<Vec<f32>>,
    ) -> Result<Self> {
        let bad = |reason: String| Err(Error::config("k-means metric", reason));
        if d == 0 || rows == 0 {
            return bad(format!("d = {d} and rows = {rows} must be positive"));
        }
        if hessians.is_empty() || !hessians.len().is_multiple_of(d * d) {
            return bad(format!(
                "{} values are not a whole number of {d} x {d} blocks",
                hessians.len()
            ));
        }
        if let Some(i) = hessians.iter().position(|v| !v.is_finite()) {
            return bad(format!("value {i} of the second moments is not finite"));
        }
        let mut hessians = hessians;
        for h in hessians.chunks_exact_mut(d * d) {
            for r in 0..d {
                if h[r * d + r] < 0.0 {
                    return bad(format!(
                        "a second-moment block has a negative diagonal {}",
                        h[r * d + r]
                    ));
                }
                for c in r + 1..d {
                    let m = 0.5 * (h[r * d + c] + h[c * d + r]);
                    h[r * d + c] = m;
                    h[c * d + r] = m;
                }
            }
        }
        if let Some(w) = &row_weights {
            if w.len() != rows {
                return bad(format!("{} row weights for {rows} rows", w.len()));
            }
            if let Some(i) = w.iter().position(|v| !(v.is_finite() && *v >= 0.0)) {
                return bad(format!(
                    "row weight {i} is {}, not a non-negative number",
                    w[i]
                ));
            }
            if w.iter().all(|v| *v == 0.0) {
                return bad("every row weight is zero".into());
            }
        }
        Ok(Self {
            d,
            rows,
            hessians,
            row_weights,
            ridge: 0.01,
        })
    }

    /// Second moments of calibration inputs `x` (`m × cols`, row-major) cut into blocks of `d`:
    /// `H_b = Σ_i x_{i,b} x_{i,b}ᵀ / m` for the `cols / d` block positions of a Linear layer with
    /// `rows` outputs.
    pub fn from_inputs(x: &[f32], cols: usize, d: usize, rows: usize) -> Result<Self> {
        if cols == 0
            || d == 0
            || !cols.is_multiple_of(d)
            || !x.len().is_multiple_of(cols)
            || x.is_empty()
        {
            return Err(Error::config(
                "k-means metric",
                format!(
                    "{} inputs of width {cols} cannot be cut into blocks of {d}",
                    x.len()
                ),
            ));
        }
        // The running moments with a span of exactly `d`: the same sums, one place.
        let mut moments = InputMoments::with_span(cols, d);
        moments.add(x)?;
        moments
            .metric(d, rows)
            .ok_or_else(|| Error::config("k-means metric", "the inputs give no second moments"))
    }

    /// With another damping `λ` (`H_b + λ · mean(diag H_b) · I`; 0 leaves `H_b` as given).
    pub fn with_ridge(mut self, ridge: f64) -> Result<Self> {
        if !(ridge.is_finite() && ridge >= 0.0) {
            return Err(Error::config(
                "k-means ridge",
                format!("{ridge} is not a non-negative number"),
            ));
        }
        self.ridge = ridge;
        Ok(self)
    }

    /// The damping λ.
    pub fn ridge(&self) -> f64 {
        self.ridge
    }

    /// The `d × d` second-moment block of `position` (row-major, undamped).
    pub fn block(&self, position: usize) -> &[f32] {
        let dd = self.d * self.d;
        &self.hessians[position * dd..(position + 1) * dd]
    }

    /// Block positions.
    pub fn positions(&self) -> usize {
        self.hessians.len() / (self.d * self.d)
    }

    /// Sub-vector dimension.
    pub fn d(&self) -> usize {
        self.d
    }

    /// Points per block position.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// The plain metric: `positions` identity blocks over `rows` unweighted rows (k-means under
    /// it is [`kmeans`]).
    pub fn identity(d: usize, rows: usize, positions: usize) -> Result<Self> {
        let mut h = vec![0f32; positions * d * d];
        for b in h.chunks_exact_mut(d * d) {
            (0..d).for_each(|r| b[r * d + r] = 1.0);
        }
        Self::new(d, rows, h, None)
    }

    /// The metric of the points of `rows` only (every block position kept, row weights carried).
    pub fn select_rows(&self, rows: &[usize]) -> Result<Self> {
        if let Some(r) = rows.iter().find(|r| **r >= self.rows) {
            return Err(Error::config(
                "k-means metric",
                format!("row {r} is past the metric's {} rows", self.rows),
            ));
        }
        let weights = self
            .row_weights
            .as_ref()
            .map(|w| rows.iter().map(|&r| w[r]).collect::<Vec<f32>>());
        // A selection of rows that are all never read keeps them equally weighted instead of
        // refusing: the error of such a sample is still a fair estimate.
        let weights = weights.filter(|w| w.iter().any(|v| *v > 0.0));
        let mut m = Self::new(self.d, rows.len(), self.hessians.clone(), weights)?;
        m.ridge = self.ridge;
        Ok(m)
    }

    /// The output error of replacing every point by its assigned centroid, relative to the
    /// output energy of the points: `Σ_j s_j (w_j − c)ᵀH_b(w_j − c) / Σ_j s_j w_jᵀH_b w_j` with
    /// the damped blocks (`points` in [`crate::layout::BlockLayout`] order). 0 when the points
    /// carry no energy.
    pub fn relative_error(
        &self,
        points: &[f32],
        centroids: &[f32],
        assignments: &[u32],
    ) -> Result<f64> {
        let (d, rows) = (self.d, self.rows);
        let n = self.positions() * rows;
        if points.len() != n * d || assignments.len() != n {
            return Err(Error::config(
                "k-means metric",
                format!(
                    "{} values and {} assignments for {n} points of {d}",
                    points.len(),
                    assignments.len()
                ),
            ));
        }
        let k = centroids.len() / d;
        if let Some(a) = assignments.iter().find(|a| **a as usize >= k) {
            return Err(Error::config(
                "k-means metric",
                format!("assignment {a} is past the {k} centroids"),
            ));
        }
        let h = self.damped();
        let quad = |hb: &[f64], v: &[f64]| -> f64 {
            (0..d)
                .map(|r| v[r] * (0..d).map(|c| hb[r * d + c] * v[c]).sum::<f64>())
                .sum()
        };
        // One sum per block position, added in order: the figure does not depend on the threads.
        let per_position: Vec<(f64, f64)> = (0..self.positions())
            .into_par_iter()
            .map(|b| {
                let hb = &h[b * d * d..(b + 1) * d * d];
                let (mut err, mut energy) = (0.0, 0.0);
                for o in 0..rows {
                    let j = b * rows + o;
                    let w = &points[j * d..(j + 1) * d];
                    let c = &centroids[assignments[j] as usize * d..][..d];
                    let diff: Vec<f64> = (0..d).map(|r| w[r] as f64 - c[r] as f64).collect();
                    let wv: Vec<f64> = w.iter().map(|v| *v as f64).collect();
                    let s = self.row_weight(o);
                    err += s * quad(hb, &diff);
                    energy += s * quad(hb, &wv);
                }
                (err, energy)
            })
            .collect();
        let (err, energy) = per_position
            .iter()
            .fold((0.0, 0.0), |a, b| (a.0 + b.0, a.1 + b.1));
        Ok(if energy > 0.0 { err / energy } else { 0.0 })
    }

    /// Whether the objective is plain k-means' (every block the same multiple of `I`, rows
    /// unweighted or equally weighted).
    pub fn is_plain(&self) -> bool {
        let d = self.d;
        let s = self.hessians[0];
        let blocks_plain = s > 0.0
            && self.hessians.chunks_exact(d * d).all(|h| {
                (0..d).all(|r| (0..d).all(|c| h[r * d + c] == if r == c { s } else { 0.0 }))
            });
        let rows_plain = self
            .row_weights
            .as_ref()
            .is_none_or(|w| w.iter().all(|v| *v == w[0]));
        blocks_plain && rows_plain
    }

    /// The damped blocks in f64.
    fn damped(&self) -> Vec<f64> {
        let d = self.d;
        let mut out: Vec<f64> = self.hessians.iter().map(|v| *v as f64).collect();
        for h in out.chunks_exact_mut(d * d) {
            let mean = (0..d).map(|r| h[r * d + r]).sum::<f64>() / d as f64;
            // A position whose inputs are all zero: its errors cost nothing, but the solve still
            // needs a definite block.
            let add = if mean > 0.0 { self.ridge * mean } else { 1.0 };
            for r in 0..d {
                h[r * d + r] += add;
            }
        }
        out
    }

    fn row_weight(&self, row: usize) -> f64 {
        self.row_weights.as_ref().map_or(1.0, |w| w[row] as f64)
    }
}

/// Solves `a x = r` for a symmetric positive-definite `d × d` `a` (Cholesky); `None` when `a` is
/// not positive definite.
fn solve_spd(a: &[f64], r: &[f64], d: usize) -> Option<Vec<f64>> {
    let mut l = vec![0f64; d * d];
    for i in 0..d {
        for j in 0..=i {
            let mut s = a[i * d + j];
            for k in 0..j {
                s -= l[i * d + k] * l[j * d + k];
            }
            if i == j {
                if s <= 0.0 {
                    return None;
                }
                l[i * d + i] = s.sqrt();
            } else {
                l[i * d + j] = s / l[j * d + j];
            }
        }
    }
    let mut y = vec![0f64; d];
    for i in 0..d {
        let s = r[i] - (0..i).map(|k| l[i * d + k] * y[k]).sum::<f64>();
        y[i] = s / l[i * d + i];
    }
    let mut x = vec![0f64; d];
    for i in (0..d).rev() {
        let s = y[i] - (i + 1..d).map(|k| l[k * d + i] * x[k]).sum::<f64>();
        x[i] = s / l[i * d + i];
    }
    Some(x)
}

/// `(H w, wᵀ H w)` of every point, with the damped blocks.
fn transform(points: &[f32], h: &[f64], d: usize, rows: usize) -> (Vec<f32>, Vec<f64>) {
    let n = points.len() / d;
    let mut hx = vec![0f32; n * d];
    let mut whw = vec![0f64; n];
    hx.par_chunks_mut(rows * d)
        .zip(whw.par_chunks_mut(rows))
        .zip(points.par_chunks(rows * d))
        .enumerate()
        .for_each(|(b, ((hx, whw), p))| {
            let hb = &h[b * d * d..(b + 1) * d * d];
            for ((out, q), w) in hx
                .chunks_exact_mut(d)
                .zip(whw.iter_mut())
                .zip(p.chunks_exact(d))
            {
                let mut quad = 0f64;
                for r in 0..d {
                    let v: f64 = (0..d).map(|c| hb[r * d + c] * w[c] as f64).sum();
                    out[r] = v as f32;
                    quad += v * w[r] as f64;
                }
                *q = quad;
            }
        });
    (hx, whw)
}

/// Nearest centroids under the metric, and the weighted objective `Σ s_j (w−c)ᵀH(w−c)`.
fn assign(
    hx: &[f32],
    whw: &[f64],
    h: &[f64],
    centroids: &[f32],
    metric: &BlockMetric,
    k: usize,
) -> Result<(Vec<u32>, f64)> {
    let (d, rows) = (metric.d, metric.rows);
    let n = hx.len() / d;
    let mut index = vec![0u32; n];
    let mut partial = vec![0f32; n];
    let objectives: Vec<f64> = index
        .par_chunks_mut(rows)
        .zip(partial.par_chunks_mut(rows))
        .zip(hx.par_chunks(rows * d))
        .enumerate()
        .map(|(b, ((idx, part), p))| -> Result<f64> {
            let hb = &h[b * d * d..(b + 1) * d * d];
            let norms: Vec<f32> = centroids
                .chunks_exact(d)
                .map(|c| {
                    let mut q = 0f64;
                    for r in 0..d {
                        let v: f64 = (0..d).map(|j| hb[r * d + j] * c[j] as f64).sum();
                        q += v * c[r] as f64;
                    }
                    q as f32
                })
                .collect();
            let table = CentroidTable::with_norms(centroids, &norms, k, d)?;
            assign_nearest(p, &table, idx, part)?;
            Ok(part
                .iter()
                .enumerate()
                .map(|(o, v)| metric.row_weight(o) * (whw[b * rows + o] + *v as f64).max(0.0))
                .sum())
        })
        .collect::<Result<_>>()?;
    Ok((index, objectives.iter().sum()))
}

/// Moves every populated centroid to its weighted solve; returns the unweighted counts.
fn update(
    points: &[f32],
    hx: &[f32],
    index: &[u32],
    h: &[f64],
    metric: &BlockMetric,
    centroids: &mut [f32],
    k: usize,
) -> Vec<u64> {
    let (d, rows) = (metric.d, metric.rows);
    let p = metric.positions();
    // Per position (fixed order, so the sums do not depend on the thread count): the weight of each
    // centroid, `Σ s H w` and the plain sums for clusters whose rows all weigh zero.
    struct Part {
        weight: Vec<f64>,
        rhs: Vec<f64>,
        sums: Vec<f64>,
        counts: Vec<u64>,
    }
    let parts: Vec<Part> = (0..p)
        .into_par_iter()
        .map(|b| {
            let mut part = Part {
                weight: vec![0.0; k],
                rhs: vec![0.0; k * d],
                sums: vec![0.0; k * d],
                counts: vec![0; k],
            };
            for o in 0..rows {
                let j = b * rows + o;
                let a = index[j] as usize;
                let s = metric.row_weight(o);
                part.weight[a] += s;
                part.counts[a] += 1;
                for r in 0..d {
                    part.rhs[a * d + r] += s * hx[j * d + r] as f64;
                    part.sums[a * d + r] += points[j * d + r] as f64;
                }
            }
            part
        })
        .collect();
    let mut counts = vec![0u64; k];
    let mut rhs = vec![0f64; k * d];
    let mut sums = vec![0f64; k * d];
    let mut a = vec![0f64; k * d * d];
    for (b, part) in parts.iter().enumerate() {
        let hb = &h[b * d * d..(b + 1) * d * d];
        for c in 0..k {
            counts[c] += part.counts[c];
            if part.weight[c] > 0.0 {
                for (t, v) in a[c * d * d..(c + 1) * d * d].iter_mut().zip(hb) {
                    *t += part.weight[c] * v;
                }
            }
        }
        rhs.iter_mut().zip(&part.rhs).for_each(|(t, v)| *t += v);
        sums.iter_mut().zip(&part.sums).for_each(|(t, v)| *t += v);
    }
    for c in 0..k {
        if counts[c] == 0 {
            continue;
        }
        let solved = solve_spd(&a[c * d * d..(c + 1) * d * d], &rhs[c * d..(c + 1) * d], d);
        let new: Vec<f64> =
            solved.unwrap_or_else(|| (0..d).map(|r| sums[c * d + r] / counts[c] as f64).collect());
        for r in 0..d {
            centroids[c * d + r] = new[r] as f32;
        }
    }
    counts
}

/// k-means of the sub-vectors `points` (`positions · rows` points of dimension `metric.d()`, in
/// [`crate::layout::BlockLayout`] order) under `metric`. Initialisation, seeding and empty-cluster
/// splitting are [`kmeans`]'s; `cfg.max_points` and `cfg.bounds` are not used (every point
/// trains). When [`BlockMetric::is_plain`], this is [`kmeans`] itself.
pub fn kmeans_weighted(
    points: &[f32],
    metric: &BlockMetric,
    cfg: &KMeansConfig,
    progress: &mut dyn FnMut(&KMeansProgress),
) -> Result<KMeans> {
    let d = metric.d;
    let n = check(points, d, cfg)?;
    if n != metric.positions() * metric.rows {
        return Err(Error::config(
            "k-means metric",
            format!(
                "{} positions of {} rows do not cover the {n} points",
                metric.positions(),
                metric.rows
            ),
        ));
    }
    if metric.is_plain() {
        return kmeans(points, d, cfg, progress);
    }
    let k = cfg.k;
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    let h = metric.damped();
    let (hx, whw) = transform(points, &h, d, metric.rows);
    let rms = (points
        .iter()
        .map(|v| (*v as f64) * (*v as f64))
        .sum::<f64>()
        / points.len() as f64)
        .sqrt() as f32;
    let mut centroids = init_centroids(points, d, cfg, &mut rng);
    let mut history = Vec::with_capacity(cfg.iters);
    let mut empty_splits = 0;
    for iter in 0..cfg.iters {
        let (mut index, objective) = assign(&hx, &whw, &h, &centroids, metric, k)?;
        history.push(objective);
        let mut counts = update(points, &hx, &index, &h, metric, &mut centroids, k);
        empty_splits += split_empty(
            points,
            &mut index,
            &mut counts,
            &mut centroids,
            d,
            rms,
            &mut rng,
        );
        progress(&KMeansProgress {
            iter: iter + 1,
            iters: cfg.iters,
            objective,
            empty_splits,
        });
    }
    let (assignments, objective) = assign(&hx, &whw, &h, &centroids, metric, k)?;
    Ok(KMeans {
        centroids,
        k,
        d,
        assignments,
        history,
        objective,
        empty_splits,
        full_passes: (cfg.iters + 1) * n,
    })
}

/// Running second moments of a Linear layer's inputs, kept as the diagonal blocks of `XᵀX` of
/// width `span` (16 when the input width allows; every block size dividing the span can be read
/// off them), so that memory stays `cols · span` rather than `cols²`.
#[derive(Debug, Clone, PartialEq)]
pub struct InputMoments {
    cols: usize,
    span: usize,
    sums: Vec<f64>,
    count: u64,
}

impl InputMoments {
    /// Empty moments of inputs of width `cols`.
    pub fn new(cols: usize) -> Self {
        let span = [16, 8, 4, 2, 1]
            .into_iter()
            .find(|s| cols.is_multiple_of(*s))
            .unwrap_or(1);
        Self::with_span(cols, span)
    }

    /// Moments kept in diagonal blocks of `span` (which must divide `cols`).
    fn with_span(cols: usize, span: usize) -> Self {
        Self {
            cols,
            span,
            sums: vec![0.0; cols * span],
            count: 0,
        }
    }

    /// Adds the rows of `x` (`m × cols`, row-major); non-finite rows are refused.
    pub fn add(&mut self, x: &[f32]) -> Result<()> {
        let cols = self.cols;
        if cols == 0 || !x.len().is_multiple_of(cols) {
            return Err(Error::config(
                "calibration inputs",
                format!("{} values are not rows of {cols}", x.len()),
            ));
        }
        crate::error::ensure_finite("calibration inputs", x)?;
        let s = self.span;
        // One task per block position: each owns its `s × s` sums, so the order of additions
        // never depends on the thread count.
        self.sums
            .par_chunks_mut(s * s)
            .enumerate()
            .for_each(|(b, acc)| {
                for row in x.chunks_exact(cols) {
                    let xb = &row[b * s..(b + 1) * s];
                    for r in 0..s {
                        let v = xb[r] as f64;
                        for c in 0..s {
                            acc[r * s + c] += v * xb[c] as f64;
                        }
                    }
                }
            });
        self.count += (x.len() / cols) as u64;
        Ok(())
    }

    /// Rows added so far.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// The metric for sub-vectors of `d` of a layer with `rows` outputs; `None` when nothing was
    /// added or `d` does not divide the span kept.
    pub fn metric(&self, d: usize, rows: usize) -> Option<BlockMetric> {
        if self.count == 0 || d == 0 || !self.span.is_multiple_of(d) {
            return None;
        }
        let s = self.span;
        let p = self.cols / d;
        let mut h = Vec::with_capacity(p * d * d);
        for b in 0..p {
            let (big, off) = ((b * d) / s, (b * d) % s);
            let acc = &self.sums[big * s * s..(big + 1) * s * s];
            for r in 0..d {
                for c in 0..d {
                    h.push((acc[(off + r) * s + off + c] / self.count as f64) as f32);
                }
            }
        }
        BlockMetric::new(d, rows, h, None).ok()
    }
}
