//! Block drop as one fused CPU op with an exact backward.
//!
//! As plain tensor ops, `w * keep` costs a mask tensor the size of the weight, and candle's backward
//! of a product also computes (and accumulates) a gradient for the constant mask: measured on a
//! 3072 x 768 weight, ~80 ms of a ~100 ms backward. Block drop is diagonal and linear, so its
//! backward is the same op applied to the incoming gradient; this op reads the per-block flags
//! directly and never materialises the mask. [`super::block_drop_reference`] is its plain-tensor twin.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};
use rayon::prelude::*;

/// `out = w * (noised ? 0 : scale)` blockwise over a row-major `(rows, cols)` view.
#[derive(Debug, Clone)]
pub(crate) struct BlockDropOp {
    /// Row-major `(rows, blocks_per_row)` noise flags.
    pub(crate) noised: Arc<Vec<bool>>,
    pub(crate) cols: usize,
    pub(crate) block: usize,
    pub(crate) scale: f64,
}

impl BlockDropOp {
    fn run<T: Copy + Send + Sync + std::ops::Mul<Output = T> + Default>(
        &self,
        src: &[T],
        scale: T,
    ) -> Vec<T> {
        let mut out = vec![T::default(); src.len()];
        let bpr = self.cols / self.block;
        out.par_chunks_mut(self.cols)
            .zip(src.par_chunks(self.cols))
            .enumerate()
            .for_each(|(o, (dst, row))| {
                let flags = &self.noised[o * bpr..(o + 1) * bpr];
                for ((d, s), &dropped) in dst
                    .chunks_exact_mut(self.block)
                    .zip(row.chunks_exact(self.block))
                    .zip(flags)
                {
                    if !dropped {
                        d.iter_mut().zip(s).for_each(|(d, &s)| *d = s * scale);
                    }
                }
            });
        out
    }
}

impl BlockDropOp {
    fn run_inplace<T: Copy + Send + Sync + std::ops::Mul<Output = T> + Default>(
        &self,
        data: &mut [T],
        scale: T,
    ) {
        let bpr = self.cols / self.block;
        data.par_chunks_mut(self.cols)
            .enumerate()
            .for_each(|(o, row)| {
                let flags = &self.noised[o * bpr..(o + 1) * bpr];
                for (d, &dropped) in row.chunks_exact_mut(self.block).zip(flags) {
                    if dropped {
                        d.fill(T::default());
                    } else {
                        d.iter_mut().for_each(|d| *d = *d * scale);
                    }
                }
            });
    }
}

/// The same op in place, for the weight gradient: a fresh matmul output nobody else holds, so
/// masking it where it lies saves a weight-sized allocation and zero fill per layer and step.
impl candle_core::InplaceOp1 for BlockDropOp {
    fn name(&self) -> &'static str {
        "qn-block-drop-inplace"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> candle_core::Result<()> {
        let (start, end) = layout.contiguous_offsets().ok_or_else(|| {
            candle_core::Error::Msg("qn-block-drop needs a contiguous gradient".into())
        })?;
        match storage {
            CpuStorage::F32(v) => self.run_inplace(&mut v[start..end], self.scale as f32),
            CpuStorage::F64(v) => self.run_inplace(&mut v[start..end], self.scale),
            _ => candle_core::bail!("qn-block-drop: only f32 and f64 weights are supported"),
        }
        Ok(())
    }
}

impl CustomOp1 for BlockDropOp {
    fn name(&self) -> &'static str {
        "qn-block-drop"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (start, end) = layout.contiguous_offsets().ok_or_else(|| {
            candle_core::Error::Msg("qn-block-drop needs a contiguous weight".into())
        })?;
        let out = match storage {
            CpuStorage::F32(v) => CpuStorage::F32(self.run(&v[start..end], self.scale as f32)),
            CpuStorage::F64(v) => CpuStorage::F64(self.run(&v[start..end], self.scale)),
            _ => candle_core::bail!("qn-block-drop: only f32 and f64 weights are supported"),
        };
        Ok((out, layout.shape().clone()))
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        // d(w * keep)/dw = keep: the same op on the gradient.
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(self)?))
    }
}

/// `y = x · block_drop(w)ᵀ` as one op: the dropped weight never becomes a graph node, so the
/// backward is two matmuls and two mask passes (`dx = g · w̃`, `dw = keep ⊙ (gᵀ · x)`), with no
/// weight-sized intermediate gradient to accumulate. [`super::block_drop_matmul_reference`] is its
/// plain-tensor twin.
#[derive(Debug, Clone)]
pub(crate) struct BlockDropMatmulOp {
    pub(crate) drop: BlockDropOp,
    /// The dropped weight of the forward pass, kept for the backward (which would otherwise
    /// recompute it: one weight-sized pass per layer and step).
    pub(crate) dropped: DroppedCache,
}

