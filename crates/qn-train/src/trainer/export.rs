//! Writing a trained model as a `.qnz`: PQ layers as codes, scalar layers as int-N codes, every
//! other variable raw.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::DType;
use qn_format::{header::CodebookKind, Codebook, Payload, Writer};
use qn_kernels::export::pq_payload;

use crate::model::{named_vars, QuantModel};
use crate::{Error, Result, WeightState};

/// Writes the model as a `.qnz`: PQ layers as codes (codebooks stored as `codebook`), float weights
/// and every other variable raw `f32`. Returns the file size.
pub fn export_qnz(model: &dyn QuantModel, path: &Path, codebook: CodebookKind) -> Result<u64> {
    export_qnz_with(model, path, codebook, &[])
}

/// [`export_qnz`] with extra header metadata (what a model needs besides its tensors: its config,
/// tokenizer, label map), so that the file is self-contained.
pub fn export_qnz_with(
    model: &dyn QuantModel,
    path: &Path,
    codebook: CodebookKind,
    metadata: &[(String, String)],
) -> Result<u64> {
    let bad = |e: qn_format::Error| match e {
        qn_format::Error::Io { source, .. } => Error::file(path, source),
        other => Error::file(path, other),
    };
    writer(model, codebook, metadata, &BTreeMap::new(), &bad)?
        .write_file(path)
        .map_err(bad)
}

/// The exact size [`export_qnz_with`] would write if the float layers named in `planned` were
/// product-quantized with `(block size, centroids)`: every byte, header included (its compressed
/// length can differ by a few bytes, as the real codes' checksums differ from the stand-ins').
pub fn planned_size(
    model: &dyn QuantModel,
    codebook: CodebookKind,
    metadata: &[(String, String)],
    planned: &BTreeMap<String, (usize, usize)>,
) -> Result<u64> {
    let bad = |e: qn_format::Error| Error::config("planned file", e.to_string());
    writer(model, codebook, metadata, planned, &bad)?
        .write_to(&mut std::io::sink())
        .map_err(|e| Error::config("planned file", e.to_string()))
}

/// The `.qnz` of `model`, with the float layers in `planned` stood in by all-zero PQ payloads of
/// their planned geometry.
fn writer(
    model: &dyn QuantModel,
    codebook: CodebookKind,
    metadata: &[(String, String)],
    planned: &BTreeMap<String, (usize, usize)>,
    bad: &dyn Fn(qn_format::Error) -> Error,
) -> Result<Writer> {
    let will_be_pq = |layer: &dyn crate::layers::QuantNoiseLayer| {
        !matches!(layer.qweight().state(), WeightState::Float(_))
            || planned.contains_key(layer.name())
    };
    // A quantized layer's exact row (an embedding's padding row) travels beside its codes: the
    // tensor `<weight>.exact_row` and the metadata `exact_row:<weight>` = row (docs/format.md), so
    // that decoders restore it exactly instead of losing padding_idx to the codebook.
    let mut exact_rows = Vec::new();
    for layer in model.layers() {
        if let (Some((row, value)), true) = (layer.qweight().frozen_row(), will_be_pq(layer)) {
            exact_rows.push((format!("{}.weight", layer.name()), row, value.clone()));
        }
    }
    let mut w = Writer::new().with_metadata(
        "producer",
        format!("qn-train {}", env!("CARGO_PKG_VERSION")),
    );
    for (k, v) in metadata {
        w = w.with_metadata(k.clone(), v.clone());
    }
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
    let stood_in: Vec<String> = planned.keys().map(|l| format!("{l}.weight")).collect();
    for (name, var) in named_vars(model) {
        if name.ends_with(".centroids") || stood_in.contains(&name) {
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
    for (name, b) in model.buffers() {
        let t = b.to_dtype(DType::F32)?;
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
            WeightState::Float(v) => {
                if let Some(&(bs, k)) = planned.get(layer.name()) {
                    let layout = layer.qweight().layout().with_block_size(layer.name(), bs)?;
                    // Stand-ins that differ from layer to layer as real codes do: identical
                    // records would share a checksum, which the compressed header would shrink.
                    let salt = crc32fast::hash(name.as_bytes());
                    let mix = |i: usize| (i as u32 ^ salt).wrapping_mul(0x9E37_79B1);
                    let centroids: Vec<f32> = (0..k * bs)
                        .map(|i| (mix(i) >> 8) as f32 / (1u32 << 24) as f32 - 0.5)
                        .collect();
                    let payload = Payload::Pq {
                        layer: qn_kernels::export::format_layer_kind(layout.kind()),
                        block_size: bs,
                        k,
                        codebook: Codebook::from_f32(&centroids, codebook),
                        assignments: (0..layout.n_blocks())
                            .map(|j| (mix(j) as usize % k) as u16)
                            .collect(),
                    };
                    w.add(&name, v.dims(), &payload).map_err(bad)?;
                }
            }
        }
    }
    Ok(w)
}
