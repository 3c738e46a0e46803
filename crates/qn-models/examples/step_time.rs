//! Times a training step of all-MiniLM-L6-v2 on SST-2 (batch 32, ≤ 64 tokens, dynamic padding,
//! AdamW): forward, backward and optimizer separately, median of N steps. The peer is
//! `scripts/step_time_torch.py` (same rows, same batches); `scripts/encoder_step_time.sh` runs both.
//!
//! `cargo run --release -p qn-models --example step_time -- $QN_DATA_DIR [steps] [noise]`

use std::time::Instant;

use candle_core::Device;
use qn_models::bundle::{load_bundle, LoadRequest};
use qn_models::text::{read_examples, to_dataset, Task};
use qn_train::optim::{AdamW, AdamWParams};
use qn_train::{named_vars, QuantModel};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // As `qn` does, so the step is timed as a user's `qn finetune` runs it.
    qn_train::allocator::retain_freed_memory();
    let root = std::path::PathBuf::from(std::env::args().nth(1).expect("QN_DATA_DIR"));
    let steps: usize = std::env::args().nth(2).map_or(5, |s| s.parse().unwrap());
    let noise: Option<String> = std::env::args().nth(3);
    let task = Task::Sst2;
    // The first 32·steps rows in file order, batches in order: the same work as
    // scripts/step_time_torch.py does.
    let mut rows = read_examples(&root.join("data/sst2/train.tsv"), task, None, 0)?;
    rows.truncate(32 * steps);
    let labels = task.fixed_labels().unwrap();
    let b = load_bundle(
        root.join("models/all-MiniLM-L6-v2").to_str().unwrap(),
        None,
        &LoadRequest {
            labels: Some(labels.clone()),
            keep_codes: false,
        },
        0,
        &Device::Cpu,
    )?;
    let tok = b.tokenizer(Some(64))?;
    let data = to_dataset(&rows, &labels, &tok, "train", &Device::Cpu)?;
    if let Some(spec) = noise {
        let spec: qn_train::NoiseSpec = spec.parse()?;
        let layers = b.model.layers();
        qn_train::apply_noise_spec(
            &layers,
            &regex::Regex::new(".")?,
            |n, l| spec.resolve(n, l),
            0,
        )?;
    }
    let named = named_vars(&b.model);
    let mut opt = AdamW::new(named.clone(), AdamWParams::default())?;
    let (mut f, mut bw, mut o) = (vec![], vec![], vec![]);
    for s in 0..steps {
        let x = data.x.narrow(0, 32 * s, 32)?;
        let y = data.y.narrow(0, 32 * s, 32)?;
        qn_train::set_noise_step(&b.model.layers(), s as u64, 0);
        let t0 = Instant::now();
        let logits = b.model.forward_t(&x, true)?;
        let loss = qn_train::trainer::cross_entropy(&logits, &y)?;
        let _ = loss.to_scalar::<f32>()?;
        let t1 = Instant::now();
        let grads = loss.backward()?;
        let t2 = Instant::now();
        opt.step(&grads, 1e-4)?;
        let t3 = Instant::now();
        if std::env::var_os("QN_STEP_RSS").is_some() {
            // Resident memory per step: a leak (moments holding graphs) shows as growth.
            let statm = std::fs::read_to_string("/proc/self/statm")?;
            let pages: u64 = statm.split_whitespace().nth(1).unwrap_or("0").parse()?;
            eprintln!("step {s}: rss {} MB", pages * 4096 / (1 << 20));
        }
        f.push((t1 - t0).as_secs_f64());
        bw.push((t2 - t1).as_secs_f64());
        o.push((t3 - t2).as_secs_f64());
    }
    let (f, bw, o) = (median(f), median(bw), median(o));
    println!(
        "median of {steps} steps: forward {f:.3} s, backward {bw:.3} s, optimizer {o:.3} s, step {:.3} s",
        f + bw + o
    );
    Ok(())
}
