//! The fused training-mode batch norm against its plain-op twin: outputs, the gradients of the
//! input, scale and shift (the twin's come from candle's autodiff through the batch mean and
//! variance), and the running statistics it leaves; the fused activations against theirs.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarBuilder;
use qn_models::vision::BatchNorm2d;

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

fn layer(params: &HashMap<String, Tensor>) -> BatchNorm2d {
    let vb = VarBuilder::from_tensors(params.clone(), DType::F32, &Device::Cpu);
    BatchNorm2d::new(params["weight"].elem_count(), 1e-3, 0.1, vb).unwrap()
}

#[test]
fn fused_training_batch_norm_matches_the_plain_ops() {
    let dev = Device::Cpu;
    // Several planes per channel; one image of one pixel (N = 1: the unbiased variance's guard);
    // an offset, scaled input (the variance pass must not lose it to the mean).
    for (shape, offset) in [
        ((3, 5, 4, 6), 0.0),
        ((2, 17, 7, 7), 30.0f32),
        ((1, 4, 1, 1), 0.0),
        ((8, 3, 2, 3), -5.0),
    ] {
        let c = shape.1;
        let params: HashMap<String, Tensor> = [
            ("weight", Tensor::randn(1f32, 0.3, c, &dev).unwrap()),
            ("bias", Tensor::randn(0f32, 0.3, c, &dev).unwrap()),
            ("running_mean", Tensor::randn(0f32, 1.0, c, &dev).unwrap()),
            ("running_var", Tensor::rand(0.5f32, 2.0, c, &dev).unwrap()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let (fused, plain) = (layer(&params), layer(&params));
        let x0 = (Tensor::randn(0f32, 2.0, shape, &dev).unwrap() + offset as f64).unwrap();
        let probe = Tensor::randn(0f32, 1.0, shape, &dev).unwrap();
        let run = |bn: &BatchNorm2d, reference: bool| {
            let x = Var::from_tensor(&x0).unwrap();
            let y = if reference {
                bn.forward_t_reference(&x, true).unwrap()
            } else {
                bn.forward_t(&x, true).unwrap()
            };
            let grads = (&y * &probe)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let mut out = vec![y, grads.get(&x).unwrap().clone()];
            for (_, v) in bn.vars() {
                out.push(grads.get(&v).unwrap().clone());
            }
            out
        };
        let (a, b) = (run(&fused, false), run(&plain, true));
        for (what, (u, v)) in [
            "output",
            "input gradient",
            "scale gradient",
            "shift gradient",
        ]
        .iter()
        .zip(a.iter().zip(&b))
        {
            let scale = 1.0 + max_diff(v, &v.zeros_like().unwrap());
            let d = max_diff(u, v);
            assert!(d < 2e-4 * scale, "{what}, shape {shape:?}: |Δ| {d}");
        }
        for ((name, u), (_, v)) in fused.buffers().iter().zip(plain.buffers().iter()) {
            let d = max_diff(u, v);
            assert!(
                d < 1e-4 * (1.0 + offset.abs()),
                "{name}, shape {shape:?}: |Δ| {d}"
            );
        }
        // Evaluation is the same path for both: the statistics just compared.
        let e = max_diff(
            &fused.forward_t(&x0, false).unwrap(),
            &plain.forward_t_reference(&x0, false).unwrap(),
        );
        assert!(e < 1e-4 * (1.0 + offset.abs()), "evaluation: |Δ| {e}");
    }
}

/// ReLU6 and swish, fused, against candle's `clamp` and `silu`: values and gradients, including
/// inputs on both sides of ReLU6's kinks (never exactly on them, where the twins' conventions
/// differ: PyTorch's, kept by the fused op, gives 0 there).
#[test]
fn fused_activations_match_the_plain_ops() {
    use qn_models::vision::activation::{relu6, relu6_reference, swish, swish_reference};
    let dev = Device::Cpu;
    let x0 = (Tensor::randn(0f32, 4.0, (3, 40_000), &dev).unwrap() + 1.0).unwrap();
    let probe = Tensor::randn(0f32, 1.0, x0.dims(), &dev).unwrap();
    type Act = fn(&Tensor) -> candle_core::Result<Tensor>;
    for (name, fused, plain) in [
        ("relu6", relu6 as Act, relu6_reference as Act),
        ("swish", swish as Act, swish_reference as Act),
    ] {
        let run = |f: Act| {
            let x = Var::from_tensor(&x0).unwrap();
            let y = f(&x).unwrap();
            let g = (&y * &probe)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            (y, g.get(&x).unwrap().clone())
        };
        let ((ya, ga), (yb, gb)) = (run(fused), run(plain));
        assert!(max_diff(&ya, &yb) < 1e-5, "{name} output");
        assert!(max_diff(&ga, &gb) < 1e-5, "{name} gradient");
    }
    // At the kinks: PyTorch's hardtanh gradient, 0 on both boundaries.
    let x = Var::from_tensor(&Tensor::new(&[0f32, 6.0, 3.0], &dev).unwrap()).unwrap();
    let g = relu6(&x).unwrap().sum_all().unwrap().backward().unwrap();
    assert_eq!(
        g.get(&x).unwrap().to_vec1::<f32>().unwrap(),
        [0.0, 0.0, 1.0]
    );
}
