//! Staged training with quantization noise and iterative PQ (the paper's compression schedule).
//!
//! A run is a list of [`Stage`]s. A stage first product-quantizes the layers its regex names
//! (k-means, with a progress bar), then rebuilds the optimizer over everything still trainable —
//! float layers, every layer's centroids, biases — and trains its steps. A stage without layers is
//! plain training (with whatever noise the layers carry). Checkpoints hold the position, every
//! variable, the PQ assignments and the optimizer moments; batches and noise masks depend only on the
//! seed and the step, so a killed run resumes to the same final weights as an uninterrupted one.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor, D};
use indicatif::{ProgressBar, ProgressStyle};
use qn_format::{header::CodebookKind, Codebook, Payload, Writer};
use qn_kernels::{
    export::pq_payload,
    layout::{BlockLayout, LayerKind},
    pq::{Assignments, KMeansConfig, PqCodes},
};
use regex::Regex;
use serde::Deserialize;

use crate::checkpoint::{self, Position};
use crate::data::Dataset;
use crate::model::{named_vars, QuantModel};
use crate::optim::{clip_grad_norm, learning_rate, AdamW, AdamWParams, Schedule};
use crate::{CentroidGrad, Error, PqWeight, Result, WeightState};

/// One stage of a run.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Stage {
    /// A label for logs.
    pub name: String,
    /// Regex of the layer names to product-quantize at the start of the stage (none: train only).
    #[serde(default)]
    pub layers: Option<String>,
    /// Block size; default by layer as in the paper: 4 for attention projections, 8 for other
    /// linears and embeddings, `kh*kw` for k x k convs, 4 for 1x1 convs.
    #[serde(default)]
    pub block_size: Option<usize>,
    /// Centroids per layer (default 256).
    #[serde(default = "default_centroids")]
    pub n_centroids: usize,
    /// Training steps after quantizing (or give `epochs`).
    #[serde(default)]
    pub steps: Option<usize>,
    /// Training length in passes over the training set, when `steps` is absent.
    #[serde(default)]
    pub epochs: Option<f64>,
    /// Per-layer exceptions: the first whose `match` regex fits a layer name sets its block size
    /// and/or centroids.
    #[serde(default, rename = "override")]
    pub overrides: Vec<StageOverride>,
}

/// A per-layer exception inside a stage.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StageOverride {
    /// Layer-name regex.
    #[serde(rename = "match")]
    pub pattern: String,
    /// Block size for the matching layers.
    #[serde(default)]
    pub block_size: Option<usize>,
    /// Centroids for the matching layers.
    #[serde(default)]
    pub n_centroids: Option<usize>,
}

impl Stage {
    /// Steps of this stage for `n` training examples in batches of `batch`.
    pub fn total_steps(&self, n: usize, batch: usize) -> Result<usize> {
        match (self.steps, self.epochs) {
            (Some(s), _) => Ok(s),
            (None, Some(e)) if e > 0.0 => Ok((e * n as f64 / batch.max(1) as f64).ceil() as usize),
            _ => Err(Error::Layer {
                layer: format!("stage `{}`", self.name),
                reason: "needs `steps` or a positive `epochs`".into(),
            }),
        }
    }

    /// `(block size, centroids)` of layer `name`: the first matching override, else the stage's
    /// values, else the paper's defaults.
    fn settings_for(&self, name: &str, layout: &BlockLayout) -> (usize, usize) {
        let o = self
            .overrides
            .iter()
            .find(|o| Regex::new(&o.pattern).is_ok_and(|r| r.is_match(name)));
        let bs = o
            .and_then(|o| o.block_size)
            .or(self.block_size)
            .unwrap_or_else(|| default_block_size(name, layout));
        let k = o.and_then(|o| o.n_centroids).unwrap_or(self.n_centroids);
        (bs, k)
    }
}

fn default_centroids() -> usize {
    256
}

/// A staged run read from TOML: `[[stage]]` tables and `int8_centroids`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StagePlan {
    /// The stages in order.
    #[serde(rename = "stage")]
    pub stages: Vec<Stage>,
    /// Round every codebook to int8 at the end ("iPQ + int8").
    #[serde(default)]
    pub int8_centroids: bool,
}

