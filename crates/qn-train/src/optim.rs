//! AdamW with inspectable state, learning-rate schedules and gradient clipping.
//!
//! candle-nn's `AdamW` keeps its moments private, so a checkpoint could not hold them and a resumed
//! run would restart the moments from zero. This one has the same update (PyTorch's AdamW: decoupled
//! weight decay, bias-corrected moments) and exposes its state.

use candle_core::{backprop::GradStore, Tensor, Var};

use crate::Result;

/// AdamW hyper-parameters (PyTorch defaults but the learning rate).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWParams {
    /// First-moment decay.
    pub beta1: f64,
    /// Second-moment decay.
    pub beta2: f64,
    /// Denominator epsilon.
    pub eps: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
    /// Which variables the decay applies to.
    pub decay_on: DecayOn,
}

/// Which variables weight decay applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DecayOn {
    /// Weight matrices and kernels only — variables named `*.weight` of rank ≥ 2 — not biases,
    /// norms or PQ centroids (the convention of Hugging Face's `Trainer` and fairseq).
    #[default]
    Weights,
    /// Every variable (PyTorch's `AdamW(model.parameters())`).
    All,
}

impl DecayOn {
    /// Whether the variable `name` of `rank` is decayed.
    pub fn applies(self, name: &str, rank: usize) -> bool {
        match self {
            DecayOn::All => true,
            DecayOn::Weights => name.ends_with(".weight") && rank >= 2,
        }
    }
}

impl Default for AdamWParams {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
            decay_on: DecayOn::Weights,
        }
    }
}

/// AdamW over a fixed list of variables.
#[derive(Debug)]
pub struct AdamW {
    params: AdamWParams,
    names: Vec<String>,
    vars: Vec<Var>,
    decay: Vec<bool>,
    lr_scale: Vec<f64>,
    first: Vec<Moment>,
    second: Vec<Moment>,
    step: u64,
}

/// One moment: host memory updated in place by the fused CPU kernel, or a tensor elsewhere.
#[derive(Debug)]
enum Moment {
    Host(Vec<f32>),
    Device(Tensor),
}

impl Moment {
    fn zeros_for(v: &Var) -> Result<Self> {
        let t = v.as_tensor();
        Ok(if fused(t) {
            Moment::Host(vec![0.0; t.elem_count()])
        } else {
            Moment::Device(t.zeros_like()?)
        })
    }
    fn to_tensor(&self, like: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Moment::Host(v) => Tensor::from_slice(v, like.dims(), like.device())?,
            Moment::Device(t) => t.clone(),
        })
    }
    fn from_tensor(t: Tensor, like: &Var) -> Result<Self> {
        Ok(if fused(like.as_tensor()) {
            Moment::Host(
                t.flatten_all()?
                    .to_dtype(candle_core::DType::F32)?
                    .to_vec1()?,
            )
        } else {
            Moment::Device(t)
        })
    }
}

/// Whether the fused in-place CPU update applies (f32 on the CPU).
fn fused(t: &Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == candle_core::DType::F32
}

impl AdamW {
    /// Zero moments for named variables; weight decay applies to those `params.decay_on` selects.
    pub fn new(named: Vec<(String, Var)>, params: AdamWParams) -> Result<Self> {
        let decay = named
            .iter()
            .map(|(n, v)| params.decay_on.applies(n, v.rank()))
            .collect();
        let (names, vars): (Vec<String>, Vec<Var>) = named.into_iter().unzip();
        let first = vars
            .iter()
            .map(Moment::zeros_for)
            .collect::<Result<Vec<_>>>()?;
        let second = vars
            .iter()
            .map(Moment::zeros_for)
            .collect::<Result<Vec<_>>>()?;
        let lr_scale = vec![1.0; vars.len()];
        Ok(Self {
            params,
            names,
            vars,
            decay,
            lr_scale,
            first,
            second,
            step: 0,
        })
    }

    /// Multiplies the learning rate of the variables whose name `pick` accepts by `factor` (e.g.
    /// PQ centroids, which tolerate a larger step than dense weights).
    pub fn scale_lr(&mut self, pick: impl Fn(&str) -> bool, factor: f64) {
        for (s, n) in self.lr_scale.iter_mut().zip(&self.names) {
            if pick(n) {
                *s = factor;
            }
        }
    }

