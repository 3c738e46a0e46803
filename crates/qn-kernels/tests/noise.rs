//! Noise masks: rates, unbiasedness, gradients (against finite differences), no mutation.

mod common;

use candle_core::{DType, Device, Tensor, Var};
use common::{gaussian, rng};
use qn_kernels::layout::BlockLayout;
use qn_kernels::noise::{block_drop, pq_noise, scalar_noise, BlockMask, NoiseRate};
use qn_kernels::pq::{encode, KMeansConfig};
use qn_kernels::scalar::{fake_quantize, observe, ScalarConfig};

fn layouts() -> Vec<(BlockLayout, &'static str)> {
    vec![
        (BlockLayout::linear("fc", &[64, 128], 8).unwrap(), "linear"),
        (
            BlockLayout::embedding("emb", &[100, 32], 8).unwrap(),
            "embedding",
        ),
        (
            BlockLayout::conv2d("conv3x3", &[16, 8, 3, 3], 9).unwrap(),
            "conv 3x3",
        ),
        (
            BlockLayout::conv2d("conv1x1", &[32, 16, 1, 1], 4).unwrap(),
            "conv 1x1",
        ),
        (
            BlockLayout::conv2d("depthwise", &[32, 1, 3, 3], 9).unwrap(),
            "depthwise",
        ),
    ]
}

fn values(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()
}

#[test]
fn dropped_fraction_is_within_four_sigma_of_p() {
    let layout = BlockLayout::linear("fc", &[1024, 4096], 8).unwrap();
    let n = layout.n_blocks() as f64;
    let mut r = rng(1);
    for p in [0.05, 0.1, 0.5, 0.9] {
        let mask = BlockMask::sample(&layout, NoiseRate::new(p).unwrap(), &mut r);
        let sigma = (p * (1.0 - p) / n).sqrt();
        assert!(
            (mask.noised_fraction() - p).abs() < 4.0 * sigma,
            "p = {p}: {}",
            mask.noised_fraction()
        );
    }
}

#[test]
fn block_drop_drops_whole_blocks_and_is_unbiased() {
    for (layout, what) in layouts() {
        let w = Tensor::from_vec(
            gaussian(layout.numel(), 1.0, 2),
            layout.shape(),
            &Device::Cpu,
        )
        .unwrap();
        let p = NoiseRate::new(0.25).unwrap();
        let mut r = rng(3);
        let draws = 400;
        let mut sum = vec![0f64; layout.numel()];
        for _ in 0..draws {
            let mask = BlockMask::sample(&layout, p, &mut r);
            let noisy = block_drop(&w, &mask, p).unwrap();
            // Each block is all zero or all scaled by 1 / (1 - p), as the mask says.
            let sub = values(&layout.to_subvectors(&noisy).unwrap());
            let orig = values(&layout.to_subvectors(&w).unwrap());
            let bs = layout.block_size();
            for o in 0..layout.rows() {
                for b in 0..layout.blocks_per_row() {
                    let j = layout.subvector_index(o, b);
                    let dropped = mask.noised()[o * layout.blocks_per_row() + b];
                    for e in 0..bs {
                        let expect = if dropped {
                            0.0
                        } else {
                            orig[j * bs + e] / 0.75
                        };
                        assert!(
                            (sub[j * bs + e] - expect).abs() < 1e-5,
                            "{what}: block ({o}, {b})"
                        );
                    }
                }
            }
            sum.iter_mut()
                .zip(values(&noisy))
                .for_each(|(s, v)| *s += v);
        }
        // E[noisy] = W: the mean of the draws is within 5 standard errors of W everywhere.
        let w = values(&w);
        let se_factor = (0.25f64 / 0.75 / draws as f64).sqrt();
        for (i, (s, wi)) in sum.iter().zip(&w).enumerate() {
            let mean = s / draws as f64;
            assert!(
                (mean - wi).abs() <= 5.0 * se_factor * wi.abs() + 1e-9,
                "{what}: element {i}: {mean} vs {wi}"
            );
        }
    }
}

