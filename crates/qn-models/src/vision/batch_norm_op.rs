//! Batch normalisation in training mode as one fused CPU op with an analytic backward.
//!
//! Built from plain candle ops, a training-mode batch norm is a transpose copy, two means, a
//! broadcast multiply and add, and in the backward candle reduces each broadcast with a generic
//! strided `sum_keepdim` over the batch and pixels: ~20 % of an EfficientNet-Lite0 training step.
//! Here the statistics are one parallel pass over each channel's planes, the forward one
//! multiply-add per element, and the backward two passes (per-channel sums of `dy` and
//! `dy · x̂`, then `dx`) with the gradients of the batch statistics folded in:
//!
//! ```text
//! x̂ = (x − μ) · r,  r = 1 / √(σ² + ε),  y = γ · x̂ + β
//! dβ = Σ dy,  dγ = Σ dy · x̂,  dx = γ · r · (dy − dβ / N − x̂ · dγ / N)
//! ```
//!
//! `BatchNorm2d::forward_t_reference` is the plain-op twin it is tested against (values, the
//! three gradients, the running statistics); off the CPU or for other dtypes the twin runs.

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::encoder::fused::f32s;

/// Per-channel batch statistics of `x (n, c, h, w)`: the mean and the biased variance, each a
/// `c`-vector, accumulated in f64 (a channel holds up to ~10⁵ values).
pub(super) fn channel_stats(x: &Tensor) -> Result<(Vec<f32>, Vec<f32>)> {
    let (n, c, h, w) = x.dims4()?;
    let x = x.contiguous()?;
    let (storage, layout) = x.storage_and_layout();
    let candle_core::Storage::Cpu(cpu) = &*storage else {
        candle_core::bail!("qn-batch-norm: statistics need a CPU tensor");
    };
    let v = f32s(cpu, layout, "qn-batch-norm")?;
    let plane = h * w;
    let count = (n * plane) as f64;
    let stats: Vec<(f32, f32)> = (0..c)
        .into_par_iter()
        .map(|ch| {
            let planes = || (0..n).map(|b| &v[(b * c + ch) * plane..][..plane]);
            let sum: f64 = planes()
                .map(|p| p.iter().map(|&x| x as f64).sum::<f64>())
                .sum();
            let mean = sum / count;
            let m = mean as f32;
            let sq: f64 = planes()
                .map(|p| p.iter().map(|&x| ((x - m) * (x - m)) as f64).sum::<f64>())
                .sum();
            (m, (sq / count) as f32)
        })
        .collect();
    Ok(stats.into_iter().unzip())
}

/// `y = γ · (x − μ) · r + β` with the batch's `μ` and `r` fixed in the op (the backward accounts
/// for their dependence on `x`).
pub(super) struct BatchNormTrainOp {
    pub(super) mean: Vec<f32>,
    pub(super) rstd: Vec<f32>,
}

impl BatchNormTrainOp {
    fn dims(&self, l: &Layout) -> Result<(usize, usize, usize)> {
        let (n, c, h, w) = l.shape().dims4()?;
        if c != self.mean.len() {
            candle_core::bail!(
                "qn-batch-norm: {c} channels, statistics for {}",
                self.mean.len()
            );
        }
        Ok((n, c, h * w))
    }
}

impl CustomOp3 for BatchNormTrainOp {
    fn name(&self) -> &'static str {
        "qn-batch-norm-train"
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
        let (x, g, b) = (
            f32s(s1, l1, self.name())?,
            f32s(s2, l2, self.name())?,
            f32s(s3, l3, self.name())?,
        );
        let (_, c, plane) = self.dims(l1)?;
        let mut y = vec![0f32; x.len()];
        if plane > 0 {
            y.par_chunks_mut(plane)
                .zip(x.par_chunks(plane))
                .enumerate()
                .for_each(|(p, (yp, xp))| {
                    let ch = p % c;
                    let scale = self.rstd[ch] * g[ch];
                    let shift = b[ch] - self.mean[ch] * scale;
                    for (o, &v) in yp.iter_mut().zip(xp) {
                        *o = v * scale + shift;
                    }
                });
        }
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        g: &Tensor,
        _b: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let c = self.mean.len();
        let op = BatchNormGradOp {
            mean: self.mean.clone(),
            rstd: self.rstd.clone(),
        };
        let packed = x.apply_op3_no_bwd(g, &dy.contiguous()?, &op)?;
        let len = x.elem_count();
        let dx = packed.narrow(0, 0, len)?.reshape(x.shape())?;
        let dg = packed.narrow(0, len, c)?;
        let db = packed.narrow(0, len + c, c)?;
        Ok((Some(dx), Some(dg), Some(db)))
    }
}

/// `(x, γ, dy)` → `dx` (flattened), then `dγ` (`c`), then `dβ` (`c`).
struct BatchNormGradOp {
    mean: Vec<f32>,
    rstd: Vec<f32>,
}

impl CustomOp3 for BatchNormGradOp {
    fn name(&self) -> &'static str {
        "qn-batch-norm-train-grad"
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
        let (x, g, dy) = (
            f32s(s1, l1, self.name())?,
            f32s(s2, l2, self.name())?,
            f32s(s3, l3, self.name())?,
        );
        let (n, c, h, w) = l1.shape().dims4()?;
        let plane = h * w;
        let mut out = vec![0f32; x.len() + 2 * c];
        if x.is_empty() {
            let len = out.len();
            return Ok((CpuStorage::F32(out), Shape::from(len)));
        }
        let count = (n * plane) as f64;
        // Per channel: Σ dy and Σ dy · x̂, in f64 over the planes.
        let sums: Vec<(f32, f32)> = (0..c)
            .into_par_iter()
            .map(|ch| {
                let (m, r) = (self.mean[ch], self.rstd[ch]);
                let (mut sd, mut sdx) = (0f64, 0f64);
                for b in 0..n {
                    let at = (b * c + ch) * plane;
                    let (xp, dp) = (&x[at..at + plane], &dy[at..at + plane]);
                    let (mut a, mut bx) = (0f32, 0f32);
                    for (&xv, &dv) in xp.iter().zip(dp) {
                        a += dv;
                        bx += dv * (xv - m) * r;
                    }
                    sd += a as f64;
                    sdx += bx as f64;
                }
                (sd as f32, sdx as f32)
            })
            .collect();
        let (dx, rest) = out.split_at_mut(x.len());
        dx.par_chunks_mut(plane)
            .zip(x.par_chunks(plane).zip(dy.par_chunks(plane)))
            .enumerate()
            .for_each(|(p, (dxp, (xp, dp)))| {
                let ch = p % c;
                let (m, r) = (self.mean[ch], self.rstd[ch]);
                let (sd, sdx) = sums[ch];
                let k = g[ch] * r;
                let (md, mdx) = ((sd as f64 / count) as f32, (sdx as f64 / count) as f32);
                for ((o, &xv), &dv) in dxp.iter_mut().zip(xp).zip(dp) {
                    *o = k * (dv - md - (xv - m) * r * mdx);
                }
            });
        for (ch, &(sd, sdx)) in sums.iter().enumerate() {
            rest[ch] = sdx;
            rest[c + ch] = sd;
        }
        Ok((CpuStorage::F32(out), Shape::from(x.len() + 2 * c)))
    }
}
