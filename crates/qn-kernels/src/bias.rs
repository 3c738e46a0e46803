//! `y + b` over the rows of a `(m, n)` matrix as one graph node with a fast backward.
//!
//! candle's `broadcast_add` gets the bias gradient by a generic strided `sum` over the broadcast
//! dimension, which on the encoder's `(2048, 1536)` FFN activations was about 6 % of a
//! training step; here it is a row-parallel column sum, and the input's gradient is the incoming
//! gradient itself (no copy). [`add_bias_reference`] is the plain-op twin.
//!
//! ```
//! use candle_core::{Device, Tensor};
//! let y = Tensor::ones((3, 4), candle_core::DType::F32, &Device::Cpu)?;
//! let b = Tensor::new(&[1f32, 2., 3., 4.], &Device::Cpu)?;
//! let z = qn_kernels::bias::add_bias(&y, &b)?;
//! assert_eq!(z.to_vec2::<f32>()?[2], [2., 3., 4., 5.]);
//! # Ok::<(), qn_kernels::Error>(())
//! ```

use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::Result;

/// `y + b` with `y (m, n)` and `b (n)`: fused on the CPU for f32, [`add_bias_reference`] elsewhere.
pub fn add_bias(y: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (_, n) = y.dims2()?;
    if b.dims() != [n] {
        return Err(candle_core::Error::Msg(format!(
            "add_bias: bias of shape {:?} for {n} columns",
            b.dims()
        ))
        .into());
    }
    if !y.device().is_cpu() || y.dtype() != DType::F32 || b.dtype() != DType::F32 {
        return add_bias_reference(y, b);
    }
    Ok(y.contiguous()?.apply_op2(&b.contiguous()?, BiasAdd)?)
}

/// `y.broadcast_add(b)`.
pub fn add_bias_reference(y: &Tensor, b: &Tensor) -> Result<Tensor> {
    Ok(y.broadcast_add(b)?)
}

fn f32s<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> candle_core::Result<&'a [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Ok(&v[a..b]),
        _ => candle_core::bail!("{what}: needs a contiguous f32 tensor"),
    }
}

/// Rows handled by one task: about 64 K elements, so two cores split even small matrices.
fn rows_per_task(n: usize) -> usize {
    (65_536 / n.max(1)).max(1)
}

struct BiasAdd;

impl CustomOp2 for BiasAdd {
    fn name(&self) -> &'static str {
        "qn-add-bias"
    }

    fn cpu_fwd(
        &self,
        ys: &CpuStorage,
        yl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (y, b) = (f32s(ys, yl, self.name())?, f32s(bs, bl, self.name())?);
        let n = b.len();
        let mut out = vec![0f32; y.len()];
        let per = rows_per_task(n) * n;
        out.par_chunks_mut(per)
            .zip(y.par_chunks(per))
            .for_each(|(oc, yc)| {
                for (orow, yrow) in oc.chunks_mut(n).zip(yc.chunks(n)) {
                    for ((o, y), b) in orow.iter_mut().zip(yrow).zip(b) {
                        *o = y + b;
                    }
                }
            });
        Ok((CpuStorage::F32(out), yl.shape().clone()))
    }

    fn bwd(
        &self,
        _y: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(grad.clone()), Some(column_sum(grad)?)))
    }
}

/// `Σ_rows g` of a `(m, n)` gradient: a bias's gradient, as a tensor outside the graph.
pub(crate) fn column_sum(grad: &Tensor) -> candle_core::Result<Tensor> {
    grad.contiguous()?.apply_op1_no_bwd(&ColumnSum)
}

/// `y[r] += b` for every row `r` of a row-major `(m, b.len())` matrix, in place.
pub(crate) fn add_rows_in_place(y: &mut [f32], b: &[f32]) {
    let n = b.len().max(1);
    y.par_chunks_mut(rows_per_task(n) * n).for_each(|chunk| {
        for row in chunk.chunks_mut(n) {
            row.iter_mut().zip(b).for_each(|(y, b)| *y += b);
        }
    });
}

/// Sums a `(m, n)` matrix over its rows.
struct ColumnSum;

impl CustomOp1 for ColumnSum {
    fn name(&self) -> &'static str {
        "qn-column-sum"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = f32s(s, l, self.name())?;
        let (_, n) = l.shape().dims2()?;
        let per = rows_per_task(n) * n;
        // Fixed chunks summed in order: the result does not depend on the thread count or on
        // rayon's scheduling, so a resumed run reproduces the gradients bit for bit.
        let partials: Vec<Vec<f32>> = g
            .par_chunks(per)
            .map(|chunk| {
                let mut acc = vec![0f32; n];
                for row in chunk.chunks(n) {
                    acc.iter_mut().zip(row).for_each(|(a, g)| *a += g);
                }
                acc
            })
            .collect();
        let mut sum = vec![0f32; n];
        for p in &partials {
            sum.iter_mut().zip(p).for_each(|(s, p)| *s += p);
        }
        Ok((CpuStorage::F32(sum), Shape::from(n)))
    }
}