#[test]
fn rates_zero_and_one() {
    let layout = BlockLayout::linear("fc", &[8, 16], 4).unwrap();
    let w = Tensor::from_vec(gaussian(128, 1.0, 4), (8, 16), &Device::Cpu).unwrap();
    let zero = NoiseRate::new(0.0).unwrap();
    let one = NoiseRate::new(1.0).unwrap();
    let mask0 = BlockMask::sample(&layout, zero, &mut rng(1));
    assert_eq!(values(&block_drop(&w, &mask0, zero).unwrap()), values(&w));
    let mask1 = BlockMask::sample(&layout, one, &mut rng(1));
    assert!(values(&block_drop(&w, &mask1, one).unwrap())
        .iter()
        .all(|&v| v == 0.0));
    // p = 1 scalar noise is ordinary fake quantization (QAT).
    let params = observe(&w, &ScalarConfig::int4()).unwrap();
    let per_element = BlockLayout::linear("fc", &[8, 16], 1).unwrap();
    let all = BlockMask::sample(&per_element, one, &mut rng(2));
    assert_eq!(
        values(&scalar_noise(&w, &params, &all).unwrap()),
        values(&fake_quantize(&w, &params).unwrap())
    );
    assert!(NoiseRate::new(1.5).is_err() && NoiseRate::new(-0.1).is_err());
}

/// `L(w) = sum(g * f(w))`; returns autograd's dL/dw and the noisy output.
fn autograd(w: &Tensor, g: &Tensor, f: &dyn Fn(&Tensor) -> Tensor) -> (Vec<f64>, Tensor) {
    let var = Var::from_tensor(w).unwrap();
    let out = f(var.as_tensor());
    let loss = (out.clone() * g).unwrap().sum_all().unwrap();
    let grads = loss.backward().unwrap();
    (values(grads.get(var.as_tensor()).unwrap()), out)
}

/// Central finite difference of `L` at element `i`.
fn finite_difference(
    w: &Tensor,
    g: &Tensor,
    f: &dyn Fn(&Tensor) -> Tensor,
    i: usize,
    h: f64,
) -> f64 {
    let base = values(w);
    let at = |delta: f64| {
        let mut v = base.clone();
        v[i] += delta;
        let t = Tensor::from_vec(v, w.dims(), &Device::Cpu).unwrap();
        values(&(f(&t) * g).unwrap().sum_all().unwrap())[0]
    };
    (at(h) - at(-h)) / (2.0 * h)
}

#[test]
fn block_drop_gradient_matches_finite_differences() {
    let layout = BlockLayout::conv2d("conv", &[4, 2, 3, 3], 9).unwrap();
    let w = Tensor::from_vec(gaussian(72, 1.0, 5), layout.shape(), &Device::Cpu)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap();
    let g = Tensor::from_vec(gaussian(72, 1.0, 6), layout.shape(), &Device::Cpu)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap();
    let p = NoiseRate::new(0.3).unwrap();
    let mask = BlockMask::sample(&layout, p, &mut rng(7));
    let f = |t: &Tensor| block_drop(t, &mask, p).unwrap();
    let (grad, _) = autograd(&w, &g, &f);
    assert_eq!(grad.len(), 72);
    for (i, &gi) in grad.iter().enumerate() {
        let fd = finite_difference(&w, &g, &f, i, 1e-3);
        assert!(
            (gi - fd).abs() < 1e-8,
            "element {i}: autograd {gi} vs finite difference {fd}"
        );
    }
}

#[test]
fn scalar_noise_gradients_kept_exact_noised_straight_through() {
    let layout = BlockLayout::linear("fc", &[6, 20], 1).unwrap();
    let mut wv = gaussian(120, 1.0, 8);
    wv[3] = 9.0; // far outside any range observed below
    let w32 = Tensor::from_vec(wv, (6, 20), &Device::Cpu).unwrap();
    let w = w32.to_dtype(DType::F64).unwrap();
    let g = Tensor::from_vec(gaussian(120, 1.0, 9), (6, 20), &Device::Cpu)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap();
    // Parameters observed on a clipped copy, so that element 3 lies outside the grid.
    let params = observe(&w32.clamp(-3f32, 3f32).unwrap(), &ScalarConfig::int4()).unwrap();
    let mut flags = vec![false; 120];
    for i in (0..120).step_by(3) {
        flags[i] = true;
    }
    let mask = BlockMask::from_vec(&layout, flags.clone()).unwrap();
    let f = |t: &Tensor| scalar_noise(t, &params, &mask).unwrap();
    let (grad, out) = autograd(&w, &g, &f);
    let fq = values(&fake_quantize(&w32, &params).unwrap());
    let (gv, wv, out) = (values(&g), values(&w), values(&out));
    for i in 0..120 {
        if flags[i] {
            // The value is exactly the fake-quantized one, clamped (never reflected) when out of range.
            assert_eq!(out[i] as f32, fq[i] as f32, "element {i}");
            let expect = if i == 3 { 0.0 } else { gv[i] };
            assert_eq!(grad[i], expect, "element {i}: straight-through gradient");
        } else {
            assert_eq!(out[i], wv[i], "element {i}: kept values are exact");
            let fd = finite_difference(&w, &g, &f, i, 1e-4);
            assert!(
                (grad[i] - fd).abs() < 1e-8,
                "element {i}: {} vs {fd}",
                grad[i]
            );
        }
    }
    assert!(
        out[3] < 3.5,
        "the out-of-range element is clamped: {}",
        out[3]
    );
}

