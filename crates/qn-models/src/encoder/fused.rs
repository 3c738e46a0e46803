//! Fused CPU kernels with a backward for the encoder's elementwise pieces: LayerNorm, exact GELU and
//! softmax over the last dimension. Built from plain candle ops each of these is 5–10 graph nodes,
//! and candle's backward allocates a zero tensor and adds into it for every node; one node each
//! removes most of that traffic. Each has a plain-op twin in `ops` (`*_reference`) that the tests
//! compare against, values and gradients; off the CPU, or for other dtypes, the twin runs.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use qn_kernels::multiversion;
use qn_kernels::simd::{dot, erf, erf_with, exp, sum};
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

#[inline(always)]
fn row_stats(x: &[f32], eps: f32) -> (f32, f32) {
    let h = x.len() as f32;
    let mean = sum(x) / h;
    // Two passes, as PyTorch: E[(x - mean)²], not E[x²] - mean², which cancels.
    let mut acc = [0f32; 16];
    let mut chunks = x.chunks_exact(16);
    for c in &mut chunks {
        for i in 0..16 {
            acc[i] += (c[i] - mean) * (c[i] - mean);
        }
    }
    let tail: f32 = chunks
        .remainder()
        .iter()
        .map(|v| (v - mean) * (v - mean))
        .sum();
    let var = (tail + acc.iter().sum::<f32>()) / h;
    (mean, 1.0 / (var + eps).sqrt())
}

multiversion! {
    /// LayerNorm of the rows of `x` (width `w.len()`) into `y`.
    fn layer_norm_rows(y: &mut [f32], x: &[f32], w: &[f32], b: &[f32], eps: f32) = layer_norm_rows_body;
}

#[inline(always)]
fn layer_norm_rows_body(y: &mut [f32], x: &[f32], w: &[f32], b: &[f32], eps: f32) {
    let h = w.len();
    for (yr, xr) in y.chunks_mut(h).zip(x.chunks(h)) {
        let (mean, rstd) = row_stats(xr, eps);
        for i in 0..h {
            yr[i] = (xr[i] - mean) * rstd * w[i] + b[i];
        }
    }
}

multiversion! {
    /// The LayerNorm gradient of the rows of `x` into `dx`; adds the rows' weight and bias
    /// gradients into `pw` and `pb`. `g` is scratch of the row width.
    fn layer_norm_grad_rows(
        dx: &mut [f32],
        x: &[f32],
        dy: &[f32],
        w: &[f32],
        eps: f32,
        pw: &mut [f32],
        pb: &mut [f32],
        g: &mut [f32],
    ) = layer_norm_grad_rows_body;
}

#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn layer_norm_grad_rows_body(
    dx: &mut [f32],
    x: &[f32],
    dy: &[f32],
    w: &[f32],
    eps: f32,
    pw: &mut [f32],
    pb: &mut [f32],
    g: &mut [f32],
) {
    let h = w.len();
    let (pw, pb, g) = (&mut pw[..h], &mut pb[..h], &mut g[..h]);
    for ((dxr, xr), dyr) in dx.chunks_mut(h).zip(x.chunks(h)).zip(dy.chunks(h)) {
        let (mean, rstd) = row_stats(xr, eps);
        // dx holds x̂ for the moment: it is overwritten below.
        for i in 0..h {
            let xhat = (xr[i] - mean) * rstd;
            dxr[i] = xhat;
            g[i] = dyr[i] * w[i];
            pw[i] += dyr[i] * xhat;
            pb[i] += dyr[i];
        }
        let mg = sum(g) / h as f32;
        let mgx = dot(g, dxr) / h as f32;
        for i in 0..h {
            dxr[i] = rstd * (g[i] - mg - dxr[i] * mgx);
        }
    }
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
            .for_each(|(yc, xc)| layer_norm_rows(yc, xc, w, b, self.eps));
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
                layer_norm_grad_rows(dxc, xc, dyc, w, self.eps, &mut pw, &mut pb, &mut g);
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

// ---------------------------------------------------------------- GELU

/// The exact (erf) GELU.
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(GeluOp)
}

multiversion! {
    fn gelu_slice(y: &mut [f32], x: &[f32]) = gelu_body;
}

#[inline(always)]
fn gelu_body(y: &mut [f32], x: &[f32]) {
    for (y, &x) in y.iter_mut().zip(x) {
        *y = 0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2));
    }
}

multiversion! {
    fn gelu_grad_slice(dx: &mut [f32], x: &[f32], dy: &[f32]) = gelu_grad_body;
}

#[inline(always)]
fn gelu_grad_body(dx: &mut [f32], x: &[f32], dy: &[f32]) {
    const INV_SQRT_2PI: f32 = 0.398_942_3;
    let n = dx.len().min(x.len()).min(dy.len());
    let (dx, x, dy) = (&mut dx[..n], &x[..n], &dy[..n]);
    for i in 0..n {
        let v = x[i];
        // exp(-v²/2) is both the density and erf(v/√2)'s exp(-(v/√2)²): computed once.
        let e = exp(-0.5 * v * v);
        let cdf = 0.5 * (1.0 + erf_with(v * std::f32::consts::FRAC_1_SQRT_2, e));
        dx[i] = dy[i] * (cdf + v * INV_SQRT_2PI * e);
    }
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
            .for_each(|(y, x)| gelu_slice(y, x));
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
        dx.par_chunks_mut(16_384)
            .zip(x.par_chunks(16_384).zip(dy.par_chunks(16_384)))
            .for_each(|(dx, (x, dy))| gelu_grad_slice(dx, x, dy));
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}

// ---------------------------------------------------------------- softmax

/// Softmax over the last dimension.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(SoftmaxOp)
}

multiversion! {
    /// Softmax of each row (width `n`) of `x`, in place.
    pub(crate) fn softmax_rows(x: &mut [f32], n: usize) = softmax_rows_body;
}

#[inline(always)]
fn row_max(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 16];
    let mut chunks = x.chunks_exact(16);
    for c in &mut chunks {
        for i in 0..16 {
            // A plain comparison, not `f32::max`: that one's NaN rule keeps LLVM from vectorising.
            acc[i] = if c[i] > acc[i] { c[i] } else { acc[i] };
        }
    }
    chunks
        .remainder()
        .iter()
        .chain(acc.iter())
        .fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m })
}

#[inline(always)]
fn softmax_rows_body(x: &mut [f32], n: usize) {
    for row in x.chunks_mut(n.max(1)) {
        let m = row_max(row);
        for v in row.iter_mut() {
            *v = exp(*v - m);
        }
        let inv = 1.0 / sum(row);
        row.iter_mut().for_each(|v| *v *= inv);
    }
}

multiversion! {
    /// The softmax gradient per row (width `n`): `dy` in `g` becomes `y ⊙ (dy − Σ y·dy)`.
    pub(crate) fn softmax_grad_rows(g: &mut [f32], y: &[f32], n: usize) = softmax_grad_rows_body;
}

#[inline(always)]
fn softmax_grad_rows_body(g: &mut [f32], y: &[f32], n: usize) {
    for (gr, yr) in g.chunks_mut(n.max(1)).zip(y.chunks(n.max(1))) {
        let d = dot(gr, yr);
        gr.iter_mut().zip(yr).for_each(|(g, y)| *g = y * (*g - d));
    }
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
                yc.copy_from_slice(xc);
                softmax_rows(yc, n);
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
                dxc.copy_from_slice(dyc);
                softmax_grad_rows(dxc, yc, n);
            });
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}
