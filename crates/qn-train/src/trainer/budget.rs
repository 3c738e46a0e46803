//! A bit budget for iPQ: which block size and how many centroids each layer gets, so that the
//! written file lands on a size the user names.
//!
//! Each layer that a stage of the plan would quantize is *probed* at every candidate `(d, K)`:
//! k-means on a seeded sample of its blocks under the layer's calibration metric
//! ([`qn_kernels::pq::probe_distortion`]) gives its relative output error
//! `‖X(W − Ŵ)‖² / ‖XW‖²` (an embedding: the row-read-weighted weight error), and the record
//! size of each candidate is exact ([`qn_format::header::record_parts`]). The choice minimises the
//! sum of the layers' relative errors under the byte budget by marginal analysis: every layer
//! starts at its smallest candidate, then the upgrade that buys the most error reduction per byte
//! and still fits is taken, until none fits. The size of the whole file — header, float tensors,
//! padding — comes from a dry run of the writer ([`super::planned_size`]), so the plan is checked
//! against the true byte count, not an estimate.
//!
//! Summing *relative* errors weighs every layer alike: a first-order stand-in for the loss, which
//! puts the big, redundant layers (a word embedding) at the lowest rates. It is a heuristic, and
//! BENCHMARKS.md measures the plans it makes against the paper's default at the same size.
//!
//! ```no_run
//! # use qn_train::trainer::{budget::*, StagePlan, TrainConfig};
//! # fn f(model: &mut dyn qn_train::QuantModel, data: &qn_train::data::Dataset, plan: &StagePlan)
//! #     -> qn_train::Result<()> {
//! let codebook = qn_format::header::CodebookKind::Int8;
//! let budget = plan_for_budget(
//!     model, plan, 4_000_000, &BudgetOptions::default(), &TrainConfig::default(), data,
//!     &mut |m, _plan, planned| qn_train::trainer::planned_size(m, codebook, &[], planned),
//! )?;
//! println!("{}", budget.to_toml()?);
//! # Ok(()) }
//! ```

use std::collections::BTreeMap;

use qn_format::header::{record_parts, CodebookKind, Encoding};
use qn_kernels::pq::{probe_distortion, BlockMetric, KMeansConfig};
use regex::Regex;
use serde::{Deserialize, Serialize};

use super::ipq::calibrate;
use super::{progress_bar, StageOverride, StagePlan, TrainConfig};
use crate::data::Dataset;
use crate::model::QuantModel;
use crate::{Error, Result, WeightState};

/// What the budget may choose from, and how hard it looks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BudgetOptions {
    /// Candidate block sizes (those a layer's shape does not allow are skipped for it).
    pub block_sizes: Vec<usize>,
    /// Candidate centroid counts (those above a layer's block count are skipped for it).
    pub centroids: Vec<usize>,
    /// Points each probe's k-means fits (at least 64 per centroid).
    pub probe_points: usize,
    /// Lloyd iterations of each probe.
    pub probe_iters: usize,
    /// How the file stores codebooks (their bytes count).
    pub codebook: CodebookKind,
    /// How the layers' errors are weighed against each other.
    pub sensitivity: Sensitivity,
}

/// How a layer's probed error becomes the cost the budget minimises.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum Sensitivity {
    /// Every layer's relative output error counts alike.
    Relative,
    /// The relative error times `‖W‖² · F̄`, with `F̄` the layer's mean empirical Fisher
    /// information (squared gradient of the loss per weight) over this many batches of the
    /// training rows: a second-order estimate of the loss each choice adds, comparable across
    /// layers (HAWQ's and Optimal Brain Surgeon's reasoning with a diagonal Fisher).
    Fisher {
        /// Batches whose gradients are averaged.
        batches: usize,
    },
}

impl Default for BudgetOptions {
    fn default() -> Self {
        Self {
            block_sizes: vec![2, 4, 8, 16],
            centroids: vec![64, 128, 256, 1024],
            probe_points: 1 << 15,
            probe_iters: 10,
            codebook: CodebookKind::Int8,
            sensitivity: Sensitivity::Fisher { batches: 8 },
        }
    }
}