#[test]
fn pq_noise_replaces_blocks_by_their_nearest_centroid() {
    let layout = BlockLayout::linear("fc", &[32, 64], 4).unwrap();
    let w32 = Tensor::from_vec(gaussian(2048, 1.0, 10), (32, 64), &Device::Cpu).unwrap();
    let codes = encode(
        &w32,
        &layout,
        &KMeansConfig::new(16).with_iters(5),
        &mut |_| {},
    )
    .unwrap();
    let decoded = values(&codes.decode().unwrap());
    let w = w32.to_dtype(DType::F64).unwrap();
    let g = Tensor::from_vec(gaussian(2048, 1.0, 11), (32, 64), &Device::Cpu)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap();
    let mask = BlockMask::sample(&layout, NoiseRate::new(0.5).unwrap(), &mut rng(12));
    let f = |t: &Tensor| pq_noise(t, &codes, &mask).unwrap();
    let (grad, out) = autograd(&w, &g, &f);
    let (gv, wv, out) = (values(&g), values(&w), values(&out));
    let bpr = layout.blocks_per_row();
    for o in 0..32 {
        for b in 0..bpr {
            let noised = mask.noised()[o * bpr + b];
            for e in 0..4 {
                let i = o * 64 + b * 4 + e;
                // The weight was just encoded, so its nearest centroid is its own code.
                let expect = if noised {
                    decoded[i] as f32 as f64
                } else {
                    wv[i]
                };
                assert!((out[i] - expect).abs() < 1e-6, "element {i}");
                assert_eq!(
                    grad[i], gv[i],
                    "element {i}: gradient passes straight through"
                );
            }
        }
    }
    let i = (0..2048)
        .find(|i| !mask.noised()[(i / 64) * bpr + (i % 64) / 4])
        .unwrap();
    assert!((finite_difference(&w, &g, &f, i, 1e-4) - gv[i]).abs() < 1e-8);
}

#[test]
fn noise_never_mutates_the_weight() {
    let layout = BlockLayout::linear("fc", &[16, 32], 4).unwrap();
    let w = Tensor::from_vec(gaussian(512, 1.0, 13), (16, 32), &Device::Cpu).unwrap();
    let var = Var::from_tensor(&w).unwrap();
    let before: Vec<u32> = w
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .map(|v| v.to_bits())
        .collect();
    let p = NoiseRate::new(0.5).unwrap();
    let codes = encode(
        &w,
        &layout,
        &KMeansConfig::new(8).with_iters(2),
        &mut |_| {},
    )
    .unwrap();
    let params = observe(&w, &ScalarConfig::int4()).unwrap();
    let mut r = rng(14);
    for _ in 0..20 {
        let mask = BlockMask::sample(&layout, p, &mut r);
        let a = block_drop(var.as_tensor(), &mask, p).unwrap();
        let b = pq_noise(var.as_tensor(), &codes, &mask).unwrap();
        let c = scalar_noise(var.as_tensor(), &params, &mask).unwrap();
        let loss = ((a + b).unwrap() + c)
            .unwrap()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap();
        let _ = loss.backward().unwrap();
    }
    let after: Vec<u32> = var
        .as_tensor()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .map(|v| v.to_bits())
        .collect();
    assert_eq!(before, after);
}

