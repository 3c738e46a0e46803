//! The fused bias add against `broadcast_add`: values and both gradients, on shapes that split
//! unevenly across tasks; bad shapes are errors.

use candle_core::{Device, Tensor, Var};
use qn_kernels::bias::{add_bias, add_bias_reference};

fn fill(shape: &[usize], seed: u64) -> Tensor {
    let n: usize = shape.iter().product();
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let v: Vec<f32> = (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
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

#[test]
fn matches_broadcast_add_with_gradients() {
    for (m, n) in [(1, 1), (3, 7), (2048, 384), (129, 1536), (70_000, 1)] {
        let (y, b, r) = (fill(&[m, n], 1), fill(&[n], 2), fill(&[m, n], 3));
        let run = |f: &dyn Fn(&Tensor, &Tensor) -> Tensor| {
            let (yv, bv) = (Var::from_tensor(&y).unwrap(), Var::from_tensor(&b).unwrap());
            let out = f(yv.as_tensor(), bv.as_tensor());
            let g = (&out * &r).unwrap().sum_all().unwrap().backward().unwrap();
            (
                out,
                g.get(yv.as_tensor()).unwrap().clone(),
                g.get(bv.as_tensor()).unwrap().clone(),
            )
        };
        let (o, gy, gb) = run(&|y, b| add_bias(y, b).unwrap());
        let (or, gyr, gbr) = run(&|y, b| add_bias_reference(y, b).unwrap());
        assert_eq!(max_diff(&o, &or), 0.0, "{m}x{n} values");
        assert_eq!(max_diff(&gy, &gyr), 0.0, "{m}x{n} input gradient");
        // Summation order differs from candle's: relative to the sum of magnitudes.
        assert!(
            max_diff(&gb, &gbr) <= 1e-6 * m as f32,
            "{m}x{n} bias gradient {}",
            max_diff(&gb, &gbr)
        );
    }
}

#[test]
fn bias_gradient_does_not_depend_on_the_thread_count() {
    let (y, b) = (fill(&[3000, 37], 4), fill(&[37], 5));
    let grad_b = || {
        let bv = Var::from_tensor(&b).unwrap();
        let out = add_bias(&y, bv.as_tensor()).unwrap();
        let g = out.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        g.get(bv.as_tensor()).unwrap().to_vec1::<f32>().unwrap()
    };
    let one = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap()
        .install(grad_b);
    let three = rayon::ThreadPoolBuilder::new()
        .num_threads(3)
        .build()
        .unwrap()
        .install(grad_b);
    assert_eq!(one, three);
}

#[test]
fn wrong_bias_shape_is_an_error() {
    let err = add_bias(&fill(&[2, 3], 1), &fill(&[4], 2)).unwrap_err();
    assert!(
        err.to_string().contains("bias of shape [4] for 3 columns"),
        "{err}"
    );
}
