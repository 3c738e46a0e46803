//! The training loop shared by every model kind: stages, micro-batches, evaluation, metrics,
//! checkpoints, pause and resume.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{backprop::GradStore, DType, Tensor, D};
use qn_kernels::pq::{Assignments, PqCodes};

use super::fingerprint::{self, Fingerprint};
use super::ipq::{int8_centroids, quantize_stage};
use super::metrics::Metrics;
use super::{progress_bar, RunOutput, RunReport, StagePlan, TrainConfig};
use crate::checkpoint::{self, Position};
use crate::data::Dataset;
use crate::distill::{distill_loss, hidden_mse, log_softmax};
use crate::model::{named_vars, QuantModel};
use crate::optim::{clip_grad_norm, learning_rate, AdamW};
use crate::{set_noise_step, Error, NoiseStep, PqWeight, Result, WeightState};

/// Mean cross-entropy of `logits` `(n, classes)` against `labels` `(n)`.
pub fn cross_entropy(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    let log_probs = log_softmax(logits)?;
    let picked = log_probs.gather(&labels.to_dtype(DType::U32)?.unsqueeze(1)?, 1)?;
    Ok(picked.mean_all()?.neg()?)
}

/// Classification accuracy in eval mode (no noise).
pub fn accuracy(model: &dyn QuantModel, data: &Dataset, batch: usize) -> Result<f64> {
    let n = data.len();
    let batch = batch.max(1);
    let mut correct = 0usize;
    let mut start = 0;
    while start < n {
        let len = batch.min(n - start);
        let logits = model.forward_t(&data.x.narrow(0, start, len)?, false)?;
        let pred = logits.argmax(D::Minus1)?;
        let y = data.y.narrow(0, start, len)?.to_dtype(DType::U32)?;
        correct += pred
            .eq(&y)?
            .to_dtype(DType::U32)?
            .sum_all()?
            .to_scalar::<u32>()? as usize;
        start += len;
    }
    Ok(correct as f64 / n.max(1) as f64)
}

fn checkpoint_tensors(
    model: &dyn QuantModel,
    opt: Option<&AdamW>,
) -> Result<HashMap<String, Tensor>> {
    let mut t = HashMap::new();
    let vars = named_vars(model);
    for (name, var) in vars.iter() {
        t.insert(format!("var/{name}"), var.as_tensor().detach());
        if let Some((first, second)) = opt.map(|o| o.moments(name)).transpose()?.flatten() {
            t.insert(format!("opt/first/{name}"), first);
            t.insert(format!("opt/second/{name}"), second);
        }
    }
    for (name, b) in model.buffers() {
        t.insert(format!("buf/{name}"), b.detach());
    }
    for layer in model.layers() {
        if let WeightState::Pq(pq) = layer.qweight().state() {
            let codes = pq.codes()?;
            t.insert(
                format!("pq/{}/assignments", layer.name()),
                checkpoint::index_tensor(codes.assignments.to_u32(), codes.centroids.device())?,
            );
        }
    }
    Ok(t)
}

fn restore(
    dir: &Path,
    model: &mut dyn QuantModel,
    position: &Position,
    tensors: &HashMap<String, Tensor>,
    cfg: &TrainConfig,
) -> Result<()> {
    let missing = |n: &str| Error::Checkpoint {
        dir: dir.display().to_string(),
        reason: format!("`{n}` is missing; remove the directory to start afresh"),
    };
    for (name, bs) in &position.pq_layers {
        let mut layers = model.layers_mut();
        let layer = layers
            .iter_mut()
            .find(|l| l.name() == name)
            .ok_or_else(|| missing(name))?;
        let layout = layer.qweight().layout().with_block_size(name, *bs)?;
        let centroids = tensors
            .get(&format!("var/{name}.centroids"))
            .ok_or_else(|| missing(&format!("{name}.centroids")))?;
        let index = checkpoint::index_vec(
            tensors
                .get(&format!("pq/{name}/assignments"))
                .ok_or_else(|| missing(&format!("{name} assignments")))?,
        )?;
        let k = centroids.dim(0)?;
        let codes = PqCodes::new(centroids.clone(), Assignments::from_u32(&index, k)?, layout)?;
        layer
            .qweight_mut()
            .set_pq(PqWeight::from_codes(&codes, cfg.centroid_grad)?)?;
    }
    for (name, var) in named_vars(model) {
        let t = tensors
            .get(&format!("var/{name}"))
            .ok_or_else(|| missing(&name))?;
        var.set(t)?;
    }
    for (name, _) in model.buffers() {
        let t = tensors
            .get(&format!("buf/{name}"))
            .ok_or_else(|| missing(&name))?;
        model.set_buffer(&name, t)?;
    }
    Ok(())
}