impl StagePlan {
    /// Parses a TOML plan; errors name the field.
    pub fn from_toml(text: &str) -> Result<Self> {
        let plan: StagePlan = toml::from_str(text).map_err(|e| Error::Layer {
            layer: "stage plan".into(),
            reason: e.message().to_string(),
        })?;
        for s in &plan.stages {
            let bad = |e: regex::Error| Error::Layer {
                layer: format!("stage `{}`", s.name),
                reason: e.to_string(),
            };
            if let Some(p) = &s.layers {
                Regex::new(p).map_err(bad)?;
            }
            for o in &s.overrides {
                Regex::new(&o.pattern).map_err(bad)?;
            }
            s.total_steps(1, 1)?;
        }
        Ok(plan)
    }
}

/// Optimisation settings.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainConfig {
    /// Peak learning rate.
    pub lr: f64,
    /// AdamW settings.
    pub adamw: AdamWParams,
    /// Warm-up steps at the start of each stage.
    pub warmup: usize,
    /// Decay after warm-up, over each stage.
    pub schedule: Schedule,
    /// Gradient clipping (global L2 norm).
    pub max_grad_norm: Option<f64>,
    /// Examples per step.
    pub batch_size: usize,
    /// Evaluate every this many steps (0: only at stage ends).
    pub eval_every: usize,
    /// Checkpoint every this many steps (0: only at stage ends), when a directory is given.
    pub checkpoint_every: usize,
    /// Seed of batches and noise.
    pub seed: u64,
    /// Show a progress bar.
    pub progress: bool,
    /// Centroid gradient rule of PQ layers.
    pub centroid_grad: CentroidGrad,
    /// k-means iterations when a stage quantizes.
    pub kmeans_iters: usize,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            lr: 1e-3,
            adamw: AdamWParams::default(),
            warmup: 0,
            schedule: Schedule::Linear,
            max_grad_norm: Some(1.0),
            batch_size: 64,
            eval_every: 0,
            checkpoint_every: 0,
            seed: 0,
            progress: false,
            centroid_grad: CentroidGrad::Mean,
            kmeans_iters: 20,
        }
    }
}

/// Where a run writes: checkpoints and `metrics.jsonl` in `dir`.
#[derive(Debug, Clone, Default)]
pub struct RunOutput {
    /// Directory for checkpoints and metrics (none: nothing written, no resume).
    pub dir: Option<PathBuf>,
    /// Stop after this many global steps (simulates a kill, for tests).
    pub stop_after: Option<usize>,
}

/// What a finished run reports.
#[derive(Debug, Clone, PartialEq)]
pub struct RunReport {
    /// Evaluation accuracy at the end of each stage.
    pub stage_accuracy: Vec<f64>,
    /// Steps done in all.
    pub steps: usize,
    /// Whether the run stopped early at `stop_after`.
    pub stopped: bool,
}

/// Mean cross-entropy of `logits` `(n, classes)` against `labels` `(n)`.
pub fn cross_entropy(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    // log-softmax from primitives (max, sub, exp, sum, log): every step has a backward.
    let max = logits.max_keepdim(D::Minus1)?;
    let shifted = logits.broadcast_sub(&max)?;
    let log_sum = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    let log_probs = shifted.broadcast_sub(&log_sum)?;
    let picked = log_probs.gather(&labels.to_dtype(DType::U32)?.unsqueeze(1)?, 1)?;
    Ok(picked.mean_all()?.neg()?)
}

