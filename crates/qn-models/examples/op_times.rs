//! Times the encoder's fused CPU ops alone on one layer's training shapes (batch 32 × 40 tokens,
//! all-MiniLM-L6-v2's widths), best of 15 runs each, to set beside PyTorch's profiler per op
//! (BENCHMARKS.md, "Training-step time"). A backward time includes the harness's multiply by a
//! random gradient and its sum.
//!
//! `RAYON_NUM_THREADS=2 cargo run --release -p qn-models --example op_times`

use candle_core::{Device, Tensor, Var};
use qn_models::encoder::{attention, fused, ops};
use std::time::Instant;

fn best<F: FnMut() -> candle_core::Result<()>>(mut f: F) -> candle_core::Result<f64> {
    let mut b = f64::MAX;
    for _ in 0..15 {
        let t = Instant::now();
        f()?;
        b = b.min(t.elapsed().as_secs_f64());
    }
    Ok(b * 1e3)
}
fn main() -> candle_core::Result<()> {
    qn_train::allocator::retain_freed_memory();
    let dev = Device::Cpu;
    let (b, l, h, f) = (32usize, 40usize, 384usize, 1536usize);
    let m = b * l;
    let xf = Var::from_tensor(&Tensor::randn(0f32, 1., (m, f), &dev)?)?;
    let gf = Tensor::randn(0f32, 1., (m, f), &dev)?;
    let y = fused::gelu_erf(xf.as_tensor())?;
    println!(
        "gelu fwd {:.2} ms (x6 per step)",
        best(|| {
            fused::gelu_erf(xf.as_tensor())?;
            Ok(())
        })?
    );
    let loss = (y.clone() * &gf)?.sum_all()?;
    println!(
        "gelu fwd+mul+sum bwd {:.2} ms",
        best(|| {
            loss.backward()?;
            Ok(())
        })?
    );
    let xh = Var::from_tensor(&Tensor::randn(0f32, 1., (m, h), &dev)?)?;
    let w = Var::from_tensor(&Tensor::ones(h, candle_core::DType::F32, &dev)?)?;
    let bb = Var::from_tensor(&Tensor::zeros(h, candle_core::DType::F32, &dev)?)?;
    let gh = Tensor::randn(0f32, 1., (m, h), &dev)?;
    println!(
        "ln fwd {:.2} ms (x12)",
        best(|| {
            fused::layer_norm(xh.as_tensor(), w.as_tensor(), bb.as_tensor(), 1e-12)?;
            Ok(())
        })?
    );
    let y = fused::layer_norm(xh.as_tensor(), w.as_tensor(), bb.as_tensor(), 1e-12)?;
    let loss = (y * &gh)?.sum_all()?;
    println!(
        "ln mul+sum bwd {:.2} ms",
        best(|| {
            loss.backward()?;
            Ok(())
        })?
    );
    let mul_only = (xh.as_tensor() * &gh)?.sum_all()?;
    println!(
        "  (mul+sum bwd alone {:.2} ms)",
        best(|| {
            mul_only.backward()?;
            Ok(())
        })?
    );
    let mulf = (xf.as_tensor() * &gf)?.sum_all()?;
    println!(
        "  (mul+sum bwd alone, wide {:.2} ms)",
        best(|| {
            mulf.backward()?;
            Ok(())
        })?
    );
    let q = Var::from_tensor(&Tensor::randn(0f32, 1., (b, l, h), &dev)?)?;
    let k = Var::from_tensor(&Tensor::randn(0f32, 1., (b, l, h), &dev)?)?;
    let v = Var::from_tensor(&Tensor::randn(0f32, 1., (b, l, h), &dev)?)?;
    let bias = Tensor::zeros((b, 1, 1, l), candle_core::DType::F32, &dev)?;
    let d = Some(attention::ProbsDropout { p: 0.1, seed: 3 });
    println!(
        "attn fwd {:.2} ms (x6)",
        best(|| {
            attention::self_attention(q.as_tensor(), k.as_tensor(), v.as_tensor(), &bias, 12, d)?;
            Ok(())
        })?
    );
    let ctx = attention::self_attention(q.as_tensor(), k.as_tensor(), v.as_tensor(), &bias, 12, d)?;
    let gctx = Tensor::randn(0f32, 1., (b, l, h), &dev)?;
    let loss = (ctx * &gctx)?.sum_all()?;
    println!(
        "attn bwd (+mul) {:.2} ms",
        best(|| {
            loss.backward()?;
            Ok(())
        })?
    );
    let at = qn_train::NoiseStep { step: 1, micro: 0 };
    println!(
        "dropout fwd h {:.2} ms (x12 + emb)",
        best(|| {
            ops::dropout(xh.as_tensor(), 0.1, 1, at, 3)?;
            Ok(())
        })?
    );
    println!(
        "zeros_like h {:.3} ms",
        best(|| {
            xh.as_tensor().zeros_like()?;
            Ok(())
        })?
    );
    println!(
        "add h {:.3} ms",
        best(|| {
            (xh.as_tensor() + &gh)?;
            Ok(())
        })?
    );
    println!(
        "zeros_like f {:.3} ms",
        best(|| {
            xf.as_tensor().zeros_like()?;
            Ok(())
        })?
    );
    println!(
        "add f {:.3} ms",
        best(|| {
            (xf.as_tensor() + &gf)?;
            Ok(())
        })?
    );
    let bvar = Var::from_tensor(&Tensor::zeros(f, candle_core::DType::F32, &dev)?)?;
    println!(
        "bias fwd f {:.3} ms",
        best(|| {
            qn_kernels::bias::add_bias(xf.as_tensor(), bvar.as_tensor()).unwrap();
            Ok(())
        })?
    );
    Ok(())
}
