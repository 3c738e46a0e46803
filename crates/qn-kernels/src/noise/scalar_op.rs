//! Scalar (int-N) noise as one fused CPU op: the noisy weight in one pass over the weight, and a
//! backward that is the incoming gradient times the straight-through gate — instead of the dozen
//! weight-sized tensor ops of [`super::scalar_noise_reference`] (divide, round, add, clamp,
//! subtract, multiply, the gate's comparisons, `where`), each with its own backward node.
//!
//! Element for element it computes what the reference does, in the same `f32` operations:
//! `q = clamp(round(w / scale) + zp, qmin, qmax)`, value `(q − zp) · scale` where the mask says
//! noised and `w` elsewhere; gradient 1 where kept, and where noised 1 if
//! `round(w / scale) + zp` lies in `qmin..=qmax`, else 0.

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};

use crate::scalar::QParams;

/// What the op needs per element: its parameter slot and its noise flag.
#[derive(Debug, Clone)]
pub(crate) struct ScalarNoiseOp {
    scale: Vec<f32>,
    zero_point: Vec<f32>,
    /// The weight as the parameters' 3-D view `(a, b, c)` and the parameter shape.
    view: [usize; 3],
    param: [usize; 3],
    /// Per element: 1 where noised.
    noised: Vec<u8>,
    qmin: f32,
    qmax: f32,
}

impl ScalarNoiseOp {
    pub(crate) fn new(params: &QParams, noised: Vec<u8>) -> crate::Result<Self> {
        Ok(Self {
            scale: params.scale.flatten_all()?.to_vec1::<f32>()?,
            zero_point: params.zero_point.flatten_all()?.to_vec1::<f32>()?,
            view: params.view.view(),
            param: params.view.param(),
            noised,
            qmin: params.config.qmin() as f32,
            qmax: params.config.qmax() as f32,
        })
    }

    /// The parameter slot of the first element of view row `row` (rows of `c` elements) and the
    /// step of the slot along the row (0 or 1).
    fn row_base(&self, row: usize) -> (usize, usize) {
        let [_, b, _] = self.view;
        let [pa, pb, pc] = self.param;
        let pick = |i: usize, p: usize| if p == 1 { 0 } else { i };
        let (i, j) = (row / b, row % b);
        ((pick(i, pa) * pb + pick(j, pb)) * pc, usize::from(pc != 1))
    }

    /// `f(w, slot)` on every noised element, in fixed chunks over rayon (each element depends
    /// on itself only); the others get `w` (`keep_w`) or `init`.
    fn map_noised(
        &self,
        w: &[f32],
        init: f32,
        keep_w: bool,
        f: impl Fn(f32, usize) -> f32 + Sync,
    ) -> Vec<f32> {
        use rayon::prelude::*;
        const CHUNK: usize = 1 << 14;
        let c = self.view[2];
        let mut out = if keep_w {
            w.to_vec()
        } else {
            vec![init; w.len()]
        };
        out.par_chunks_mut(CHUNK)
            .zip(w.par_chunks(CHUNK))
            .zip(self.noised.par_chunks(CHUNK))
            .enumerate()
            .for_each(|(ci, ((o, wc), nc))| {
                let e0 = ci * CHUNK;
                let (mut row, mut k) = (e0 / c, e0 % c);
                let (mut base, mut step) = self.row_base(row);
                for i in 0..o.len() {
                    if nc[i] != 0 {
                        o[i] = f(wc[i], base + step * k);
                    }
                    k += 1;
                    if k == c {
                        k = 0;
                        row += 1;
                        (base, step) = self.row_base(row);
                    }
                }
            });
        out
    }

    fn forward(&self, w: &[f32]) -> Vec<f32> {
        self.map_noised(w, 0.0, true, |x, s| {
            let (scale, zp) = (self.scale[s], self.zero_point[s]);
            let q = ((x / scale).round() + zp).clamp(self.qmin, self.qmax);
            (q - zp) * scale
        })
    }

    /// The straight-through gate: 1 where kept or inside the grid, 0 where noised and clamped.
    fn gate(&self, w: &[f32]) -> Vec<f32> {
        self.map_noised(w, 1.0, false, |x, s| {
            let code = (x / self.scale[s]).round() + self.zero_point[s];
            if code >= self.qmin && code <= self.qmax {
                1.0
            } else {
                0.0
            }
        })
    }
}

impl CustomOp1 for ScalarNoiseOp {
    fn name(&self) -> &'static str {
        "qn-scalar-noise"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (start, end) = layout.contiguous_offsets().ok_or_else(|| {
            candle_core::Error::Msg("qn-scalar-noise needs a contiguous weight".into())
        })?;
        let CpuStorage::F32(v) = storage else {
            candle_core::bail!("qn-scalar-noise: only f32 weights take the fused path");
        };
        if end - start != self.noised.len() {
            candle_core::bail!(
                "qn-scalar-noise: {} values for a mask of {}",
                end - start,
                self.noised.len()
            );
        }
        Ok((
            CpuStorage::F32(self.forward(&v[start..end])),
            layout.shape().clone(),
        ))
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let w = arg.flatten_all()?.to_vec1::<f32>()?;
        let gate = Tensor::from_vec(self.gate(&w), arg.shape(), arg.device())?;
        Ok(Some(grad.mul(&gate)?))
    }
}
