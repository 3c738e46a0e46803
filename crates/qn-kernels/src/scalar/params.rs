//! Quantization parameters: which elements share them, and how they are computed from a range.

use candle_core::{DType, Tensor};

use super::{histogram::histogram_range, Granularity, ObserverKind, ScalarConfig, Scheme};
use crate::{Error, Result};

/// A tensor seen as a 3-D view `(a, b, c)` whose parameters have shape `param` (each dimension either
/// the view's or 1), so that scales broadcast over the view.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamView {
    shape: Vec<usize>,
    view: [usize; 3],
    param: [usize; 3],
}

impl ParamView {
    /// The view of a tensor of `shape` for `granularity`; errors name `tensor`.
    pub fn new(tensor: &str, shape: &[usize], granularity: Granularity) -> Result<Self> {
        // The format owns the definition, so that what is written is what is decoded.
        let (view, param) = qn_format::header::scalar_view(shape, granularity.into())
            .map_err(|reason| Error::shape(tensor, reason))?;
        Ok(Self {
            shape: shape.to_vec(),
            view,
            param,
        })
    }

    /// The original tensor shape.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// The 3-D view shape.
    pub fn view(&self) -> [usize; 3] {
        self.view
    }

    /// The parameter shape (broadcastable to the view).
    pub fn param(&self) -> [usize; 3] {
        self.param
    }

    /// Number of (scale, zero point) pairs.
    pub fn n_params(&self) -> usize {
        self.param.iter().product()
    }

    /// The parameter slot of the view element `(a, b, c)`.
    fn slot(&self, a: usize, b: usize, c: usize) -> usize {
        let [_, p1, p2] = self.param;
        let pick = |i: usize, p: usize| if p == 1 { 0 } else { i };
        (pick(a, self.param[0]) * p1 + pick(b, p1)) * p2 + pick(c, p2)
    }

    /// Splits view-ordered `values` into one list per parameter slot.
    pub(crate) fn group_values(&self, values: &[f32]) -> Vec<Vec<f32>> {
        let [a, b, c] = self.view;
        let per = values.len() / self.n_params();
        let mut groups: Vec<Vec<f32>> = (0..self.n_params())
            .map(|_| Vec::with_capacity(per))
            .collect();
        for i in 0..a {
            for j in 0..b {
                let row = &values[(i * b + j) * c..(i * b + j + 1) * c];
                if self.param[2] == 1 {
                    groups[self.slot(i, j, 0)].extend_from_slice(row);
                } else {
                    for (k, v) in row.iter().enumerate() {
                        groups[self.slot(i, j, k)].push(*v);
                    }
                }
            }
        }
        groups
    }
}

/// Scales and zero points for one tensor, shaped to broadcast over its [`ParamView`].
#[derive(Debug, Clone)]
pub struct QParams {
    /// `f32`, shape `view.param()`.
    pub scale: Tensor,
    /// `f32` holding integers in `qmin..=qmax`, shape `view.param()`.
    pub zero_point: Tensor,
    /// Which elements each pair covers.
    pub view: ParamView,
    /// The quantizer these were made for.
    pub config: ScalarConfig,
}

impl QParams {
    /// The clamp range `[lo, hi]` of representable values per slot: `scale * (qmin - zp)` and
    /// `scale * (qmax - zp)`.
    pub fn clamp_range(&self) -> Result<(Tensor, Tensor)> {
        let lo = ((self.zero_point.affine(-1.0, self.config.qmin() as f64))? * &self.scale)?;
        let hi = ((self.zero_point.affine(-1.0, self.config.qmax() as f64))? * &self.scale)?;
        Ok((lo, hi))
    }
}

/// The (scale, zero point) for a range `[lo, hi]`; 0 is always brought into the range so that it is
/// represented exactly (zero padding, pruned weights), as PyTorch's observers do.
pub(crate) fn qparams_from_range(lo: f32, hi: f32, config: &ScalarConfig) -> (f32, f32) {
    let (lo, hi) = (lo.min(0.0), hi.max(0.0));
    let (qmin, qmax) = (config.qmin() as f32, config.qmax() as f32);
    match config.scheme {
        Scheme::Affine => {
            let scale = ((hi - lo) / (qmax - qmin)).max(f32::EPSILON);
            let zp = (qmin - (lo / scale).round()).clamp(qmin, qmax);
            (scale, zp)
        }
        Scheme::Symmetric => {
            // Zero point 2^(bits-1): the grid holds 2^(bits-1) - 1 steps above zero and one more
            // below. The scale puts +max|x| on the top code, so both +max|x| and -max|x| are
            // representable (dividing by (qmax - qmin) / 2 instead would leave the top at
            // 0.93 max|x| for int4, and the largest weights outside the grid).
            let amax = hi.max(-lo);
            let zp = (1u32 << (config.bits - 1)) as f32;
            let scale = (amax / (qmax - zp)).max(f32::EPSILON);
            (scale, zp)
        }
    }
}

/// Builds [`QParams`] from per-slot ranges.
pub fn observe_range(
    lo: &[f32],
    hi: &[f32],
    view: ParamView,
    config: &ScalarConfig,
    device: &candle_core::Device,
) -> Result<QParams> {
    config.validate()?;
    if lo.len() != view.n_params() || hi.len() != view.n_params() {
        return Err(Error::config(
            "range",
            format!(
                "{} / {} ranges for {} parameter slots",
                lo.len(),
                hi.len(),
                view.n_params()
            ),
        ));
    }
    let (scale, zp): (Vec<f32>, Vec<f32>) = lo
        .iter()
        .zip(hi)
        .map(|(&l, &h)| qparams_from_range(l, h, config))
        .unzip();
    let shape = view.param();
    Ok(QParams {
        scale: Tensor::from_vec(scale, &shape, device)?,
        zero_point: Tensor::from_vec(zp, &shape, device)?,
        view,
        config: *config,
    })
}

/// Observes `weight` and returns its quantization parameters for `config`.
pub fn observe(weight: &Tensor, config: &ScalarConfig) -> Result<QParams> {
    config.validate()?;
    let view = ParamView::new("weight", weight.dims(), config.granularity)?;
    let v = weight.to_dtype(DType::F32)?.reshape(&view.view())?;
    // min/max skip NaN, so check finiteness first: x - x is NaN exactly where x is not finite.
    if !v.sub(&v)?.sum_all()?.to_scalar::<f32>()?.is_finite() {
        crate::error::ensure_finite("weight", &v.flatten_all()?.to_vec1::<f32>()?)?;
    }
    let (lo, hi) = match config.observer {
        ObserverKind::MinMax => {
            let (mut lo, mut hi) = (v.clone(), v);
            for (axis, &p) in view.param().iter().enumerate().rev() {
                if p == 1 {
                    lo = lo.min_keepdim(axis)?;
                    hi = hi.max_keepdim(axis)?;
                }
            }
            let lo = lo.flatten_all()?.to_vec1::<f32>()?;
            let hi = hi.flatten_all()?.to_vec1::<f32>()?;
            (lo, hi)
        }
        ObserverKind::Histogram { bins } => {
            let values = v.flatten_all()?.to_vec1::<f32>()?;
            let groups = view.group_values(&values);
            use rayon::prelude::*;
            groups
                .par_iter()
                .map(|g| histogram_range(g, bins, config))
                .collect::<Vec<_>>()
                .into_iter()
                .unzip()
        }
    };
    observe_range(&lo, &hi, view, config, weight.device())
}