/// `x · wᵀ` on CPU storage for `x (m, k)` and a row-major `w (n, k)` whose layout is `wl`: the
/// forward of both matmul ops.
fn matmul_xwt(
    what: &str,
    xs: &CpuStorage,
    xl: &Layout,
    ws: &CpuStorage,
    wl: &Layout,
) -> candle_core::Result<(CpuStorage, Shape)> {
    use candle_core::backend::BackendStorage;
    let (m, k) = xl.shape().dims2()?;
    let (n, k2) = wl.shape().dims2()?;
    if k != k2 {
        candle_core::bail!("{what}: x has {k} columns, the weight {k2}");
    }
    let y = xs.matmul(ws, (1, m, n, k), xl, &wl.transpose(0, 1)?)?;
    Ok((y, Shape::from((m, n))))
}

/// The forward's dropped weight: row-major values, rows, columns.
pub(crate) type DroppedCache = Arc<std::sync::Mutex<Option<(Vec<f32>, usize, usize)>>>;

impl candle_core::CustomOp2 for BlockDropMatmulOp {
    fn name(&self) -> &'static str {
        "qn-block-drop-matmul"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (dropped, _) = self.drop.cpu_fwd(ws, wl)?;
        let (n, k) = wl.shape().dims2()?;
        let out = matmul_xwt(self.name(), xs, xl, &dropped, &Layout::contiguous((n, k)))?;
        if let CpuStorage::F32(v) = dropped {
            *self.dropped.lock().expect("cache lock") = Some((v, n, k));
        }
        Ok(out)
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let cached = self.dropped.lock().expect("cache lock").take();
        let dropped = match cached {
            Some((v, n, k)) if w.dims() == [n, k] => Tensor::from_vec(v, (n, k), w.device())?,
            _ => w.contiguous()?.apply_op1_no_bwd(&self.drop)?,
        };
        let dx = grad.matmul(&dropped)?;
        // A fresh, contiguous matmul output that nothing else holds: masked where it lies.
        let dw = grad.t()?.matmul(x)?.contiguous()?;
        dw.inplace_op1(&self.drop)?;
        Ok((Some(dx), Some(dw)))
    }
}

/// `y = x · wᵀ` as one op, with the backward of [`BlockDropMatmulOp`] minus the mask passes: the
/// baseline a noisy layer is measured against, so that noise overhead is the noise alone.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LinearMatmulOp;

impl candle_core::CustomOp2 for LinearMatmulOp {
    fn name(&self) -> &'static str {
        "qn-linear-matmul"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        matmul_xwt(self.name(), xs, xl, ws, wl)
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(grad.matmul(w)?), Some(grad.t()?.matmul(x)?)))
    }
}

/// One of the fused matmuls above with the layer's bias folded in: the bias is added to the
/// matmul's fresh output where it lies, and its gradient (the column sums of the incoming one)
/// comes out of the same node, so the pre-bias product never becomes a graph node whose
/// gradient candle would zero-fill and accumulate.
#[derive(Debug, Clone)]
pub(crate) struct WithBias<O>(pub(crate) O);

impl<O: candle_core::CustomOp2 + Send + Sync> candle_core::CustomOp3 for WithBias<O> {
    fn name(&self) -> &'static str {
        "qn-matmul-bias"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let b = match (bs, bl.contiguous_offsets()) {
            (CpuStorage::F32(v), Some((from, to))) => &v[from..to],
            _ => candle_core::bail!("{}: the bias must be a contiguous f32 vector", self.name()),
        };
        let (y, shape) = self.0.cpu_fwd(xs, xl, ws, wl)?;
        let n = shape.dims().last().copied().unwrap_or(0);
        match y {
            CpuStorage::F32(mut v) if n == b.len() => {
                crate::bias::add_rows_in_place(&mut v, b);
                Ok((CpuStorage::F32(v), shape))
            }
            _ => candle_core::bail!(
                "{}: a bias of {} for an output of shape {shape:?}",
                self.name(),
                b.len()
            ),
        }
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        y: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, dw) = self.0.bwd(x, w, y, grad)?;
        Ok((dx, dw, Some(crate::bias::column_sum(grad)?)))
    }
}