/// Adds `more`'s gradients into `acc` (gradient accumulation).
fn accumulate(acc: &mut GradStore, more: GradStore, vars: &[candle_core::Var]) -> Result<()> {
    for v in vars {
        if let Some(g) = more.get(v.as_tensor()) {
            let sum = match acc.remove(v.as_tensor()) {
                Some(a) => (a + g)?,
                None => g.clone(),
            };
            acc.insert(v.as_tensor(), sum);
        }
    }
    Ok(())
}

/// The state the loop carries and checkpoints.
struct State {
    stage: usize,
    step_in_stage: usize,
    global: usize,
    pq_layers: Vec<(String, usize)>,
    stage_accuracy: Vec<f64>,
    warnings: Vec<String>,
}

impl State {
    fn save(
        &self,
        dir: Option<&Path>,
        model: &dyn QuantModel,
        opt: Option<&AdamW>,
        fingerprint: &Fingerprint,
    ) -> Result<()> {
        let Some(d) = dir else { return Ok(()) };
        let pos = Position {
            stage: self.stage,
            step_in_stage: self.step_in_stage,
            global_step: self.global,
            optimizer_steps: opt.map_or(0, AdamW::steps),
            pq_layers: self.pq_layers.clone(),
            tensors: String::new(),
            stage_accuracy: self.stage_accuracy.clone(),
            warnings: self.warnings.clone(),
            fingerprint: fingerprint.clone(),
        };
        checkpoint::save(d, &pos, &checkpoint_tensors(model, opt)?)
    }

    fn report(&self, stopped: bool) -> RunReport {
        RunReport {
            stage_accuracy: self.stage_accuracy.clone(),
            steps: self.global,
            stopped,
            interrupted: false,
            warnings: self.warnings.clone(),
        }
    }

    fn interrupted(&self) -> RunReport {
        RunReport {
            interrupted: true,
            ..self.report(true)
        }
    }
}

/// The name of the lock file a run holds in its output directory.
pub const LOCK_FILE: &str = ".qn-lock";

/// Takes an exclusive OS lock on `dir/.qn-lock`, creating the directory and the (empty) file.
fn lock_dir(dir: &Path) -> Result<std::fs::File> {
    std::fs::create_dir_all(dir).map_err(|e| Error::file(dir, e))?;
    let path = dir.join(LOCK_FILE);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| Error::file(&path, e))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(Error::file(
            dir,
            format!(
                "another run is writing to this directory (it holds {LOCK_FILE}): wait for it \
                 to finish or stop it, or choose another output directory"
            ),
        )),
        Err(std::fs::TryLockError::Error(e)) => Err(Error::file(&path, e)),
    }
}

/// Runs (or resumes, when `out.dir` holds a checkpoint of the same run) the stages on `model`.
///
/// Everything is checked before the first step: the settings, the plan, `stop_at`, and on resume
/// the checkpoint's fingerprint (a run with other settings is refused, naming what differs).
pub fn run_stages(
    model: &mut dyn QuantModel,
    train: &Dataset,
    eval: &Dataset,
    plan: &StagePlan,
    cfg: &TrainConfig,
    out: &RunOutput,
) -> Result<RunReport> {
    run_stages_with_teacher(model, None, train, eval, plan, cfg, out)
}

