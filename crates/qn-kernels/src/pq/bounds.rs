//! Hamerly's bounds for Lloyd's assignment step: points whose centroid provably stays skip the
//! distance pass, and the assignments stay exactly those of the full pass.
//!
//! Each point keeps an upper bound `u` on the distance to its centroid and a lower bound `l` on the
//! distance to every other one. When the centroids move, `u` grows by its centroid's move and `l`
//! shrinks by the largest move of any other. A point whose bounds prove that its centroid is still
//! the nearest — `l² − u² > 2E`, or `4s(s − u) > 2E` with `s` half the distance from its centroid
//! to the nearest other centroid — keeps it; otherwise `u` is tightened to the exact distance, and
//! if the proof still fails the point goes, with the others that failed, through
//! [`assign_nearest_top2`] exactly like a full pass (which also gives its new bounds).
//!
//! `E` bounds the rounding error of the kernel's `‖c‖² − 2x·c` in `f32` (`2(d + 1)` unit
//! roundoffs of `(‖x‖ + max‖c‖)²`, taken twice over). A gap of more than `2E` between the true
//! squared distances means the kernel orders the two centroids the same way, so a skipped point
//! gets exactly the index the full pass would give it — the assignments, and so the centroids,
//! equal plain Lloyd's bit for bit.

use rayon::prelude::*;

use super::assign::{assign_nearest_top2, CentroidTable};
use crate::Result;

/// Points per parallel task: fixed, so results never depend on the thread count.
const CHUNK: usize = 4096;

/// Bounds of every point against the centroids of the last assignment.
pub(crate) struct Hamerly {
    index: Vec<u32>,
    upper: Vec<f64>,
    lower: Vec<f64>,
    /// `‖x‖` of every point.
    norm_x: Vec<f64>,
    /// The centroids the bounds refer to (empty: no valid bounds).
    last: Vec<f32>,
    /// Points that went through the full pass, over all assignments.
    recomputed: usize,
}

/// `√(Σ (a − b)²)` in f64.
fn dist(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| {
            let t = *x as f64 - *y as f64;
            t * t
        })
        .sum::<f64>()
        .sqrt()
}

fn norm(a: &[f32]) -> f64 {
    a.iter()
        .map(|v| (*v as f64) * (*v as f64))
        .sum::<f64>()
        .sqrt()
}

/// The kernel's rounding-error bound `E` for a point of norm `nx` against centroids of norm at
/// most `max_c`.
fn error_bound(d: usize, nx: f64, max_c: f64) -> f64 {
    4.0 * (d as f64 + 1.0) * (f32::EPSILON as f64 / 2.0) * (nx + max_c).powi(2)
}

impl Hamerly {
    pub(crate) fn new(points: &[f32], d: usize) -> Self {
        let norm_x: Vec<f64> = points.chunks_exact(d).map(norm).collect();
        let n = norm_x.len();
        Self {
            index: vec![0; n],
            upper: vec![0.0; n],
            lower: vec![0.0; n],
            norm_x,
            last: Vec::new(),
            recomputed: 0,
        }
    }

    /// Forget the bounds (after the caller changed assignments itself, e.g. an empty-cluster split).
    pub(crate) fn invalidate(&mut self) {
        self.last.clear();
    }

    /// Points that went through the full distance pass so far.
    pub(crate) fn full_passes(&self) -> usize {
        self.recomputed
    }

