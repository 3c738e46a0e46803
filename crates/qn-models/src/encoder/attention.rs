//! The self-attention core as one graph node: `softmax(q·kᵀ/√d + bias)`, dropout on the
//! probabilities, times `v`, for every (sequence, head) pair, straight from the `(b, l, h)`
//! projections to the `(b, l, h)` context.
//!
//! Built from candle ops the same computation is about fifteen nodes per layer (three head splits
//! with a copy each, two batched matmuls, scale, mask, softmax, dropout, the merge and its copy),
//! and candle's backward allocates a zero gradient and adds into it at every node: on
//! all-MiniLM-L6-v2 that bookkeeping cost more than the attention's arithmetic. Here the heads are
//! strided views handed to `gemm`, the forward keeps nothing (the backward recomputes the
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
use gemm::Parallelism;
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

impl Shared {
    /// The element `i` further on. A method, so a closure captures the whole `Shared` (which is
    /// `Sync`) rather than its raw-pointer field (which is not).
    fn at(self, i: usize) -> *mut f32 {
        // SAFETY: callers stay inside the buffer the pointer came from.
        unsafe { self.0.add(i) }
    }
}

/// `dst (m × n) = beta · lhs (m × k) · rhs (k × n) [+ dst]`, every operand by (row, column) strides.
#[allow(clippy::too_many_arguments)]
fn mm(
    (m, n, k): (usize, usize, usize),
    dst: *mut f32,
    (dst_rs, dst_cs): (usize, usize),
    accumulate: bool,
    lhs: *const f32,
    (lhs_rs, lhs_cs): (usize, usize),
    rhs: *const f32,
    (rhs_rs, rhs_cs): (usize, usize),
    beta: f32,
) {
    // SAFETY: callers pass pointers into buffers that hold every strided element addressed.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            dst_cs as isize,
            dst_rs as isize,
            accumulate,
            lhs,
            lhs_cs as isize,
            lhs_rs as isize,
            rhs,
            rhs_cs as isize,
            rhs_rs as isize,
            1.0,
            beta,
            false,
            false,
            false,
            Parallelism::None,
        )
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

    /// Writes the pair's attention probabilities (before dropout, `l × l`) into `p`; `q` and `k`
    /// are the whole `(b, l, h)` inputs.
    fn probs(&self, pair: usize, q: &[f32], k: &[f32], p: &mut [f32]) {
        let (l, h, d) = (self.l, self.h, self.d());
        let (bi, hd) = (pair / self.heads, pair % self.heads);
        let at = bi * l * h + hd * d;
        let scale = 1.0 / (d as f32).sqrt();
        mm(
            (l, l, d),
            p.as_mut_ptr(),
            (l, 1),
            false,
            q[at..].as_ptr(),
            (h, 1),
            k[at..].as_ptr(),
            (1, h),
            scale,
        );
        let bias = &self.bias[bi * l..(bi + 1) * l];
        for row in p.chunks_mut(l) {
            row.iter_mut().zip(bias).for_each(|(s, b)| *s += b);
        }
        super::fused::softmax_rows(p, l);
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
            || vec![0f32; l * l],
            |p, pair| {
                self.probs(pair, q, k, p);
                if let Some(drop) = self.drop {
                    let mask = probs_mask(drop, pair, l);
                    p.iter_mut().zip(&mask).for_each(|(x, m)| *x *= m);
                }
                let at = (pair / self.heads) * l * h + (pair % self.heads) * d;
                // `at` addresses this pair's rows and head columns inside `out`.
                mm(
                    (l, d, l),
                    dst.at(at),
                    (h, 1),
                    false,
                    p.as_ptr(),
                    (l, 1),
                    v[at..].as_ptr(),
                    (h, 1),
                    1.0,
                );
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
            || (vec![0f32; l * l], vec![0f32; l * l]),
            |(p, dp), pair| {
                let at = (pair / self.heads) * l * h + (pair % self.heads) * d;
                self.probs(pair, q, k, p);
                let mask = self.drop.map(|drop| probs_mask(drop, pair, l));
                // dV = (P ⊙ M)ᵀ · dO, with the dropped-out probabilities rebuilt in `dp` first.
                match &mask {
                    Some(m) => dp
                        .iter_mut()
                        .zip(p.iter().zip(m))
                        .for_each(|(o, (x, m))| *o = x * m),
                    None => dp.copy_from_slice(p),
                }
                // Each `at` addresses this pair's rows and head columns.
                mm(
                    (l, d, l),
                    pv.at(at),
                    (h, 1),
                    false,
                    dp.as_ptr(),
                    (1, l),
                    g[at..].as_ptr(),
                    (h, 1),
                    1.0,
                );
                // dP = (dO · Vᵀ) ⊙ M
                mm(
                    (l, l, d),
                    dp.as_mut_ptr(),
                    (l, 1),
                    false,
                    g[at..].as_ptr(),
                    (h, 1),
                    v[at..].as_ptr(),
                    (1, h),
                    1.0,
                );
                if let Some(m) = &mask {
                    dp.iter_mut().zip(m).for_each(|(x, m)| *x *= m);
                }
                // dS = P ⊙ (dP − Σⱼ dP·P), per row.
                super::fused::softmax_grad_rows(dp, p, l);
                // dQ = scale · dS · K, dK = scale · dSᵀ · Q.
                mm(
                    (l, d, l),
                    pq.at(at),
                    (h, 1),
                    false,
                    dp.as_ptr(),
                    (l, 1),
                    k[at..].as_ptr(),
                    (h, 1),
                    scale,
                );
                mm(
                    (l, d, l),
                    pk.at(at),
                    (h, 1),
                    false,
                    dp.as_ptr(),
                    (1, l),
                    q[at..].as_ptr(),
                    (h, 1),
                    scale,
                );
            },
        );
        Ok((dq, dk, dv))
    }
}
