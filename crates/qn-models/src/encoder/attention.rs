//! The self-attention core as one graph node: `softmax(q·kᵀ/√d + bias)`, dropout on the
//! probabilities, times `v`, for every (sequence, head) pair, straight from the `(b, l, h)`
//! projections to the `(b, l, h)` context.
//!
//! Built from candle ops the same computation is about fifteen nodes per layer (three head splits
//! with a copy each, two batched matmuls, scale, mask, softmax, dropout, the merge and its copy),
//! and candle's backward allocates a zero gradient and adds into it at every node: on
//! all-MiniLM-L6-v2 that bookkeeping cost more than the attention's arithmetic. Here each (sequence,
//! head) pair is copied into contiguous scratch and multiplied by small register-blocked kernels
//! (a general GEMM's packing and dispatch cost more than these 40 × 40 × 32 products), the
//! forward keeps nothing (the backward recomputes the
//! probabilities from `q` and `k`, a small `l × l` matmul per pair), and the dropout mask is a
//! function of (seed, pair) so the backward draws it again. [`self_attention_reference`] is the
//! plain-op twin the tests compare values and gradients against; off the CPU or for other dtypes it
//! is what runs.
//!
//! ```
//! use candle_core::{Device, Tensor};
//! use qn_models::encoder::attention::self_attention;
//! let (b, l, h) = (2, 5, 8);
//! let q = Tensor::randn(0f32, 1.0, (b, l, h), &Device::Cpu)?;
//! let bias = Tensor::zeros((b, 1, 1, l), candle_core::DType::F32, &Device::Cpu)?;
//! let ctx = self_attention(&q, &q, &q, &bias, 2, None)?;
//! assert_eq!(ctx.dims(), &[b, l, h]);
//! # Ok::<(), candle_core::Error>(())
//! ```

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Storage, Tensor};
use qn_kernels::multiversion;
use rayon::prelude::*;

use super::fused::f32s;

/// Dropout on the attention probabilities: rate `p`, masks drawn from `seed` and the
/// (sequence, head) pair.
#[derive(Debug, Clone, Copy)]
pub struct ProbsDropout {
    /// Probability of dropping a probability.
    pub p: f64,
    /// Mixed from the run's seed, step, micro-batch and the layer's dropout site.
    pub seed: u64,
}

/// The inverted-dropout mask (`0` or `1/(1-p)`) of one (sequence, head) pair's `len × len`
/// probabilities.
pub fn probs_mask(drop: ProbsDropout, pair: usize, len: usize) -> Vec<f32> {
    let seed = drop.seed ^ (pair as u64 + 1).wrapping_mul(0xD6E8_FEB8_6659_FD93);
    super::ops::dropout_mask(seed, len * len, drop.p)
}

/// Multi-head attention core. `q`, `k`, `v`: `(b, l, h)` with `h = heads · d`; `bias`: the additive
/// key mask `(b, 1, 1, l)` (0 to attend, a large negative to ignore). Returns `(b, l, h)`.
pub fn self_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    bias: &Tensor,
    heads: usize,
    drop: Option<ProbsDropout>,
) -> Result<Tensor> {
    let drop = drop.filter(|d| d.p > 0.0);
    if !super::fused::fused_ok(q) {
        return self_attention_reference(q, k, v, bias, heads, drop);
    }
    let (b, l, h) = q.dims3()?;
    if heads == 0 || h % heads != 0 {
        candle_core::bail!("attention: hidden size {h} is not a multiple of {heads} heads");
    }
    let bias = bias.reshape((b, l))?.flatten_all()?.to_vec1::<f32>()?;
    let op = AttentionOp {
        b,
        l,
        h,
        heads,
        bias,
        drop,
    };
    q.contiguous()?
        .apply_op3(&k.contiguous()?, &v.contiguous()?, op)
}

/// [`self_attention`] from plain candle ops (split heads, matmuls, softmax, dropout by
/// [`probs_mask`], merge).
pub fn self_attention_reference(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    bias: &Tensor,
    heads: usize,
    drop: Option<ProbsDropout>,
) -> Result<Tensor> {
    let (b, l, h) = q.dims3()?;
    let d = h / heads;
    let split = |t: &Tensor| t.reshape((b, l, heads, d))?.transpose(1, 2)?.contiguous();
    let (qh, kh, vh) = (split(q)?, split(k)?, split(v)?);
    let scores = (qh.matmul(&kh.t()?)? / (d as f64).sqrt())?.broadcast_add(bias)?;
    let mut probs = super::ops::softmax_reference(&scores)?;
    if let Some(drop) = drop.filter(|d| d.p > 0.0) {
        let mask: Vec<f32> = (0..b * heads)
            .flat_map(|pair| probs_mask(drop, pair, l))
            .collect();
        let mask = Tensor::from_vec(mask, (b, heads, l, l), q.device())?.to_dtype(q.dtype())?;
        probs = probs.mul(&mask)?;
    }
    probs
        .matmul(&vh)?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((b, l, h))
}

