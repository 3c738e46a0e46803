//! Product quantization against closed-form bounds and its plain-tensor reference.

mod common;

use candle_core::{Device, Tensor};
use common::{gaussian, gaussian_tensor};
use qn_kernels::layout::BlockLayout;
use qn_kernels::pq::{
    assign_nearest, assign_nearest_reference, encode, kmeans, kmeans_reference, kmeans_tensor,
    Assignments, CentroidTable, KMeansConfig, KMeansInit, PqCodes,
};

/// 1024 x 4096 N(0, 0.02) weight, as in the issue.
fn big_gaussian() -> Tensor {
    gaussian_tensor(&[1024, 4096], 0.02, 7)
}

#[test]
fn one_bit_per_weight_lands_between_shannon_and_lloyd_max() {
    let w = big_gaussian();
    // d = 8, K = 256: log2(256) / 8 = 1 bit per weight.
    let layout = BlockLayout::linear("gaussian", w.dims(), 8).unwrap();
    let codes = encode(
        &w,
        &layout,
        &KMeansConfig::new(256).with_iters(20),
        &mut |_| {},
    )
    .unwrap();
    assert_eq!(codes.index_bits_per_weight(), 1.0);
    let rel = codes.relative_mse(&w).unwrap();
    // Shannon's rate-distortion bound at 1 bit: 2^-2 = 0.25; Lloyd-Max 1-bit scalar: 1 - 2/pi = 0.363.
    assert!(rel > 0.25 && rel < 0.3634, "relative MSE {rel}");
}

#[test]
fn two_bits_per_weight_beats_lloyd_max() {
    let w = big_gaussian();
    let layout = BlockLayout::linear("gaussian", w.dims(), 4).unwrap();
    let codes = encode(
        &w,
        &layout,
        &KMeansConfig::new(256).with_iters(20),
        &mut |_| {},
    )
    .unwrap();
    assert_eq!(codes.index_bits_per_weight(), 2.0);
    let rel = codes.relative_mse(&w).unwrap();
    // Shannon at 2 bits: 0.0625; Lloyd-Max 2-bit scalar: 0.1175.
    assert!(rel > 0.0625 && rel < 0.1175, "relative MSE {rel}");
}

#[test]
fn objective_never_increases() {
    for init in [KMeansInit::RandomColumns, KMeansInit::KMeansPlusPlus] {
        let points = gaussian(20_000 * 8, 1.0, 3);
        let km = kmeans(
            &points,
            8,
            &KMeansConfig::new(64).with_iters(25).with_init(init),
            &mut |_| {},
        )
        .unwrap();
        assert_eq!(km.history.len(), 25);
        for (t, pair) in km.history.windows(2).enumerate() {
            // The assignment uses f32 GEMM-form distances; a tie broken by rounding can cost at most
            // f32 epsilon of the objective.
            assert!(
                pair[1] <= pair[0] * (1.0 + 1e-6),
                "{init:?}: iteration {t}: {} -> {}",
                pair[0],
                pair[1]
            );
        }
        assert!(km.objective <= km.history.last().unwrap() * (1.0 + 1e-6));
        assert!(
            km.history[24] < 0.9 * km.history[0],
            "{init:?} did not improve: {:?}",
            km.history
        );
    }
}

#[test]
fn kmeans_plus_plus_starts_lower_than_random_points() {
    let points = gaussian(10_000 * 4, 1.0, 5);
    let rand = kmeans(
        &points,
        4,
        &KMeansConfig::new(128).with_iters(1),
        &mut |_| {},
    )
    .unwrap();
    let pp = kmeans(
        &points,
        4,
        &KMeansConfig::new(128)
            .with_iters(1)
            .with_init(KMeansInit::KMeansPlusPlus),
        &mut |_| {},
    )
    .unwrap();
    assert!(
        pp.history[0] < rand.history[0],
        "k-means++ {} vs random {}",
        pp.history[0],
        rand.history[0]
    );
}

#[test]
fn same_seed_same_result_on_one_and_two_threads() {
    let points = gaussian(50_000 * 8, 0.02, 11);
    let run = |threads: usize, init: KMeansInit| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            kmeans(
                &points,
                8,
                &KMeansConfig::new(128)
                    .with_iters(8)
                    .with_seed(42)
                    .with_init(init),
                &mut |_| {},
            )
            .unwrap()
        })
    };
    for init in [KMeansInit::RandomColumns, KMeansInit::KMeansPlusPlus] {
        let (one, two) = (run(1, init), run(2, init));
        assert_eq!(one.assignments, two.assignments);
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&one.centroids), bits(&two.centroids));
        assert_eq!(one.history, two.history);
    }
}

