//! Writing a trained model as a `.qnz`: PQ layers as codes, scalar layers as int-N codes, every
//! other variable raw.

use std::path::Path;

use candle_core::DType;
use qn_format::{header::CodebookKind, Payload, Writer};
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
    let bad = |e: qn_format::Error| match e {
        qn_format::Error::Io { source, .. } => Error::file(path, source),
        other => Error::file(path, other),
    };
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
            WeightState::Float(_) => {}
        }
    }
    w.write_file(path).map_err(bad)
}
