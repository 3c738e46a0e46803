//! The iPQ step of a stage: k-means on every float layer the stage names, swapping its weight for
//! trainable centroids; and the final rounding of every codebook to int8.

use qn_format::{header::CodebookKind, Codebook};
use qn_kernels::pq::KMeansConfig;
use regex::Regex;

use super::{progress_bar, Stage, TrainConfig};
use crate::model::QuantModel;
use crate::{Error, Result, WeightState};

/// What quantizing a stage did: the layers now PQ (name, block size) and the ones left float, each
/// with the reason.
#[derive(Debug, Default)]
pub(crate) struct Quantized {
    pub done: Vec<(String, usize)>,
    pub skipped: Vec<String>,
}

pub(crate) fn quantize_stage(
    model: &mut dyn QuantModel,
    stage: &Stage,
    cfg: &TrainConfig,
) -> Result<Quantized> {
    let mut out = Quantized::default();
    let Some(pattern) = &stage.layers else {
        return Ok(out);
    };
    let re = Regex::new(pattern)
        .map_err(|e| Error::config(format!("stage `{}`: layers", stage.name), e.to_string()))?;
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
    for i in picked {
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
        layer
            .quantize_pq(bs, &kmeans, cfg.centroid_grad)
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
