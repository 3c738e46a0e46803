//! The fused depthwise convolution against its plain twin (candle's grouped conv2d) and against
//! finite differences through the fused op itself (f64).

use candle_core::{DType, Device, Tensor, Var};
use qn_kernels::conv::{
    depthwise_conv2d, depthwise_conv2d_reference, depthwise_conv2d_with, same_padding,
    DepthwiseKernel, Padding2d,
};

const KERNELS: [DepthwiseKernel; 3] = [
    DepthwiseKernel::Auto,
    DepthwiseKernel::Rows,
    DepthwiseKernel::ChannelBlocks,
];

type Case = (usize, usize, usize, usize, usize, usize, Padding2d);

/// (n, c, h, w, k, stride, padding): odd and even sizes, k 3 and 5, stride 1 and 2, TF "SAME"
/// (asymmetric), symmetric and no padding, a padding wider than the kernel reach; channel counts
/// below, at and across the channel-block width of 16 (a partial last block).
fn cases() -> Vec<Case> {
    let asym = |top, bottom, left, right| Padding2d {
        top,
        bottom,
        left,
        right,
    };
    vec![
        (2, 3, 9, 9, 3, 1, Padding2d::symmetric(1)),
        (2, 4, 8, 8, 3, 2, Padding2d::same(8, 8, 3, 2)),
        (1, 5, 11, 7, 5, 2, Padding2d::same(11, 7, 5, 2)),
        (3, 2, 6, 10, 5, 1, Padding2d::symmetric(2)),
        (2, 3, 7, 7, 3, 2, Padding2d::default()),
        (1, 2, 5, 6, 3, 1, asym(0, 2, 3, 1)),
        (1, 2, 4, 4, 3, 3, asym(4, 0, 0, 4)),
        (2, 16, 5, 5, 3, 1, Padding2d::symmetric(1)),
        (2, 37, 9, 8, 5, 2, Padding2d::same(9, 8, 5, 2)),
        (1, 20, 6, 40, 3, 1, Padding2d::same(6, 40, 3, 1)),
    ]
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

#[test]
fn same_padding_matches_tensorflow() {
    // TF: out = ceil(len / s); pad = max((out - 1) * s + k - len, 0), the smaller half first.
    assert_eq!(same_padding(224, 3, 2), (0, 1));
    assert_eq!(same_padding(112, 5, 2), (1, 2));
    assert_eq!(same_padding(113, 3, 2), (1, 1));
    assert_eq!(same_padding(56, 3, 1), (1, 1));
    assert_eq!(same_padding(7, 5, 1), (2, 2));
}

#[test]
fn forward_and_gradients_match_the_grouped_conv2d() -> candle_core::Result<()> {
    let dev = Device::Cpu;
    for ((n, c, h, w, k, s, pad), kernel) in cases()
        .into_iter()
        .flat_map(|case| KERNELS.map(|kernel| (case, kernel)))
    {
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (n, c, h, w), &dev)?)?;
        let kern = Var::from_tensor(&Tensor::randn(0f32, 1.0, (c, 1, k, k), &dev)?)?;
        let fast = depthwise_conv2d_with(&x, &kern, s, pad, kernel).unwrap();
        let plain = depthwise_conv2d_reference(&x, &kern, s, pad).unwrap();
        assert_eq!(
            fast.dims(),
            plain.dims(),
            "case {:?}",
            (n, c, h, w, k, s, pad, kernel)
        );
        assert!(
            max_diff(&fast, &plain) < 1e-5,
            "forward {:?}",
            (c, h, w, k, s, pad, kernel)
        );

        // Weight the outputs so that every position's gradient differs.
        let r = Tensor::randn(0f32, 1.0, fast.dims(), &dev)?;
        let gf = (&fast * &r)?.sum_all()?.backward()?;
        let gp = (&plain * &r)?.sum_all()?.backward()?;
        for (v, what) in [(&x, "input"), (&kern, "kernel")] {
            let (a, b) = (gf.get(v).unwrap(), gp.get(v).unwrap());
            let scale = 1.0 + max_diff(b, &b.zeros_like()?);
            assert!(
                max_diff(a, b) < 1e-4 * scale,
                "{what} gradient, case {:?}: {}",
                (c, h, w, k, s, pad, kernel),
                max_diff(a, b)
            );
        }
    }
    Ok(())
}

