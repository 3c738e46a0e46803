//! The fused CPU kernels against their plain-op twins: values and gradients (through candle's
//! autograd of the plain ops), on shapes with odd widths, with every compiled copy of the kernels
//! this CPU can run (AVX-512, AVX2 + FMA, baseline).

use candle_core::{Device, Tensor, Var};
use qn_kernels::simd::Level;
use qn_models::encoder::{fused, ops};

fn rand(shape: &[usize], seed: u64) -> Tensor {
    // A fixed pseudo-random fill: the comparison does not depend on candle's RNG.
    let n: usize = shape.iter().product();
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let v: Vec<f32> = (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
        })
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap()
}

/// Runs `f` once per instruction-set level this CPU has. Tests in this binary run in parallel and
/// the cap is process-wide, so a kernel may run at another level than the one named: every level
/// must pass every test anyway, and each level is certain to run here.
fn at_every_level(f: impl Fn(Level)) {
    let best = qn_kernels::simd::detected();
    for level in [Level::Baseline, Level::Avx2, Level::Avx512] {
        if level <= best {
            qn_kernels::simd::cap_level(level);
            f(level);
        }
    }
    qn_kernels::simd::cap_level(Level::Avx512);
}

/// Runs `f` on fresh variables, backpropagates `sum(out · r)`, returns the output and the gradients.
fn run(inputs: &[Tensor], f: impl Fn(&[Tensor]) -> Tensor) -> (Tensor, Vec<Tensor>) {
    let vars: Vec<Var> = inputs
        .iter()
        .map(|t| Var::from_tensor(t).unwrap())
        .collect();
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let out = f(&ts);
    let r = rand(out.dims(), 99);
    let g = (&out * &r).unwrap().sum_all().unwrap().backward().unwrap();
    let grads = vars
        .iter()
        .map(|v| g.get(v.as_tensor()).unwrap().clone())
        .collect();
    (out, grads)
}

#[test]
fn layer_norm_matches_the_plain_ops() {
    at_every_level(|level| {
        for (shape, h) in [
            (vec![3, 5, 37], 37),
            (vec![64, 384], 384),
            (vec![1, 1, 3], 3),
        ] {
            let x = rand(&shape, 1);
            let w = rand(&[h], 2);
            let b = rand(&[h], 3);
            let (y0, g0) = run(&[x.clone(), w.clone(), b.clone()], |t| {
                ops::layer_norm_reference(&t[0], &t[1], &t[2], 1e-5).unwrap()
            });
            let (y1, g1) = run(&[x, w, b], |t| {
                fused::layer_norm(&t[0], &t[1], &t[2], 1e-5).unwrap()
            });
            assert!(max_diff(&y0, &y1) < 1e-5, "{level:?} {shape:?} values");
            for (i, (a, b)) in g0.iter().zip(&g1).enumerate() {
                let scale = a
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap()
                    .max(1.0);
                assert!(
                    max_diff(a, b) / scale < 1e-4,
                    "{level:?} {shape:?} grad {i}: {}",
                    max_diff(a, b)
                );
            }
        }
    });
}

#[test]
fn gelu_matches_candle_and_its_derivative() {
    at_every_level(|level| {
        let x = rand(&[7, 301], 4);
        let (y0, g0) = run(std::slice::from_ref(&x), |t| t[0].gelu_erf().unwrap());
        let (y1, g1) = run(&[x], |t| fused::gelu_erf(&t[0]).unwrap());
        assert!(
            max_diff(&y0, &y1) < 1e-6,
            "{level:?} values {}",
            max_diff(&y0, &y1)
        );
        assert!(
            max_diff(&g0[0], &g1[0]) < 1e-5,
            "{level:?} grads {}",
            max_diff(&g0[0], &g1[0])
        );
    });
}