/// [`run_stages`] with a teacher model run online beside the student, for
/// [`TrainConfig::hidden_distill`]: each step adds `β · mean_l MSE(h_l^student, h_l^teacher)` over
/// the hidden states both models expose ([`QuantModel::forward_hidden_t`]; the teacher in
/// evaluation mode, without gradients).
pub fn run_stages_with_teacher(
    model: &mut dyn QuantModel,
    teacher: Option<&dyn QuantModel>,
    train: &Dataset,
    eval: &Dataset,
    plan: &StagePlan,
    cfg: &TrainConfig,
    out: &RunOutput,
) -> Result<RunReport> {
    cfg.validate()?;
    if cfg.hidden_distill > 0.0 {
        let Some(t) = teacher else {
            return Err(Error::config(
                "hidden_distill",
                "hidden-state distillation needs a teacher model run beside the student",
            ));
        };
        let probe = train.batch_rows(0, 1, cfg.seed)?;
        let (s, t) = (
            model.forward_hidden_t(&probe.x, false)?,
            t.forward_hidden_t(&probe.x, false)?,
        );
        match (s, t) {
            (Some((_, s)), Some((_, t))) if !s.is_empty() && s.len() == t.len() => {
                for (a, b) in s.iter().zip(&t) {
                    if a.dims() != b.dims() {
                        return Err(Error::config(
                            "hidden_distill",
                            format!(
                                "the student's hidden states {:?} and the teacher's {:?} differ in shape",
                                a.dims(),
                                b.dims()
                            ),
                        ));
                    }
                }
            }
            _ => {
                return Err(Error::config(
                    "hidden_distill",
                    "the student and the teacher must expose the same number of hidden states \
                     (an encoder does; this model does not)",
                ))
            }
        }
    }
    plan.validate()?;
    if out.stop_at == Some(0) {
        return Err(Error::config("stop_at", "must be at least 1"));
    }
    if cfg.distill.is_some() && train.teacher.is_none() {
        return Err(Error::config(
            "distill",
            "the training set carries no teacher logits (Dataset::with_teacher)",
        ));
    }
    if train.is_empty() || eval.is_empty() {
        return Err(Error::dataset(
            if train.is_empty() {
                "training set"
            } else {
                "evaluation set"
            },
            "holds no examples",
        ));
    }
    let per_step = cfg.batch_size * cfg.grad_accum;
    let lengths = plan
        .stages
        .iter()
        .map(|s| s.total_steps(train.len(), per_step))
        .collect::<Result<Vec<_>>>()?;
    let dir = out.dir.as_deref();
    // Held until this function returns (and released by the OS however the process ends): a second
    // run into the same directory would interleave its checkpoints and metrics lines with ours.
    let _lock = dir.map(lock_dir).transpose()?;
    let fp = fingerprint::fingerprint(model, plan, cfg, train.len());
    let resumed = match dir {
        Some(d) => checkpoint::load(d, train.x.device())?,
        None => None,
    };
    let mut st = State {
        stage: 0,
        step_in_stage: 0,
        global: 0,
        pq_layers: Vec::new(),
        stage_accuracy: Vec::new(),
        warnings: Vec::new(),
    };
    let mut restored_opt = None;
    if let Some((pos, tensors)) = &resumed {
        let d = dir.expect("resumed from a directory");
        fingerprint::check(d, &pos.fingerprint, &fp)?;
        restore(d, model, pos, tensors, cfg)?;
        st = State {
            stage: pos.stage,
            step_in_stage: pos.step_in_stage,
            global: pos.global_step,
            pq_layers: pos.pq_layers.clone(),
            stage_accuracy: pos.stage_accuracy.clone(),
            warnings: pos.warnings.clone(),
        };
        if pos.step_in_stage > 0 {
            restored_opt = Some((pos.optimizer_steps, tensors));
        }
    }
    let mut metrics = Metrics::open(dir, resumed.as_ref().map(|(p, _)| p.global_step))?;
    while st.stage < plan.stages.len() {
        let stage = &plan.stages[st.stage];
        let stage_steps = lengths[st.stage];
        if out.stop_at.is_some_and(|s| st.global >= s) {
            // Paused already (a rerun with the same or an earlier `stop_at`), or at a stage
            // boundary: the checkpoint on disk holds this position.
            return Ok(st.report(true));
        }
        if st.step_in_stage == 0 && out.cancelled() {
            // Between stages: the stage-end checkpoint (or, before the first step, no checkpoint
            // at all) already holds this position.
            return Ok(st.interrupted());
        }
        if st.step_in_stage == 0 {
            // A stage starts by quantizing (a checkpoint taken mid-stage always has a step > 0, so
            // a resumed stage is never quantized twice) and with a fresh optimizer.
            let q = quantize_stage(model, stage, cfg, train)?;
            st.pq_layers.extend(q.done);
            st.warnings.extend(q.skipped);
        }
        let mut named = named_vars(model);
        named.retain(|(n, _)| !cfg.is_frozen(n));
        let vars: Vec<_> = named.iter().map(|(_, v)| v.clone()).collect();
        let mut opt = AdamW::new(named.clone(), cfg.adamw)?;
        if let Some(c) = cfg.centroid_lr {
            opt.scale_lr(|n| n.ends_with(".centroids"), c / cfg.lr);
        }
        if let Some((steps, tensors)) = restored_opt.take() {
            let get = |kind: &str| -> Result<Vec<Tensor>> {
                named
                    .iter()
                    .map(|(n, _)| {
                        tensors
                            .get(&format!("opt/{kind}/{n}"))
                            .cloned()
                            .ok_or_else(|| Error::Checkpoint {
                                dir: dir.map(|d| d.display().to_string()).unwrap_or_default(),
                                reason: format!("the optimizer state of `{n}` is missing"),
                            })
                    })
                    .collect()
            };
            opt.set_state(get("first")?, get("second")?, steps)?;
        }
        let bar = progress_bar(cfg.progress, stage_steps, &format!("stage {}", stage.name));
        bar.set_position(st.step_in_stage as u64);
        while st.step_in_stage < stage_steps {
            // A cancel is not taken at step 0 of a stage: a mid-stage checkpoint always has a
            // step > 0 (its resume must not quantize the stage again), so a stage whose k-means
            // was interrupted takes one step first.
            let cancelled = st.step_in_stage > 0 && out.cancelled();
            if cancelled || out.stop_at == Some(st.global) {
                st.save(dir, model, Some(&opt), &fp)?;
                bar.abandon();
                return Ok(if cancelled {
                    st.interrupted()
                } else {
                    st.report(true)
                });
            }
            let layers = model.layers();
            let mut grads: Option<GradStore> = None;
            let mut loss_sum = 0.0;
            for micro in 0..cfg.grad_accum {
                set_noise_step(&layers, st.global as u64, micro as u32);
                model.set_step(NoiseStep {
                    step: st.global as u64,
                    micro: micro as u32,
                });
                let b = train.batch_rows(
                    st.global * cfg.grad_accum + micro,
                    cfg.batch_size,
                    cfg.seed,
                )?;
                let (logits, hidden) = match (cfg.hidden_distill > 0.0, teacher) {
                    (true, Some(t)) => {
                        let (logits, hs) = model
                            .forward_hidden_t(&b.x, true)?
                            .expect("checked before the first step");
                        let (_, ht) = t
                            .forward_hidden_t(&b.x, false)?
                            .expect("checked before the first step");
                        (logits, Some(hidden_mse(&hs, &ht)?))
                    }
                    _ => (model.forward_t(&b.x, true)?, None),
                };
                let loss = match (&cfg.distill, &b.teacher) {
                    (Some(d), Some(t)) => distill_loss(&logits, t, &b.y, d)?,
                    _ => cross_entropy(&logits, &b.y)?,
                };
                let loss = match hidden {
                    Some(h) => (loss + (h * cfg.hidden_distill)?)?,
                    None => loss,
                };
                loss_sum += loss.to_scalar::<f32>()? as f64;
                let loss = if cfg.grad_accum > 1 {
                    (loss / cfg.grad_accum as f64)?
                } else {
                    loss
                };
                let g = loss.backward()?;
                match &mut grads {
                    None => grads = Some(g),
                    Some(acc) => accumulate(acc, g, &vars)?,
                }
            }
            let mut grads = grads.expect("grad_accum >= 1");
            let grad_norm = match cfg.max_grad_norm {
                Some(m) => clip_grad_norm(&mut grads, &vars, m)?,
                None => f64::NAN,
            };
            let lr = learning_rate(
                cfg.lr,
                st.step_in_stage,
                stage_steps,
                cfg.warmup,
                cfg.schedule,
            );
            opt.step(&grads, lr)?;
            st.step_in_stage += 1;
            st.global += 1;
            let loss = loss_sum / cfg.grad_accum as f64;
            if !loss.is_finite() {
                return Err(Error::config(
                    "lr",
                    format!(
                        "the loss became {loss} at step {} (stage `{}`); lower the learning rate",
                        st.global, stage.name
                    ),
                ));
            }
            let noise_rate = model
                .layers()
                .iter()
                .flat_map(|l| l.qweight().noises())
                .map(|c| c.rate())
                .fold(0.0, f64::max);
            let mut line = serde_json::json!({"step": st.global, "stage": stage.name, "loss": loss, "lr": lr, "grad_norm": grad_norm, "noise_rate": noise_rate});
            if cfg.eval_every > 0 && st.step_in_stage.is_multiple_of(cfg.eval_every) {
                line["eval_accuracy"] = serde_json::json!(accuracy(model, eval, 256)?);
            }
            metrics.log(line)?;
            bar.inc(1);
            bar.set_message(format!("stage {} loss {loss:.4}", stage.name));
            if st.step_in_stage < stage_steps
                && cfg.checkpoint_every > 0
                && st.step_in_stage.is_multiple_of(cfg.checkpoint_every)
            {
                st.save(dir, model, Some(&opt), &fp)?;
            }
        }
        bar.finish_and_clear();
        if super::recalibrate::recalibrate(model, train, cfg, st.global)? {
            metrics.log(serde_json::json!({"step": st.global, "stage": stage.name, "recalibrated_batches": cfg.recalibrate_batches}))?;
        }
        // The stage's result is logged and kept in the stage-end checkpoint, so that it survives a
        // resume; the next stage starts with a fresh optimizer.
        let acc = accuracy(model, eval, 256)?;
        metrics.log(serde_json::json!({"step": st.global, "stage": stage.name, "stage_end": true, "eval_accuracy": acc}))?;
        st.stage_accuracy.push(acc);
        st.stage += 1;
        st.step_in_stage = 0;
        st.save(dir, model, None, &fp)?;
    }
    if plan.int8_centroids {
        int8_centroids(model)?;
        if let Some(acc) = st.stage_accuracy.last_mut() {
            *acc = accuracy(model, eval, 256)?;
        }
    }
    Ok(st.report(false))
}