#[test]
fn duplicate_heavy_input_splits_empty_clusters() {
    // 5,000 points drawn from only 24 distinct vectors, 32 centroids: clusters must go empty.
    let distinct = gaussian(24 * 4, 1.0, 2);
    let mut points = Vec::new();
    for i in 0..5_000 {
        let c = (i * 7919) % 24;
        points.extend_from_slice(&distinct[c * 4..c * 4 + 4]);
    }
    let mut reports = 0;
    let km = kmeans(
        &points,
        4,
        &KMeansConfig::new(32).with_iters(15).with_seed(3),
        &mut |_| reports += 1,
    )
    .unwrap();
    assert_eq!(reports, 15);
    assert!(km.empty_splits > 0, "no empty cluster was split");
    assert!(km.centroids.iter().all(|v| v.is_finite()));
    assert!(km.assignments.iter().all(|&a| (a as usize) < 32));
    // Every distinct vector gets a centroid of its own: the objective reaches zero.
    let total: f64 = points.iter().map(|v| (*v as f64).powi(2)).sum();
    assert!(
        km.objective / total < 1e-10,
        "objective {} of {}",
        km.objective,
        total
    );
}

#[test]
fn subsampled_training_still_assigns_every_point() {
    let points = gaussian(40_000 * 8, 1.0, 9);
    let full = kmeans(
        &points,
        8,
        &KMeansConfig::new(64).with_iters(10),
        &mut |_| {},
    )
    .unwrap();
    let sub = kmeans(
        &points,
        8,
        &KMeansConfig::new(64)
            .with_iters(10)
            .with_max_points(Some(8_000)),
        &mut |_| {},
    )
    .unwrap();
    assert_eq!(sub.assignments.len(), 40_000);
    // Training on a fifth of the points costs little quality.
    assert!(
        sub.objective < full.objective * 1.05,
        "{} vs {}",
        sub.objective,
        full.objective
    );
}

#[test]
fn optimised_assignment_matches_the_tensor_reference() {
    for (n, d, k) in [
        (3000, 8, 256),
        (2000, 4, 100),
        (1500, 16, 37),
        (1000, 3, 20),
        (777, 1, 5),
    ] {
        let points = gaussian(n * d, 1.0, (n + d + k) as u64);
        let centroids = gaussian(k * d, 1.0, 99);
        let table = CentroidTable::new(&centroids, k, d).unwrap();
        let (mut index, mut partial) = (vec![0u32; n], vec![0f32; n]);
        assign_nearest(&points, &table, &mut index, &mut partial).unwrap();
        let pt = Tensor::from_slice(&points, (n, d), &Device::Cpu).unwrap();
        let ct = Tensor::from_slice(&centroids, (k, d), &Device::Cpu).unwrap();
        let (ref_index, ref_partial) = assign_nearest_reference(&pt, &ct).unwrap();
        let ref_index = ref_index.to_vec1::<u32>().unwrap();
        let ref_partial = ref_partial.to_vec1::<f32>().unwrap();
        let dist = |i: usize, c: u32| -> f64 {
            (0..d)
                .map(|j| (points[i * d + j] as f64 - centroids[c as usize * d + j] as f64).powi(2))
                .sum()
        };
        let mut differ = 0;
        for i in 0..n {
            assert!(
                (partial[i] - ref_partial[i]).abs() <= 1e-4 * (1.0 + ref_partial[i].abs()),
                "d={d}: partial {i}"
            );
            if index[i] != ref_index[i] {
                // Only a near-tie may be broken differently by the two summation orders.
                differ += 1;
                assert!(
                    (dist(i, index[i]) - dist(i, ref_index[i])).abs() < 1e-4,
                    "d={d}: point {i}"
                );
            }
        }
        assert!(differ * 100 < n, "d={d}: {differ} of {n} differ");
    }
}