    /// The nearest centroid of every point, exactly as [`super::assign_nearest`] gives it.
    pub(crate) fn assign(
        &mut self,
        points: &[f32],
        centroids: &[f32],
        k: usize,
        d: usize,
    ) -> Result<Vec<u32>> {
        let table = CentroidTable::new(centroids, k, d)?;
        let max_c = centroids.chunks_exact(d).map(norm).fold(0.0, f64::max);
        let n = self.index.len();
        let todo: Vec<u32> = if self.last.len() != centroids.len() {
            (0..n as u32).collect()
        } else {
            let moves: Vec<f64> = centroids
                .chunks_exact(d)
                .zip(self.last.chunks_exact(d))
                .map(|(a, b)| dist(a, b) * (1.0 + 1e-12))
                .collect();
            // The largest move, and the largest of the others (for the points of its centroid).
            let (mut m1, mut m1_at, mut m2) = (0.0f64, usize::MAX, 0.0f64);
            for (c, &m) in moves.iter().enumerate() {
                if m > m1 {
                    m2 = m1;
                    (m1, m1_at) = (m, c);
                } else if m > m2 {
                    m2 = m;
                }
            }
            // Half the distance from each centroid to its nearest other centroid.
            let half_gap: Vec<f64> = (0..k)
                .into_par_iter()
                .map(|a| {
                    let ca = &centroids[a * d..(a + 1) * d];
                    let mut best = f64::INFINITY;
                    for b in (0..k).filter(|&b| b != a) {
                        best = best.min(dist(ca, &centroids[b * d..(b + 1) * d]));
                    }
                    0.5 * best * (1.0 - 1e-12)
                })
                .collect();
            let marked: Vec<Vec<u32>> = points
                .par_chunks(CHUNK * d)
                .zip(self.index.par_chunks(CHUNK))
                .zip(self.upper.par_chunks_mut(CHUNK))
                .zip(self.lower.par_chunks_mut(CHUNK))
                .zip(self.norm_x.par_chunks(CHUNK))
                .enumerate()
                .map(|(ci, ((((p, idx), up), lo), nx))| {
                    let mut marked = Vec::new();
                    for (i, x) in p.chunks_exact(d).enumerate() {
                        let a = idx[i] as usize;
                        let e2 = 2.0 * error_bound(d, nx[i], max_c);
                        let mut u = up[i] + moves[a];
                        let l = lo[i] - if a == m1_at { m2 } else { m1 };
                        let s = half_gap[a];
                        let proven = |u: f64| {
                            (l > u && l * l - u * u > e2) || (s > u && 4.0 * s * (s - u) > e2)
                        };
                        if !proven(u) {
                            u = dist(x, &centroids[a * d..(a + 1) * d]) * (1.0 + 1e-12);
                            if !proven(u) {
                                marked.push((ci * CHUNK + i) as u32);
                            }
                        }
                        up[i] = u;
                        lo[i] = l;
                    }
                    marked
                })
                .collect();
            marked.into_iter().flatten().collect()
        };
        self.recompute(points, &table, &todo, d, max_c)?;
        self.last = centroids.to_vec();
        Ok(self.index.clone())
    }

    /// The full pass for the points in `todo`: index and both bounds from the kernel's values.
    fn recompute(
        &mut self,
        points: &[f32],
        table: &CentroidTable,
        todo: &[u32],
        d: usize,
        max_c: f64,
    ) -> Result<()> {
        if todo.is_empty() {
            return Ok(());
        }
        self.recomputed += todo.len();
        let all = todo.len() == self.index.len();
        let gathered: Vec<f32>;
        let input: &[f32] = if all {
            points
        } else {
            gathered = todo
                .iter()
                .flat_map(|&i| points[i as usize * d..(i as usize + 1) * d].iter().copied())
                .collect();
            &gathered
        };
        let m = todo.len();
        let (mut index, mut partial, mut second) = (vec![0u32; m], vec![0f32; m], vec![0f32; m]);
        assign_nearest_top2(input, table, &mut index, &mut partial, &mut second)?;
        for (j, &i) in todo.iter().enumerate() {
            let i = i as usize;
            let nx = self.norm_x[i];
            let (e, xx) = (error_bound(d, nx, max_c), nx * nx);
            self.index[i] = index[j];
            self.upper[i] = (partial[j] as f64 + xx + e).max(0.0).sqrt();
            self.lower[i] = (second[j] as f64 + xx - e).max(0.0).sqrt();
        }
        Ok(())
    }
}