#[test]
fn mismatched_shapes_are_errors() {
    let layout = BlockLayout::linear("fc", &[8, 16], 4).unwrap();
    let mask = BlockMask::sample(&layout, NoiseRate::new(0.1).unwrap(), &mut rng(1));
    let w = Tensor::zeros((8, 12), DType::F32, &Device::Cpu).unwrap();
    let err = block_drop(&w, &mask, NoiseRate::new(0.1).unwrap())
        .unwrap_err()
        .to_string();
    assert!(err.contains("[8, 12]") && err.contains("[8, 16]"), "{err}");
    assert!(BlockMask::from_vec(&layout, vec![true; 3]).is_err());
}

#[test]
fn host_expanded_mask_matches_the_tensor_expansion() {
    for (layout, what) in layouts() {
        let mask = BlockMask::sample(&layout, NoiseRate::new(0.3).unwrap(), &mut rng(15));
        let host = values(&mask.to_tensor(DType::F32, &Device::Cpu).unwrap());
        let flags: Vec<f32> = mask.noised().iter().map(|&b| b as u8 as f32).collect();
        let per_block = Tensor::from_vec(
            flags,
            (layout.rows(), layout.blocks_per_row()),
            &Device::Cpu,
        )
        .unwrap();
        let reference = values(&layout.expand_block_values(&per_block).unwrap());
        assert_eq!(host, reference, "{what}");
        let u8_mask = mask.to_tensor(DType::U8, &Device::Cpu).unwrap();
        assert_eq!(values(&u8_mask), reference, "{what}: u8");
    }
}

#[test]
fn fused_block_drop_matches_its_reference_with_gradients() {
    for (layout, what) in layouts() {
        let p = NoiseRate::new(0.3).unwrap();
        let mask = BlockMask::sample(&layout, p, &mut rng(16));
        for dtype in [DType::F32, DType::F64] {
            let w = Tensor::from_vec(
                gaussian(layout.numel(), 1.0, 17),
                layout.shape(),
                &Device::Cpu,
            )
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
            let g = Tensor::from_vec(
                gaussian(layout.numel(), 1.0, 18),
                layout.shape(),
                &Device::Cpu,
            )
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
            let run = |f: &dyn Fn(&Tensor) -> Tensor| {
                let v = Var::from_tensor(&w).unwrap();
                let out = f(v.as_tensor());
                let grads = (out.clone() * &g)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap();
                (values(&out), values(grads.get(v.as_tensor()).unwrap()))
            };
            let fused = run(&|t| block_drop(t, &mask, p).unwrap());
            let reference = run(&|t| qn_kernels::noise::block_drop_reference(t, &mask, p).unwrap());
            // The reference builds its mask in f32, so for f64 weights its 1/(1-p) carries f32
            // rounding; the fused op uses the f64 scale.
            let tol = if dtype == DType::F32 { 0.0 } else { 1e-7 };
            for (a, b) in [(&fused.0, &reference.0), (&fused.1, &reference.1)] {
                assert_eq!(a.len(), b.len());
                for (i, (x, y)) in a.iter().zip(b.iter()).enumerate() {
                    assert!(
                        (x - y).abs() <= tol * y.abs(),
                        "{what} {dtype:?} element {i}: {x} vs {y}"
                    );
                }
            }
        }
    }
}

#[test]
fn fused_noisy_matmul_matches_its_reference_with_gradients() {
    let layout = BlockLayout::linear("fc", &[48, 64], 8).unwrap();
    let p = NoiseRate::new(0.25).unwrap();
    let mask = BlockMask::sample(&layout, p, &mut rng(19));
    let x0 = Tensor::from_vec(gaussian(10 * 64, 1.0, 20), (10, 64), &Device::Cpu).unwrap();
    let w0 = Tensor::from_vec(gaussian(48 * 64, 1.0, 21), (48, 64), &Device::Cpu).unwrap();
    let g = Tensor::from_vec(gaussian(10 * 48, 1.0, 22), (10, 48), &Device::Cpu).unwrap();
    let run = |f: &dyn Fn(&Tensor, &Tensor) -> Tensor| {
        let (x, w) = (
            Var::from_tensor(&x0).unwrap(),
            Var::from_tensor(&w0).unwrap(),
        );
        let y = f(x.as_tensor(), w.as_tensor());
        let grads = (y.clone() * &g)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        [
            values(&y),
            values(grads.get(x.as_tensor()).unwrap()),
            values(grads.get(w.as_tensor()).unwrap()),
        ]
    };
    let fused = run(&|x, w| qn_kernels::noise::block_drop_matmul(x, w, &mask, p).unwrap());
    let reference =
        run(&|x, w| qn_kernels::noise::block_drop_matmul_reference(x, w, &mask, p).unwrap());
    for (what, (a, b)) in ["y", "dx", "dw"].iter().zip(fused.iter().zip(&reference)) {
        assert_eq!(a.len(), b.len());
        for (i, (u, v)) in a.iter().zip(b).enumerate() {
            // Both are f32 GEMMs, summed in possibly different orders.
            assert!(
                (u - v).abs() <= 1e-4 * (1.0 + v.abs()),
                "{what}[{i}]: {u} vs {v}"
            );
        }
    }
    // Dropped blocks get exactly zero gradient.
    let bpr = layout.blocks_per_row();
    for (j, &dropped) in mask.noised().iter().enumerate() {
        if dropped {
            let (o, b) = (j / bpr, j % bpr);
            assert!(fused[2][o * 64 + b * 8..o * 64 + b * 8 + 8]
                .iter()
                .all(|&v| v == 0.0));
        }
    }
}