    /// Whether variable `i` is weight-decayed.
    pub fn decays(&self, i: usize) -> bool {
        self.decay[i]
    }

    /// The variables.
    pub fn vars(&self) -> &[Var] {
        &self.vars
    }

    /// Updates taken.
    pub fn steps(&self) -> u64 {
        self.step
    }

    /// `(first, second)` moments of the variable named `name` (for checkpoints).
    pub fn moments(&self, name: &str) -> Result<Option<(Tensor, Tensor)>> {
        let Some(i) = self.names.iter().position(|n| n == name) else {
            return Ok(None);
        };
        let like = self.vars[i].as_tensor();
        Ok(Some((
            self.first[i].to_tensor(like)?,
            self.second[i].to_tensor(like)?,
        )))
    }

    /// Restores moments saved by [`Self::moments`], in the order of the variables.
    pub fn set_state(&mut self, first: Vec<Tensor>, second: Vec<Tensor>, step: u64) -> Result<()> {
        if first.len() != self.vars.len() || second.len() != self.vars.len() {
            return Err(crate::Error::config(
                "optimizer state",
                format!("{} moments for {} variables", first.len(), self.vars.len()),
            ));
        }
        for (i, (f, s)) in first.iter().zip(&second).enumerate() {
            if f.dims() != self.vars[i].dims() || s.dims() != self.vars[i].dims() {
                return Err(crate::Error::config(
                    "optimizer state",
                    format!("the moments of `{}` do not match it", self.names[i]),
                ));
            }
        }
        self.first = first
            .into_iter()
            .zip(&self.vars)
            .map(|(t, v)| Moment::from_tensor(t, v))
            .collect::<Result<_>>()?;
        self.second = second
            .into_iter()
            .zip(&self.vars)
            .map(|(t, v)| Moment::from_tensor(t, v))
            .collect::<Result<_>>()?;
        self.step = step;
        Ok(())
    }

    /// One update with learning rate `lr`; variables without a gradient are left alone.
    pub fn step(&mut self, grads: &GradStore, lr: f64) -> Result<()> {
        self.step += 1;
        let p = self.params;
        let (bc1, bc2) = (
            1.0 - p.beta1.powi(self.step as i32),
            1.0 - p.beta2.powi(self.step as i32),
        );
        for (i, var) in self.vars.iter().enumerate() {
            let Some(g) = grads.get(var.as_tensor()) else {
                continue;
            };
            let decay = if self.decay[i] { p.weight_decay } else { 0.0 };
            let lr = lr * self.lr_scale[i];
            match (&mut self.first[i], &mut self.second[i]) {
                (Moment::Host(m), Moment::Host(v)) if g.dtype() == candle_core::DType::F32 => {
                    // One pass over weight, gradient and both moments, in place: the tensor
                    // version below allocates seven temporaries the size of every variable.
                    let op = FusedAdamW {
                        m: std::sync::Mutex::new(m),
                        v: std::sync::Mutex::new(v),
                        lr: lr as f32,
                        beta1: p.beta1 as f32,
                        beta2: p.beta2 as f32,
                        bc1: bc1 as f32,
                        bc2: bc2 as f32,
                        eps: p.eps as f32,
                        decay: (1.0 - lr * decay) as f32,
                    };
                    var.as_tensor().inplace_op2(&g.contiguous()?, &op)?;
                }
                (first, second) => {
                    // Gradients carry the graph they were computed through: moments built from
                    // them undetached would keep every step's activations alive.
                    let g = &g.detach();
                    let like = var.as_tensor();
                    let m0 = first.to_tensor(like)?;
                    let v0 = second.to_tensor(like)?;
                    let m = ((m0 * p.beta1)? + (g * (1.0 - p.beta1))?)?;
                    let v = ((v0 * p.beta2)? + (g.sqr()? * (1.0 - p.beta2))?)?;
                    let update = ((&m / bc1)? / ((&v / bc2)?.sqrt()? + p.eps)?)?;
                    let decayed = (like * (1.0 - lr * decay))?;
                    var.set(&(decayed - (update * lr)?)?)?;
                    *first = Moment::Device(m.detach());
                    *second = Moment::Device(v.detach());
                }
            }
        }
        Ok(())
    }
}