#[test]
fn decode_matches_reference_and_u16_codes_work() {
    let w = gaussian_tensor(&[96, 64, 1, 1], 1.0, 4);
    let layout = BlockLayout::conv2d("pw", w.dims(), 4).unwrap();
    let codes = encode(
        &w,
        &layout,
        &KMeansConfig::new(300).with_iters(3),
        &mut |_| {},
    )
    .unwrap();
    assert!(matches!(codes.assignments, Assignments::U16(_)));
    let fast = codes
        .decode()
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let reference = codes
        .decode_reference()
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert_eq!(fast, reference);
    assert!(codes.relative_mse(&w).unwrap() < 0.8);

    let small = encode(
        &w,
        &layout,
        &KMeansConfig::new(16).with_iters(3),
        &mut |_| {},
    )
    .unwrap();
    assert!(matches!(small.assignments, Assignments::U8(_)));
}

#[test]
fn codes_of_a_hand_made_codebook_decode_exactly() {
    // Linear (2, 4), blocks of 2, centroids [[1,1],[2,2]]; j = b * 2 + o.
    let layout = BlockLayout::linear("fc", &[2, 4], 2).unwrap();
    let centroids = Tensor::new(&[[1f32, 1.], [2., 2.]], &Device::Cpu).unwrap();
    let codes = PqCodes::new(centroids, Assignments::U8(vec![0, 1, 1, 0]), layout).unwrap();
    let w = codes.decode().unwrap().to_vec2::<f32>().unwrap();
    assert_eq!(w, vec![vec![1., 1., 2., 2.], vec![2., 2., 1., 1.]]);
}

#[test]
fn bad_inputs_are_errors() {
    let w = gaussian_tensor(&[4, 8], 1.0, 1);
    let layout = BlockLayout::linear("small.weight", w.dims(), 4).unwrap();
    let err = encode(&w, &layout, &KMeansConfig::new(256), &mut |_| {})
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("256 centroids") && err.contains("[4, 8]"),
        "{err}"
    );
    let err = kmeans(
        &[1.0, f32::NAN, 0.0, 1.0],
        2,
        &KMeansConfig::new(1),
        &mut |_| {},
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("non-finite"), "{err}");
    let err = kmeans(
        &[0.0; 64],
        2,
        &KMeansConfig::new(8).with_max_points(Some(4)),
        &mut |_| {},
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("max_points"), "{err}");
    assert!(CentroidTable::new(&[1.0, 2.0, 3.0], 2, 2).is_err());
    let table = CentroidTable::new(&[1.0, 2.0], 1, 2).unwrap();
    assert!(assign_nearest(&[1.0, 2.0, 3.0], &table, &mut [0; 1], &mut [0.0; 1]).is_err());
    let err = Assignments::from_u32(&[0, 5], 4).unwrap_err().to_string();
    assert!(err.contains("index 5"), "{err}");
    let bad = PqCodes::new(
        Tensor::zeros((4, 3), candle_core::DType::F32, &Device::Cpu).unwrap(),
        Assignments::U8(vec![0; 8]),
        layout,
    );
    assert!(bad.unwrap_err().to_string().contains("block size"));
}

#[test]
fn kmeans_matches_its_tensor_op_reference() {
    // The reference path is what a CUDA tensor runs; on the CPU both must find the same clustering.
    let points = gaussian(8_000 * 8, 1.0, 21);
    let t = Tensor::from_slice(&points, (8_000, 8), &Device::Cpu).unwrap();
    let cfg = KMeansConfig::new(64).with_iters(10).with_seed(5);
    let fast = kmeans_tensor(&t, &cfg, &mut |_| {}).unwrap();
    let reference = kmeans_reference(&t, &cfg, &mut |_| {}).unwrap();
    assert_eq!(fast.history.len(), reference.history.len());
    for (a, b) in fast.history.iter().zip(&reference.history) {
        assert!((a - b).abs() <= 1e-4 * b, "{a} vs {b}");
    }
    let same = fast
        .assignments
        .iter()
        .zip(&reference.assignments)
        .filter(|(a, b)| a == b)
        .count();
    assert!(
        same * 1000 >= 999 * 8_000,
        "{same} of 8000 assignments agree"
    );
}

