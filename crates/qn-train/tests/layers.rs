//! Quant-noise layers: rates, unbiasedness, eval determinism, gradients, PQ state, padding rows.

use candle_core::{DType, Device, ModuleT, Tensor, Var};
use candle_nn::Conv2dConfig;
use qn_train::kernels::{
    layout::BlockLayout,
    pq::KMeansConfig,
    scalar::{Granularity, ObserverKind},
};
use qn_train::layers::{QConv2d, QEmbedding, QLinear, QuantNoiseLayer};
use qn_train::{
    apply_noise, vars_without_gradient, CentroidGrad, NoiseConfig, NoiseStep, WeightState,
};

fn at(step: u64) -> NoiseStep {
    NoiseStep { step, micro: 0 }
}
use rand::SeedableRng;
use rand_distr::{Distribution, Normal};

fn gaussian(shape: &[usize], seed: u64) -> Tensor {
    let mut r = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|_| Normal::new(0.0f32, 1.0).unwrap().sample(&mut r))
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

fn var(shape: &[usize], seed: u64) -> Var {
    Var::from_tensor(&gaussian(shape, seed)).unwrap()
}

fn values(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()
}

fn bits(t: &Tensor) -> Vec<u32> {
    t.flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .map(|v| v.to_bits())
        .collect()
}

/// One layer of each kind, with the block size its noise uses.
fn layers() -> Vec<(Box<dyn QuantNoiseLayer>, usize)> {
    let conv = |shape: &[usize], groups: usize, seed| {
        QConv2d::new(
            "conv",
            var(shape, seed),
            None,
            Conv2dConfig {
                groups,
                padding: 1,
                ..Default::default()
            },
        )
        .unwrap()
    };
    vec![
        (
            Box::new(
                QLinear::new(
                    "encoder.layer.0.attention.self.query",
                    var(&[32, 64], 1),
                    None,
                )
                .unwrap(),
            ),
            8,
        ),
        (
            Box::new(
                QEmbedding::new("embeddings.word_embeddings", var(&[50, 16], 2), None).unwrap(),
            ),
            4,
        ),
        (Box::new(conv(&[8, 4, 3, 3], 1, 3)), 9),
        (Box::new(conv(&[16, 8, 1, 1], 1, 4)), 4),
        (Box::new(conv(&[8, 1, 3, 3], 8, 5)), 9),
    ]
}

#[test]
fn block_drop_rate_and_expectation_for_every_layer_kind() {
    for (layer, bs) in layers() {
        let p = 0.3;
        layer
            .set_noise(NoiseConfig::BlockDrop { p, block_size: bs }, 11)
            .unwrap();
        let w = layer.qweight().stored().unwrap();
        let exact = values(&w);
        let draws = 300;
        let (mut sum, mut dropped, mut total) = (vec![0f64; exact.len()], 0usize, 0usize);
        for d in 0..draws {
            layer.qweight().set_noise_step(at(d));
            let noisy = values(&layer.qweight().weight_t(true).unwrap());
            for (i, v) in noisy.iter().enumerate() {
                sum[i] += v;
                if *v == 0.0 {
                    dropped += 1;
                }
                total += 1;
            }
        }
        let frac = dropped as f64 / total as f64;
        let blocks = (total / bs) as f64;
        assert!(
            (frac - p).abs() < 4.0 * (p * (1.0 - p) / blocks).sqrt() + 1e-3,
            "{}: dropped {frac}",
            layer.name()
        );
        // E[noisy] = W within 5 standard errors per element.
        let se = (p / (1.0 - p) / draws as f64).sqrt();
        for (i, (s, w)) in sum.iter().zip(&exact).enumerate() {
            assert!(
                (s / draws as f64 - w).abs() <= 5.0 * se * w.abs() + 1e-9,
                "{}: element {i}",
                layer.name()
            );
        }
        // The stored weight is untouched by all those draws.
        assert_eq!(bits(&layer.qweight().stored().unwrap()), bits(&w));
        assert_eq!(layer.qweight().noise_step(), at(draws - 1));
    }
}

#[test]
fn eval_mode_is_noise_free_and_deterministic() {
    let fc = QLinear::new("fc", var(&[8, 16], 6), Some(var(&[8], 7))).unwrap();
    fc.set_noise(
        NoiseConfig::BlockDrop {
            p: 0.5,
            block_size: 4,
        },
        1,
    )
    .unwrap();
    let x = gaussian(&[3, 16], 8);
    let a = fc.forward_t(&x, false).unwrap();
    let b = fc.forward_t(&x, false).unwrap();
    assert_eq!(bits(&a), bits(&b));
    let w = fc.qweight().stored().unwrap();
    let expect = x
        .matmul(&w.t().unwrap())
        .unwrap()
        .broadcast_add(&fc.vars()[1].as_tensor().clone())
        .unwrap();
    assert_eq!(bits(&a), bits(&expect));
    assert_ne!(
        bits(&fc.forward_t(&x, true).unwrap()),
        bits(&a),
        "training mode is noisy"
    );
    assert_eq!(
        fc.qweight().noise_step(),
        at(0),
        "forward passes never advance the noise"
    );
}

#[test]
fn same_seed_same_masks() {
    let fc = QLinear::new("fc", var(&[8, 16], 9), None).unwrap();
    let cfg = NoiseConfig::BlockDrop {
        p: 0.5,
        block_size: 4,
    };
    let x = gaussian(&[2, 16], 10);
    let run = |fc: &QLinear| -> Vec<Vec<u32>> {
        (0..3)
            .map(|s| {
                fc.qweight().set_noise_step(at(s));
                bits(&fc.forward_t(&x, true).unwrap())
            })
            .collect()
    };
    fc.set_noise(cfg, 42).unwrap();
    let a = run(&fc);
    fc.set_noise(cfg, 42).unwrap();
    assert_eq!(a, run(&fc));
    assert_ne!(a[0], a[1], "another step draws another mask");
}

