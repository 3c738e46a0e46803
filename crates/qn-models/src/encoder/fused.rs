//! Fused CPU kernels with a backward for the encoder's elementwise pieces: LayerNorm, exact GELU and
//! softmax over the last dimension. Built from plain candle ops each of these is 5–10 graph nodes,
//! and candle's backward allocates a zero tensor and adds into it for every node; one node each
//! removes most of that traffic. Each has a plain-op twin in `ops` (`*_reference`) that the tests
//! compare against, values and gradients; off the CPU, or for other dtypes, the twin runs.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

pub(crate) fn f32s<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> Result<&'a [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Ok(&v[a..b]),
        _ => candle_core::bail!("{op}: needs a contiguous f32 tensor"),
    }
}

/// Rows per parallel task: enough work to amortise the task, few enough to balance two cores.
fn rows_per_task(rows: usize, width: usize) -> usize {
    (16_384 / width.max(1)).clamp(1, rows.max(1))
}

/// Whether the fused kernels apply.
pub fn fused_ok(x: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == candle_core::DType::F32
}

// ---------------------------------------------------------------- LayerNorm

/// `LayerNorm(x; w, b, eps)` over the last dimension.
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    x.contiguous()?.apply_op3(
        &w.contiguous()?,
        &b.contiguous()?,
        LayerNormOp { eps: eps as f32 },
    )
}

struct LayerNormOp {
    eps: f32,
}

fn row_stats(x: &[f32], eps: f32) -> (f32, f32) {
    let h = x.len() as f32;
    let mean = x.iter().sum::<f32>() / h;
    let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / h;
    (mean, 1.0 / (var + eps).sqrt())
}

impl CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        "qn-layer-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, w, b) = (
            f32s(s1, l1, self.name())?,
            f32s(s2, l2, self.name())?,
            f32s(s3, l3, self.name())?,
        );
        let h = w.len();
        if h == 0 || x.len() % h != 0 || b.len() != h {
            candle_core::bail!("qn-layer-norm: {:?} against weight {h}", l1.dims());
        }
        let mut y = vec![0f32; x.len()];
        let per = rows_per_task(x.len() / h, h) * h;
        y.par_chunks_mut(per)
            .zip(x.par_chunks(per))
            .for_each(|(yc, xc)| {
                for (yr, xr) in yc.chunks_mut(h).zip(xc.chunks(h)) {
                    let (mean, rstd) = row_stats(xr, self.eps);
                    for i in 0..h {
                        yr[i] = (xr[i] - mean) * rstd * w[i] + b[i];
                    }
                }
            });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let h = w.elem_count();
        let rows = x.elem_count() / h;
        let packed =
            x.apply_op3_no_bwd(w, &dy.contiguous()?, &LayerNormGradOp { eps: self.eps })?;
        let dx = packed.narrow(0, 0, rows)?.reshape(x.shape())?;
        let dw = packed.narrow(0, rows, 1)?.reshape(h)?;
        let db = packed.narrow(0, rows + 1, 1)?.reshape(h)?;
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

/// `(x, w, dy)` → `(rows + 2, h)`: dx rows, then dw, then db.
struct LayerNormGradOp {
    eps: f32,
}

impl CustomOp3 for LayerNormGradOp {
    fn name(&self) -> &'static str {
        "qn-layer-norm-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, w, dy) = (
            f32s(s1, l1, self.name())?,
            f32s(s2, l2, self.name())?,
            f32s(s3, l3, self.name())?,
        );
        let h = w.len();
        let rows = x.len() / h;
        let mut out = vec![0f32; (rows + 2) * h];
        let (dx, rest) = out.split_at_mut(rows * h);
        let per = rows_per_task(rows, h) * h;
        let (dw, db) = dx
            .par_chunks_mut(per)
            .zip(x.par_chunks(per).zip(dy.par_chunks(per)))
            .map(|(dxc, (xc, dyc))| {
                let mut pw = vec![0f32; h];
                let mut pb = vec![0f32; h];
                let mut g = vec![0f32; h];
                for ((dxr, xr), dyr) in dxc.chunks_mut(h).zip(xc.chunks(h)).zip(dyc.chunks(h)) {
                    let (mean, rstd) = row_stats(xr, self.eps);
                    let (mut sg, mut sgx) = (0f32, 0f32);
                    for i in 0..h {
                        let xhat = (xr[i] - mean) * rstd;
                        g[i] = dyr[i] * w[i];
                        sg += g[i];
                        sgx += g[i] * xhat;
                        pw[i] += dyr[i] * xhat;
                        pb[i] += dyr[i];
                    }
                    let (mg, mgx) = (sg / h as f32, sgx / h as f32);
                    for i in 0..h {
                        let xhat = (xr[i] - mean) * rstd;
                        dxr[i] = rstd * (g[i] - mg - xhat * mgx);
                    }
                }
                (pw, pb)
            })
            .reduce(
                || (vec![0f32; h], vec![0f32; h]),
                |(mut aw, mut ab), (bw, bb)| {
                    aw.iter_mut().zip(&bw).for_each(|(a, b)| *a += b);
                    ab.iter_mut().zip(&bb).for_each(|(a, b)| *a += b);
                    (aw, ab)
                },
            );
        rest[..h].copy_from_slice(&dw);
        rest[h..].copy_from_slice(&db);
        Ok((CpuStorage::F32(out), Shape::from((rows + 2, h))))
    }
}