/// Hamerly's bounds skip distance passes and change nothing: assignments, centroids and the
/// objective history equal plain Lloyd's bit for bit — for d = 8 (the AVX2 kernel), d = 6 (the
/// portable one), K that is not a power of two, duplicate-heavy data that splits empty clusters,
/// and sub-sampled training.
#[test]
fn bounds_give_exactly_the_plain_lloyd_result() {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    let gaussian = |n: usize, d: usize, rng: &mut rand_chacha::ChaCha8Rng| -> Vec<f32> {
        (0..n * d)
            .map(|_| {
                let (u, v): (f64, f64) = (rng.random::<f64>().max(1e-12), rng.random());
                ((-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()) as f32 * 0.02
            })
            .collect()
    };
    let dupes: Vec<f32> = (0..4000 * 4).map(|i| ((i / 4) % 7) as f32).collect();
    let cases: Vec<(&str, Vec<f32>, usize, KMeansConfig)> = vec![
        (
            "d8 K256",
            gaussian(20_000, 8, &mut rng),
            8,
            KMeansConfig::new(256),
        ),
        (
            "d6 K100",
            gaussian(6_000, 6, &mut rng),
            6,
            KMeansConfig::new(100).with_seed(3),
        ),
        (
            "d4 K37 ++",
            gaussian(5_000, 4, &mut rng),
            4,
            KMeansConfig::new(37).with_init(KMeansInit::KMeansPlusPlus),
        ),
        ("duplicates", dupes, 4, KMeansConfig::new(16).with_iters(8)),
        (
            "subsample",
            gaussian(10_000, 8, &mut rng),
            8,
            KMeansConfig::new(64).with_max_points(Some(3000)),
        ),
    ];
    for (name, points, d, cfg) in cases {
        let plain = kmeans(&points, d, &cfg.with_bounds(false), &mut |_| {}).unwrap();
        let fast = kmeans(&points, d, &cfg.with_bounds(true), &mut |_| {}).unwrap();
        assert_eq!(fast.assignments, plain.assignments, "{name}: assignments");
        assert_eq!(fast.centroids, plain.centroids, "{name}: centroids");
        assert_eq!(fast.history, plain.history, "{name}: objective history");
        assert_eq!(fast.empty_splits, plain.empty_splits, "{name}: splits");
        assert!(
            fast.full_passes <= plain.full_passes,
            "{name}: {} > {}",
            fast.full_passes,
            plain.full_passes
        );
        if name == "d8 K256" {
            // The bounds skip a good share of the passes on the paper's setting.
            assert!(
                (fast.full_passes as f64) < 0.8 * plain.full_passes as f64,
                "{name}: {} of {} passes",
                fast.full_passes,
                plain.full_passes
            );
        }
    }
}

/// The top-2 kernel gives the plain kernel's index and distance bit for bit, and as runner-up the
/// nearest of the other centroids: the plain kernel's answer once the winner is removed.
#[test]
fn top2_assignment_gives_the_runner_up() {
    use qn_kernels::pq::{assign_nearest, assign_nearest_top2, CentroidTable};
    for (d, k, n) in [(8usize, 40usize, 300usize), (6, 19, 200), (4, 5, 50)] {
        let points: Vec<f32> = (0..n * d)
            .map(|i| ((i * 7919 % 997) as f32 / 997.0) - 0.5)
            .collect();
        let centroids: Vec<f32> = (0..k * d)
            .map(|i| ((i * 104_729 % 991) as f32 / 991.0) - 0.5)
            .collect();
        let table = CentroidTable::new(&centroids, k, d).unwrap();
        let (mut i1, mut p1) = (vec![0u32; n], vec![0f32; n]);
        assign_nearest(&points, &table, &mut i1, &mut p1).unwrap();
        let (mut i2, mut p2, mut s2) = (vec![0u32; n], vec![0f32; n], vec![0f32; n]);
        assign_nearest_top2(&points, &table, &mut i2, &mut p2, &mut s2).unwrap();
        assert_eq!(i1, i2, "d {d}");
        assert_eq!(p1, p2, "d {d}");
        for p in 0..n {
            let others: Vec<f32> = (0..k)
                .filter(|&c| c != i1[p] as usize)
                .flat_map(|c| centroids[c * d..(c + 1) * d].iter().copied())
                .collect();
            let t = CentroidTable::new(&others, k - 1, d).unwrap();
            let (mut i, mut v) = ([0u32], [0f32]);
            assign_nearest(&points[p * d..(p + 1) * d], &t, &mut i, &mut v).unwrap();
            assert_eq!(s2[p], v[0], "d {d} point {p}");
        }
    }
}