/// Masks are a function of (layer seed, global step, micro-batch) and of nothing else: a second
/// forward pass at the same step (weight tying), eval passes in between, or the order in which
/// steps are visited change nothing; another micro-batch of the same step draws another mask.
#[test]
fn masks_depend_on_seed_step_and_micro_batch_only() {
    let fc = QLinear::new("fc", var(&[8, 16], 9), None).unwrap();
    fc.set_noise(
        NoiseConfig::BlockDrop {
            p: 0.5,
            block_size: 4,
        },
        7,
    )
    .unwrap();
    let x = gaussian(&[2, 16], 10);
    let y = |step: u64, micro: u32| {
        fc.qweight().set_noise_step(NoiseStep { step, micro });
        bits(&fc.forward_t(&x, true).unwrap())
    };
    let step5 = y(5, 0);
    assert_eq!(y(5, 0), step5, "a tied second use at the same step");
    fc.forward_t(&x, false).unwrap();
    fc.forward_t(&x, false).unwrap();
    assert_eq!(y(5, 0), step5, "eval passes in between");
    let _ = (y(9, 0), y(2, 0));
    assert_eq!(y(5, 0), step5, "other steps visited before");
    assert_ne!(y(5, 1), step5, "micro-batch 1 of the same step");
    assert_eq!(y(5, 1), y(5, 1));
}

#[test]
fn block_drop_gradient_through_a_layer_matches_finite_differences() {
    let (w0, x, g) = (
        gaussian(&[4, 8], 12),
        gaussian(&[3, 8], 13),
        gaussian(&[3, 4], 14),
    );
    let cfg = NoiseConfig::BlockDrop {
        p: 0.4,
        block_size: 2,
    };
    let loss_of = |w: &Tensor| -> (f64, Option<Vec<f64>>) {
        let v = Var::from_tensor(&w.to_dtype(DType::F64).unwrap()).unwrap();
        let fc = QLinear::new("fc", v.clone(), None).unwrap();
        fc.set_noise(cfg, 5).unwrap();
        let y = fc
            .forward_t(&x.to_dtype(DType::F64).unwrap(), true)
            .unwrap();
        let loss = (y * g.to_dtype(DType::F64).unwrap())
            .unwrap()
            .sum_all()
            .unwrap();
        let grads = loss.backward().unwrap();
        (values(&loss)[0], grads.get(v.as_tensor()).map(values))
    };
    let (_, grad) = loss_of(&w0);
    let grad = grad.unwrap();
    let base = values(&w0);
    for i in 0..base.len() {
        let at = |d: f64| {
            let mut v = base.clone();
            v[i] += d;
            loss_of(&Tensor::from_vec(v, (4, 8), &Device::Cpu).unwrap()).0
        };
        let fd = (at(1e-3) - at(-1e-3)) / 2e-3;
        assert!(
            (grad[i] - fd).abs() < 1e-6,
            "element {i}: {} vs {fd}",
            grad[i]
        );
    }
}

/// `sum(y ⊙ g)` in f64: the scalar loss whose gradients the finite-difference tests check.
fn loss_against(y: &Tensor, g: &Tensor) -> f64 {
    values(
        &(y * g.to_dtype(DType::F64).unwrap())
            .unwrap()
            .sum_all()
            .unwrap(),
    )[0]
}

/// Asserts that `grad` (f32 autograd) matches central differences of `loss` around `base`, and
/// returns the differences.
fn assert_matches_finite_differences(
    what: &str,
    grad: &[f64],
    base: &[f64],
    loss: impl Fn(&[f64]) -> f64,
) -> Vec<f64> {
    (0..base.len())
        .map(|i| {
            let mut up = base.to_vec();
            let mut down = base.to_vec();
            up[i] += 1e-4;
            down[i] -= 1e-4;
            let fd = (loss(&up) - loss(&down)) / 2e-4;
            assert!(
                (grad[i] - fd).abs() <= 1e-4 * (1.0 + fd.abs()),
                "{what} element {i}: f32 autograd {} vs f64 finite difference {fd}",
                grad[i]
            );
            fd
        })
        .collect()
}

/// The production path — f32, block drop fused into the matmul (`block_drop_matmul`) — against
/// finite differences computed in f64 on the same masks (masks depend only on seed and step).
#[test]
fn fused_f32_block_drop_gradient_matches_f64_finite_differences() {
    let (w0, x, g) = (
        gaussian(&[6, 16], 70),
        gaussian(&[5, 16], 71),
        gaussian(&[5, 6], 72),
    );
    let cfg = NoiseConfig::BlockDrop {
        p: 0.3,
        block_size: 4,
    };
    let layer = |w: &Tensor| {
        let v = Var::from_tensor(w).unwrap();
        let fc = QLinear::new("fc", v.clone(), None).unwrap();
        fc.set_noise(cfg, 8).unwrap();
        fc.qweight().set_noise_step(at(3));
        (v, fc)
    };
    let (v, fc) = layer(&w0);
    let y = fc.forward_t(&x, true).unwrap();
    let grads = (y * &g).unwrap().sum_all().unwrap().backward().unwrap();
    let grad = values(grads.get(v.as_tensor()).unwrap());
    let loss64 = |w: &[f64]| -> f64 {
        let t = Tensor::from_vec(w.to_vec(), (6, 16), &Device::Cpu).unwrap();
        let (_, fc) = layer(&t);
        let y = fc
            .forward_t(&x.to_dtype(DType::F64).unwrap(), true)
            .unwrap();
        loss_against(&y, &g)
    };
    let fds = assert_matches_finite_differences("weight", &grad, &values(&w0), loss64);
    let dropped = fds.iter().filter(|&&fd| fd == 0.0).count();
    assert!(
        dropped > 0 && dropped < fds.len(),
        "{dropped} elements dropped"
    );
}