#[test]
fn noise_free_linear_matmul_matches_candles_matmul_with_gradients() {
    let x0 = Tensor::from_vec(gaussian(10 * 64, 1.0, 30), (10, 64), &Device::Cpu).unwrap();
    let w0 = Tensor::from_vec(gaussian(48 * 64, 1.0, 31), (48, 64), &Device::Cpu).unwrap();
    let g = Tensor::from_vec(gaussian(10 * 48, 1.0, 32), (10, 48), &Device::Cpu).unwrap();
    let run = |f: &dyn Fn(&Tensor, &Tensor) -> Tensor| {
        let (x, w) = (
            Var::from_tensor(&x0).unwrap(),
            Var::from_tensor(&w0).unwrap(),
        );
        let y = f(x.as_tensor(), w.as_tensor());
        let grads = (y.clone() * &g)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        [
            values(&y),
            values(grads.get(x.as_tensor()).unwrap()),
            values(grads.get(w.as_tensor()).unwrap()),
        ]
    };
    let fused = run(&|x, w| qn_kernels::noise::linear_matmul(x, w).unwrap());
    let plain = run(&|x, w| x.matmul(&w.t().unwrap()).unwrap());
    for (what, (a, b)) in ["y", "dx", "dw"].iter().zip(fused.iter().zip(&plain)) {
        for (i, (u, v)) in a.iter().zip(b).enumerate() {
            assert!(
                (u - v).abs() <= 1e-4 * (1.0 + v.abs()),
                "{what}[{i}]: {u} vs {v}"
            );
        }
    }
}

/// The bias folded into the fused matmuls (one graph node) against the separate matmul and
/// `broadcast_add`: values and the gradients of x, w and b, with and without block drop.
#[test]
fn fused_matmuls_with_bias_match_matmul_then_broadcast_add() {
    let layout = BlockLayout::linear("fc", &[48, 64], 8).unwrap();
    let p = NoiseRate::new(0.25).unwrap();
    let mask = BlockMask::sample(&layout, p, &mut rng(40));
    // Leading rows not a multiple of the bias kernel's rows per task.
    let x0 = Tensor::from_vec(gaussian(1500 * 64, 1.0, 41), (1500, 64), &Device::Cpu).unwrap();
    let w0 = Tensor::from_vec(gaussian(48 * 64, 1.0, 42), (48, 64), &Device::Cpu).unwrap();
    let b0 = Tensor::from_vec(gaussian(48, 1.0, 43), 48, &Device::Cpu).unwrap();
    let g = Tensor::from_vec(gaussian(1500 * 48, 1.0, 44), (1500, 48), &Device::Cpu).unwrap();
    let run = |f: &dyn Fn(&Tensor, &Tensor, &Tensor) -> Tensor| {
        let vars = [&x0, &w0, &b0].map(|t| Var::from_tensor(t).unwrap());
        let y = f(
            vars[0].as_tensor(),
            vars[1].as_tensor(),
            vars[2].as_tensor(),
        );
        let grads = (y.clone() * &g)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let mut out = vec![values(&y)];
        out.extend(
            vars.iter()
                .map(|v| values(grads.get(v.as_tensor()).unwrap())),
        );
        out
    };
    use qn_kernels::noise::{
        block_drop_matmul_bias, block_drop_matmul_reference, linear_matmul_bias,
    };
    type Layer<'a> = Box<dyn Fn(&Tensor, &Tensor, &Tensor) -> Tensor + 'a>;
    let cases: [(&str, Layer, Layer); 2] = [
        (
            "exact",
            Box::new(|x, w, b| linear_matmul_bias(x, w, Some(b)).unwrap()),
            Box::new(|x, w, b| x.matmul(&w.t().unwrap()).unwrap().broadcast_add(b).unwrap()),
        ),
        (
            "block drop",
            Box::new(|x, w, b| block_drop_matmul_bias(x, w, Some(b), &mask, p).unwrap()),
            Box::new(|x, w, b| {
                block_drop_matmul_reference(x, w, &mask, p)
                    .unwrap()
                    .broadcast_add(b)
                    .unwrap()
            }),
        ),
    ];
    for (case, fused, plain) in &cases {
        let (a, b) = (run(fused.as_ref()), run(plain.as_ref()));
        for (what, (u, v)) in ["y", "dx", "dw", "db"].iter().zip(a.iter().zip(&b)) {
            assert_eq!(u.len(), v.len(), "{case} {what}");
            for (i, (u, v)) in u.iter().zip(v).enumerate() {
                // f32 GEMMs and column sums, summed in different orders.
                assert!(
                    (u - v).abs() <= 1e-3 * (1.0 + v.abs()),
                    "{case} {what}[{i}]: {u} vs {v}"
                );
            }
        }
    }
    // A bias of the wrong length is an error naming it, not a panic.
    let short = Tensor::zeros(47, DType::F32, &Device::Cpu).unwrap();
    let err = linear_matmul_bias(&x0, &w0, Some(&short))
        .unwrap_err()
        .to_string();
    assert!(err.contains("bias"), "{err}");
}