/// PyTorch's AdamW step on host memory: `w ← w·(1 − lr·λ) − lr·m̂/(√v̂ + ε)`.
struct FusedAdamW<'a> {
    m: std::sync::Mutex<&'a mut Vec<f32>>,
    v: std::sync::Mutex<&'a mut Vec<f32>>,
    lr: f32,
    beta1: f32,
    beta2: f32,
    bc1: f32,
    bc2: f32,
    eps: f32,
    decay: f32,
}

impl candle_core::InplaceOp2 for FusedAdamW<'_> {
    fn name(&self) -> &'static str {
        "fused-adamw"
    }

    fn cpu_fwd(
        &self,
        dst: &mut candle_core::CpuStorage,
        dst_l: &candle_core::Layout,
        g_s: &candle_core::CpuStorage,
        g_l: &candle_core::Layout,
    ) -> candle_core::Result<()> {
        use rayon::prelude::*;
        let (candle_core::CpuStorage::F32(w), candle_core::CpuStorage::F32(g)) = (dst, g_s) else {
            candle_core::bail!("fused-adamw: f32 only");
        };
        let (Some((w0, w1)), Some((g0, g1))) =
            (dst_l.contiguous_offsets(), g_l.contiguous_offsets())
        else {
            candle_core::bail!("fused-adamw: contiguous tensors only");
        };
        let w = &mut w[w0..w1];
        let g = &g[g0..g1];
        let mut m = self.m.lock().expect("moment lock");
        let mut v = self.v.lock().expect("moment lock");
        let (b1, b2, eps, lr, decay) = (self.beta1, self.beta2, self.eps, self.lr, self.decay);
        let (ibc1, ibc2) = (1.0 / self.bc1, 1.0 / self.bc2);
        const CHUNK: usize = 1 << 14;
        w.par_chunks_mut(CHUNK)
            .zip(g.par_chunks(CHUNK))
            .zip(m.par_chunks_mut(CHUNK))
            .zip(v.par_chunks_mut(CHUNK))
            .for_each(|(((w, g), m), v)| {
                for i in 0..w.len() {
                    let gi = g[i];
                    let mi = b1 * m[i] + (1.0 - b1) * gi;
                    let vi = b2 * v[i] + (1.0 - b2) * gi * gi;
                    m[i] = mi;
                    v[i] = vi;
                    w[i] = w[i] * decay - lr * (mi * ibc1) / ((vi * ibc2).sqrt() + eps);
                }
            });
        Ok(())
    }
}

/// The learning-rate decay after warm-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Schedule {
    /// Constant.
    Constant,
    /// Linear to zero at the last step.
    Linear,
    /// Cosine to zero at the last step.
    Cosine,
}

/// Learning rate at `step` of `total`: linear warm-up over `warmup` steps, then `schedule`.
pub fn learning_rate(
    base: f64,
    step: usize,
    total: usize,
    warmup: usize,
    schedule: Schedule,
) -> f64 {
    if step < warmup {
        return base * (step + 1) as f64 / warmup as f64;
    }
    let span = total.saturating_sub(warmup).max(1) as f64;
    let t = ((step - warmup) as f64 / span).min(1.0);
    match schedule {
        Schedule::Constant => base,
        Schedule::Linear => base * (1.0 - t),
        Schedule::Cosine => base * 0.5 * (1.0 + (std::f64::consts::PI * t).cos()),
    }
}

/// Scales the gradients of `vars` so that their global L2 norm is at most `max_norm`; returns the
/// norm before clipping.
pub fn clip_grad_norm(grads: &mut GradStore, vars: &[Var], max_norm: f64) -> Result<f64> {
    let mut total = 0.0;
    for v in vars {
        if let Some(g) = grads.get(v.as_tensor()) {
            total += g
                .sqr()?
                .sum_all()?
                .to_dtype(candle_core::DType::F64)?
                .to_scalar::<f64>()?;
        }
    }
    let norm = total.sqrt();
    if norm > max_norm && norm > 0.0 {
        let scale = max_norm / norm;
        for v in vars {
            if let Some(g) = grads.remove(v.as_tensor()) {
                grads.insert(v.as_tensor(), (g * scale)?);
            }
        }
    }
    Ok(norm)
}