/// The fused op's input gradient is taken through the dropped weight of the same step, not the
/// stored one: a noisy layer's backward must see the weight its forward used.
#[test]
fn fused_f32_block_drop_input_gradient_matches_f64_finite_differences() {
    let (w, x0, g) = (
        gaussian(&[6, 16], 73),
        gaussian(&[5, 16], 74),
        gaussian(&[5, 6], 75),
    );
    let cfg = NoiseConfig::BlockDrop {
        p: 0.3,
        block_size: 4,
    };
    let layer = |w: &Tensor| {
        let fc = QLinear::new("fc", Var::from_tensor(w).unwrap(), None).unwrap();
        fc.set_noise(cfg, 9).unwrap();
        fc.qweight().set_noise_step(at(5));
        fc
    };
    let fc = layer(&w);
    let x = Var::from_tensor(&x0).unwrap();
    let y = fc.forward_t(x.as_tensor(), true).unwrap();
    let grads = (y * &g).unwrap().sum_all().unwrap().backward().unwrap();
    let grad = values(grads.get(x.as_tensor()).unwrap());
    let fc64 = layer(&w.to_dtype(DType::F64).unwrap());
    let loss64 = |x: &[f64]| -> f64 {
        let t = Tensor::from_vec(x.to_vec(), (5, 16), &Device::Cpu).unwrap();
        loss_against(&fc64.forward_t(&t, true).unwrap(), &g)
    };
    let fds = assert_matches_finite_differences("x", &grad, &values(&x0), loss64);
    // Against the noise-free weight the gradient would be g · w: it must differ from that.
    let clean = values(&g.matmul(&w).unwrap());
    assert!(
        clean.iter().zip(&fds).any(|(c, fd)| (c - fd).abs() > 1e-3),
        "the mask dropped nothing at p = 0.3"
    );
}

#[test]
fn scalar_noise_at_p_one_is_quantization_aware_training() {
    let fc = QLinear::new("fc", var(&[8, 32], 15), None).unwrap();
    fc.set_noise(
        NoiseConfig::Scalar {
            bits: 4,
            p: 1.0,
            block_size: 1,
            observer: ObserverKind::MinMax,
            granularity: Granularity::PerChannel { axis: 0 },
            update_every: 1,
        },
        0,
    )
    .unwrap();
    let w = fc.qweight().stored().unwrap();
    let params = qn_train::kernels::scalar::observe(
        &w,
        &qn_train::kernels::scalar::ScalarConfig::int4()
            .with_granularity(Granularity::PerChannel { axis: 0 }),
    )
    .unwrap();
    let fq = qn_train::kernels::scalar::fake_quantize(&w, &params).unwrap();
    assert_eq!(bits(&fc.qweight().weight_t(true).unwrap()), bits(&fq));
    fc.set_noise(
        NoiseConfig::Scalar {
            bits: 4,
            p: 0.0,
            block_size: 1,
            observer: ObserverKind::MinMax,
            granularity: Granularity::PerTensor,
            update_every: 1,
        },
        0,
    )
    .unwrap();
    assert_eq!(bits(&fc.qweight().weight_t(true).unwrap()), bits(&w));
}

fn distinct_blocks(w: &Tensor) -> Vec<Vec<u32>> {
    let layout = BlockLayout::linear("fc", w.dims(), 8).unwrap();
    let mut blocks: Vec<Vec<u32>> = layout
        .to_subvectors(w)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap()
        .iter()
        .map(|r| r.iter().map(|v| v.to_bits()).collect())
        .collect();
    blocks.sort();
    blocks.dedup();
    blocks
}

/// φ_PQ snaps blocks to centroids learned from the weight as it is now: within an `update_every`
/// interval the codebook is the one learned at its start; once the weight has moved and a new
/// interval begins, the noise snaps to the new weight's centroids.
#[test]
fn pq_noise_uses_current_centroids_and_keeps_the_weight() {
    let v = var(&[32, 64], 16);
    let fc = QLinear::new("fc", v.clone(), None).unwrap();
    fc.set_noise(
        NoiseConfig::Pq {
            p: 1.0,
            block_size: 8,
            n_centroids: 16,
            update_every: 2,
        },
        0,
    )
    .unwrap();
    let w = fc.qweight().stored().unwrap();
    fc.qweight().set_noise_step(at(0));
    let noisy0 = fc.qweight().weight_t(true).unwrap();
    // p = 1: every block is a centroid, so there are at most 16 distinct blocks.
    let old = distinct_blocks(&noisy0);
    assert!(old.len() <= 16, "{} distinct blocks", old.len());
    let rel = qn_train::kernels::relative_mse(&w, &noisy0).unwrap();
    assert!(rel > 0.05 && rel < 0.9, "{rel}");
    assert_eq!(bits(&fc.qweight().stored().unwrap()), bits(&w));
    // The weight moves far (as training would move it, slowly).
    let moved = ((&w * 3.0).unwrap() + 2.0).unwrap();
    v.set(&moved).unwrap();
    // Same interval (steps 0-1): still the old codebook.
    fc.qweight().set_noise_step(at(1));
    let noisy1 = fc.qweight().weight_t(true).unwrap();
    let stale = distinct_blocks(&noisy1);
    assert!(
        stale.iter().all(|b| old.contains(b)),
        "step 1 uses step 0's centroids"
    );
    // Next interval: centroids of the moved weight.
    fc.qweight().set_noise_step(at(2));
    let noisy2 = fc.qweight().weight_t(true).unwrap();
    let fresh = distinct_blocks(&noisy2);
    assert!(fresh.len() <= 16);
    assert!(
        fresh.iter().all(|b| !old.contains(b)),
        "step 2 uses new centroids"
    );
    let err_stale = qn_train::kernels::relative_mse(&moved, &noisy1).unwrap();
    let err_fresh = qn_train::kernels::relative_mse(&moved, &noisy2).unwrap();
    assert!(
        err_fresh < 0.9 && err_fresh < 0.5 * err_stale,
        "{err_fresh} vs {err_stale}"
    );
    assert_eq!(bits(&fc.qweight().stored().unwrap()), bits(&moved));
}