/// Classification accuracy in eval mode (no noise).
pub fn accuracy(model: &dyn QuantModel, data: &Dataset, batch: usize) -> Result<f64> {
    let n = data.len();
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

/// The paper's default block size for a layer.
pub fn default_block_size(name: &str, layout: &BlockLayout) -> usize {
    match layout.kind() {
        LayerKind::Conv2d => BlockLayout::default_conv_block_size(layout.shape()),
        LayerKind::Embedding => 8,
        LayerKind::Linear
            if Regex::new(r"attention|attn|query|key|value|q_proj|k_proj|v_proj|out_proj")
                .unwrap()
                .is_match(name) =>
        {
            4
        }
        LayerKind::Linear => 8,
    }
}

fn quantize_stage(
    model: &mut dyn QuantModel,
    stage: &Stage,
    cfg: &TrainConfig,
) -> Result<Vec<(String, usize)>> {
    let Some(pattern) = &stage.layers else {
        return Ok(Vec::new());
    };
    let re = Regex::new(pattern).map_err(|e| Error::Layer {
        layer: format!("stage `{}`", stage.name),
        reason: e.to_string(),
    })?;
    let mut layers = model.layers_mut();
    let picked: Vec<usize> = (0..layers.len())
        .filter(|&i| {
            re.is_match(layers[i].name())
                && matches!(layers[i].qweight().state(), WeightState::Float(_))
        })
        .collect();
    let bar = progress_bar(
        cfg.progress,
        picked.len(),
        &format!("stage {}: k-means", stage.name),
    );
    let mut done = Vec::new();
    for i in picked {
        let layer = &mut layers[i];
        let name = layer.name().to_string();
        let (bs, k) = stage.settings_for(&name, layer.qweight().layout());
        bar.set_message(name.clone());
        let kmeans = KMeansConfig::new(k)
            .with_iters(cfg.kmeans_iters)
            .with_seed(cfg.seed);
        layer.quantize_pq(bs, &kmeans, cfg.centroid_grad)?;
        done.push((name, bs));
        bar.inc(1);
    }
    bar.finish_and_clear();
    Ok(done)
}

fn progress_bar(show: bool, len: usize, what: &str) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    ProgressBar::new(len as u64)
        .with_style(
            ProgressStyle::with_template(
                "{msg:30} {bar:30} {pos}/{len} [{elapsed_precise} < {eta}]",
            )
            .expect("valid template"),
        )
        .with_message(what.to_string())
}