#[test]
fn gradients_match_finite_differences_through_the_fused_op() -> candle_core::Result<()> {
    // 3 channels (one partial block) and 19 (a full one and a partial one), both kernels.
    for (c, kernel) in [
        (3, DepthwiseKernel::Rows),
        (3, DepthwiseKernel::ChannelBlocks),
    ] {
        finite_differences(c, kernel)?;
    }
    finite_differences(19, DepthwiseKernel::ChannelBlocks)
}

fn finite_differences(c: usize, kernel: DepthwiseKernel) -> candle_core::Result<()> {
    let dev = Device::Cpu;
    let conv = |x: &Tensor, kern: &Tensor, s, pad| depthwise_conv2d_with(x, kern, s, pad, kernel);
    let (n, h, w, k, s) = (2, 7, 6, 3, 2);
    let pad = Padding2d::same(h, w, k, s);
    let x0 = Tensor::randn(0f64, 1.0, (n, c, h, w), &dev)?;
    let k0 = Tensor::randn(0f64, 1.0, (c, 1, k, k), &dev)?;
    let probe = Tensor::randn(0f64, 1.0, conv(&x0, &k0, s, pad).unwrap().dims(), &dev)?;
    let loss = |x: &Tensor, kern: &Tensor| -> f64 {
        (conv(x, kern, s, pad).unwrap() * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    };
    let (xv, kv) = (Var::from_tensor(&x0)?, Var::from_tensor(&k0)?);
    let y = conv(&xv, &kv, s, pad).unwrap();
    let grads = (y * &probe)?.sum_all()?.backward()?;
    let eps = 1e-6;
    for (base, var, other_is_x) in [(&x0, &xv, false), (&k0, &kv, true)] {
        let analytic = grads.get(var).unwrap().flatten_all()?.to_vec1::<f64>()?;
        let flat = base.flatten_all()?.to_vec1::<f64>()?;
        for i in (0..flat.len()).step_by(if c > 3 { 29 } else { 7 }) {
            let bump = |d: f64| {
                let mut v = flat.clone();
                v[i] += d;
                Tensor::from_vec(v, base.dims(), &dev).unwrap()
            };
            let (plus, minus) = (bump(eps), bump(-eps));
            let numeric = if other_is_x {
                (loss(&x0, &plus) - loss(&x0, &minus)) / (2.0 * eps)
            } else {
                (loss(&plus, &k0) - loss(&minus, &k0)) / (2.0 * eps)
            };
            assert!(
                (numeric - analytic[i]).abs() < 1e-6 * (1.0 + numeric.abs()),
                "{kernel:?}, {c} channels, index {i}: finite difference {numeric}, backward {}",
                analytic[i]
            );
        }
    }
    Ok(())
}

#[test]
fn bad_shapes_are_errors_not_panics() {
    let dev = Device::Cpu;
    let x = Tensor::zeros((1, 4, 5, 5), DType::F32, &dev).unwrap();
    let wrong_channels = Tensor::zeros((3, 1, 3, 3), DType::F32, &dev).unwrap();
    let e = depthwise_conv2d(&x, &wrong_channels, 1, Padding2d::default()).unwrap_err();
    assert!(e.to_string().contains("depthwise kernel"), "{e}");
    let too_big = Tensor::zeros((4, 1, 7, 7), DType::F32, &dev).unwrap();
    let e = depthwise_conv2d(&x, &too_big, 1, Padding2d::default()).unwrap_err();
    assert!(e.to_string().contains("smaller than"), "{e}");
    let k = Tensor::zeros((4, 1, 3, 3), DType::F32, &dev).unwrap();
    assert!(depthwise_conv2d(&x, &k, 0, Padding2d::default()).is_err());
    let flat = Tensor::zeros((4, 5, 5), DType::F32, &dev).unwrap();
    assert!(depthwise_conv2d(&flat, &k, 1, Padding2d::default()).is_err());
}