// ---------------------------------------------------------------- exp

/// `eˣ` without a libm call and without branches, so the loops over it vectorise (the libm call
/// was 6 % of an encoder training step, in GELU and the attention softmax). Relative error below
/// 3e-7 on [-87, 88]; below -87.3 it is exactly 0 (never a subnormal: those would slow every
/// later multiply by orders of magnitude), above 88.3 it is clamped.
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // Adding 1.5 · 2²³ rounds to the nearest integer in plain float arithmetic.
    const ROUND: f32 = 12_582_912.0;
    let underflow = x < -87.3;
    let x = x.clamp(-87.3, 88.3);
    let n = (x * LOG2E + ROUND) - ROUND;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    let y = p * f32::from_bits(((n as i32 + 127) as u32) << 23);
    if underflow {
        0.0
    } else {
        y
    }
}

// ---------------------------------------------------------------- GELU

/// erf with |error| < 1.5e-7 (Abramowitz & Stegun 7.1.26), well inside f32 GELU's needs.
#[inline]
fn erf(x: f32) -> f32 {
    let s = x.signum();
    let a = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let p = t
        * (0.254_829_6
            + t * (-0.284_496_74 + t * (1.421_413_8 + t * (-1.453_152_1 + t * 1.061_405_4))));
    s * (1.0 - p * exp(-a * a))
}

/// The exact (erf) GELU.
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(GeluOp)
}

struct GeluOp;

impl CustomOp1 for GeluOp {
    fn name(&self) -> &'static str {
        "qn-gelu"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32s(s, l, self.name())?;
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(16_384)
            .zip(x.par_chunks(16_384))
            .for_each(|(y, x)| {
                for (y, &x) in y.iter_mut().zip(x) {
                    *y = 0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2));
                }
            });
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }
    fn bwd(&self, x: &Tensor, _res: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(x.apply_op2_no_bwd(&dy.contiguous()?, &GeluGradOp)?))
    }
}

struct GeluGradOp;

impl CustomOp2 for GeluGradOp {
    fn name(&self) -> &'static str {
        "qn-gelu-grad"
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
        const INV_SQRT_2PI: f32 = 0.398_942_3;
        dx.par_chunks_mut(16_384)
            .zip(x.par_chunks(16_384).zip(dy.par_chunks(16_384)))
            .for_each(|(dx, (x, dy))| {
                for i in 0..dx.len() {
                    let v = x[i];
                    let cdf = 0.5 * (1.0 + erf(v * std::f32::consts::FRAC_1_SQRT_2));
                    dx[i] = dy[i] * (cdf + v * INV_SQRT_2PI * exp(-0.5 * v * v));
                }
            });
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}

// ---------------------------------------------------------------- softmax

/// Softmax over the last dimension.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(SoftmaxOp)
}

struct SoftmaxOp;

impl CustomOp1 for SoftmaxOp {
    fn name(&self) -> &'static str {
        "qn-softmax"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32s(s, l, self.name())?;
        let n = *l.dims().last().unwrap_or(&1);
        let mut y = vec![0f32; x.len()];
        let per = rows_per_task(x.len() / n.max(1), n) * n;
        y.par_chunks_mut(per.max(1))
            .zip(x.par_chunks(per.max(1)))
            .for_each(|(yc, xc)| {
                for (yr, xr) in yc.chunks_mut(n).zip(xc.chunks(n)) {
                    let m = xr.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let mut sum = 0f32;
                    for (y, &x) in yr.iter_mut().zip(xr) {
                        *y = exp(x - m);
                        sum += *y;
                    }
                    let inv = 1.0 / sum;
                    yr.iter_mut().for_each(|y| *y *= inv);
                }
            });
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }
    fn bwd(&self, _x: &Tensor, y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(y.apply_op2_no_bwd(&dy.contiguous()?, &SoftmaxGradOp)?))
    }
}

struct SoftmaxGradOp;

impl CustomOp2 for SoftmaxGradOp {
    fn name(&self) -> &'static str {
        "qn-softmax-grad"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (y, dy) = (f32s(s1, l1, self.name())?, f32s(s2, l2, self.name())?);
        let n = *l1.dims().last().unwrap_or(&1);
        let mut dx = vec![0f32; y.len()];
        let per = rows_per_task(y.len() / n.max(1), n) * n;
        dx.par_chunks_mut(per.max(1))
            .zip(y.par_chunks(per.max(1)).zip(dy.par_chunks(per.max(1))))
            .for_each(|(dxc, (yc, dyc))| {
                for ((dxr, yr), dyr) in dxc.chunks_mut(n).zip(yc.chunks(n)).zip(dyc.chunks(n)) {
                    let dot: f32 = yr.iter().zip(dyr).map(|(a, b)| a * b).sum();
                    for i in 0..n {
                        dxr[i] = yr[i] * (dyr[i] - dot);
                    }
                }
            });
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn exp_is_within_3e_7_of_libm() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let want = (x as f64).exp();
            let rel = ((super::exp(x) as f64 - want) / want).abs();
            worst = worst.max(rel);
            x += 0.001_37;
        }
        assert!(worst < 3e-7, "worst relative error {worst:e}");
        assert_eq!(super::exp(0.0), 1.0);
        assert_eq!(super::exp(-1e30), 0.0);
        assert_eq!(super::exp(-87.4), 0.0);
        assert!(super::exp(-87.2).is_normal());
        assert!(super::exp(1e30).is_finite());
    }
}
