//! Batch normalisation over `(batch, channel, h, w)` with running statistics, as PyTorch's
//! `BatchNorm2d`: training normalises with the batch's statistics and updates the running ones
//! (`running = (1 - momentum) · running + momentum · batch`, the variance unbiased); evaluation uses
//! the running ones. Scale and shift are trainable; the running statistics are buffers that are
//! saved and exported with the weights. Training on the CPU runs a fused op (`batch_norm_op`).

use std::sync::Mutex;

use candle_core::{DType, Tensor, Var, D};
use candle_nn::VarBuilder;

use super::batch_norm_op::{channel_stats, BatchNormTrainOp};
use crate::encoder::fused::fused_ok;
use crate::Result;

/// A `BatchNorm2d` layer (PyTorch names: `weight`, `bias`, `running_mean`, `running_var`).
#[derive(Debug)]
pub struct BatchNorm2d {
    name: String,
    weight: Var,
    bias: Var,
    running: Mutex<(Tensor, Tensor)>,
    eps: f64,
    momentum: f64,
}

impl BatchNorm2d {
    /// `channels` statistics from `vb` (missing ones start at mean 0, variance 1, scale 1, shift 0).
    pub fn new(channels: usize, eps: f64, momentum: f64, vb: VarBuilder) -> Result<Self> {
        let weight = Var::from_tensor(&vb.get_with_hints(
            channels,
            "weight",
            candle_nn::Init::Const(1.0),
        )?)?;
        let bias =
            Var::from_tensor(&vb.get_with_hints(channels, "bias", candle_nn::Init::Const(0.0))?)?;
        let mean = vb.get_with_hints(channels, "running_mean", candle_nn::Init::Const(0.0))?;
        let var = vb.get_with_hints(channels, "running_var", candle_nn::Init::Const(1.0))?;
        Ok(Self {
            name: vb.prefix(),
            weight,
            bias,
            running: Mutex::new((mean, var)),
            eps,
            momentum,
        })
    }

    /// `(prefix.weight, ·)`, `(prefix.bias, ·)`: the trainable variables.
    pub fn vars(&self) -> Vec<(String, Var)> {
        vec![
            (format!("{}.weight", self.name), self.weight.clone()),
            (format!("{}.bias", self.name), self.bias.clone()),
        ]
    }

    /// `(prefix.running_mean, ·)`, `(prefix.running_var, ·)`: the buffers, as they are now.
    pub fn buffers(&self) -> Vec<(String, Tensor)> {
        let r = self.running.lock().expect("running stats lock");
        vec![
            (format!("{}.running_mean", self.name), r.0.clone()),
            (format!("{}.running_var", self.name), r.1.clone()),
        ]
    }

    /// Replaces the running statistics (restoring a checkpoint).
    pub fn set_buffers(&self, mean: Tensor, var: Tensor) {
        *self.running.lock().expect("running stats lock") = (mean, var);
    }

    /// Replaces `prefix.running_mean` or `prefix.running_var` when `name` is one of them (checked
    /// shape); `Ok(false)` when the name is another layer's.
    pub fn set_buffer(&self, name: &str, value: &Tensor) -> candle_core::Result<bool> {
        let Some(which) = name.strip_prefix(&format!("{}.", self.name)) else {
            return Ok(false);
        };
        let mut r = self.running.lock().expect("running stats lock");
        let slot = match which {
            "running_mean" => &mut r.0,
            "running_var" => &mut r.1,
            _ => return Ok(false),
        };
        if value.dims() != slot.dims() {
            candle_core::bail!(
                "buffer `{name}` is {:?}, the layer has {:?}",
                value.dims(),
                slot.dims()
            );
        }
        *slot = value.to_dtype(slot.dtype())?;
        Ok(true)
    }

    /// Normalises `x (n, c, h, w)`: in training with the batch's statistics (updating the running
    /// ones), in evaluation with the running ones. Training on the CPU in f32 runs the fused op
    /// of `batch_norm_op`; everything else runs [`BatchNorm2d::forward_t_reference`].
    pub fn forward_t(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        if train && fused_ok(x) && self.weight.dtype() == DType::F32 && x.rank() == 4 {
            return self.forward_train_fused(x);
        }
        self.forward_t_reference(x, train)
    }

    fn forward_train_fused(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (n, c, h, w) = x.dims4()?;
        let (mean, var) = channel_stats(x)?;
        let eps = self.eps as f32;
        let rstd = var.iter().map(|v| 1.0 / (v + eps).sqrt()).collect();
        let dev = x.device();
        self.update_running(
            &Tensor::from_slice(&mean, c, dev)?,
            &Tensor::from_slice(&var, c, dev)?,
            (n * h * w) as f64,
        )?;
        x.contiguous()?.apply_op3(
            self.weight.as_tensor(),
            self.bias.as_tensor(),
            BatchNormTrainOp { mean, rstd },
        )
    }

    /// `running = (1 - momentum) · running + momentum · batch`, the batch variance made unbiased.
    fn update_running(&self, mean: &Tensor, var: &Tensor, count: f64) -> candle_core::Result<()> {
        let mut r = self.running.lock().expect("running stats lock");
        let m = self.momentum;
        let unbiased = (var.detach() * (count / (count - 1.0).max(1.0)))?;
        let new_mean = ((&r.0 * (1.0 - m))? + (mean.detach() * m)?)?;
        let new_var = ((&r.1 * (1.0 - m))? + (unbiased * m)?)?;
        *r = (new_mean, new_var);
        Ok(())
    }

    /// The plain-op twin of [`BatchNorm2d::forward_t`] (candle derives its backward): statistics
    /// by `mean` over a transposed copy, then a broadcast scale and shift.
    pub fn forward_t_reference(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let c = x.dim(1)?;
        let (mean, var) = if train {
            let (n, _, h, w) = x.dims4()?;
            // Per-channel statistics as (c) vectors: the mean over the batch and the pixels.
            let flat = x.transpose(0, 1)?.contiguous()?.reshape((c, ()))?;
            let mean = flat.mean(D::Minus1)?;
            let centred = flat.broadcast_sub(&mean.unsqueeze(1)?)?;
            let var = centred.sqr()?.mean(D::Minus1)?;
            self.update_running(&mean, &var, (n * h * w) as f64)?;
            (mean, var)
        } else {
            let r = self.running.lock().expect("running stats lock");
            (r.0.clone(), r.1.clone())
        };
        // y = (x - mean) · scale + shift, with scale = weight / sqrt(var + eps).
        let scale = (self.weight.as_tensor() / (var + self.eps)?.sqrt()?)?;
        let shift = (self.bias.as_tensor() - (&mean * &scale)?)?;
        let shape = (1, c, 1, 1);
        x.broadcast_mul(&scale.reshape(shape)?)?
            .broadcast_add(&shift.reshape(shape)?)
    }

    /// The dtype of the statistics (f32).
    pub fn dtype(&self) -> DType {
        self.weight.dtype()
    }
}
