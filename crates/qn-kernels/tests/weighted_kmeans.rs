//! Activation-aware k-means against plain k-means: identical where the metric is the identity,
//! a smaller layer-output error where the inputs are anisotropic, and the two Lloyd steps checked
//! against brute force in f64.

mod common;

use common::{gaussian, rng};
use qn_kernels::pq::{kmeans, kmeans_weighted, BlockMetric, KMeans, KMeansConfig};
use rand::Rng;

/// Sub-vectors of a `(rows, cols)` weight in the layout's order: `j = b · rows + o`.
fn subvectors(w: &[f32], rows: usize, cols: usize, d: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(w.len());
    for b in 0..cols / d {
        for o in 0..rows {
            out.extend_from_slice(&w[o * cols + b * d..o * cols + (b + 1) * d]);
        }
    }
    out
}

/// The weight rebuilt from a k-means result.
fn rebuild(km: &KMeans, rows: usize, cols: usize) -> Vec<f32> {
    let d = km.d;
    let mut w = vec![0f32; rows * cols];
    for (j, &a) in km.assignments.iter().enumerate() {
        let (b, o) = (j / rows, j % rows);
        w[o * cols + b * d..o * cols + (b + 1) * d]
            .copy_from_slice(&km.centroids[a as usize * d..(a as usize + 1) * d]);
    }
    w
}

/// `Σ_i ‖(W − Ŵ) x_i‖²` over the inputs `x` (`m × cols`): every cross-block term included.
fn output_error(w: &[f32], w_hat: &[f32], x: &[f32], rows: usize, cols: usize) -> f64 {
    let mut total = 0.0;
    for xi in x.chunks_exact(cols) {
        for o in 0..rows {
            let e: f64 = (0..cols)
                .map(|c| (w[o * cols + c] - w_hat[o * cols + c]) as f64 * xi[c] as f64)
                .sum();
            total += e * e;
        }
    }
    total
}

#[test]
fn an_identity_metric_gives_plain_kmeans_bit_for_bit() {
    let (rows, cols, d) = (96, 64, 8);
    let points = gaussian(rows * cols, 0.05, 3);
    let cfg = KMeansConfig::new(32).with_iters(8).with_seed(5);
    let plain = kmeans(&points, d, &cfg, &mut |_| {}).unwrap();
    let positions = cols / d;
    for scale in [1.0f32, 3.5] {
        let mut h = vec![0f32; positions * d * d];
        for b in 0..positions {
            for r in 0..d {
                h[b * d * d + r * d + r] = scale;
            }
        }
        for weights in [None, Some(vec![2.0f32; rows])] {
            let metric = BlockMetric::new(d, rows, h.clone(), weights).unwrap();
            assert!(metric.is_plain());
            let w = kmeans_weighted(&points, &metric, &cfg, &mut |_| {}).unwrap();
            assert_eq!(w.assignments, plain.assignments);
            assert_eq!(
                w.centroids.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                plain
                    .centroids
                    .iter()
                    .map(|v| v.to_bits())
                    .collect::<Vec<_>>()
            );
        }
    }
}

/// Inputs whose per-feature scales span three decades, correlated inside each block, as the
/// activations entering a transformer's FFN are (a few outlier features carry most of the energy).
fn anisotropic_inputs(m: usize, cols: usize, seed: u64) -> Vec<f32> {
    let mut r = rng(seed);
    let scales: Vec<f32> = (0..cols)
        .map(|_| 10f32.powf(r.random_range(-1.5f32..1.5)))
        .collect();
    let base = gaussian(m * cols, 1.0, seed + 1);
    let mut x = vec![0f32; m * cols];
    for i in 0..m {
        for c in 0..cols {
            // Each feature leans on its block neighbour: off-diagonal second moments.
            let mix = if c % 2 == 1 {
                0.6 * base[i * cols + c - 1]
            } else {
                0.0
            };
            x[i * cols + c] = scales[c] * (base[i * cols + c] + mix);
        }
    }
    x
}