struct AttentionOp {
    b: usize,
    l: usize,
    h: usize,
    heads: usize,
    /// `(b, l)` additive key mask.
    bias: Vec<f32>,
    drop: Option<ProbsDropout>,
}

/// A pointer the per-pair tasks share: each writes only its own head's columns.
#[derive(Clone, Copy)]
struct Shared(*mut f32);
// SAFETY: tasks write disjoint elements (their pair's rows × head columns) and nothing reads them
// until every task has finished.
unsafe impl Send for Shared {}
unsafe impl Sync for Shared {}

multiversion! {
    /// `dst (m × n) = scale · a (m × k) · b (k × n)`, all row-major and contiguous.
    fn mm_nn(dst: &mut [f32], a: &[f32], b: &[f32], m: usize, k: usize, n: usize, scale: f32) = mm_nn_body;
}

multiversion! {
    /// `dst (m × n) = scale · aᵀ · b` for `a (k × m)` and `b (k × n)`, row-major and contiguous.
    fn mm_tn(dst: &mut [f32], a: &[f32], b: &[f32], m: usize, k: usize, n: usize, scale: f32) = mm_tn_body;
}

// The attention's products are small (a head's `l × l` scores over `d` columns, l ≈ 40, d ≈ 32)
// and there are `b · heads` of them per layer: a general GEMM spends more on packing and dispatch
// than on arithmetic there. These kernels keep a 4-row × 16-column block of the output in
// registers while they run down `k`, reading each row of `b` once per four output rows; the
// operands are copied into contiguous scratch first ([`Head`]).

#[inline(always)]
fn mm_nn_body(dst: &mut [f32], a: &[f32], b: &[f32], m: usize, k: usize, n: usize, scale: f32) {
    small_mm::<false>(dst, a, b, m, k, n, scale)
}

#[inline(always)]
fn mm_tn_body(dst: &mut [f32], a: &[f32], b: &[f32], m: usize, k: usize, n: usize, scale: f32) {
    small_mm::<true>(dst, a, b, m, k, n, scale)
}

/// `dst = scale · op(a) · b` with `op(a) = aᵀ` when `TA` (then `a` is `k × m`).
#[inline(always)]
fn small_mm<const TA: bool>(
    dst: &mut [f32],
    a: &[f32],
    b: &[f32],
    m: usize,
    k: usize,
    n: usize,
    scale: f32,
) {
    assert!(dst.len() >= m * n && a.len() >= m * k && b.len() >= k * n);
    let mut i = 0;
    while i < m {
        let rows = if m - i >= 4 { 4 } else { 1 };
        let mut j = 0;
        while j < n {
            let step = match (rows, n - j) {
                (4, w) if w >= 16 => panel::<TA, 4, 16>(dst, a, b, (i, j), (m, k, n), scale),
                (4, w) if w >= 8 => panel::<TA, 4, 8>(dst, a, b, (i, j), (m, k, n), scale),
                (4, _) => panel::<TA, 4, 1>(dst, a, b, (i, j), (m, k, n), scale),
                (_, w) if w >= 16 => panel::<TA, 1, 16>(dst, a, b, (i, j), (m, k, n), scale),
                (_, w) if w >= 8 => panel::<TA, 1, 8>(dst, a, b, (i, j), (m, k, n), scale),
                _ => panel::<TA, 1, 1>(dst, a, b, (i, j), (m, k, n), scale),
            };
            j += step;
        }
        i += rows;
    }
}

/// The `R × W` output block at `(i, j)`, accumulated over all of `k`; returns `W`.
#[inline(always)]
fn panel<const TA: bool, const R: usize, const W: usize>(
    dst: &mut [f32],
    a: &[f32],
    b: &[f32],
    (i, j): (usize, usize),
    (m, k, n): (usize, usize, usize),
    scale: f32,
) -> usize {
    let mut acc = [[0f32; W]; R];
    for p in 0..k {
        let bv: &[f32; W] = b[p * n + j..p * n + j + W].try_into().expect("W columns");
        for (r, acc) in acc.iter_mut().enumerate() {
            let s = if TA {
                a[p * m + i + r]
            } else {
                a[(i + r) * k + p]
            };
            for t in 0..W {
                acc[t] += s * bv[t];
            }
        }
    }
    for (r, acc) in acc.iter().enumerate() {
        let out = &mut dst[(i + r) * n + j..(i + r) * n + j + W];
        for t in 0..W {
            out[t] = acc[t] * scale;
        }
    }
    W
}