/// PyTorch's fake-quantize rule at both ends of the grid: the gradient passes where the rounded code
/// is inside `qmin..=qmax`, so a value less than half a step outside the range keeps it, and one more
/// than half a step outside loses it.
#[test]
fn scalar_straight_through_gate_at_both_boundaries() {
    use qn_kernels::scalar::{observe_range, ParamView, Scheme};
    for scheme in [Scheme::Affine, Scheme::Symmetric] {
        let cfg = ScalarConfig::int4().with_scheme(scheme);
        let view = ParamView::new("w", &[1, 8], cfg.granularity).unwrap();
        let params = observe_range(&[-1.0], &[1.0], view, &cfg, &Device::Cpu).unwrap();
        let (lo, hi) = params.clamp_range().unwrap();
        let (lo, hi) = (
            lo.flatten_all().unwrap().to_vec1::<f32>().unwrap()[0] as f64,
            hi.flatten_all().unwrap().to_vec1::<f32>().unwrap()[0] as f64,
        );
        let step = params
            .scale
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()[0] as f64;
        let probes = [
            hi - 0.2 * step, // inside
            hi + 0.4 * step, // rounds to qmax: passes
            hi + 0.6 * step, // rounds past qmax: cut
            hi + 3.0 * step,
            lo + 0.2 * step,
            lo - 0.4 * step, // rounds to qmin: passes
            lo - 0.6 * step, // cut
            lo - 3.0 * step,
        ];
        let expect = [1.0, 1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0];
        let w = Tensor::from_vec(probes.to_vec(), (1, 8), &Device::Cpu).unwrap();
        let layout = BlockLayout::linear("w", &[1, 8], 1).unwrap();
        let mask = BlockMask::from_vec(&layout, vec![true; 8]).unwrap();
        let v = Var::from_tensor(&w).unwrap();
        let out = scalar_noise(v.as_tensor(), &params, &mask).unwrap();
        let grads = out.sum_all().unwrap().backward().unwrap();
        let grad = values(grads.get(v.as_tensor()).unwrap());
        assert_eq!(grad, expect.to_vec(), "{scheme:?}: gradient gate");
        // Values are the clamped grid points.
        let out = values(&out);
        assert!(
            (out[2] - hi).abs() < 1e-6 && (out[6] - lo).abs() < 1e-6,
            "{scheme:?}: {out:?}"
        );
        let gate = values(&qn_kernels::noise::straight_through_gate(&w, &params).unwrap());
        assert_eq!(gate, expect.to_vec());
    }
}