#[test]
fn anisotropic_inputs_get_a_smaller_output_error_than_plain_kmeans() {
    let (rows, cols, d, k, m) = (128, 64, 4, 16, 2048);
    let w = gaussian(rows * cols, 0.1, 11);
    let x = anisotropic_inputs(m, cols, 12);
    let points = subvectors(&w, rows, cols, d);
    let cfg = KMeansConfig::new(k).with_iters(25).with_seed(1);
    let plain = kmeans(&points, d, &cfg, &mut |_| {}).unwrap();
    let metric = BlockMetric::from_inputs(&x, cols, d, rows).unwrap();
    assert!(!metric.is_plain());
    let weighted = kmeans_weighted(&points, &metric, &cfg, &mut |_| {}).unwrap();
    let e_plain = output_error(&w, &rebuild(&plain, rows, cols), &x, rows, cols);
    let e_weighted = output_error(&w, &rebuild(&weighted, rows, cols), &x, rows, cols);
    let signal = output_error(&w, &vec![0.0; w.len()], &x, rows, cols);
    println!(
        "relative output error ‖X(W−Ŵ)ᵀ‖²/‖XWᵀ‖²: plain k-means {:.4}, activation-aware {:.4} ({:.1}x smaller)",
        e_plain / signal,
        e_weighted / signal,
        e_plain / e_weighted
    );
    assert!(
        e_weighted < 0.5 * e_plain,
        "activation-aware {e_weighted} against plain {e_plain}"
    );
    // The weighted objective falls (Lloyd with exact solves; f32 assignment ties aside).
    for pair in weighted.history.windows(2) {
        assert!(pair[1] <= pair[0] * (1.0 + 1e-5), "{:?}", weighted.history);
    }
}

/// Every point sits at the centroid that minimises its own quadratic form (brute force in f64,
/// with the damped blocks), and the objective reported is that sum.
#[test]
fn assignments_are_the_brute_force_nearest_under_the_metric() {
    let (rows, cols, d, k) = (40, 24, 3, 8);
    let w = gaussian(rows * cols, 1.0, 21);
    let x = anisotropic_inputs(300, cols, 22);
    let points = subvectors(&w, rows, cols, d);
    let mut r = rng(23);
    let weights: Vec<f32> = (0..rows).map(|_| r.random_range(0.0f32..3.0)).collect();
    let base = BlockMetric::from_inputs(&x, cols, d, rows).unwrap();
    // Rebuild with row weights: the blocks come from a plain metric's inputs again.
    let h = {
        let mut h = vec![0f64; (cols / d) * d * d];
        for xi in x.chunks_exact(cols) {
            for b in 0..cols / d {
                for i in 0..d {
                    for j in 0..d {
                        h[b * d * d + i * d + j] += xi[b * d + i] as f64 * xi[b * d + j] as f64;
                    }
                }
            }
        }
        h.iter().map(|v| (v / 300.0) as f32).collect::<Vec<_>>()
    };
    let metric = BlockMetric::new(d, rows, h.clone(), Some(weights.clone())).unwrap();
    assert_eq!(metric.positions(), base.positions());
    let km = kmeans_weighted(
        &points,
        &metric,
        &KMeansConfig::new(k).with_iters(6),
        &mut |_| {},
    )
    .unwrap();
    let lambda = metric.ridge();
    let mut objective = 0.0;
    for (j, p) in points.chunks_exact(d).enumerate() {
        let b = j / rows;
        let mut hb: Vec<f64> = h[b * d * d..(b + 1) * d * d]
            .iter()
            .map(|v| *v as f64)
            .collect();
        let mean = (0..d).map(|i| hb[i * d + i]).sum::<f64>() / d as f64;
        (0..d).for_each(|i| hb[i * d + i] += lambda * mean);
        let cost = |c: &[f32]| {
            let e: Vec<f64> = p
                .iter()
                .zip(c)
                .map(|(a, b)| *a as f64 - *b as f64)
                .collect();
            (0..d)
                .map(|i| (0..d).map(|jj| e[i] * hb[i * d + jj] * e[jj]).sum::<f64>())
                .sum::<f64>()
        };
        let costs: Vec<f64> = km.centroids.chunks_exact(d).map(cost).collect();
        let best = costs.iter().cloned().fold(f64::INFINITY, f64::min);
        let got = costs[km.assignments[j] as usize];
        assert!(
            got <= best + 1e-4 * best.abs().max(1.0),
            "point {j}: cost {got} against the best {best}"
        );
        objective += weights[j % rows] as f64 * got;
    }
    assert!(
        (km.objective - objective).abs() <= 1e-3 * objective,
        "{} against {objective}",
        km.objective
    );
}

