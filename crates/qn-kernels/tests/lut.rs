//! Matmul from PQ codes against its plain twin (decode, then matmul) on random shapes: block sizes
//! that do not divide 8, K that is not a power of two, u16 codes, tails of fewer than 8 outputs.

use candle_core::{Device, Tensor};
use qn_kernels::layout::BlockLayout;
use qn_kernels::pq::{encode, pq_matmul_reference, Assignments, KMeansConfig, PqMatmul};

fn max_abs(t: &Tensor) -> f32 {
    t.abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

#[test]
fn table_matmul_equals_decode_then_matmul() {
    // (out, in, d, K): d = 8 as in the paper, d = 6 and 5 that do not divide 8, K = 100 and 300
    // (u16 codes), outputs that are not a multiple of the 8 SIMD lanes.
    for (i, &(rows, cols, d, k)) in [
        (48usize, 64usize, 8usize, 32usize),
        (37, 90, 6, 100),
        (300, 96, 4, 256),
        (70, 40, 5, 300),
        (513, 64, 8, 256),
    ]
    .iter()
    .enumerate()
    {
        let w = Tensor::randn(0f32, 0.05, (rows, cols), &Device::Cpu).unwrap();
        let layout = BlockLayout::linear("fc.weight", w.dims(), d).unwrap();
        let cfg = KMeansConfig::new(k).with_iters(3).with_seed(i as u64);
        let codes = encode(&w, &layout, &cfg, &mut |_| {}).unwrap();
        assert_eq!(
            matches!(codes.assignments, Assignments::U16(_)),
            k > 256,
            "code width"
        );
        let auto = PqMatmul::new(&codes).unwrap();
        // Tables always, the dense path always, and the per-call choice.
        let tables = auto.clone().with_max_table_rows(usize::MAX);
        let dense = auto.clone().with_max_table_rows(0);
        for shape in [
            vec![1, cols],
            vec![3, cols],
            vec![2, 2, cols],
            vec![20, cols],
        ] {
            let x = Tensor::randn(0f32, 1.0, shape.as_slice(), &Device::Cpu).unwrap();
            let r = pq_matmul_reference(&x, &codes).unwrap();
            let tol = 1e-4 * max_abs(&r);
            for (name, m) in [("auto", &auto), ("tables", &tables), ("dense", &dense)] {
                let y = m.forward(&x).unwrap();
                assert_eq!(y.dims(), r.dims());
                let diff = max_abs(&(&y - &r).unwrap());
                assert!(
                    diff <= tol,
                    "{name} {rows}x{cols} d {d} K {k} x {shape:?}: {diff} > {tol}"
                );
            }
        }
    }
}

/// `f` run in a pool of `threads` threads.
fn in_pool<R: Send>(threads: usize, f: impl FnOnce() -> R + Send) -> R {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap()
        .install(f)
}

#[test]
fn results_do_not_depend_on_the_thread_count() {
    let w = Tensor::randn(0f32, 0.05, (1000, 256), &Device::Cpu).unwrap();
    let layout = BlockLayout::linear("fc.weight", w.dims(), 8).unwrap();
    let codes = encode(
        &w,
        &layout,
        &KMeansConfig::new(256).with_iters(2),
        &mut |_| {},
    )
    .unwrap();
    let m = PqMatmul::new(&codes).unwrap();
    let x: Vec<f32> = (0..2 * 256).map(|i| (i as f32 * 0.37).sin()).collect();
    let run = |threads: usize| {
        let mut y = vec![0f32; 2 * 1000];
        in_pool(threads, || m.forward_slice(&x, 2, &mut y));
        y
    };
    assert_eq!(run(1), run(3));
    // The tiled decode + GEMM path, on a batch of 40 rows.
    let x: Vec<f32> = (0..40 * 256).map(|i| (i as f32 * 0.37).sin()).collect();
    let dense = |threads: usize| {
        let mut y = vec![0f32; 40 * 1000];
        in_pool(threads, || m.forward_dense(&x, 40, &mut y));
        y
    };
    assert_eq!(dense(1), dense(3));
}

#[test]
fn refuses_what_it_cannot_multiply_naming_the_shapes() {
    let w = Tensor::randn(0f32, 0.05, (16, 32), &Device::Cpu).unwrap();
    let layout = BlockLayout::linear("fc.weight", w.dims(), 8).unwrap();
    let codes = encode(
        &w,
        &layout,
        &KMeansConfig::new(16).with_iters(2),
        &mut |_| {},
    )
    .unwrap();
    let m = PqMatmul::new(&codes).unwrap();
    let x = Tensor::zeros((2, 31), candle_core::DType::F32, &Device::Cpu).unwrap();
    let err = m.forward(&x).unwrap_err().to_string();
    assert!(err.contains("31") && err.contains("32"), "{err}");
    let conv = Tensor::randn(0f32, 0.05, (16, 4, 3, 3), &Device::Cpu).unwrap();
    let layout = BlockLayout::conv2d("conv.weight", conv.dims(), 9).unwrap();
    let codes = encode(
        &conv,
        &layout,
        &KMeansConfig::new(16).with_iters(2),
        &mut |_| {},
    )
    .unwrap();
    let err = PqMatmul::new(&codes).unwrap_err().to_string();
    assert!(err.contains("[16, 4, 3, 3]"), "{err}");
}
