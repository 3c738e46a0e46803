//! Matmul and row lookups straight from int-N codes, against their dequantise-first twins; codes
//! read back from a `.qnz` record without expanding them.

mod common;

use candle_core::{Device, Tensor};
use common::gaussian_tensor;
use qn_kernels::import::{coded_tensor, CodedTensor};
use qn_kernels::scalar::{
    dequantize, observe, quantize, scalar_gather_rows, scalar_matmul, scalar_matmul_reference,
    Granularity, ScalarConfig, Scheme, SCALAR_MAX_ROWS,
};

fn max_rel(a: &Tensor, b: &Tensor) -> f32 {
    let d = (a - b).unwrap().abs().unwrap().max_all().unwrap();
    let m = b.abs().unwrap().max_all().unwrap();
    d.to_scalar::<f32>().unwrap() / m.to_scalar::<f32>().unwrap().max(f32::MIN_POSITIVE)
}

fn configs() -> Vec<ScalarConfig> {
    let mut v = Vec::new();
    for bits in [8, 4, 3] {
        for scheme in [Scheme::Affine, Scheme::Symmetric] {
            for granularity in [
                Granularity::PerTensor,
                Granularity::PerChannel { axis: 0 },
                Granularity::PerChannel { axis: 1 },
                Granularity::PerGroup { size: 8 },
            ] {
                v.push(
                    ScalarConfig::new(bits)
                        .unwrap()
                        .with_scheme(scheme)
                        .with_granularity(granularity),
                );
            }
        }
    }
    v
}

#[test]
fn matmul_from_codes_matches_dequantize_then_matmul() {
    // Columns that are not a multiple of the 8 or 32 codes a SIMD step takes; batches on both
    // sides of the crossover; a 3-D input.
    for (i, (rows, cols)) in [(24, 40), (130, 72), (7, 8), (65, 200)]
        .into_iter()
        .enumerate()
    {
        let w = gaussian_tensor(&[rows, cols], 0.05, i as u64);
        for config in configs() {
            let q = quantize(&w, &observe(&w, &config).unwrap()).unwrap();
            for n in [1, 3, SCALAR_MAX_ROWS, SCALAR_MAX_ROWS + 5] {
                let x = gaussian_tensor(&[n, cols], 1.0, 100 + n as u64);
                let got = scalar_matmul(&x, &q).unwrap();
                let want = scalar_matmul_reference(&x, &q).unwrap();
                assert_eq!(got.dims(), &[n, rows]);
                let r = max_rel(&got, &want);
                assert!(r <= 1e-5, "{rows}x{cols} {config:?} n={n}: {r}");
            }
            let x3 = gaussian_tensor(&[2, 2, cols], 1.0, 7);
            let got = scalar_matmul(&x3, &q).unwrap();
            assert_eq!(got.dims(), &[2, 2, rows]);
            assert!(max_rel(&got, &scalar_matmul_reference(&x3, &q).unwrap()) <= 1e-5);
        }
    }
}

#[test]
fn wrong_input_widths_are_refused_naming_both_sizes() {
    let w = gaussian_tensor(&[16, 32], 0.05, 1);
    let q = quantize(&w, &observe(&w, &ScalarConfig::int8()).unwrap()).unwrap();
    let x = gaussian_tensor(&[2, 31], 1.0, 2);
    let e = scalar_matmul(&x, &q).unwrap_err().to_string();
    assert!(e.contains("31") && e.contains("32"), "{e}");
    let e = scalar_gather_rows(&q, &[3, 16]).unwrap_err().to_string();
    assert!(e.contains("16") && e.contains("out of range"), "{e}");
}

#[test]
fn rows_from_codes_match_the_dequantized_table() {
    let w = gaussian_tensor(&[50, 24], 0.5, 3);
    for config in configs() {
        let q = quantize(&w, &observe(&w, &config).unwrap()).unwrap();
        let ids = [0u32, 49, 7, 7, 23];
        let got = scalar_gather_rows(&q, &ids).unwrap();
        let idx = Tensor::new(&ids, &Device::Cpu).unwrap();
        let want = dequantize(&q)
            .unwrap()
            .index_select(&idx, 0)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(got, want, "{config:?}");
    }
}

#[test]
fn codes_read_back_from_a_record_are_the_codes_written() {
    let w = gaussian_tensor(&[12, 16], 0.1, 4);
    for config in configs() {
        let q = quantize(&w, &observe(&w, &config).unwrap()).unwrap();
        let mut file = qn_format::Writer::new();
        file.add(
            "w",
            w.dims(),
            &qn_kernels::export::scalar_payload(&q).unwrap(),
        )
        .unwrap();
        let mut bytes = Vec::new();
        file.write_to(&mut bytes).unwrap();
        let r = qn_format::Reader::from_bytes(&bytes).unwrap();
        let view = r.tensor("w").unwrap();
        let Some(CodedTensor::Scalar(back)) =
            coded_tensor("w", &view.entry.shape, view.codes().unwrap(), &Device::Cpu).unwrap()
        else {
            panic!("not scalar")
        };
        let codes = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<u8>().unwrap();
        assert_eq!(codes(&back.codes), codes(&q.codes), "{config:?}");
        // And decode exactly as the file's own decoder does.
        let dense = dequantize(&back).unwrap().flatten_all().unwrap();
        assert_eq!(dense.to_vec1::<f32>().unwrap(), view.decode_f32().unwrap());
    }
}

#[test]
fn pq_codes_read_back_from_a_record_decode_as_the_file_does() {
    use qn_kernels::layout::BlockLayout;
    use qn_kernels::pq::{encode, KMeansConfig};
    let w = gaussian_tensor(&[40, 24], 0.1, 5);
    for (k, bs) in [(16, 4), (300, 3)] {
        let w = if k > 256 {
            gaussian_tensor(&[400, 24], 0.1, 6)
        } else {
            w.clone()
        };
        let layout = BlockLayout::linear("w", w.dims(), bs).unwrap();
        let codes = encode(
            &w,
            &layout,
            &KMeansConfig::new(k).with_iters(2),
            &mut |_| {},
        )
        .unwrap();
        let mut file = qn_format::Writer::new();
        let payload =
            qn_kernels::export::pq_payload(&codes, qn_format::header::CodebookKind::F32).unwrap();
        file.add("w", w.dims(), &payload).unwrap();
        let mut bytes = Vec::new();
        file.write_to(&mut bytes).unwrap();
        let r = qn_format::Reader::from_bytes(&bytes).unwrap();
        let view = r.tensor("w").unwrap();
        let Some(CodedTensor::Pq(back)) =
            coded_tensor("w", &view.entry.shape, view.codes().unwrap(), &Device::Cpu).unwrap()
        else {
            panic!("not PQ")
        };
        assert_eq!(back.assignments, codes.assignments, "K = {k}");
        let dense = back.decode().unwrap().flatten_all().unwrap();
        assert_eq!(dense.to_vec1::<f32>().unwrap(), view.decode_f32().unwrap());
    }
}
