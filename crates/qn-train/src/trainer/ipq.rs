//! The iPQ step of a stage: k-means on every float layer the stage names, swapping its weight for
//! trainable centroids; and the final rounding of every codebook to int8.

use qn_format::{header::CodebookKind, Codebook};
use qn_kernels::pq::KMeansConfig;
use regex::Regex;

use super::{progress_bar, Stage, TrainConfig};
use crate::data::Dataset;
use crate::model::QuantModel;
use crate::{Calibration, Error, Result, WeightState};

/// What quantizing a stage did: the layers now PQ (name, block size) and the ones left float, each
/// with the reason.
#[derive(Debug, Default)]
pub(crate) struct Quantized {
    pub done: Vec<(String, usize)>,
    pub skipped: Vec<String>,
    /// Layers whose codebook was learnt under their measured inputs.
    pub activation_aware: usize,
}

/// Runs `cfg.calibration_rows` training rows (a seeded draw; evaluation mode) through `model`
/// with the layers `picked` measuring their inputs, and returns what each measured (nothing for
/// any when calibration is off).
pub(crate) fn calibrate(
    model: &mut dyn QuantModel,
    picked: &[usize],
    train: &Dataset,
    cfg: &TrainConfig,
) -> Result<Vec<Option<Calibration>>> {
    let (rows, seed, embeddings) = (cfg.calibration_rows, cfg.seed, cfg.calibrate_embeddings);
    if rows == 0 || picked.is_empty() {
        return Ok(vec![None; picked.len()]);
    }
    let layers = model.layers();
    for &i in picked {
        let q = layers[i].qweight();
        if embeddings || q.layout().kind() != qn_kernels::layout::LayerKind::Embedding {
            q.start_calibration();
        }
    }
    let rows = rows.min(train.len());
    let batch = train.batch_rows(0, rows, seed ^ CALIBRATION_SEED)?;
    let mut start = 0;
    let result = (|| -> Result<()> {
        while start < rows {
            let len = CALIBRATION_BATCH.min(rows - start);
            model.forward_t(&batch.x.narrow(0, start, len)?, false)?;
            start += len;
        }
        Ok(())
    })();
    let taken = picked
        .iter()
        .map(|&i| layers[i].qweight().take_calibration())
        .collect();
    result.map(|()| taken)
}

/// Keeps the calibration draw apart from the batches of training step 0.
const CALIBRATION_SEED: u64 = 0xCA11_B8A7_1000_0001;
const CALIBRATION_BATCH: usize = 64;

pub(crate) fn quantize_stage(
    model: &mut dyn QuantModel,
    stage: &Stage,
    cfg: &TrainConfig,
    train: &Dataset,
) -> Result<Quantized> {
    let mut out = Quantized::default();
    let Some(pattern) = &stage.layers else {
        return Ok(out);
    };
    let re = Regex::new(pattern)
        .map_err(|e| Error::config(format!("stage `{}`: layers", stage.name), e.to_string()))?;
    let picked: Vec<usize> = {
        let layers = model.layers();
        (0..layers.len())
            .filter(|&i| {
                re.is_match(layers[i].name())
                    && matches!(layers[i].qweight().state(), WeightState::Float(_))
            })
            .collect()
    };
    // The inputs are measured on the model as it is now, earlier stages quantized: each stage's
    // codebooks answer the activations they will see.
    let calibration = calibrate(model, &picked, train, cfg)?;
    let mut layers = model.layers_mut();
    let bar = progress_bar(
        cfg.progress,
        picked.len(),
        &format!("stage {}: k-means", stage.name),
    );
    for (i, calib) in picked.into_iter().zip(calibration) {
        let layer = &mut layers[i];
        let name = layer.name().to_string();
        let layout = layer.qweight().layout().clone();
        let (bs, k) = stage.settings_for(&name, &layout);
        let blocks = layout
            .with_block_size(&name, bs)
            .map_err(|e| Error::Layer {
                layer: name.clone(),
                reason: format!("stage `{}`: {e}", stage.name),
            })?
            .n_blocks();
        if blocks < k {
            // Too small for its codebook (a BERT's 2 x 384 token-type table): it stays float, and
            // the caller says so.
            out.skipped.push(format!(
                "layer `{name}` stays float: its {blocks} blocks of {bs} are fewer than the {k} centroids"
            ));
            bar.inc(1);
            continue;
        }
        bar.set_message(name.clone());
        let kmeans = KMeansConfig::new(k)
            .with_iters(cfg.kmeans_iters)
            .with_seed(cfg.seed);
        let metric = calib.and_then(|c| {
            layout
                .with_block_size(&name, bs)
                .ok()
                .and_then(|l| c.metric(&l))
        });
        if metric.is_some() {
            out.activation_aware += 1;
        }
        layer
            .qweight_mut()
            .quantize_pq_with(bs, &kmeans, cfg.centroid_grad, metric.as_ref())
            .map_err(|e| match e {
                Error::Kernels(k) => Error::Kernels(k.for_tensor(&name)),
                other => other,
            })?;
        out.done.push((name, bs));
        bar.inc(1);
    }
    bar.finish_and_clear();
    Ok(out)
}

/// Rounds every PQ layer's centroids to the int8 grid the file will store.
pub fn int8_centroids(model: &dyn QuantModel) -> Result<()> {
    for layer in model.layers() {
        if let WeightState::Pq(pq) = layer.qweight().state() {
            let c = pq.centroids().as_tensor();
            let values = c.flatten_all()?.to_vec1::<f32>()?;
            let rounded = Codebook::from_f32(&values, CodebookKind::Int8).to_f32();
            pq.centroids().set(&candle_core::Tensor::from_vec(
                rounded,
                c.dims(),
                c.device(),
            )?)?;
        }
    }
    Ok(())
}