#[test]
fn centroid_gradient_is_the_mean_or_sum_of_its_blocks() {
    let x = gaussian(&[5, 32], 17);
    let g = gaussian(&[5, 16], 18);
    for reduction in [CentroidGrad::Mean, CentroidGrad::Sum] {
        let mut fc = QLinear::new("fc", var(&[16, 32], 19), None).unwrap();
        let codes = fc
            .quantize_pq(4, &KMeansConfig::new(40).with_iters(3), reduction)
            .unwrap();
        let WeightState::Pq(pq) = fc.qweight().state() else {
            panic!("not PQ")
        };
        let centroids = pq.centroids().clone();
        let loss = (fc.forward_t(&x, true).unwrap() * &g)
            .unwrap()
            .sum_all()
            .unwrap();
        let grads = loss.backward().unwrap();
        let got = grads
            .get(centroids.as_tensor())
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        // The gradient with respect to the decoded weight, cut into blocks.
        let w = Var::from_tensor(&codes.decode().unwrap()).unwrap();
        let dw = (x.matmul(&w.as_tensor().t().unwrap()).unwrap() * &g)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let block_grads = codes
            .layout
            .to_subvectors(dw.get(w.as_tensor()).unwrap())
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let assign = codes.assignments.to_u32();
        for (c, got_c) in got.iter().enumerate().take(40) {
            let members: Vec<usize> = (0..assign.len())
                .filter(|&j| assign[j] as usize == c)
                .collect();
            for e in 0..4 {
                let sum: f32 = members.iter().map(|&j| block_grads[j][e]).sum();
                let expect = match (reduction, members.len()) {
                    (_, 0) => 0.0,
                    (CentroidGrad::Mean, n) => sum / n as f32,
                    (CentroidGrad::Sum, _) => sum,
                };
                assert!(got_c[e].is_finite());
                assert!(
                    (got_c[e] - expect).abs() < 1e-4 * (1.0 + expect.abs()),
                    "{reduction:?} centroid {c}: {} vs {expect}",
                    got_c[e]
                );
            }
        }
        // The centroids replaced the float weight among the trainable variables.
        assert_eq!(fc.vars().len(), 1);
        assert_eq!(fc.vars()[0].dims(), &[40, 4]);
    }
}

#[test]
fn embedding_padding_row_is_exact_untrained_and_survives_pq() {
    let mut weight = gaussian(&[20, 8], 20).to_vec2::<f32>().unwrap();
    weight[1] = vec![0.0; 8];
    let w = Var::from_tensor(&Tensor::new(weight, &Device::Cpu).unwrap()).unwrap();
    let mut emb = QEmbedding::new("embeddings.word_embeddings", w.clone(), Some(1)).unwrap();
    emb.set_noise(
        NoiseConfig::BlockDrop {
            p: 0.5,
            block_size: 4,
        },
        3,
    )
    .unwrap();
    let ids = Tensor::new(&[[1u32, 2, 1], [3, 1, 0]], &Device::Cpu).unwrap();
    let out = emb.forward_t(&ids, true).unwrap();
    assert_eq!(out.dims(), &[2, 3, 8]);
    let loss = out.sqr().unwrap().sum_all().unwrap();
    let grads = loss.backward().unwrap();
    let gw = grads.get(w.as_tensor()).unwrap().to_vec2::<f32>().unwrap();
    assert!(
        gw[1].iter().all(|&v| v == 0.0),
        "padding row got a gradient"
    );
    // After PQ the padding row still reads back exactly zero.
    emb.quantize_pq(4, &KMeansConfig::new(8).with_iters(3), CentroidGrad::Mean)
        .unwrap();
    let out = emb
        .forward_t(&Tensor::new(&[1u32], &Device::Cpu).unwrap(), false)
        .unwrap();
    assert!(values(&out).iter().all(|&v| v == 0.0));
    assert_eq!(emb.padding_idx(), Some(1));
}

#[test]
fn noise_reaches_every_matching_layer_and_no_other() {
    let q = QLinear::new(
        "encoder.layer.0.attention.self.query",
        var(&[8, 8], 21),
        None,
    )
    .unwrap();
    let k = QLinear::new("encoder.layer.0.attention.self.key", var(&[8, 8], 22), None).unwrap();
    let ffn = QLinear::new(
        "encoder.layer.0.intermediate.dense",
        var(&[32, 8], 23),
        None,
    )
    .unwrap();
    let head = QLinear::new("classifier", var(&[2, 8], 24), None).unwrap();
    let emb = QEmbedding::new("embeddings.word_embeddings", var(&[10, 8], 25), Some(0)).unwrap();
    let all: Vec<&dyn QuantNoiseLayer> = vec![&q, &k, &ffn, &head, &emb];
    let cfg = NoiseConfig::BlockDrop {
        p: 0.2,
        block_size: 4,
    };
    let touched = apply_noise(
        &all,
        &regex::Regex::new("attention|intermediate|classifier").unwrap(),
        cfg,
        0,
    )
    .unwrap();
    assert_eq!(
        touched,
        vec![
            "encoder.layer.0.attention.self.query",
            "encoder.layer.0.attention.self.key",
            "encoder.layer.0.intermediate.dense",
            "classifier",
        ]
    );
    for l in [&q as &dyn QuantNoiseLayer, &k, &ffn, &head] {
        assert_eq!(l.qweight().noise(), cfg, "{}", l.name());
    }
    assert_eq!(emb.qweight().noise(), NoiseConfig::None);
}

#[test]
fn convs_train_with_noise_and_every_variable_gets_a_gradient() {
    let x = gaussian(&[2, 8, 6, 6], 26);
    let conv = QConv2d::new(
        "conv",
        var(&[8, 8, 3, 3], 27),
        Some(var(&[8], 28)),
        Conv2dConfig {
            padding: 1,
            ..Default::default()
        },
    )
    .unwrap();
    let pw = QConv2d::new(
        "pw",
        var(&[16, 8, 1, 1], 29),
        Some(var(&[16], 30)),
        Conv2dConfig::default(),
    )
    .unwrap();
    let dw = QConv2d::new(
        "dw",
        var(&[16, 1, 3, 3], 31),
        None,
        Conv2dConfig {
            padding: 1,
            groups: 16,
            ..Default::default()
        },
    )
    .unwrap();
    conv.set_noise(
        NoiseConfig::BlockDrop {
            p: 0.2,
            block_size: 9,
        },
        1,
    )
    .unwrap();
    pw.set_noise(
        NoiseConfig::BlockDrop {
            p: 0.2,
            block_size: 4,
        },
        2,
    )
    .unwrap();
    dw.set_noise(
        NoiseConfig::BlockDrop {
            p: 0.2,
            block_size: 9,
        },
        3,
    )
    .unwrap();
    let y = dw
        .forward_t(
            &pw.forward_t(&conv.forward_t(&x, true).unwrap(), true)
                .unwrap(),
            true,
        )
        .unwrap();
    assert_eq!(y.dims(), &[2, 16, 6, 6]);
    let grads = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
    let mut vars = Vec::new();
    for (l, n) in [(&conv, "conv"), (&pw, "pw"), (&dw, "dw")] {
        for (i, v) in l.vars().into_iter().enumerate() {
            vars.push((format!("{n}.{i}"), v));
        }
    }
    assert_eq!(vars.len(), 5);
    assert!(vars_without_gradient(&grads, &vars).is_empty());
}