/// With the symmetric scheme, the largest positive weight is on the grid, so noising it does not
/// cut its gradient (the old `(qmax - qmin) / 2` scale left int4's top at 0.93 max|w|).
#[test]
fn symmetric_grid_represents_plus_and_minus_max_abs() {
    use qn_kernels::scalar::Scheme;
    let mut v = gaussian(256, 1.0, 33);
    let amax = v.iter().fold(0f32, |m, x| m.max(x.abs()));
    v[0] = amax; // the largest magnitude is positive
    v[1] = -amax;
    let w = Tensor::from_vec(v, (4, 64), &Device::Cpu).unwrap();
    for bits in [4u8, 8] {
        let cfg = ScalarConfig::new(bits)
            .unwrap()
            .with_scheme(Scheme::Symmetric);
        let params = observe(&w, &cfg).unwrap();
        let fq = values(&fake_quantize(&w, &params).unwrap());
        assert!(
            (fq[0] - amax as f64).abs() < 1e-6,
            "bits {bits}: +max -> {}",
            fq[0]
        );
        assert!(
            (fq[1] + amax as f64).abs() < 1e-6,
            "bits {bits}: -max -> {}",
            fq[1]
        );
        let gate = values(&qn_kernels::noise::straight_through_gate(&w, &params).unwrap());
        assert!(
            gate.iter().all(|&g| g == 1.0),
            "bits {bits}: every weight keeps its gradient"
        );
    }
}

/// The fused scalar-noise op against its plain-tensor twin: the same values and the same
/// gradients bit for bit, for per-tensor, per-channel and per-group parameters, int4 and int8,
/// element and block masks, a conv weight, and values beyond the grid (clamped: gradient 0).
#[test]
fn fused_scalar_noise_equals_its_reference() {
    use qn_kernels::noise::scalar_noise_reference;
    use qn_kernels::scalar::{observe_range, Granularity, ParamView, QParams};
    use rand::SeedableRng;
    type Noise = fn(&Tensor, &QParams, &BlockMask) -> qn_kernels::Result<Tensor>;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
    let cases: Vec<(&str, Vec<usize>, usize, Granularity, u8)> = vec![
        (
            "tensor int8 bs1",
            vec![24, 32],
            1,
            Granularity::PerTensor,
            8,
        ),
        (
            "channel int4 bs4",
            vec![24, 32],
            4,
            Granularity::PerChannel { axis: 0 },
            4,
        ),
        (
            "group int4 bs8",
            vec![16, 64],
            8,
            Granularity::PerGroup { size: 16 },
            4,
        ),
        (
            "conv channel int8 bs1",
            vec![8, 3, 3, 3],
            1,
            Granularity::PerChannel { axis: 0 },
            8,
        ),
    ];
    for (name, shape, bs, granularity, bits) in cases {
        let w = Tensor::randn(0f32, 1.0, shape.as_slice(), &Device::Cpu).unwrap();
        let cfg = ScalarConfig::new(bits)
            .unwrap()
            .with_granularity(granularity);
        // Ranges narrower than the data, so that some values are clamped.
        let view = ParamView::new("w", &shape, granularity).unwrap();
        let n = view.n_params();
        let (lo, hi) = (vec![-1.0f32; n], vec![1.2f32; n]);
        let params = observe_range(&lo, &hi, view, &cfg, &Device::Cpu).unwrap();
        let layout = if shape.len() == 4 {
            BlockLayout::conv2d("w", &shape, bs).unwrap()
        } else {
            BlockLayout::linear("w", &shape, bs).unwrap()
        };
        let mask = BlockMask::sample(&layout, NoiseRate::new(0.5).unwrap(), &mut rng);
        let run = |f: Noise| {
            let v = Var::from_tensor(&w).unwrap();
            let y = f(v.as_tensor(), &params, &mask).unwrap();
            // A non-uniform upstream gradient.
            let g = Tensor::arange(0f32, y.elem_count() as f32, &Device::Cpu)
                .unwrap()
                .reshape(y.dims())
                .unwrap();
            let grads = (y.clone() * g)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            (values(&y), values(grads.get(v.as_tensor()).unwrap()))
        };
        let (fused_y, fused_g) = run(scalar_noise);
        let (ref_y, ref_g) = run(scalar_noise_reference);
        assert_eq!(fused_y, ref_y, "{name}: values");
        assert_eq!(fused_g, ref_g, "{name}: gradients");
        assert!(fused_g.contains(&0.0), "{name}: some value is clamped");
    }
}