/// One `(d, K)` a layer could take: its record's bytes and its measured cost (the relative
/// error, weighed by [`Sensitivity`]).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Candidate {
    /// Block size `d`.
    pub block_size: usize,
    /// Centroids `K`.
    pub centroids: usize,
    /// Bytes of the layer's record, aligned as the file aligns it.
    pub bytes: u64,
    /// Relative output error of the probe, weighed by the layer's [`Sensitivity`].
    pub distortion: f64,
}

/// A layer's candidates and the stage that quantizes it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerOptions {
    /// Layer name.
    pub layer: String,
    /// Index of the stage that quantizes it.
    pub stage: usize,
    /// Its candidates.
    pub candidates: Vec<Candidate>,
}

/// The plan a budget chose.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BudgetPlan {
    /// The size asked for.
    pub target_bytes: u64,
    /// The file size of the chosen plan (a dry run of the writer).
    pub planned_bytes: u64,
    /// The smallest file any choice gives.
    pub smallest_bytes: u64,
    /// The plan given, with one override per layer setting its block size and centroids.
    pub plan: StagePlan,
    /// Every layer's options and, per layer, the index of the chosen candidate.
    pub layers: Vec<LayerOptions>,
    /// The chosen candidate of each layer.
    pub chosen: Vec<usize>,
}

impl BudgetPlan {
    /// The chosen plan as a TOML plan file (`qn compress --plan` reads it back), each layer's
    /// choice and measured error in a comment.
    pub fn to_toml(&self) -> Result<String> {
        let body =
            toml::to_string(&self.plan).map_err(|e| Error::config("budget plan", e.to_string()))?;
        let mut out = format!(
            "# Bit budget: {} bytes asked, {} planned (smallest possible {}).\n",
            self.target_bytes, self.planned_bytes, self.smallest_bytes
        );
        for (l, &c) in self.layers.iter().zip(&self.chosen) {
            let c = l.candidates[c];
            out.push_str(&format!(
                "# {}: d = {}, K = {}, {} bytes, cost {:.4e}\n",
                l.layer, c.block_size, c.centroids, c.bytes, c.distortion
            ));
        }
        out.push_str(&body);
        Ok(out)
    }

    /// `(block size, centroids)` of every planned layer.
    pub fn planned(&self) -> BTreeMap<String, (usize, usize)> {
        planned(&self.layers, &self.chosen)
    }
}

fn planned(layers: &[LayerOptions], chosen: &[usize]) -> BTreeMap<String, (usize, usize)> {
    layers
        .iter()
        .zip(chosen)
        .map(|(l, &c)| {
            let c = l.candidates[c];
            (l.layer.clone(), (c.block_size, c.centroids))
        })
        .collect()
}

/// `plan` with one override per layer (first, so that it wins) fixing its choice.
fn with_choices(plan: &StagePlan, layers: &[LayerOptions], chosen: &[usize]) -> StagePlan {
    let mut out = plan.clone();
    let mut added: Vec<Vec<StageOverride>> = vec![Vec::new(); plan.stages.len()];
    for (l, &c) in layers.iter().zip(chosen) {
        let c = l.candidates[c];
        added[l.stage].push(StageOverride {
            pattern: format!("^{}$", regex::escape(&l.layer)),
            block_size: Some(c.block_size),
            centroids: Some(c.centroids),
        });
    }
    for (stage, mut new) in out.stages.iter_mut().zip(added) {
        new.append(&mut stage.overrides);
        stage.overrides = new;
    }
    out
}

