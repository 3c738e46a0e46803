//! Training-step time of an encoder built from a `config.json` alone (random weights, random
//! token ids): for sizes no checkpoint in `../shared` has, e.g. RoBERTa-base
//! (`assets/configs/roberta-base.json`, 125M parameters). Batch `b × l` tokens (no padding), AdamW,
//! median of N steps after one warm-up. `scripts/step_time_torch_config.py` is the PyTorch peer.
//!
//! `cargo run --release -p qn-models --example config_step_time -- assets/configs/roberta-base.json [steps] [batch] [len] [noise]`

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use qn_models::encoder::{pack_batch, Encoder, EncoderConfig};
use qn_train::optim::{AdamW, AdamWParams};
use qn_train::{named_vars, QuantModel};
use rand::{Rng, SeedableRng};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    qn_train::allocator::retain_freed_memory();
    let arg = |i: usize| std::env::args().nth(i);
    let path = arg(1).ok_or("usage: config_step_time CONFIG.json [steps] [batch] [len] [noise]")?;
    let steps: usize = arg(2).map_or(Ok(4), |s| s.parse())?;
    let batch: usize = arg(3).map_or(Ok(32), |s| s.parse())?;
    let len: usize = arg(4).map_or(Ok(64), |s| s.parse())?;
    let config = EncoderConfig::from_file(std::path::Path::new(&path))?;
    let dev = Device::Cpu;
    let varmap = VarMap::new();
    let model = Encoder::new(
        &config,
        2,
        0,
        VarBuilder::from_varmap(&varmap, DType::F32, &dev),
    )?;
    if let Some(spec) = arg(5) {
        let spec: qn_train::NoiseSpec = spec.parse()?;
        qn_train::apply_noise_spec(
            &model.layers(),
            &regex::Regex::new(".")?,
            |n, l| spec.resolve(n, l),
            0,
        )?;
    }
    let params: usize = varmap.all_vars().iter().map(|v| v.elem_count()).sum();
    let named = named_vars(&model);
    let mut opt = AdamW::new(named, AdamWParams::default())?;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let pad = config.pad_id();
    let mut times = Vec::new();
    for s in 0..=steps {
        // Ids above the special tokens; a first token as a tokenizer would put there.
        let rows: Vec<(Vec<u32>, Vec<u32>)> = (0..batch)
            .map(|_| {
                let ids = (0..len)
                    .map(|_| rng.random_range(4..config.vocab_size as u32))
                    .collect();
                (ids, vec![0; len])
            })
            .collect();
        let x = pack_batch(&rows, pad, &dev)?;
        let y = Tensor::from_vec((0..batch as u32).map(|i| i % 2).collect(), batch, &dev)?;
        qn_train::set_noise_step(&model.layers(), s as u64, 0);
        let t0 = Instant::now();
        let loss = qn_train::trainer::cross_entropy(&model.forward_t(&x, true)?, &y)?;
        let grads = loss.backward()?;
        opt.step(&grads, 1e-5)?;
        if s > 0 {
            times.push(t0.elapsed().as_secs_f64());
        }
    }
    times.sort_by(f64::total_cmp);
    println!(
        "{} ({params} parameters): median of {steps} steps {:.3} s/step, batch {batch} x {len} tokens, {} threads",
        config.model_type,
        times[times.len() / 2],
        rayon::current_num_threads()
    );
    Ok(())
}