#[test]
fn softmax_matches_the_plain_ops_with_masked_columns() {
    at_every_level(|level| {
        let mut x = rand(&[2, 3, 5, 9], 5);
        // Masked positions as the encoder adds them.
        let bias = Tensor::from_vec(
            (0..9).map(|j| if j > 6 { -1e30f32 } else { 0.0 }).collect(),
            (1, 1, 1, 9),
            &Device::Cpu,
        )
        .unwrap();
        x = x.broadcast_add(&bias).unwrap();
        let (y0, g0) = run(std::slice::from_ref(&x), |t| {
            ops::softmax_reference(&t[0]).unwrap()
        });
        let (y1, g1) = run(&[x], |t| fused::softmax_last_dim(&t[0]).unwrap());
        assert!(max_diff(&y0, &y1) < 1e-6, "{level:?} values");
        assert!(max_diff(&g0[0], &g1[0]) < 1e-6, "{level:?} grads");
    });
}

/// The fused attention core against its plain-op twin, with a padding mask and with dropout: the
/// context and the gradients of q, k and v.
#[test]
fn attention_matches_the_plain_ops() {
    at_every_level(|level| {
        use qn_models::encoder::attention::{
            self_attention, self_attention_reference, ProbsDropout,
        };
        for (b, l, heads, d, p) in [
            (2, 7, 3, 5, 0.0),
            (3, 16, 2, 8, 0.1),
            (1, 1, 1, 4, 0.0),
            (2, 33, 4, 6, 0.5),
        ] {
            let h = heads * d;
            let (q, k, v) = (
                rand(&[b, l, h], 1),
                rand(&[b, l, h], 2),
                rand(&[b, l, h], 3),
            );
            // The last sequence ends with padding: its keys must not be attended to.
            let mut mask = vec![0f32; b * l];
            for j in l.saturating_sub(2).max(1)..l {
                mask[(b - 1) * l + j] = -1e30;
            }
            let bias = Tensor::from_vec(mask, (b, 1, 1, l), &Device::Cpu).unwrap();
            let drop = (p > 0.0).then_some(ProbsDropout { p, seed: 17 });
            let (y, g) = run(&[q.clone(), k.clone(), v.clone()], |t| {
                self_attention(&t[0], &t[1], &t[2], &bias, heads, drop).unwrap()
            });
            let (yr, gr) = run(&[q, k, v], |t| {
                self_attention_reference(&t[0], &t[1], &t[2], &bias, heads, drop).unwrap()
            });
            let scale = 1.0 + max_abs(&yr);
            assert!(
                max_diff(&y, &yr) < 1e-5 * scale,
                "{level:?} context {b}x{l}x{h} p={p}"
            );
            for (name, (a, r)) in ["q", "k", "v"].iter().zip(g.iter().zip(&gr)) {
                let tol = 1e-4 * (1.0 + max_abs(r));
                assert!(
                    max_diff(a, r) < tol,
                    "{level:?} d{name} {b}x{l}x{h} p={p}: {}",
                    max_diff(a, r)
                );
            }
            // A dropout mask actually dropped something, and the seed decides which.
            if let Some(drop) = drop {
                let again = self_attention(
                    &rand(&[b, l, h], 1),
                    &rand(&[b, l, h], 2),
                    &rand(&[b, l, h], 3),
                    &bias,
                    heads,
                    Some(drop),
                )
                .unwrap();
                assert_eq!(max_diff(&again, &y), 0.0, "same seed, same mask");
                let other = ProbsDropout { seed: 18, ..drop };
                let y2 = self_attention(
                    &rand(&[b, l, h], 1),
                    &rand(&[b, l, h], 2),
                    &rand(&[b, l, h], 3),
                    &bias,
                    heads,
                    Some(other),
                )
                .unwrap();
                assert!(max_diff(&y2, &y) > 0.0, "another seed, another mask");
            }
        }
    });
}