#[test]
fn the_gradient_check_catches_candles_fused_layer_norm() {
    // candle 0.11's fused layer_norm has no backward: a weight behind it gets no gradient.
    let w = Var::from_tensor(&Tensor::ones(8, DType::F32, &Device::Cpu).unwrap()).unwrap();
    let b = Var::from_tensor(&Tensor::zeros(8, DType::F32, &Device::Cpu).unwrap()).unwrap();
    let x = gaussian(&[4, 8], 32);
    let y = candle_nn::ops::layer_norm(&x, w.as_tensor(), b.as_tensor(), 1e-5).unwrap();
    let grads = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
    let missing = vars_without_gradient(&grads, &[("ln.weight".into(), w), ("ln.bias".into(), b)]);
    assert_eq!(
        missing,
        vec!["ln.weight".to_string(), "ln.bias".to_string()]
    );
}

/// Training with activation quantization puts the outputs on the int-N grid of the running range
/// with a straight-through gradient (1 where the rounded code is inside the grid, 0 where it is
/// clamped); with p < 1 only that fraction is quantized and the rest is clamped; eval quantizes all.
#[test]
fn activation_quantization_fake_quantizes_in_training_with_a_straight_through_gradient() {
    use qn_train::{ActQuant, ActQuantConfig};
    let narrow = gaussian(&[64, 32], 41);
    let wide = (&narrow * 3.0).unwrap();
    let q = ActQuant::new(ActQuantConfig {
        bits: 4,
        momentum: 0.5,
        p: 1.0,
    })
    .unwrap();
    q.forward_t(&narrow, true, 0).unwrap(); // range of the narrow batch
    let xv = Var::from_tensor(&wide).unwrap();
    let out = q.forward_t(xv.as_tensor(), true, 1).unwrap();
    let (lo, hi) = q.range().unwrap();
    let (wlo, whi) = fc2_range(&wide);
    // momentum 0.5: the range is halfway between the narrow batch's and the wide one's.
    assert!(lo > wlo && hi < whi, "[{lo}, {hi}] vs wide [{wlo}, {whi}]");
    let ov = values(&out);
    let mut levels: Vec<u32> = ov.iter().map(|v| (*v as f32).to_bits()).collect();
    levels.sort();
    levels.dedup();
    assert!(levels.len() <= 16, "{} levels in training", levels.len());
    let grads = out.sum_all().unwrap().backward().unwrap();
    let g = values(grads.get(xv.as_tensor()).unwrap());
    // The grid of that range, as the quantizer places it (zero exactly representable).
    use qn_train::kernels::scalar::{observe_range, ParamView, ScalarConfig};
    let cfg = ScalarConfig::int4();
    let params = observe_range(
        &[lo],
        &[hi],
        ParamView::new("a", &[1], cfg.granularity).unwrap(),
        &cfg,
        &Device::Cpu,
    )
    .unwrap();
    let first = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap()[0] as f64;
    let (glo, ghi) = params.clamp_range().unwrap();
    let (lo, hi, step) = (first(&glo), first(&ghi), first(&params.scale));
    let (mut passed, mut cut) = (0, 0);
    for (i, x) in values(&wide).iter().enumerate() {
        if *x >= lo - 0.45 * step && *x <= hi + 0.45 * step {
            assert_eq!(
                g[i], 1.0,
                "element {i} = {x} inside [{lo}, {hi}] keeps its gradient"
            );
            assert!(
                (ov[i] - x).abs() <= 0.51 * step,
                "element {i}: {} vs {x}",
                ov[i]
            );
            passed += 1;
        } else if *x < lo - 0.55 * step || *x > hi + 0.55 * step {
            assert_eq!(g[i], 0.0, "element {i} = {x} clamped passes nothing");
            cut += 1;
        }
    }
    assert!(passed > 100 && cut > 10, "{passed} passed, {cut} cut");
    // Eval: every output on the 4-bit grid.
    let e = values(&q.forward_t(&wide, false, 0).unwrap());
    let mut levels: Vec<u32> = e.iter().map(|v| (*v as f32).to_bits()).collect();
    levels.sort();
    levels.dedup();
    assert!(levels.len() <= 16, "{} levels in eval", levels.len());
    // p = 0.5: about half the outputs are quantized, the others clamped but otherwise exact.
    let half = ActQuant::new(ActQuantConfig {
        bits: 4,
        momentum: 0.0,
        p: 0.5,
    })
    .unwrap();
    let y = values(&half.forward_t(&narrow, true, 3).unwrap());
    let exact = values(&narrow)
        .iter()
        .zip(&y)
        .filter(|(a, b)| a == b)
        .count() as f64
        / y.len() as f64;
    assert!(
        (exact - 0.5).abs() < 0.06,
        "{exact} of the outputs kept exact"
    );
    assert_eq!(
        y,
        values(&half.forward_t(&narrow, true, 3).unwrap()),
        "same seed, same mask"
    );
}

/// The layer wiring: a QLinear with activation quantization trains through it (its weight gets a
/// gradient) and quantizes its output in eval.
#[test]
fn qlinear_activation_quantization_trains_and_quantizes() {
    let mut fc = QLinear::new("fc", var(&[16, 32], 40), None).unwrap();
    fc.set_activation_quant(Some(qn_train::ActQuantConfig {
        bits: 4,
        momentum: 0.0,
        p: 1.0,
    }))
    .unwrap();
    let x = gaussian(&[64, 32], 41);
    let y = fc.forward_t(&x, true).unwrap();
    let grads = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
    let vars: Vec<(String, Var)> = fc
        .vars()
        .into_iter()
        .map(|v| ("fc.weight".into(), v))
        .collect();
    assert!(vars_without_gradient(&grads, &vars).is_empty());
    let e = values(&fc.forward_t(&x, false).unwrap());
    let mut levels: Vec<u32> = e.iter().map(|v| (*v as f32).to_bits()).collect();
    levels.sort();
    levels.dedup();
    assert!(levels.len() <= 16, "{} levels", levels.len());
}