/// Bytes of a PQ record of `shape` at `(d, K)`, padded to the file's alignment.
fn record_bytes(
    shape: &[usize],
    kind: qn_kernels::layout::LayerKind,
    d: usize,
    k: usize,
    codebook: CodebookKind,
) -> Option<u64> {
    let enc = Encoding::Pq {
        layer: qn_kernels::export::format_layer_kind(kind),
        block_size: d,
        k,
        codebook,
        rans_words: None,
    };
    let len: usize = record_parts(shape, &enc).ok()?.iter().map(|(_, n)| n).sum();
    let align = qn_format::ALIGN as u64;
    Some((len as u64).div_ceil(align) * align)
}

/// The mean squared gradient of the cross-entropy per weight of each layer in `picked`, over
/// `batches` seeded batches of `data` (training mode, so that gradients flow; dropout draws are
/// seeded by the batch index).
fn mean_fisher(
    model: &dyn QuantModel,
    picked: &[usize],
    data: &Dataset,
    batches: usize,
    batch: usize,
    seed: u64,
) -> Result<Vec<f64>> {
    let layers = model.layers();
    let vars: Vec<candle_core::Var> = picked
        .iter()
        .map(|&i| layers[i].qweight().vars().remove(0))
        .collect();
    let mut sums = vec![0f64; picked.len()];
    for b in 0..batches {
        model.set_step(crate::NoiseStep {
            step: b as u64,
            micro: 0,
        });
        let rows = data.batch_rows(b, batch.min(data.len()), seed ^ FISHER_SEED)?;
        let logits = model.forward_t(&rows.x, true)?;
        let grads = super::cross_entropy(&logits, &rows.y)?.backward()?;
        for (sum, v) in sums.iter_mut().zip(&vars) {
            if let Some(g) = grads.get(v.as_tensor()) {
                *sum += g
                    .sqr()?
                    .sum_all()?
                    .to_dtype(candle_core::DType::F64)?
                    .to_scalar::<f64>()?;
            }
        }
    }
    Ok(sums
        .iter()
        .zip(&vars)
        .map(|(s, v)| s / (batches.max(1) * v.as_tensor().elem_count()) as f64)
        .collect())
}

/// Keeps the Fisher batches apart from training step 0's.
const FISHER_SEED: u64 = 0xF15E_0000_0000_0001;