/// An embedding's rows weighted by token frequency: rows read often are reproduced better than by
/// plain k-means, and the frequency-weighted error falls.
#[test]
fn row_weights_favour_the_rows_that_are_read() {
    let (rows, cols, d, k) = (512, 32, 8, 16);
    let w = gaussian(rows * cols, 0.05, 31);
    let points = subvectors(&w, rows, cols, d);
    // Zipf-like: the first rows are read far more often.
    let freq: Vec<f32> = (0..rows).map(|o| 1.0 / (1.0 + o as f32)).collect();
    let mut h = vec![0f32; (cols / d) * d * d];
    for b in 0..cols / d {
        for i in 0..d {
            h[b * d * d + i * d + i] = 1.0;
        }
    }
    let metric = BlockMetric::new(d, rows, h, Some(freq.clone())).unwrap();
    let cfg = KMeansConfig::new(k).with_iters(20).with_seed(2);
    let plain = rebuild(&kmeans(&points, d, &cfg, &mut |_| {}).unwrap(), rows, cols);
    let weighted = rebuild(
        &kmeans_weighted(&points, &metric, &cfg, &mut |_| {}).unwrap(),
        rows,
        cols,
    );
    let err = |w_hat: &[f32], by_freq: bool| -> f64 {
        (0..rows)
            .map(|o| {
                let e: f64 = (0..cols)
                    .map(|c| ((w[o * cols + c] - w_hat[o * cols + c]) as f64).powi(2))
                    .sum();
                if by_freq {
                    freq[o] as f64 * e
                } else {
                    e
                }
            })
            .sum()
    };
    let (ep, ew) = (err(&plain, true), err(&weighted, true));
    let (up, uw) = (err(&plain, false), err(&weighted, false));
    println!(
        "frequency-weighted error: plain {ep:.5}, weighted {ew:.5}; unweighted: plain {up:.5}, \
         weighted {uw:.5}"
    );
    // Each wins the objective it minimises.
    assert!(ew < ep, "weighted {ew} against plain {ep}");
    assert!(up < uw, "unweighted: plain {up} against weighted {uw}");
}

#[test]
fn bad_metrics_are_refused_naming_what_is_wrong() {
    let cases: Vec<(Result<BlockMetric, qn_kernels::Error>, &str)> = vec![
        (BlockMetric::new(0, 4, vec![1.0], None), "must be positive"),
        (BlockMetric::new(2, 4, vec![1.0; 3], None), "whole number"),
        (
            BlockMetric::new(2, 4, vec![1.0, 0.0, 0.0, f32::NAN], None),
            "not finite",
        ),
        (
            BlockMetric::new(2, 4, vec![-1.0, 0.0, 0.0, 1.0], None),
            "negative diagonal",
        ),
        (
            BlockMetric::new(2, 4, vec![1.0, 0.0, 0.0, 1.0], Some(vec![1.0; 3])),
            "3 row weights for 4 rows",
        ),
        (
            BlockMetric::new(2, 4, vec![1.0, 0.0, 0.0, 1.0], Some(vec![0.0; 4])),
            "every row weight is zero",
        ),
        (BlockMetric::from_inputs(&[1.0; 10], 5, 2, 3), "blocks of 2"),
    ];
    for (r, want) in cases {
        let e = r.unwrap_err().to_string();
        assert!(e.contains(want), "wanted `{want}` in `{e}`");
    }
    // Points that the metric does not cover.
    let metric = BlockMetric::new(2, 4, vec![1.0, 0.5, 0.5, 2.0], None).unwrap();
    let e = kmeans_weighted(&[0.0; 10], &metric, &KMeansConfig::new(2), &mut |_| {})
        .unwrap_err()
        .to_string();
    assert!(e.contains("do not cover the 5 points"), "{e}");
    assert!(metric.clone().with_ridge(-1.0).is_err());
}

/// `Σ s (w − c)ᵀH(w − c) / Σ s wᵀHw` written out in f64 with the damped blocks.
fn relative_error_by_hand(
    points: &[f32],
    h: &[f32],
    weights: &[f32],
    centroids: &[f32],
    assignments: &[u32],
    (d, rows): (usize, usize),
    ridge: f64,
) -> f64 {
    let (mut err, mut energy) = (0.0f64, 0.0f64);
    for (j, &a) in assignments.iter().enumerate() {
        let (b, o) = (j / rows, j % rows);
        let hb = &h[b * d * d..(b + 1) * d * d];
        let mean = (0..d).map(|r| hb[r * d + r] as f64).sum::<f64>() / d as f64;
        let at =
            |r: usize, c: usize| hb[r * d + c] as f64 + if r == c { ridge * mean } else { 0.0 };
        let w = &points[j * d..(j + 1) * d];
        let c = &centroids[a as usize * d..(a as usize + 1) * d];
        for r in 0..d {
            for cc in 0..d {
                let s = weights[o] as f64 * at(r, cc);
                err += s * (w[r] as f64 - c[r] as f64) * (w[cc] as f64 - c[cc] as f64);
                energy += s * w[r] as f64 * w[cc] as f64;
            }
        }
    }
    err / energy
}

