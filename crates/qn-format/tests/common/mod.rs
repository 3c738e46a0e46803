//! Random valid files for the round-trip and corruption tests.
#![allow(dead_code)]

use half::{bf16, f16};
use qn_format::header::{CodebookKind, Granularity, LayerKind, RawDType, Scheme};
use qn_format::{Codebook, Payload, Writer};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// A seeded generator.
pub fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

/// One random valid tensor: (shape, payload, the f32 values a decoder must produce).
pub fn random_tensor(r: &mut ChaCha8Rng) -> (Vec<usize>, Payload, Vec<f32>) {
    match r.random_range(0..3) {
        0 => {
            let shape = vec![r.random_range(1..5), r.random_range(1..9)];
            let n: usize = shape.iter().product();
            let dtype = [
                RawDType::F32,
                RawDType::F16,
                RawDType::Bf16,
                RawDType::I64,
                RawDType::I32,
                RawDType::U8,
            ][r.random_range(0..6)];
            let vals: Vec<f32> = (0..n)
                .map(|_| r.random_range(-100i32..100) as f32 / 4.0)
                .collect();
            let bytes: Vec<u8> = match dtype {
                RawDType::F32 => vals.iter().flat_map(|v| v.to_le_bytes()).collect(),
                RawDType::F16 => vals
                    .iter()
                    .flat_map(|v| f16::from_f32(*v).to_le_bytes())
                    .collect(),
                RawDType::Bf16 => vals
                    .iter()
                    .flat_map(|v| bf16::from_f32(*v).to_le_bytes())
                    .collect(),
                RawDType::I64 => vals
                    .iter()
                    .flat_map(|v| (*v as i64).to_le_bytes())
                    .collect(),
                RawDType::I32 => vals
                    .iter()
                    .flat_map(|v| (*v as i32).to_le_bytes())
                    .collect(),
                RawDType::U8 => vals.iter().map(|v| v.abs() as u8).collect(),
            };
            let expect = match dtype {
                RawDType::I64 | RawDType::I32 => vals.iter().map(|v| v.trunc()).collect(),
                RawDType::U8 => vals.iter().map(|v| (v.abs() as u8) as f32).collect(),
                _ => vals,
            };
            (shape, Payload::Raw { dtype, bytes }, expect)
        }
        1 => {
            let bits = r.random_range(2..=8u8);
            let shape = vec![r.random_range(1..6), 4 * r.random_range(1..5)];
            let n: usize = shape.iter().product();
            let granularity = [
                Granularity::PerTensor,
                Granularity::PerChannel { axis: 0 },
                Granularity::PerChannel { axis: 1 },
                Granularity::PerGroup { size: 4 },
            ][r.random_range(0..4)];
            let (view, param) = qn_format::header::scalar_view(&shape, granularity).unwrap();
            let n_params: usize = param.iter().product();
            let qmax = (1u16 << bits) - 1;
            let codes: Vec<u8> = (0..n).map(|_| r.random_range(0..=qmax) as u8).collect();
            let scales: Vec<f32> = (0..n_params)
                .map(|_| r.random_range(1..100) as f32 / 64.0)
                .collect();
            let zero_points: Vec<u8> = (0..n_params)
                .map(|_| r.random_range(0..=qmax) as u8)
                .collect();
            let mut expect = vec![0f32; n];
            let pick = |i: usize, p: usize| if p == 1 { 0 } else { i };
            for i in 0..view[0] {
                for j in 0..view[1] {
                    for l in 0..view[2] {
                        let e = (i * view[1] + j) * view[2] + l;
                        let s = (pick(i, param[0]) * param[1] + pick(j, param[1])) * param[2]
                            + pick(l, param[2]);
                        expect[e] = (codes[e] as f32 - zero_points[s] as f32) * scales[s];
                    }
                }
            }
            let scheme = if r.random::<bool>() {
                Scheme::Affine
            } else {
                Scheme::Symmetric
            };
            (
                shape,
                Payload::Scalar {
                    bits,
                    scheme,
                    granularity,
                    codes,
                    scales,
                    zero_points,
                },
                expect,
            )
        }
        _ => {
            let conv = r.random::<bool>();
            let (shape, layer, d) = if conv {
                (
                    vec![r.random_range(1..5), r.random_range(1..3), 3, 3],
                    LayerKind::Conv2d,
                    9,
                )
            } else {
                let d = [1, 2, 4][r.random_range(0..3)];
                (
                    vec![r.random_range(1..7), d * r.random_range(1..5)],
                    LayerKind::Linear,
                    d,
                )
            };
            let n: usize = shape.iter().product();
            let k = [1, 2, 3, 16, 200, 256, 300][r.random_range(0..7)];
            let kind =
                [CodebookKind::F32, CodebookKind::F16, CodebookKind::Int8][r.random_range(0..3)];
            let values: Vec<f32> = (0..k * d)
                .map(|_| r.random_range(-64i32..64) as f32 / 64.0)
                .collect();
            let codebook = Codebook::from_f32(&values, kind);
            let stored = codebook.to_f32();
            let rows = shape[0];
            let n_sub = n / d;
            // Skewed usage (the minimum of two draws), as k-means clusters are uneven.
            let assignments: Vec<u16> = (0..n_sub)
                .map(|_| r.random_range(0..k).min(r.random_range(0..k)) as u16)
                .collect();
            let mut expect = vec![0f32; n];
            let cols = n / rows;
            for o in 0..rows {
                for b in 0..cols / d {
                    let a = assignments[b * rows + o] as usize;
                    expect[o * cols + b * d..o * cols + (b + 1) * d]
                        .copy_from_slice(&stored[a * d..(a + 1) * d]);
                }
            }
            (
                shape,
                Payload::Pq {
                    layer,
                    block_size: d,
                    k,
                    codebook,
                    assignments,
                },
                expect,
            )
        }
    }
}

/// A random valid file with `n` tensors: its bytes and the expected decoded values per name.
/// (name, shape, decoded values) of one tensor of a random file.
pub type Expected = (String, Vec<usize>, Vec<f32>);

pub fn random_file(seed: u64, n: usize) -> (Vec<u8>, Vec<Expected>) {
    let mut r = rng(seed);
    // Odd seeds also try rANS for PQ assignments (kept only where smaller).
    let mut w = Writer::new()
        .with_metadata("seed", seed.to_string())
        .with_entropy_coding(seed % 2 == 1);
    let mut expect = Vec::new();
    for i in 0..n {
        let (shape, payload, values) = random_tensor(&mut r);
        let name = format!("t{i}.weight");
        w.add(&name, &shape, &payload).unwrap();
        expect.push((name, shape, values));
    }
    let mut bytes = Vec::new();
    w.write_to(&mut bytes).unwrap();
    (bytes, expect)
}