fn fc2_range(t: &Tensor) -> (f32, f32) {
    (
        t.min_all().unwrap().to_scalar::<f32>().unwrap(),
        t.max_all().unwrap().to_scalar::<f32>().unwrap(),
    )
}

#[test]
fn stored_weight_is_bit_identical_after_noisy_forward_and_backward() {
    for (layer, bs) in layers() {
        layer
            .set_noise(
                NoiseConfig::BlockDrop {
                    p: 0.5,
                    block_size: bs,
                },
                1,
            )
            .unwrap();
        let before = bits(&layer.qweight().stored().unwrap());
        for _ in 0..5 {
            let w = layer.qweight().weight_t(true).unwrap();
            let _ = w.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        }
        assert_eq!(
            before,
            bits(&layer.qweight().stored().unwrap()),
            "{}",
            layer.name()
        );
    }
}

#[test]
fn stage_plans_take_overrides_and_epochs() {
    use qn_train::trainer::StagePlan;
    let plan = StagePlan::from_toml(
        "[[stage]]\nname = 'attn'\nlayers = 'attention'\nepochs = 2.0\n\
         [[stage.override]]\nmatch = 'query'\nblock_size = 2\nn_centroids = 16\n",
    )
    .unwrap();
    assert_eq!(plan.stages[0].total_steps(1000, 64).unwrap(), 32);
    assert_eq!(plan.stages[0].overrides[0].block_size, Some(2));
    let err = StagePlan::from_toml("[[stage]]\nname = 'x'\n")
        .unwrap_err()
        .to_string();
    assert!(err.contains("`x`") && err.contains("steps"), "{err}");
    let err = StagePlan::from_toml("[[stage]]\nname = 'x'\nsteps = 1\nlayers = '('\n")
        .unwrap_err()
        .to_string();
    assert!(err.contains("`x`"), "{err}");
    let err = StagePlan::from_toml("[[stage]]\nname = 'x'\nsteps = 1\nbogus = 1\n")
        .unwrap_err()
        .to_string();
    assert!(err.contains("bogus"), "{err}");
}

#[test]
fn noises_compose_in_order() {
    let fc = QLinear::new("fc", var(&[8, 32], 50), None).unwrap();
    let scalar = NoiseConfig::Scalar {
        bits: 4,
        p: 1.0,
        block_size: 1,
        observer: ObserverKind::MinMax,
        granularity: Granularity::PerTensor,
        update_every: 1,
    };
    let drop = NoiseConfig::BlockDrop {
        p: 0.5,
        block_size: 4,
    };
    fc.set_noise(scalar, 3).unwrap();
    fc.qweight().add_noise(drop).unwrap();
    assert_eq!(fc.qweight().noises(), vec![scalar, drop]);
    let w = fc.qweight().stored().unwrap();
    let params =
        qn_train::kernels::scalar::observe(&w, &qn_train::kernels::scalar::ScalarConfig::int4())
            .unwrap();
    let fq = values(&qn_train::kernels::scalar::fake_quantize(&w, &params).unwrap());
    let noisy = values(&fc.qweight().weight_t(true).unwrap());
    let (mut zeroed, mut kept) = (0, 0);
    for block in 0..noisy.len() / 4 {
        let r = block * 4..block * 4 + 4;
        if noisy[r.clone()].iter().all(|&v| v == 0.0) && fq[r.clone()].iter().any(|&v| v != 0.0) {
            zeroed += 1;
        } else {
            // Kept blocks are the quantized weight scaled by 1 / (1 - 0.5).
            for i in r {
                assert!((noisy[i] - 2.0 * fq[i]).abs() < 1e-6, "element {i}");
            }
            kept += 1;
        }
    }
    assert!(zeroed > 0 && kept > 0, "{zeroed} dropped, {kept} kept");
}

#[test]
fn scalar_state_is_frozen_int8_and_exports() {
    let x = gaussian(&[4, 32], 51);
    let mut fc = QLinear::new("fc", var(&[16, 32], 52), Some(var(&[16], 53))).unwrap();
    let cfg = qn_train::kernels::scalar::ScalarConfig::int8()
        .with_granularity(Granularity::PerChannel { axis: 0 });
    let w = fc.qweight().stored().unwrap();
    let fq = qn_train::kernels::scalar::fake_quantize(
        &w,
        &qn_train::kernels::scalar::observe(&w, &cfg).unwrap(),
    )
    .unwrap();
    fc.qweight_mut().quantize_scalar(&cfg).unwrap();
    assert!(matches!(fc.qweight().state(), WeightState::Scalar(_)));
    assert_eq!(bits(&fc.qweight().stored().unwrap()), bits(&fq));
    // Only the bias is still trainable; training mode adds no noise to a frozen weight.
    assert_eq!(fc.vars().len(), 1);
    let y = fc.forward_t(&x, true).unwrap();
    let expect = x
        .matmul(&fq.t().unwrap())
        .unwrap()
        .broadcast_add(fc.vars()[0].as_tensor())
        .unwrap();
    assert_eq!(bits(&y), bits(&expect));
    assert!(
        fc.qweight_mut().quantize_scalar(&cfg).is_err(),
        "quantizing twice is an error"
    );
}