#[test]
fn attention_rejects_heads_that_do_not_divide() {
    use qn_models::encoder::attention::self_attention;
    let x = rand(&[1, 3, 10], 1);
    let bias = Tensor::zeros((1, 1, 1, 3), candle_core::DType::F32, &Device::Cpu).unwrap();
    let err = self_attention(&x, &x, &x, &bias, 3, None).unwrap_err();
    assert!(
        err.to_string().contains("not a multiple of 3 heads"),
        "{err}"
    );
}

fn max_abs(t: &Tensor) -> f32 {
    t.abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap()
}

/// Dropout and dropout-plus-residual as single nodes against `x ⊙ mask (+ r)` from plain ops:
/// values and gradients, the drop rate, and a mask that is a function of its seed.
#[test]
fn dropout_and_dropout_add_match_the_plain_ops() {
    use qn_train::NoiseStep;
    let at = NoiseStep { step: 7, micro: 1 };
    let (x, r) = (rand(&[5, 11, 37], 6), rand(&[5, 11, 37], 7));
    for p in [0.1, 0.5] {
        let mask = ops::dropout_mask(ops::mask_seed(3, at, 9), x.elem_count(), p);
        let dropped = mask.iter().filter(|&&m| m == 0.0).count() as f64 / mask.len() as f64;
        assert!((dropped - p).abs() < 0.05, "p={p}: dropped {dropped}");
        let (y0, g0) = run(std::slice::from_ref(&x), |t| {
            ops::dropout_reference(&t[0], mask.clone()).unwrap()
        });
        let (y1, g1) = run(std::slice::from_ref(&x), |t| {
            ops::dropout(&t[0], p, 3, at, 9).unwrap()
        });
        assert_eq!(max_diff(&y0, &y1), 0.0, "p={p} values");
        assert_eq!(max_diff(&g0[0], &g1[0]), 0.0, "p={p} grads");
        let (y0, g0) = run(&[x.clone(), r.clone()], |t| {
            (ops::dropout_reference(&t[0], mask.clone()).unwrap() + &t[1]).unwrap()
        });
        let (y1, g1) = run(&[x.clone(), r.clone()], |t| {
            ops::dropout_add(&t[0], &t[1], p, 3, at, 9).unwrap()
        });
        assert_eq!(max_diff(&y0, &y1), 0.0, "p={p} dropout_add values");
        for i in 0..2 {
            assert_eq!(max_diff(&g0[i], &g1[i]), 0.0, "p={p} dropout_add grad {i}");
        }
    }
    let other = ops::dropout(&x, 0.5, 3, at, 10).unwrap();
    assert!(max_diff(&other, &ops::dropout(&x, 0.5, 3, at, 9).unwrap()) > 0.0);
    assert_eq!(max_diff(&ops::dropout(&x, 0.0, 3, at, 9).unwrap(), &x), 0.0);
}

/// The mask is drawn as block fills of the ChaCha8 stream, chunk by chunk on several threads: the
/// same draws, in the same order, as one `random::<u32>()` per element, so masks (and resumed
/// runs) do not depend on how the stream is read.
#[test]
fn dropout_mask_block_draw_equals_one_draw_at_a_time() {
    use rand::{Rng, SeedableRng};
    // The last spans several of the threads' chunks (65,536 draws each) and ends inside one.
    for (seed, n, p) in [
        (1u64, 1usize, 0.1),
        (2, 17, 0.3),
        (3, 4099, 0.1),
        (4, 200_003, 0.1),
    ] {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let threshold = (p * 4_294_967_296.0) as u64;
        let keep = 1.0 / (1.0 - p) as f32;
        let one_by_one: Vec<f32> = (0..n)
            .map(|_| {
                if (rng.random::<u32>() as u64) < threshold {
                    0.0
                } else {
                    keep
                }
            })
            .collect();
        assert_eq!(
            ops::dropout_mask(seed, n, p),
            one_by_one,
            "seed {seed}, n {n}"
        );
    }
}