/// One (sequence, head) pair's operands and results in contiguous row-major scratch, reused
/// across the pairs a task handles.
struct Head {
    q: Vec<f32>,
    k: Vec<f32>,
    /// `kᵀ (d × l)`.
    kt: Vec<f32>,
    v: Vec<f32>,
    /// `vᵀ (d × l)`.
    vt: Vec<f32>,
    g: Vec<f32>,
    /// Probabilities `l × l`.
    p: Vec<f32>,
    /// Their gradient, `l × l`.
    dp: Vec<f32>,
    /// Three `l × d` results.
    out: [Vec<f32>; 3],
}

impl Head {
    fn new(l: usize, d: usize) -> Self {
        let z = |n: usize| vec![0f32; n];
        Self {
            q: z(l * d),
            k: z(l * d),
            kt: z(l * d),
            v: z(l * d),
            vt: z(l * d),
            g: z(l * d),
            p: z(l * l),
            dp: z(l * l),
            out: [z(l * d), z(l * d), z(l * d)],
        }
    }
}

/// Copies the head columns `at .. at + d` of rows of width `h` into `dst (l × d)`.
fn gather(src: &[f32], at: usize, h: usize, d: usize, dst: &mut [f32]) {
    for (i, row) in dst.chunks_exact_mut(d.max(1)).enumerate() {
        row.copy_from_slice(&src[at + i * h..at + i * h + d]);
    }
}

/// [`gather`], transposed: `dst (d × l)`.
fn gather_t(src: &[f32], at: usize, h: usize, l: usize, dst: &mut [f32]) {
    let d = dst.len() / l.max(1);
    for i in 0..l {
        let row = &src[at + i * h..at + i * h + d];
        for (c, &x) in row.iter().enumerate() {
            dst[c * l + i] = x;
        }
    }
}

/// Writes `src (l × d)` into the head columns `at .. at + d` of `dst`'s rows of width `h`.
///
/// # Safety
/// `dst` must address a buffer holding every element written, and no other task may touch those
/// elements while this runs.
unsafe fn scatter(dst: Shared, at: usize, h: usize, src: &[f32], d: usize) {
    for (i, row) in src.chunks_exact(d.max(1)).enumerate() {
        // SAFETY: the caller guarantees the range is inside the buffer and exclusively ours.
        unsafe { std::ptr::copy_nonoverlapping(row.as_ptr(), dst.0.add(at + i * h), d) };
    }
}

impl AttentionOp {
    fn d(&self) -> usize {
        self.h / self.heads
    }

    fn check(&self, len: usize) -> Result<()> {
        if len != self.b * self.l * self.h {
            candle_core::bail!(
                "qn-attention: {len} elements, expected ({}, {}, {})",
                self.b,
                self.l,
                self.h
            );
        }
        Ok(())
    }

    /// Where the pair's rows and head columns start in a `(b, l, h)` buffer.
    fn at(&self, pair: usize) -> usize {
        (pair / self.heads) * self.l * self.h + (pair % self.heads) * self.d()
    }

    /// Loads the pair's `q` and `kᵀ` into `w` and writes its attention probabilities (before
    /// dropout, `l × l`) into `w.p`.
    fn probs(&self, pair: usize, q: &[f32], k: &[f32], w: &mut Head) {
        let (l, h, d) = (self.l, self.h, self.d());
        let (at, bi) = (self.at(pair), pair / self.heads);
        gather(q, at, h, d, &mut w.q);
        gather_t(k, at, h, l, &mut w.kt);
        mm_nn(&mut w.p, &w.q, &w.kt, l, d, l, 1.0 / (d as f32).sqrt());
        let bias = &self.bias[bi * l..(bi + 1) * l];
        for row in w.p.chunks_mut(l) {
            row.iter_mut().zip(bias).for_each(|(s, b)| *s += b);
        }
        super::fused::softmax_rows(&mut w.p, l);
    }
}

