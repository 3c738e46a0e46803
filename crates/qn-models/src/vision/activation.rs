//! EfficientNet's activations as fused CPU ops with a one-pass backward: ReLU6 (Lite) and swish /
//! SiLU (B). candle builds `clamp(0, 6)` from `maximum` and `minimum`, whose backward compares the
//! output with each input, converts the masks and divides (~20 % of a Lite0 training step), and
//! derives SiLU's from several elementwise nodes. Each here is one node forward and one pass
//! backward; [`relu6_reference`] / [`swish_reference`] are the plain-op twins the tests compare
//! against, and run off the CPU.
//!
//! ReLU6's gradient follows PyTorch's `hardtanh`: 1 strictly inside (0, 6), 0 elsewhere (candle's
//! `maximum` would split it at a tie).
//!
//! ```
//! use candle_core::{Device, Tensor};
//! use qn_models::vision::activation::{relu6, swish, swish_reference};
//!
//! let x = Tensor::new(&[-1f32, 0.5, 7.0], &Device::Cpu)?;
//! assert_eq!(relu6(&x)?.to_vec1::<f32>()?, [0.0, 0.5, 6.0]);
//! let d = (swish(&x)? - swish_reference(&x)?)?.abs()?.max(0)?.to_scalar::<f32>()?;
//! assert!(d < 1e-5);
//! # Ok::<(), candle_core::Error>(())
//! ```

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::encoder::fused::{f32s, fused_ok};
use qn_kernels::simd::exp;

/// Elements per parallel task.
const CHUNK: usize = 16_384;

/// `min(max(x, 0), 6)`.
pub fn relu6(x: &Tensor) -> Result<Tensor> {
    if fused_ok(x) {
        x.contiguous()?.apply_op1(Pointwise(Relu6))
    } else {
        relu6_reference(x)
    }
}

/// The plain-op twin of [`relu6`].
pub fn relu6_reference(x: &Tensor) -> Result<Tensor> {
    x.clamp(0f32, 6f32)
}

/// `x · sigmoid(x)` (swish, SiLU).
pub fn swish(x: &Tensor) -> Result<Tensor> {
    if fused_ok(x) {
        x.contiguous()?.apply_op1(Pointwise(Swish))
    } else {
        swish_reference(x)
    }
}

/// The plain-op twin of [`swish`].
pub fn swish_reference(x: &Tensor) -> Result<Tensor> {
    x.silu()
}

/// An elementwise function and its derivative, inlined into the ops' loops.
trait Activation: Copy + Send + Sync + 'static {
    const NAME: &'static str;
    const GRAD_NAME: &'static str;
    fn value(x: f32) -> f32;
    /// `dy · f'(x)`.
    fn grad(x: f32, dy: f32) -> f32;
}

#[derive(Clone, Copy)]
struct Relu6;

impl Activation for Relu6 {
    const NAME: &'static str = "qn-relu6";
    const GRAD_NAME: &'static str = "qn-relu6-grad";
    fn value(x: f32) -> f32 {
        x.clamp(0.0, 6.0)
    }
    fn grad(x: f32, dy: f32) -> f32 {
        if x > 0.0 && x < 6.0 {
            dy
        } else {
            0.0
        }
    }
}

#[derive(Clone, Copy)]
struct Swish;

#[inline(always)]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

impl Activation for Swish {
    const NAME: &'static str = "qn-swish";
    const GRAD_NAME: &'static str = "qn-swish-grad";
    fn value(x: f32) -> f32 {
        x * sigmoid(x)
    }
    fn grad(x: f32, dy: f32) -> f32 {
        let s = sigmoid(x);
        dy * s * (1.0 + x * (1.0 - s))
    }
}

/// `y = f(x)`, in parallel chunks.
struct Pointwise<A>(A);

impl<A: Activation> CustomOp1 for Pointwise<A> {
    fn name(&self) -> &'static str {
        A::NAME
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32s(s, l, self.name())?;
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(CHUNK)
            .zip(x.par_chunks(CHUNK))
            .for_each(|(y, x)| y.iter_mut().zip(x).for_each(|(o, &v)| *o = A::value(v)));
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }
    fn bwd(&self, x: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(x.apply_op2_no_bwd(
            &dy.contiguous()?,
            &PointwiseGrad(self.0),
        )?))
    }
}

/// `dx = dy · f'(x)` from `(x, dy)`, in parallel chunks.
struct PointwiseGrad<A>(A);

impl<A: Activation> CustomOp2 for PointwiseGrad<A> {
    fn name(&self) -> &'static str {
        A::GRAD_NAME
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, dy) = (f32s(s1, l1, self.name())?, f32s(s2, l2, self.name())?);
        let mut dx = vec![0f32; x.len()];
        dx.par_chunks_mut(CHUNK)
            .zip(x.par_chunks(CHUNK).zip(dy.par_chunks(CHUNK)))
            .for_each(|(o, (x, dy))| {
                for ((o, &v), &g) in o.iter_mut().zip(x).zip(dy) {
                    *o = A::grad(v, g);
                }
            });
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}