#[test]
fn fused_noisy_linear_draws_the_masks_of_the_plain_path() {
    let fc = QLinear::new("fc", var(&[24, 32], 60), None).unwrap();
    let cfg = NoiseConfig::BlockDrop {
        p: 0.3,
        block_size: 4,
    };
    let x = gaussian(&[2, 3, 32], 61);
    fc.set_noise(cfg, 9).unwrap();
    let fused: Vec<_> = (0..3)
        .map(|s| {
            fc.qweight().set_noise_step(at(s));
            values(&fc.forward_t(&x, true).unwrap())
        })
        .collect();
    for (step, got) in fused.iter().enumerate() {
        fc.qweight().set_noise_step(at(step as u64));
        let w = fc.qweight().weight_t(true).unwrap();
        let expect = values(&x.reshape((6, 32)).unwrap().matmul(&w.t().unwrap()).unwrap());
        for (a, b) in got.iter().zip(&expect) {
            assert!(
                (a - b).abs() <= 1e-5 * (1.0 + b.abs()),
                "step {step}: {a} vs {b}"
            );
        }
    }
}

/// The embedding applies block drop and the padding row to the rows it reads; the result and the
/// table's gradient must equal those of the whole-table path (`weight_t`, then a lookup), for every
/// combination of noise and padding, with repeated ids and the padding id among them.
#[test]
fn embedding_row_path_matches_the_whole_table_path() {
    let ids = Tensor::new(&[[1u32, 2, 1, 7], [3, 1, 0, 7]], &Device::Cpu).unwrap();
    let r = gaussian(&[2, 4, 12], 31);
    for (padding, noise) in [
        (None, None),
        (Some(1), None),
        (None, Some(0.3)),
        (Some(1), Some(0.5)),
        (Some(7), Some(0.999)),
    ] {
        let w = var(&[9, 12], 30);
        let emb = QEmbedding::new("embeddings.word_embeddings", w.clone(), padding).unwrap();
        if let Some(p) = noise {
            emb.set_noise(NoiseConfig::BlockDrop { p, block_size: 4 }, 5)
                .unwrap();
        }
        emb.qweight().set_noise_step(at(3));
        let grad_of = |out: &Tensor| {
            let g = (out * &r).unwrap().sum_all().unwrap().backward().unwrap();
            g.get(w.as_tensor()).unwrap().clone()
        };
        let fast = emb.forward_t(&ids, true).unwrap();
        let g_fast = grad_of(&fast);
        let table = emb.qweight().weight_t(true).unwrap();
        let slow = table
            .index_select(&ids.flatten_all().unwrap(), 0)
            .unwrap()
            .reshape((2, 4, 12))
            .unwrap();
        let g_slow = grad_of(&slow);
        let case = format!("padding {padding:?}, noise {noise:?}");
        assert_eq!(values(&fast), values(&slow), "{case}: values");
        // Repeated ids: (g1 + g2)·s against g1·s + g2·s, equal up to rounding.
        let (a, b) = (values(&g_fast), values(&g_slow));
        let worst = a
            .iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f64, f64::max);
        assert!(worst <= 1e-6 * 8.0, "{case}: gradient differs by {worst}");
        let zero = |v: &[f64]| v.iter().map(|x| *x == 0.0).collect::<Vec<_>>();
        assert_eq!(zero(&a), zero(&b), "{case}: gradient support");
        if noise.is_some() {
            assert!(values(&fast).contains(&0.0), "{case}: nothing dropped");
        }
    }
}

/// Product-quantized layers evaluate from their codes on the CPU (tables for a few rows, one
/// decode for many, only the rows read for an embedding) and give what the decoded weight gives.
#[test]
fn pq_layers_evaluate_from_their_codes() {
    let mut lin = QLinear::new(
        "encoder.layer.0.intermediate.dense",
        var(&[64, 48], 31),
        Some(var(&[64], 32)),
    )
    .unwrap();
    lin.qweight_mut()
        .quantize_pq(8, &KMeansConfig::new(16).with_iters(3), CentroidGrad::Mean)
        .unwrap();
    let w = lin.qweight().stored().unwrap();
    // Up to `TABLE_MAX_ROWS` (16) rows the tables, above it decode + dense.
    for rows in [1usize, 3, 20, 40] {
        let x = gaussian(&[rows, 48], 33);
        let y = lin.forward_t(&x, false).unwrap();
        let bias = lin.other_vars()[0].as_tensor().clone();
        let want = x
            .matmul(&w.t().unwrap())
            .unwrap()
            .broadcast_add(&bias)
            .unwrap();
        let scale = values(&want).iter().fold(0f64, |m, v| m.max(v.abs()));
        let diff = values(&(y - want).unwrap())
            .iter()
            .fold(0f64, |m, v| m.max(v.abs()));
        assert!(diff <= 1e-5 * scale, "{rows} rows: {diff}");
    }
    let mut emb = QEmbedding::new("embeddings.word_embeddings", var(&[40, 16], 34), None).unwrap();
    emb.qweight_mut()
        .quantize_pq(4, &KMeansConfig::new(8).with_iters(3), CentroidGrad::Mean)
        .unwrap();
    let table = emb.qweight().stored().unwrap();
    let ids = Tensor::new(&[[3u32, 39, 0], [7, 7, 12]], &Device::Cpu).unwrap();
    let got = emb.forward_t(&ids, false).unwrap();
    let want = table
        .index_select(&ids.flatten_all().unwrap(), 0)
        .unwrap()
        .reshape((2, 3, 16))
        .unwrap();
    assert_eq!(
        values(&got),
        values(&want),
        "rows rebuilt from codes exactly"
    );
    // An id past the table is an error, not a panic.
    let bad = Tensor::new(&[40u32], &Device::Cpu).unwrap();
    let err = emb.forward_t(&bad, false).unwrap_err().to_string();
    assert!(err.contains("40"), "{err}");
}