#[test]
fn the_relative_error_is_the_formula_and_a_row_selection_keeps_its_rows() {
    let (rows, positions, d, k) = (40, 3, 4, 8);
    let points = gaussian(rows * positions * d, 0.3, 11);
    let mut r = rng(12);
    let mut h = vec![0f32; positions * d * d];
    let x = gaussian(200 * positions * d, 1.0, 13);
    for xi in x.chunks_exact(positions * d) {
        for b in 0..positions {
            for i in 0..d {
                for c in 0..d {
                    h[b * d * d + i * d + c] += xi[b * d + i] * xi[b * d + c] / 200.0;
                }
            }
        }
    }
    let weights: Vec<f32> = (0..rows).map(|_| r.random_range(0.0f32..5.0)).collect();
    let metric = BlockMetric::new(d, rows, h.clone(), Some(weights.clone())).unwrap();
    let centroids = gaussian(k * d, 0.3, 14);
    let assignments: Vec<u32> = (0..rows * positions)
        .map(|_| r.random_range(0..k as u32))
        .collect();
    let got = metric
        .relative_error(&points, &centroids, &assignments)
        .unwrap();
    let want = relative_error_by_hand(
        &points,
        &h,
        &weights,
        &centroids,
        &assignments,
        (d, rows),
        metric.ridge(),
    );
    assert!((got - want).abs() < 1e-9 * want, "{got} vs {want}");
    // Rows 3, 7 and 20 alone: the same sums restricted to them.
    let picked = [3usize, 7, 20];
    let sub = metric.select_rows(&picked).unwrap();
    let pick_points: Vec<f32> = (0..positions)
        .flat_map(|b| {
            picked
                .iter()
                .flat_map(move |&o| (b * rows + o) * d..(b * rows + o + 1) * d)
        })
        .map(|i| points[i])
        .collect();
    let pick_assign: Vec<u32> = (0..positions)
        .flat_map(|b| picked.iter().map(move |&o| b * rows + o))
        .map(|j| assignments[j])
        .collect();
    let pick_weights: Vec<f32> = picked.iter().map(|&o| weights[o]).collect();
    let got = sub
        .relative_error(&pick_points, &centroids, &pick_assign)
        .unwrap();
    let want = relative_error_by_hand(
        &pick_points,
        &h,
        &pick_weights,
        &centroids,
        &pick_assign,
        (d, 3),
        metric.ridge(),
    );
    assert!((got - want).abs() < 1e-9 * want, "{got} vs {want}");
    // Codes past the codebook and a wrong count are errors, not reads.
    let mut bad = assignments.clone();
    bad[5] = k as u32;
    assert!(metric.relative_error(&points, &centroids, &bad).is_err());
    assert!(metric
        .relative_error(&points, &centroids, &assignments[1..])
        .is_err());
    assert!(metric.select_rows(&[rows]).is_err());
}

#[test]
fn a_probe_on_all_points_is_the_kmeans_error_and_a_sample_estimates_it() {
    use qn_kernels::pq::probe_distortion;
    let (rows, positions, d) = (2048, 4, 4);
    let points = gaussian(rows * positions * d, 1.0, 21);
    let metric = BlockMetric::identity(d, rows, positions).unwrap();
    let cfg = KMeansConfig::new(64).with_iters(10).with_seed(3);
    // Every point fits: the probe is k-means' own relative MSE.
    let full = probe_distortion(&points, &metric, &cfg, usize::MAX).unwrap();
    let km = kmeans(&points, d, &cfg, &mut |_| {}).unwrap();
    let energy: f64 = points.iter().map(|v| (*v as f64).powi(2)).sum();
    assert!(
        (full - km.objective / energy).abs() < 1e-4 * full,
        "{full} vs {}",
        km.objective / energy
    );
    // Gaussian data at 6 bits per 4 values: between Shannon's 2^-3 = 0.125 and 1.
    assert!(full > 0.125 && full < 0.3, "{full}");
    // A sample of 64 points per centroid lands near the full figure (a little optimistic).
    let sampled = probe_distortion(&points, &metric, &cfg, 4096).unwrap();
    assert!(
        sampled < full * 1.02 && sampled > full * 0.85,
        "{sampled} vs {full}"
    );
    // More centroids, less error; refused with more centroids than points.
    let finer = probe_distortion(
        &points,
        &metric,
        &KMeansConfig::new(256).with_iters(10),
        4096,
    )
    .unwrap();
    assert!(finer < sampled);
    assert!(probe_distortion(
        &points,
        &metric,
        &KMeansConfig::new(rows * positions + 1),
        4096
    )
    .is_err());
    assert!(probe_distortion(&points[1..], &metric, &cfg, 4096).is_err());
}