/// Probes every layer a stage of `plan` would quantize at every candidate of `opts`, on the
/// model as it is (float). Calibration (`cfg.calibration_rows` rows of `data`) gives the
/// metrics; without it the errors are plain weight errors.
pub fn probe_layers(
    model: &mut dyn QuantModel,
    plan: &StagePlan,
    opts: &BudgetOptions,
    cfg: &TrainConfig,
    data: &Dataset,
) -> Result<Vec<LayerOptions>> {
    if opts.block_sizes.is_empty() || opts.centroids.is_empty() {
        return Err(Error::config(
            "bit budget",
            "needs at least one block size and one centroid count",
        ));
    }
    let regexes = plan
        .stages
        .iter()
        .map(|s| {
            s.layers
                .as_deref()
                .map(Regex::new)
                .transpose()
                .map_err(|e| Error::config(format!("stage `{}`: layers", s.name), e.to_string()))
        })
        .collect::<Result<Vec<_>>>()?;
    // A layer belongs to the first stage that names it, as the stages run.
    let mut picked: Vec<(usize, usize)> = Vec::new();
    for (i, layer) in model.layers().iter().enumerate() {
        if !matches!(layer.qweight().state(), WeightState::Float(_)) {
            continue;
        }
        if let Some(s) = regexes
            .iter()
            .position(|r| r.as_ref().is_some_and(|r| r.is_match(layer.name())))
        {
            picked.push((i, s));
        }
    }
    let indices: Vec<usize> = picked.iter().map(|(i, _)| *i).collect();
    let calibration = calibrate(model, &indices, data, cfg)?;
    let weights: Vec<f64> = match opts.sensitivity {
        Sensitivity::Relative => vec![1.0; indices.len()],
        Sensitivity::Fisher { batches } => {
            let f = mean_fisher(&*model, &indices, data, batches, cfg.batch_size, cfg.seed)?;
            let layers = model.layers();
            indices
                .iter()
                .zip(f)
                .map(|(&i, f)| -> Result<f64> {
                    let w = layers[i].qweight().vars().remove(0);
                    let energy = w
                        .as_tensor()
                        .sqr()?
                        .sum_all()?
                        .to_dtype(candle_core::DType::F64)?
                        .to_scalar::<f64>()?;
                    Ok(f * energy)
                })
                .collect::<Result<_>>()?
        }
    };
    let layers = model.layers();
    let bar = progress_bar(cfg.progress, picked.len(), "bit budget: probing layers");
    let mut out = Vec::new();
    for ((&(i, stage), calib), weight) in picked.iter().zip(calibration).zip(weights) {
        let layer = layers[i];
        let name = layer.name();
        bar.set_message(name.to_string());
        let WeightState::Float(w) = layer.qweight().state() else {
            unreachable!("only float layers are picked")
        };
        let mut candidates = Vec::new();
        // The plan's own choice is always a candidate: a layer none of the listed block sizes
        // fits (a depthwise 3x3 kernel: 9 inputs per filter) keeps its plan, not float.
        let (own_d, own_k) = plan.stages[stage].settings_for(name, layer.qweight().layout());
        let mut block_sizes = opts.block_sizes.clone();
        if !block_sizes.contains(&own_d) {
            block_sizes.push(own_d);
        }
        for d in block_sizes {
            let Ok(layout) = layer.qweight().layout().with_block_size(name, d) else {
                continue;
            };
            let ks: Vec<usize> = opts
                .centroids
                .iter()
                .copied()
                .chain((d == own_d && !opts.centroids.contains(&own_k)).then_some(own_k))
                .filter(|&k| k >= 1 && k <= layout.n_blocks())
                .collect();
            if ks.is_empty() {
                continue;
            }
            let points = layout
                .to_subvectors(&w.as_tensor().detach())?
                .flatten_all()?
                .to_vec1::<f32>()?;
            let metric = match calib.as_ref().and_then(|c| c.metric(&layout)) {
                Some(m) => m,
                None => BlockMetric::identity(d, layout.rows(), layout.n_blocks() / layout.rows())?,
            };
            for k in ks {
                let Some(bytes) = record_bytes(layout.shape(), layout.kind(), d, k, opts.codebook)
                else {
                    continue;
                };
                let km = KMeansConfig::new(k)
                    .with_iters(opts.probe_iters)
                    .with_seed(cfg.seed);
                let distortion = probe_distortion(&points, &metric, &km, opts.probe_points)
                    .map_err(|e| Error::Layer {
                        layer: name.to_string(),
                        reason: format!("bit budget probe at d = {d}, K = {k}: {e}"),
                    })?;
                candidates.push(Candidate {
                    block_size: d,
                    centroids: k,
                    bytes,
                    distortion: distortion * weight,
                });
            }
        }
        if !candidates.is_empty() {
            out.push(LayerOptions {
                layer: name.to_string(),
                stage,
                candidates,
            });
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    Ok(out)
}

/// The candidate with the fewest bytes (the lower error among equals).
fn smallest(l: &LayerOptions) -> usize {
    (0..l.candidates.len())
        .min_by(|&a, &b| {
            let (a, b) = (l.candidates[a], l.candidates[b]);
            a.bytes
                .cmp(&b.bytes)
                .then(a.distortion.total_cmp(&b.distortion))
        })
        .expect("a layer has candidates")
}

/// What [`solve`] asks of the caller: the exact file size of `model` with `plan` (the plan with
/// the choices as overrides, which the caller may store in the header) and the layers of
/// `planned` quantized at their `(d, K)`.
pub type SizeOf<'a> =
    dyn FnMut(&dyn QuantModel, &StagePlan, &BTreeMap<String, (usize, usize)>) -> Result<u64> + 'a;

/// Bytes kept free below the target for the header's checksums (see [`solve`]).
pub const HEADER_SLACK: u64 = qn_format::ALIGN as u64;

/// Marginal analysis: the candidate of each layer that minimises the summed distortion with the
/// summed bytes at most `budget`; `None` when even the smallest candidates exceed it.
pub fn choose(layers: &[LayerOptions], budget: u64) -> Option<Vec<usize>> {
    choose_from(layers, layers.iter().map(smallest).collect(), budget)
}

/// [`choose`] continued from the choice `pick` (which must fit `budget`).
fn choose_from(layers: &[LayerOptions], mut pick: Vec<usize>, budget: u64) -> Option<Vec<usize>> {
    let mut used: u64 = layers
        .iter()
        .zip(&pick)
        .map(|(l, &c)| l.candidates[c].bytes)
        .sum();
    if used > budget {
        return None;
    }
    loop {
        // (error removed per byte, layer, candidate); a free improvement ranks first.
        let mut best: Option<(f64, usize, usize)> = None;
        for (li, l) in layers.iter().enumerate() {
            let now = l.candidates[pick[li]];
            for (ci, c) in l.candidates.iter().enumerate() {
                let gain = now.distortion - c.distortion;
                if gain <= 0.0 {
                    continue;
                }
                let cost = c.bytes as i64 - now.bytes as i64;
                if cost > 0 && used + cost as u64 > budget {
                    continue;
                }
                let rate = if cost <= 0 {
                    f64::INFINITY
                } else {
                    gain / cost as f64
                };
                if best.is_none_or(|(r, _, _)| rate > r) {
                    best = Some((rate, li, ci));
                }
            }
        }
        let Some((_, li, ci)) = best else {
            break;
        };
        used = used + layers[li].candidates[ci].bytes - layers[li].candidates[pick[li]].bytes;
        pick[li] = ci;
    }
    // Bytes left that no measured gain claims (layers whose every choice measured the same, as
    // one the loss does not reach): spend them on choices that cost no error, largest first, so
    // that the file fills its budget.
    loop {
        let mut best: Option<(u64, usize, usize)> = None;
        for (li, l) in layers.iter().enumerate() {
            let now = l.candidates[pick[li]];
            for (ci, c) in l.candidates.iter().enumerate() {
                if c.distortion > now.distortion || c.bytes <= now.bytes {
                    continue;
                }
                let cost = c.bytes - now.bytes;
                if used + cost <= budget && best.is_none_or(|(b, _, _)| cost > b) {
                    best = Some((cost, li, ci));
                }
            }
        }
        let Some((cost, li, ci)) = best else {
            return Some(pick);
        };
        used += cost;
        pick[li] = ci;
    }
}

/// Chooses every layer's `(d, K)` so that the file `size_of` reports stays within
/// `target_bytes`, and returns the plan with the choices as overrides. `size_of(model, planned)`
/// is the exact file size with the layers of `planned` quantized (the caller's
/// [`super::planned_size`] with its metadata).
pub fn plan_for_budget(
    model: &mut dyn QuantModel,
    plan: &StagePlan,
    target_bytes: u64,
    opts: &BudgetOptions,
    cfg: &TrainConfig,
    data: &Dataset,
    size_of: &mut SizeOf<'_>,
) -> Result<BudgetPlan> {
    let layers = probe_layers(model, plan, opts, cfg, data)?;
    solve(&*model, plan, target_bytes, layers, size_of)
}

/// [`plan_for_budget`] after the probes: the choice, checked against the writer's dry run.
pub fn solve(
    model: &dyn QuantModel,
    plan: &StagePlan,
    target_bytes: u64,
    layers: Vec<LayerOptions>,
    size_of: &mut SizeOf<'_>,
) -> Result<BudgetPlan> {
    if layers.is_empty() {
        return Err(Error::config(
            "bit budget",
            "no layer of the plan can be product-quantized at the candidate block sizes and centroids",
        ));
    }
    let smallest: Vec<usize> = layers.iter().map(smallest).collect();
    let layer_bytes = |pick: &[usize]| -> u64 {
        layers
            .iter()
            .zip(pick)
            .map(|(l, &c)| l.candidates[c].bytes)
            .sum()
    };
    let mut size = |pick: &[usize]| {
        size_of(
            model,
            &with_choices(plan, &layers, pick),
            &planned(&layers, pick),
        )
    };
    let smallest_bytes = size(&smallest)?;
    if smallest_bytes > target_bytes {
        return Err(Error::config(
            "bit budget",
            format!(
                "{target_bytes} bytes is below the smallest file the candidates give ({smallest_bytes} bytes, every layer at its largest block size and fewest centroids)"
            ),
        ));
    }
    // Everything that is not a planned layer's record: header, float tensors, padding.
    let rest = smallest_bytes.saturating_sub(layer_bytes(&smallest));
    // The real header differs from the dry run's in its checksums: its compressed length moves by
    // a few bytes, which the alignment of the first record can round to one `ALIGN` more.
    let aim = target_bytes
        .saturating_sub(HEADER_SLACK)
        .max(smallest_bytes);
    let mut chosen = choose(&layers, aim - rest).unwrap_or(smallest.clone());
    let mut planned_bytes = size(&chosen)?;
    // The plan stored in the header moves the header's length with the choice: step back until
    // the dry run fits, fill again what that freed with the header of the plan as it now is, and
    // keep the best plan that fitted; a few rounds settle it.
    let error = |pick: &[usize]| -> f64 {
        layers
            .iter()
            .zip(pick)
            .map(|(l, &c)| l.candidates[c].distortion)
            .sum()
    };
    let mut best_fit: Option<(f64, Vec<usize>, u64)> = None;
    for _ in 0..8 {
        while planned_bytes > aim {
            let over = planned_bytes - aim;
            // The step back that loses least error per byte among those that cover the excess
            // (else among all).
            let mut best: Option<(bool, f64, usize, usize)> = None;
            for (li, l) in layers.iter().enumerate() {
                let now = l.candidates[chosen[li]];
                for (ci, c) in l.candidates.iter().enumerate() {
                    if c.bytes >= now.bytes {
                        continue;
                    }
                    let saved = now.bytes - c.bytes;
                    let covers = saved >= over;
                    let loss = (c.distortion - now.distortion).max(0.0) / saved as f64;
                    let better = match best {
                        None => true,
                        Some((bc, bl, _, _)) => covers && !bc || (covers == bc && loss < bl),
                    };
                    if better {
                        best = Some((covers, loss, li, ci));
                    }
                }
            }
            let Some((_, _, li, ci)) = best else { break };
            chosen[li] = ci;
            planned_bytes = size(&chosen)?;
        }
        // Among the plans that fit: one within 1 % of the aim first (the promise made to the
        // user), then the least error.
        let full = |b: u64| b as f64 >= 0.99 * aim as f64;
        if planned_bytes <= aim
            && best_fit
                .as_ref()
                .is_none_or(|(e, _, b)| (full(planned_bytes), -error(&chosen)) > (full(*b), -*e))
        {
            best_fit = Some((error(&chosen), chosen.clone(), planned_bytes));
        }
        let rest_now = planned_bytes.saturating_sub(layer_bytes(&chosen));
        let refilled = choose_from(&layers, chosen.clone(), aim.saturating_sub(rest_now));
        match refilled {
            Some(r) if r != chosen => {
                planned_bytes = size(&r)?;
                chosen = r;
            }
            _ => break,
        }
    }
    let (chosen, planned_bytes) = match best_fit {
        Some((_, c, b)) => (c, b),
        None => (chosen, planned_bytes),
    };
    Ok(BudgetPlan {
        target_bytes,
        planned_bytes,
        smallest_bytes,
        plan: with_choices(plan, &layers, &chosen),
        layers,
        chosen,
    })
}