/// A coded 1x1 convolution evaluates as a matmul over pixels from its codes (PQ tables for a few
/// pixels, tiled decode for many; int-N dequantised inside the dot products) and gives what the
/// decoded weight gives; other geometries convolve with the rebuilt weight.
#[test]
fn pointwise_convs_evaluate_from_their_codes() {
    let conv = |seed: u64, config: Conv2dConfig| {
        QConv2d::new(
            "blocks.3._project_conv",
            var(&[24, 32, 1, 1], seed),
            Some(var(&[24], seed + 1)),
            config,
        )
        .unwrap()
    };
    let check = |layer: &QConv2d, x: &Tensor, what: &str| {
        let c = Conv2dConfig {
            padding: 0,
            stride: 1,
            dilation: 1,
            groups: 1,
            cudnn_fwd_algo: None,
        };
        let w = layer.qweight().stored().unwrap();
        let bias = layer.other_vars()[0]
            .as_tensor()
            .reshape((1, 24, 1, 1))
            .unwrap();
        let want = x
            .conv2d(&w, c.padding, c.stride, c.dilation, c.groups)
            .unwrap()
            .broadcast_add(&bias)
            .unwrap();
        let got = layer.forward_t(x, false).unwrap();
        assert_eq!(got.dims(), want.dims(), "{what}");
        let scale = values(&want).iter().fold(0f64, |m, v| m.max(v.abs()));
        let diff = values(&(got - want).unwrap())
            .iter()
            .fold(0f64, |m, v| m.max(v.abs()));
        assert!(diff <= 1e-5 * scale, "{what}: {diff} of {scale}");
    };
    // One pixel (the tables, e.g. squeeze-and-excitation), a few, and a feature map (tiled decode).
    let inputs = [
        gaussian(&[1, 32, 1, 1], 61),
        gaussian(&[2, 32, 2, 3], 62),
        gaussian(&[2, 32, 7, 9], 63),
    ];
    let plain = Conv2dConfig::default();
    let mut pq = conv(64, plain);
    assert!(!pq.evaluates_from_codes(), "a float weight has no codes");
    pq.qweight_mut()
        .quantize_pq(4, &KMeansConfig::new(16).with_iters(3), CentroidGrad::Mean)
        .unwrap();
    assert!(pq.evaluates_from_codes());
    for (i, x) in inputs.iter().enumerate() {
        check(&pq, x, &format!("pq, input {i}"));
    }
    for (bits, cfg) in [
        (8, qn_train::kernels::scalar::ScalarConfig::int8()),
        (4, qn_train::kernels::scalar::ScalarConfig::int4()),
    ] {
        let mut q = conv(66, plain).with_same_padding();
        q.qweight_mut()
            .quantize_scalar(&cfg.with_granularity(Granularity::PerChannel { axis: 0 }))
            .unwrap();
        assert!(q.evaluates_from_codes(), "int{bits}");
        for (i, x) in inputs.iter().enumerate() {
            check(&q, x, &format!("int{bits}, input {i}"));
        }
    }
    // A strided 1x1 convolution is not a per-pixel matmul: it convolves with the rebuilt weight.
    let mut strided = conv(68, Conv2dConfig { stride: 2, ..plain });
    strided
        .qweight_mut()
        .quantize_pq(4, &KMeansConfig::new(8).with_iters(2), CentroidGrad::Mean)
        .unwrap();
    assert!(!strided.evaluates_from_codes());
    let x = gaussian(&[1, 32, 6, 6], 69);
    let y = strided.forward_t(&x, false).unwrap();
    assert_eq!(y.dims(), &[1, 24, 3, 3]);
    // Training rebuilds the weight (its centroids take gradients).
    let y = pq.forward_t(&inputs[1], true).unwrap();
    let grads = y.sum_all().unwrap().backward().unwrap();
    let vars: Vec<(String, Var)> = pq.vars().into_iter().map(|v| ("v".into(), v)).collect();
    assert_eq!(vars.len(), 2, "centroids and bias");
    assert!(vars_without_gradient(&grads, &vars).is_empty());
}

/// In training a 1x1 convolution runs as a linear layer over the batch's pixels (block drop fused
/// into the matmul); its output and the gradients of its input, weight and bias are candle's
/// `conv2d` with the weight `weight_t` builds for the same step (whose backward candle derives
/// through the block-drop op), without noise and with block drop.
#[test]
fn pointwise_convs_train_as_a_matmul_with_the_gradients_of_conv2d() {
    let max_abs = |t: &Tensor| values(t).iter().fold(0f64, |m, v| m.max(v.abs()));
    let cases = [
        ([3usize, 32, 5, 7], 71u64, None),
        ([2, 32, 1, 1], 72, None),
        ([2, 32, 4, 3], 73, Some(0.3)),
    ];
    for (shape, seed, drop) in cases {
        let (w, b) = (var(&[24, 32, 1, 1], seed), var(&[24], seed + 1));
        let layer = QConv2d::new(
            "blocks.0._expand_conv",
            w.clone(),
            Some(b.clone()),
            Conv2dConfig::default(),
        )
        .unwrap();
        if let Some(p) = drop {
            layer
                .set_noise(NoiseConfig::BlockDrop { p, block_size: 4 }, 5)
                .unwrap();
            layer.qweight().set_noise_step(at(3));
        }
        let probe = gaussian(&[shape[0], 24, shape[2], shape[3]], seed + 2);
        let x = Var::from_tensor(&gaussian(&shape, seed + 3)).unwrap();
        let y = layer.forward_t(x.as_tensor(), true).unwrap();
        let g = (&y * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let built = layer.qweight().weight_t(true).unwrap();
        if drop.is_some() {
            let zeros = values(&built).iter().filter(|v| **v == 0.0).count();
            assert!(
                zeros > 0 && zeros % 4 == 0,
                "the step drops whole blocks: {zeros} zeros"
            );
        }
        let want = x
            .as_tensor()
            .conv2d(&built, 0, 1, 1, 1)
            .unwrap()
            .broadcast_add(&b.as_tensor().reshape((1, 24, 1, 1)).unwrap())
            .unwrap();
        let gw = (&want * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let pairs = [
            ("output", y.clone(), want.clone()),
            (
                "input gradient",
                g.get(&x).unwrap().clone(),
                gw.get(&x).unwrap().clone(),
            ),
            (
                "weight gradient",
                g.get(&w).unwrap().clone(),
                gw.get(&w).unwrap().clone(),
            ),
            (
                "bias gradient",
                g.get(&b).unwrap().clone(),
                gw.get(&b).unwrap().clone(),
            ),
        ];
        for (what, got, want) in pairs {
            assert_eq!(got.dims(), want.dims(), "{what}");
            let diff = max_abs(&(&got - &want).unwrap());
            assert!(
                diff <= 1e-4 * (1.0 + max_abs(&want)),
                "{what} {shape:?} {drop:?}: {diff}"
            );
        }
    }
}
