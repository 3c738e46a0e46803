//! What defines a run, recorded in its checkpoints: resuming with other settings would silently mix
//! two runs, so it is refused with an error naming what differs.

use std::collections::BTreeMap;

use crate::model::{named_vars, QuantModel};
use crate::trainer::{StagePlan, TrainConfig};
use crate::{Error, Result};

/// Field name → value, compared field by field on resume.
pub type Fingerprint = BTreeMap<String, String>;

/// The fingerprint of running `plan` with `cfg` on `model` over `n_train` examples: the plan, noise
/// (per layer, with its seed), learning rate and schedule, optimizer, run length, batch size, seed
/// and model shape — not where the run pauses (`stop_at`), the progress bar or eval/checkpoint
/// cadence.
pub fn fingerprint(
    model: &dyn QuantModel,
    plan: &StagePlan,
    cfg: &TrainConfig,
    n_train: usize,
) -> Fingerprint {
    let mut f = Fingerprint::new();
    let mut put = |k: &str, v: String| {
        f.insert(k.to_string(), v);
    };
    put(
        "plan",
        toml::to_string(plan).unwrap_or_else(|_| format!("{plan:?}")),
    );
    put("lr", cfg.lr.to_string());
    put("warmup", cfg.warmup.to_string());
    put("schedule", format!("{:?}", cfg.schedule));
    put("optimizer", format!("{:?}", cfg.adamw));
    put("max_grad_norm", format!("{:?}", cfg.max_grad_norm));
    put("batch_size", cfg.batch_size.to_string());
    put("grad_accum", cfg.grad_accum.to_string());
    put("seed", cfg.seed.to_string());
    put("centroid_grad", format!("{:?}", cfg.centroid_grad));
    put("kmeans_iters", cfg.kmeans_iters.to_string());
    put("frozen", format!("{:?}", cfg.frozen));
    put("recalibrate_batches", cfg.recalibrate_batches.to_string());
    // Only when set, so that the checkpoints of runs from before the option still resume.
    if cfg.recalibrate_always {
        put("recalibrate_always", "true".to_string());
    }
    if let Some(d) = &cfg.distill {
        put("distill", format!("{d:?}"));
    }
    if cfg.hidden_distill > 0.0 {
        put("hidden_distill", cfg.hidden_distill.to_string());
    }
    if cfg.calibration_rows > 0 {
        put("calibration_rows", cfg.calibration_rows.to_string());
        put("calibrate_embeddings", cfg.calibrate_embeddings.to_string());
    }
    if let Some(c) = cfg.centroid_lr {
        put("centroid_lr", c.to_string());
    }
    put("train_examples", n_train.to_string());
    let layers = model.layers();
    put(
        "noise",
        layers
            .iter()
            .map(|l| {
                format!(
                    "{}: {:?} seed {}",
                    l.name(),
                    l.qweight().noises(),
                    l.qweight().noise_seed()
                )
            })
            .collect::<Vec<_>>()
            .join("; "),
    );
    let mut shapes: Vec<String> = layers
        .iter()
        .map(|l| format!("{} {:?}", l.name(), l.qweight().layout().shape()))
        .collect();
    shapes.extend(
        named_vars(model)
            .iter()
            .filter(|(n, _)| !n.ends_with(".weight") && !n.ends_with(".centroids"))
            .map(|(n, v)| format!("{n} {:?}", v.dims())),
    );
    put("model", shapes.join("; "));
    f
}

/// Checks a checkpoint's fingerprint against this run's.
pub fn check(dir: &std::path::Path, saved: &Fingerprint, now: &Fingerprint) -> Result<()> {
    let differ: Vec<&str> = now
        .keys()
        .chain(saved.keys())
        .filter(|k| saved.get(*k) != now.get(*k))
        .map(|k| k.as_str())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    if differ.is_empty() {
        return Ok(());
    }
    let first = differ[0];
    let show = |v: Option<&String>| {
        let v = v.map(String::as_str).unwrap_or("absent").replace('\n', " ");
        if v.len() > 80 {
            format!(
                "{}…",
                &v[..v.char_indices().nth(80).map_or(v.len(), |(i, _)| i)]
            )
        } else {
            v
        }
    };
    Err(Error::Checkpoint {
        dir: dir.display().to_string(),
        reason: format!(
            "it was written by a run with a different {} (`{first}` was {}, is now {}); rerun with \
             the settings it was started with, or remove the directory (or use another output) to \
             start afresh",
            differ.join(", "),
            show(saved.get(first)),
            show(now.get(first)),
        ),
    })
}
