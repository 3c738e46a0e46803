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
    vars: Vec<Var>,
    decay: Vec<bool>,
    first: Vec<Tensor>,
    second: Vec<Tensor>,
    step: u64,
}

impl AdamW {
    /// Zero moments for named variables; weight decay applies to those `params.decay_on` selects.
    pub fn new(named: Vec<(String, Var)>, params: AdamWParams) -> Result<Self> {
        let decay = named
            .iter()
            .map(|(n, v)| params.decay_on.applies(n, v.rank()))
            .collect();
        let vars: Vec<Var> = named.into_iter().map(|(_, v)| v).collect();
        let first = vars
            .iter()
            .map(|v| v.as_tensor().zeros_like())
            .collect::<candle_core::Result<Vec<_>>>()?;
        let second = first.clone();
        Ok(Self {
            params,
            vars,
            decay,
            first,
            second,
            step: 0,
        })
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

    /// `(first, second)` moments per variable, and the update count (for checkpoints).
    pub fn state(&self) -> (&[Tensor], &[Tensor], u64) {
        (&self.first, &self.second, self.step)
    }

    /// Restores moments saved by [`Self::state`].
    pub fn set_state(&mut self, first: Vec<Tensor>, second: Vec<Tensor>, step: u64) -> Result<()> {
        for (i, (f, s)) in first.iter().zip(&second).enumerate() {
            if f.dims() != self.vars[i].dims()
                || s.dims() != self.vars[i].dims()
                || first.len() != self.vars.len()
            {
                return Err(crate::Error::config(
                    "optimizer state",
                    format!("moment {i} does not match its variable"),
                ));
            }
        }
        self.first = first;
        self.second = second;
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
            let m = ((&self.first[i] * p.beta1)? + (g * (1.0 - p.beta1))?)?;
            let v = ((&self.second[i] * p.beta2)? + (g.sqr()? * (1.0 - p.beta2))?)?;
            let update = ((&m / bc1)? / ((&v / bc2)?.sqrt()? + p.eps)?)?;
            let decayed = if self.decay[i] && p.weight_decay != 0.0 {
                (var.as_tensor() * (1.0 - lr * p.weight_decay))?
            } else {
                var.as_tensor().clone()
            };
            var.set(&(decayed - (update * lr)?)?)?;
            self.first[i] = m;
            self.second[i] = v;
        }
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