fn checkpoint_tensors(model: &dyn QuantModel, opt: &AdamW) -> Result<HashMap<String, Tensor>> {
    let mut t = HashMap::new();
    let vars = named_vars(model);
    let (first, second, _) = opt.state();
    for (i, (name, var)) in vars.iter().enumerate() {
        t.insert(format!("var/{name}"), var.as_tensor().detach());
        t.insert(format!("opt/first/{name}"), first[i].clone());
        t.insert(format!("opt/second/{name}"), second[i].clone());
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
    model: &mut dyn QuantModel,
    position: &Position,
    tensors: &HashMap<String, Tensor>,
    cfg: &TrainConfig,
) -> Result<()> {
    let missing = |n: &str| Error::Layer {
        layer: n.to_string(),
        reason: "missing from the checkpoint".into(),
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
            .ok_or_else(|| missing(name))?;
        let index = checkpoint::index_vec(
            tensors
                .get(&format!("pq/{name}/assignments"))
                .ok_or_else(|| missing(name))?,
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
    Ok(())
}

struct Metrics(Option<std::io::BufWriter<std::fs::File>>);

impl Metrics {
    fn open(dir: Option<&Path>) -> Result<Self> {
        let Some(dir) = dir else {
            return Ok(Metrics(None));
        };
        std::fs::create_dir_all(dir).map_err(|e| Error::Layer {
            layer: dir.display().to_string(),
            reason: e.to_string(),
        })?;
        let path = dir.join("metrics.jsonl");
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| Error::Layer {
                layer: path.display().to_string(),
                reason: e.to_string(),
            })?;
        Ok(Metrics(Some(std::io::BufWriter::new(f))))
    }

    fn log(&mut self, line: serde_json::Value) {
        if let Some(w) = &mut self.0 {
            let _ = writeln!(w, "{line}");
            let _ = w.flush();
        }
    }
}

fn noise_rate(model: &dyn QuantModel) -> f64 {
    let rate = |c: crate::NoiseConfig| match c {
        crate::NoiseConfig::None => 0.0,
        crate::NoiseConfig::BlockDrop { p, .. }
        | crate::NoiseConfig::Pq { p, .. }
        | crate::NoiseConfig::Scalar { p, .. } => p,
    };
    model
        .layers()
        .iter()
        .flat_map(|l| l.qweight().noises())
        .map(rate)
        .fold(0.0, f64::max)
}

/// Runs (or resumes, when `out.dir` holds a checkpoint) the stages on `model`.
pub fn run_stages(
    model: &mut dyn QuantModel,
    train: &Dataset,
    eval: &Dataset,
    plan: &StagePlan,
    cfg: &TrainConfig,
    out: &RunOutput,
) -> Result<RunReport> {
    let dir = out.dir.as_deref();
    let mut metrics = Metrics::open(dir)?;
    let resumed = match dir {
        Some(d) => checkpoint::load(d, train.x.device())?,
        None => None,
    };
    let (mut stage_idx, mut step_in_stage, mut global, mut pq_layers) = (0, 0, 0, Vec::new());
    let mut restored_opt = None;
    if let Some((pos, tensors)) = &resumed {
        restore(model, pos, tensors, cfg)?;
        (stage_idx, step_in_stage, global, pq_layers) = (
            pos.stage,
            pos.step_in_stage,
            pos.global_step,
            pos.pq_layers.clone(),
        );
        restored_opt = Some((pos.optimizer_steps, tensors));
    }
    let mut report = RunReport {
        stage_accuracy: Vec::new(),
        steps: global,
        stopped: false,
    };
    while stage_idx < plan.stages.len() {
        let stage = &plan.stages[stage_idx];
        let stage_steps = stage.total_steps(train.len(), cfg.batch_size)?;
        if step_in_stage == 0 {
            // A stage starts by quantizing (a checkpoint taken mid-stage always has a step > 0, so
            // a resumed stage is never quantized twice) and with a fresh optimizer.
            pq_layers.extend(quantize_stage(model, stage, cfg)?);
            restored_opt = None;
        }
        for layer in model.layers() {
            layer.qweight().set_noise_step(global as u64);
        }
        let named = named_vars(model);
        let mut opt = AdamW::new(named.iter().map(|(_, v)| v.clone()).collect(), cfg.adamw)?;
        if let Some((steps, tensors)) = restored_opt.take() {
            let get = |kind: &str| -> Result<Vec<Tensor>> {
                named
                    .iter()
                    .map(|(n, _)| {
                        tensors
                            .get(&format!("opt/{kind}/{n}"))
                            .cloned()
                            .ok_or_else(|| Error::Layer {
                                layer: n.clone(),
                                reason: "optimizer state missing from the checkpoint".into(),
                            })
                    })
                    .collect()
            };
            opt.set_state(get("first")?, get("second")?, steps)?;
        }
        let vars: Vec<_> = named.iter().map(|(_, v)| v.clone()).collect();
        let bar = progress_bar(cfg.progress, stage_steps, &format!("stage {}", stage.name));
        bar.set_position(step_in_stage as u64);
        while step_in_stage < stage_steps {
            let (x, y) = train.batch(global, cfg.batch_size, cfg.seed)?;
            let loss = cross_entropy(&model.forward_t(&x, true)?, &y)?;
            let mut grads = loss.backward()?;
            let grad_norm = match cfg.max_grad_norm {
                Some(m) => clip_grad_norm(&mut grads, &vars, m)?,
                None => f64::NAN,
            };
            let lr = learning_rate(cfg.lr, step_in_stage, stage_steps, cfg.warmup, cfg.schedule);
            opt.step(&grads, lr)?;
            step_in_stage += 1;
            global += 1;
            let loss = loss.to_scalar::<f32>()? as f64;
            let mut line = serde_json::json!({"step": global, "stage": stage.name, "loss": loss, "lr": lr, "grad_norm": grad_norm, "noise_rate": noise_rate(model)});
            if cfg.eval_every > 0 && step_in_stage % cfg.eval_every == 0 {
                line["eval_accuracy"] = serde_json::json!(accuracy(model, eval, 256)?);
            }
            metrics.log(line);
            bar.inc(1);
            bar.set_message(format!("stage {} loss {loss:.4}", stage.name));
            let at_end = step_in_stage == stage_steps;
            if let Some(d) = dir {
                if at_end || (cfg.checkpoint_every > 0 && step_in_stage % cfg.checkpoint_every == 0)
                {
                    let (next_stage, next_step) = if at_end {
                        (stage_idx + 1, 0)
                    } else {
                        (stage_idx, step_in_stage)
                    };
                    let pos = Position {
                        stage: next_stage,
                        step_in_stage: next_step,
                        global_step: global,
                        optimizer_steps: if at_end { 0 } else { opt.steps() },
                        pq_layers: pq_layers.clone(),
                        tensors: String::new(),
                    };
                    let mut tensors = checkpoint_tensors(model, &opt)?;
                    if at_end {
                        // The next stage starts with a fresh optimizer.
                        tensors.retain(|k, _| !k.starts_with("opt/"));
                    }
                    checkpoint::save(d, &pos, &tensors)?;
                }
            }
            if out.stop_after == Some(global) {
                bar.abandon();
                report.steps = global;
                report.stopped = true;
                return Ok(report);
            }
        }
        bar.finish_and_clear();
        let acc = accuracy(model, eval, 256)?;
        metrics.log(serde_json::json!({"step": global, "stage": stage.name, "stage_end": true, "eval_accuracy": acc}));
        report.stage_accuracy.push(acc);
        stage_idx += 1;
        step_in_stage = 0;
        restored_opt = None;
    }
    if plan.int8_centroids {
        int8_centroids(model)?;
        if let Some(acc) = report.stage_accuracy.last_mut() {
            *acc = accuracy(model, eval, 256)?;
        }
    }
    report.steps = global;
    Ok(report)
}

/// Rounds every PQ layer's centroids to the int8 grid the file will store.
pub fn int8_centroids(model: &dyn QuantModel) -> Result<()> {
    for layer in model.layers() {
        if let WeightState::Pq(pq) = layer.qweight().state() {
            let c = pq.centroids().as_tensor();
            let values = c.flatten_all()?.to_vec1::<f32>()?;
            let rounded = Codebook::from_f32(&values, CodebookKind::Int8).to_f32();
            pq.centroids()
                .set(&Tensor::from_vec(rounded, c.dims(), c.device())?)?;
        }
    }
    Ok(())
}

/// Writes the model as a `.qnz`: PQ layers as codes (codebooks stored as `codebook`), float weights
/// and every other variable raw `f32`. Returns the file size.
pub fn export_qnz(model: &dyn QuantModel, path: &Path, codebook: CodebookKind) -> Result<u64> {
    // A quantized layer's exact row (an embedding's padding row) travels beside its codes: the
    // tensor `<weight>.exact_row` and the metadata `exact_row:<weight>` = row (docs/format.md), so
    // that decoders restore it exactly instead of losing padding_idx to the codebook.
    let mut exact_rows = Vec::new();
    for layer in model.layers() {
        if let (Some((row, value)), false) = (
            layer.qweight().frozen_row(),
            matches!(layer.qweight().state(), WeightState::Float(_)),
        ) {
            exact_rows.push((format!("{}.weight", layer.name()), row, value.clone()));
        }
    }
    let mut w = Writer::new().with_metadata(
        "producer",
        format!("qn-train {}", env!("CARGO_PKG_VERSION")),
    );
    let bad = |e: qn_format::Error| Error::Layer {
        layer: path.display().to_string(),
        reason: e.to_string(),
    };
    for (name, row, value) in &exact_rows {
        w = w.with_metadata(format!("exact_row:{name}"), row.to_string());
        let v = value
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        w.add(
            &format!("{name}.exact_row"),
            &[v.len()],
            &Payload::raw_f32(&v),
        )
        .map_err(bad)?;
    }
    for (name, var) in named_vars(model) {
        if name.ends_with(".centroids") {
            continue;
        }
        let t = var.as_tensor().to_dtype(DType::F32)?;
        w.add(
            &name,
            t.dims(),
            &Payload::raw_f32(&t.flatten_all()?.to_vec1::<f32>()?),
        )
        .map_err(bad)?;
    }
    for layer in model.layers() {
        let name = format!("{}.weight", layer.name());
        match layer.qweight().state() {
            WeightState::Pq(pq) => {
                let codes = pq.codes()?;
                w.add(&name, codes.layout.shape(), &pq_payload(&codes, codebook)?)
                    .map_err(bad)?;
            }
            WeightState::Scalar(q) => {
                w.add(
                    &name,
                    q.codes.dims(),
                    &qn_kernels::export::scalar_payload(q)?,
                )
                .map_err(bad)?;
            }
            WeightState::Float(_) => {}
        }
    }
    w.write_file(path).map_err(bad)
}