impl CustomOp3 for AttentionOp {
    fn name(&self) -> &'static str {
        "qn-attention"
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
        let (q, k, v) = (
            f32s(s1, l1, self.name())?,
            f32s(s2, l2, self.name())?,
            f32s(s3, l3, self.name())?,
        );
        for t in [q, k, v] {
            self.check(t.len())?;
        }
        let (l, h, d) = (self.l, self.h, self.d());
        let mut out = vec![0f32; q.len()];
        let dst = Shared(out.as_mut_ptr());
        (0..self.b * self.heads).into_par_iter().for_each_init(
            || Head::new(l, d),
            |w, pair| {
                self.probs(pair, q, k, w);
                if let Some(drop) = self.drop {
                    let mask = probs_mask(drop, pair, l);
                    w.p.iter_mut().zip(&mask).for_each(|(x, m)| *x *= m);
                }
                gather(v, self.at(pair), h, d, &mut w.v);
                mm_nn(&mut w.out[0], &w.p, &w.v, l, l, d, 1.0);
                // SAFETY: `out` holds (b, l, h) elements and each pair writes only its own rows
                // and head columns.
                unsafe { scatter(dst, self.at(pair), h, &w.out[0], d) };
            },
        );
        Ok((CpuStorage::F32(out), Shape::from((self.b, l, h))))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let (dq, dk, dv) = {
            let guards = [
                q.storage_and_layout(),
                k.storage_and_layout(),
                v.storage_and_layout(),
                grad.storage_and_layout(),
            ];
            let mut views = Vec::with_capacity(4);
            for (s, layout) in &guards {
                match &**s {
                    Storage::Cpu(cs) => views.push(f32s(cs, layout, "qn-attention")?),
                    _ => candle_core::bail!("qn-attention: backward runs on the CPU"),
                }
            }
            self.backward(views[0], views[1], views[2], views[3])?
        };
        let shape = (self.b, self.l, self.h);
        let dev = q.device();
        Ok((
            Some(Tensor::from_vec(dq, shape, dev)?),
            Some(Tensor::from_vec(dk, shape, dev)?),
            Some(Tensor::from_vec(dv, shape, dev)?),
        ))
    }
}

impl AttentionOp {
    #[allow(clippy::type_complexity)]
    fn backward(
        &self,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        g: &[f32],
    ) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
        for t in [q, k, v, g] {
            self.check(t.len())?;
        }
        let (l, h, d) = (self.l, self.h, self.d());
        let scale = 1.0 / (d as f32).sqrt();
        let mut dq = vec![0f32; q.len()];
        let mut dk = vec![0f32; q.len()];
        let mut dv = vec![0f32; q.len()];
        let (pq, pk, pv) = (
            Shared(dq.as_mut_ptr()),
            Shared(dk.as_mut_ptr()),
            Shared(dv.as_mut_ptr()),
        );
        (0..self.b * self.heads).into_par_iter().for_each_init(
            || Head::new(l, d),
            |w, pair| {
                let at = self.at(pair);
                self.probs(pair, q, k, w);
                gather(k, at, h, d, &mut w.k);
                gather(g, at, h, d, &mut w.g);
                gather_t(v, at, h, l, &mut w.vt);
                let mask = self.drop.map(|drop| probs_mask(drop, pair, l));
                // dV = (P ⊙ M)ᵀ · dO, with the dropped-out probabilities rebuilt in `dp` first.
                match &mask {
                    Some(m) => {
                        w.dp.iter_mut()
                            .zip(w.p.iter().zip(m))
                            .for_each(|(o, (x, m))| *o = x * m)
                    }
                    None => w.dp.copy_from_slice(&w.p),
                }
                mm_tn(&mut w.out[2], &w.dp, &w.g, l, l, d, 1.0);
                // dP = (dO · Vᵀ) ⊙ M
                mm_nn(&mut w.dp, &w.g, &w.vt, l, d, l, 1.0);
                if let Some(m) = &mask {
                    w.dp.iter_mut().zip(m).for_each(|(x, m)| *x *= m);
                }
                // dS = P ⊙ (dP − Σⱼ dP·P), per row.
                super::fused::softmax_grad_rows(&mut w.dp, &w.p, l);
                // dQ = scale · dS · K, dK = scale · dSᵀ · Q.
                mm_nn(&mut w.out[0], &w.dp, &w.k, l, l, d, scale);
                mm_tn(&mut w.out[1], &w.dp, &w.q, l, l, d, scale);
                for (dst, src) in [pq, pk, pv].into_iter().zip(&w.out) {
                    // SAFETY: each buffer holds (b, l, h) elements and each pair writes only its
                    // own rows and head columns.
                    unsafe { scatter(dst, at, h, src, d) };
                }
            },
        );
        Ok((dq, dk, dv))
    }
}
