//! `cargo xtask bench`: the paper's rate–accuracy comparison, end to end, with the `qn` binary.
//!
//! For each suite (all-MiniLM-L6-v2 on SST-2 and EfficientNet-Lite0 on Fashion-MNIST from
//! `QN_DATA_DIR`, or `--model/--task/--train/--eval`) every method fine-tunes with its noise
//! (`qn finetune`), compresses for real (`qn compress`) and is scored on the file written
//! (`qn eval`); the size is that file's byte size. Jobs are cached under `bench-results/cache`
//! keyed by their arguments, so shared fine-tunes run once and an interrupted bench resumes.
//!
//! ```text
//! cargo xtask bench --quick                      # every method, ≤ 20 steps per phase (CI)
//! cargo xtask bench --suite minilm-sst2          # the full comparison for one model
//! cargo xtask bench --methods ptq,qn-block --seeds 3
//! cargo xtask bench --model ./my-model --task tsv --train train.tsv --eval dev.tsv
//! cargo xtask bench --suite minilm-sst2 --seeds 3 --reuse docs/bench/all-MiniLM-L6-v2-sst2.json
//! ```
//!
//! `--reuse FILE` takes finished rows from an earlier run's JSON (same model, task and budget) in
//! place of running them again; the seeds summary is rewritten after every row, so a seeds run cut
//! off on one machine goes on from its committed summary on another.

mod plot;
mod recorded;
mod report;
mod runner;
mod suite;

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use report::Row;
use runner::{write_atomic, Runner};
use suite::{Budget, Compress, Kind, Method, Suite};

const USAGE: &str = "usage: cargo xtask bench [--quick] [--suite minilm-sst2|lite0-fmnist]... \
[--model <dir|hub-id> --task <sst2|rte|tsv|idx|imagefolder> --train <path> --eval <path>] \
[--methods id,prefix,...] [--seeds N] [--steps N] [--train-examples N] [--eval-examples N] \
[--threads N] [--data-dir DIR] [--out DIR] [--reuse FILE]...";

/// Parsed command line.
#[derive(Debug, Default)]
struct Options {
    quick: bool,
    suites: Vec<String>,
    model: Option<String>,
    task: Option<String>,
    train: Option<PathBuf>,
    eval: Option<PathBuf>,
    methods: Option<Vec<String>>,
    seeds: u64,
    steps: Option<usize>,
    train_examples: Option<usize>,
    eval_examples: Option<usize>,
    threads: Option<usize>,
    data_dir: Option<PathBuf>,
    out: Option<PathBuf>,
    reuse: Vec<PathBuf>,
}

fn parse_options(args: &[String]) -> Result<Options> {
    let mut o = Options {
        seeds: 1,
        ..Options::default()
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = |name: &str| -> Result<String> {
            it.next()
                .cloned()
                .with_context(|| format!("{name} needs a value; {USAGE}"))
        };
        let positive = |name: &str, v: String| -> Result<usize> {
            match v.parse::<usize>() {
                Ok(n) if n > 0 => Ok(n),
                _ => bail!("{name}: `{v}` is not a positive whole number"),
            }
        };
        match a.as_str() {
            "--quick" => o.quick = true,
            "--suite" => o.suites.push(value("--suite")?),
            "--model" => o.model = Some(value("--model")?),
            "--task" => o.task = Some(value("--task")?),
            "--train" => o.train = Some(value("--train")?.into()),
            "--eval" => o.eval = Some(value("--eval")?.into()),
            "--methods" => {
                o.methods = Some(
                    value("--methods")?
                        .split(',')
                        .map(|s| s.trim().to_string())
                        .filter(|s| !s.is_empty())
                        .collect(),
                )
            }
            "--seeds" => o.seeds = positive("--seeds", value("--seeds")?)? as u64,
            "--steps" => o.steps = Some(positive("--steps", value("--steps")?)?),
            "--train-examples" => {
                o.train_examples = Some(positive("--train-examples", value("--train-examples")?)?)
            }
            "--eval-examples" => {
                o.eval_examples = Some(positive("--eval-examples", value("--eval-examples")?)?)
            }
            "--threads" => o.threads = Some(positive("--threads", value("--threads")?)?),
            "--data-dir" => o.data_dir = Some(value("--data-dir")?.into()),
            "--out" => o.out = Some(value("--out")?.into()),
            "--reuse" => o.reuse.push(value("--reuse")?.into()),
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => bail!("bench: unknown argument `{other}`; {USAGE}"),
        }
    }
    Ok(o)
}

/// The suites to run, their data checked to exist (a missing path is an error naming it).
fn suites(o: &Options) -> Result<Vec<Suite>> {
    let mut out = Vec::new();
    if let Some(model) = &o.model {
        let (Some(task), Some(train), Some(eval)) = (&o.task, &o.train, &o.eval) else {
            bail!("--model needs --task, --train and --eval");
        };
        let kind = match task.as_str() {
            "sst2" | "rte" | "tsv" => Kind::Text,
            "idx" | "imagefolder" => Kind::Image,
            t => bail!("--task `{t}`: use sst2, rte, tsv, idx or imagefolder"),
        };
        for p in [train, eval] {
            if !p.exists() {
                bail!("bench: the data `{}` does not exist", p.display());
            }
        }
        let model_name = Path::new(model)
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| model.replace('/', "--"));
        out.push(Suite {
            name: format!("{model_name}-{task}"),
            model_name,
            task_name: task.clone(),
            model: model.clone(),
            task: task.clone(),
            train: train.clone(),
            eval: eval.clone(),
            kind,
            budget: Budget::preset(kind, o.quick),
        });
    } else {
        if o.task.is_some() || o.train.is_some() || o.eval.is_some() {
            bail!("--task/--train/--eval go with --model");
        }
        let data = o
            .data_dir
            .clone()
            .or_else(|| std::env::var_os("QN_DATA_DIR").map(PathBuf::from))
            .context(
                "bench: no data: set QN_DATA_DIR to the shared data directory (it holds \
                 models/all-MiniLM-L6-v2, models/efficientnet-lite0, data/sst2 and \
                 data/fashion-mnist), pass --data-dir, or name your own --model/--task/--train/--eval",
            )?;
        let wanted: Vec<&str> = if o.suites.is_empty() {
            vec!["minilm-sst2", "lite0-fmnist"]
        } else {
            o.suites.iter().map(String::as_str).collect()
        };
        for w in wanted {
            let s = match w {
                "minilm-sst2" => Suite {
                    name: "all-MiniLM-L6-v2-sst2".into(),
                    model_name: "all-MiniLM-L6-v2".into(),
                    task_name: "SST-2".into(),
                    model: data.join("models/all-MiniLM-L6-v2").display().to_string(),
                    task: "sst2".into(),
                    train: data.join("data/sst2/train.tsv"),
                    eval: data.join("data/sst2/validation.tsv"),
                    kind: Kind::Text,
                    budget: Budget::preset(Kind::Text, o.quick),
                },
                "lite0-fmnist" => Suite {
                    name: "efficientnet-lite0-fashion-mnist".into(),
                    model_name: "EfficientNet-Lite0".into(),
                    task_name: "Fashion-MNIST".into(),
                    model: data.join("models/efficientnet-lite0").display().to_string(),
                    task: "idx".into(),
                    train: data.join("data/fashion-mnist"),
                    eval: data.join("data/fashion-mnist"),
                    kind: Kind::Image,
                    budget: Budget::preset(Kind::Image, o.quick),
                },
                other => bail!("--suite `{other}`: use minilm-sst2 or lite0-fmnist"),
            };
            let missing: Vec<String> = [PathBuf::from(&s.model), s.train.clone(), s.eval.clone()]
                .iter()
                .filter(|p| !p.exists())
                .map(|p| p.display().to_string())
                .collect();
            if !missing.is_empty() {
                bail!("bench: {} needs {} (missing)", s.name, missing.join(", "));
            }
            out.push(s);
        }
    }
    for s in &mut out {
        if let Some(n) = o.steps {
            s.budget.steps = n;
        }
        if let Some(n) = o.train_examples {
            s.budget.train_examples = n;
        }
        if let Some(n) = o.eval_examples {
            s.budget.eval_examples = Some(n);
        }
    }
    Ok(out)
}

/// Runs `cargo xtask bench`.
pub fn bench(args: &[String]) -> Result<()> {
    let o = parse_options(args)?;
    let methods: Vec<Method> = suite::select(o.methods.as_deref())
        .map_err(anyhow::Error::msg)?
        .into_iter()
        .filter(|m| m.quick || !o.quick)
        .collect();
    let suites = suites(&o)?;
    let qn = crate::build_qn()?;
    let out_dir = o
        .out
        .clone()
        .unwrap_or_else(|| crate::root().join("bench-results"));
    let runner = Runner::new(qn, out_dir.join("cache"), o.threads)?;
    let preset = if o.quick { "quick" } else { "full" };
    let date = report::today();
    let mut failures = Vec::new();
    for s in &suites {
        let recorded = recorded::load(&o.reuse, s)?;
        let rows = run_suite(&runner, s, &methods, &[0], &recorded, &mut |_| Ok(()))?;
        failures.extend(rows.iter().filter_map(|r| {
            r.error
                .as_ref()
                .map(|e| format!("{} {} seed {}: {e}", s.name, r.method.id, r.seed))
        }));
        let stem = if o.quick {
            format!("{}-quick", s.name)
        } else {
            s.name.clone()
        };
        let command = format!("cargo xtask bench {}", args.join(" "));
        let md = report::markdown(s, preset, &date, command.trim(), &rows);
        println!("{md}");
        write_atomic(&out_dir.join(format!("{stem}.md")), md.as_bytes())?;
        let j = report::to_json(s, preset, &date, &rows);
        write_atomic(
            &out_dir.join(format!("{stem}.json")),
            serde_json::to_string_pretty(&j)?.as_bytes(),
        )?;
        let title = format!(
            "{} on {}: accuracy against size ({preset}, {date})",
            s.model_name, s.task_name
        );
        match plot::draw(
            &title,
            &rows,
            &out_dir.join(format!("{stem}.svg")),
            &out_dir.join(format!("{stem}.png")),
        ) {
            Ok(()) => eprintln!(
                "bench: wrote {}.{{md,json,svg,png}}",
                out_dir.join(&stem).display()
            ),
            Err(e) => failures.push(format!("{}: plot: {e}", s.name)),
        }
        if o.seeds > 1 {
            let headline: Vec<Method> = methods.iter().filter(|m| m.headline).copied().collect();
            let seeds: Vec<u64> = (0..o.seeds).collect();
            // Written after every row (a partial summary says how many runs it holds), so that
            // a run cut off keeps what it finished: `--reuse` the JSON to go on.
            let write_summary = |rows: &[Row]| -> Result<String> {
                let (md, j) =
                    report::seeds_summary(s, &date, rows, o.seeds, headline.len() * seeds.len());
                write_atomic(&out_dir.join(format!("{stem}-seeds.md")), md.as_bytes())?;
                write_atomic(
                    &out_dir.join(format!("{stem}-seeds.json")),
                    serde_json::to_string_pretty(&j)?.as_bytes(),
                )?;
                Ok(md)
            };
            let rows = run_suite(&runner, s, &headline, &seeds, &recorded, &mut |rows| {
                write_summary(rows).map(|_| ())
            })?;
            failures.extend(rows.iter().filter_map(|r| {
                r.error
                    .as_ref()
                    .map(|e| format!("{} {} seed {}: {e}", s.name, r.method.id, r.seed))
            }));
            println!("{}", write_summary(&rows)?);
        }
    }
    if !failures.is_empty() {
        bail!(
            "bench: {} row(s) failed (rerun to resume):\n  {}",
            failures.len(),
            failures.join("\n  ")
        );
    }
    Ok(())
}

/// Every method of `methods` for every seed; a failed job fails its row, not the bench.
fn run_suite(
    runner: &Runner,
    s: &Suite,
    methods: &[Method],
    seeds: &[u64],
    recorded: &[(Row, PathBuf)],
    after_row: &mut dyn FnMut(&[Row]) -> Result<()>,
) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    let total = methods.len() * seeds.len();
    for &seed in seeds {
        for m in methods {
            eprintln!(
                "bench: {} [{}/{total}] {} seed {seed}",
                s.name,
                rows.len() + 1,
                m.id
            );
            let noise = m.noise_spec(&s.budget);
            if let Some((row, from)) = recorded::find(recorded, m.id, &noise, seed) {
                eprintln!(
                    "bench: {} {} seed {seed}: recorded in {} ({:.2} %)",
                    s.name,
                    m.id,
                    from.display(),
                    row.accuracy.unwrap_or(f64::NAN) * 100.0
                );
                rows.push(row.clone());
                after_row(&rows)?;
                continue;
            }
            let mut row = Row {
                method: *m,
                noise: noise.clone(),
                seed,
                file: None,
                bytes: None,
                accuracy: None,
                examples: None,
                seconds: 0.0,
                error: None,
            };
            if let Err(e) = run_row(runner, s, m, &noise, seed, &mut row) {
                eprintln!("bench: {} {} failed: {e:#}", s.name, m.id);
                row.error = Some(format!("{e:#}"));
            }
            rows.push(row);
            after_row(&rows)?;
        }
    }
    Ok(rows)
}

/// Arguments every command shares for this suite's input: tokens or pixels.
fn input_args(s: &Suite) -> Vec<String> {
    match s.kind {
        Kind::Text => vec!["--max-len".into(), s.budget.max_len.to_string()],
        Kind::Image => vec!["--image-size".into(), s.budget.image_size.to_string()],
    }
}

fn run_row(
    runner: &Runner,
    s: &Suite,
    m: &Method,
    noise: &str,
    seed: u64,
    row: &mut Row,
) -> Result<()> {
    let b = &s.budget;
    let mut ft: Vec<String> = vec![
        "finetune".into(),
        "--model".into(),
        s.model.clone(),
        "--task".into(),
        s.task.clone(),
        "--train".into(),
        s.train.display().to_string(),
        "--eval".into(),
        s.eval.display().to_string(),
        "--max-examples".into(),
        b.train_examples.to_string(),
        "--max-steps".into(),
        b.steps.to_string(),
        "--batch-size".into(),
        b.batch.to_string(),
        "--lr".into(),
        b.lr.to_string(),
        "--noise".into(),
        noise.to_string(),
        "--seed".into(),
        seed.to_string(),
        "--checkpoint-every".into(),
        (b.steps / 4).max(10).to_string(),
    ];
    if let Some(n) = b.eval_examples {
        ft.extend(["--max-eval-examples".into(), n.to_string()]);
    }
    if s.kind == Kind::Text && noise != "none" {
        // The recorded tables put the noise on every layer, embeddings and head included (the
        // fine-tune's default before it moved to the encoder layers' projections).
        ft.extend(["--noise-layers".into(), ".".into()]);
    }
    if s.kind == Kind::Image {
        ft.extend(["--bn-recalibrate".into(), b.bn_recalibrate.to_string()]);
    }
    ft.extend(input_args(s));
    let slug: String = noise
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' {
                c
            } else {
                '-'
            }
        })
        .collect();
    let ft_dir = runner.output_path(&format!("{}-ft-{slug}-s{seed}", s.name), &ft, "");
    let tuned = runner.job(&format!("{} fine-tune", m.id), &ft_dir, &ft, Some("-o"))?;
    row.seconds += tuned.seconds;
    let file = match m.compress {
        Compress::None => ft_dir.join("model.safetensors"),
        c => {
            let mut args: Vec<String> = vec![
                "compress".into(),
                "--model".into(),
                ft_dir.display().to_string(),
                "--task".into(),
                s.task.clone(),
                "--seed".into(),
                seed.to_string(),
            ];
            match c {
                Compress::Scalar { bits, histogram } => {
                    args.extend(["--method".into(), format!("int{bits}")]);
                    args.extend(["--granularity".into(), "channel".into()]);
                    args.extend([
                        "--observer".into(),
                        if histogram { "histogram" } else { "minmax" }.into(),
                    ]);
                }
                Compress::Ipq { int8, kd, rate } => {
                    if let Some(i) = rate {
                        args.extend(["--target-ratio".into(), b.rates[i].to_string()]);
                    }
                    args.extend([
                        "--distill".into(),
                        if kd { "logits" } else { "none" }.into(),
                        "--calibration".into(),
                        if kd { "256" } else { "0" }.into(),
                        "--method".into(),
                        "ipq".into(),
                        "--codebook".into(),
                        if int8 { "int8" } else { "f16" }.into(),
                        "--train".into(),
                        s.train.display().to_string(),
                        "--max-examples".into(),
                        b.train_examples.to_string(),
                        "--steps".into(),
                        b.ipq_steps.to_string(),
                        "--kmeans-iters".into(),
                        b.kmeans_iters.to_string(),
                        "--batch-size".into(),
                        b.batch.to_string(),
                    ]);
                }
                Compress::None => unreachable!("handled above"),
            }
            if s.kind == Kind::Image && matches!(c, Compress::Ipq { .. }) {
                args.extend(["--bn-recalibrate".into(), b.bn_recalibrate.to_string()]);
            }
            args.extend(input_args(s));
            let out = runner.output_path(&format!("{}-{}-s{seed}", s.name, m.id), &args, ".qnz");
            let done = runner.job(&format!("{} compress", m.id), &out, &args, Some("-o"))?;
            row.seconds += done.seconds;
            out
        }
    };
    let bytes = std::fs::metadata(&file)
        .with_context(|| format!("{}: the file to evaluate is missing", file.display()))?
        .len();
    row.file = Some(file.clone());
    row.bytes = Some(bytes);
    // The fp32 row is evaluated from its directory (config and tokenizer beside the weights).
    let model_arg = if m.compress == Compress::None {
        ft_dir.clone()
    } else {
        file.clone()
    };
    let mut ev: Vec<String> = vec![
        "eval".into(),
        "--model".into(),
        model_arg.display().to_string(),
        "--task".into(),
        s.task.clone(),
        "--data".into(),
        s.eval.display().to_string(),
        "--batch-size".into(),
        "64".into(),
        "--json".into(),
    ];
    if let Some(n) = b.eval_examples {
        ev.extend(["--max-examples".into(), n.to_string()]);
    }
    ev.extend(input_args(s));
    let eval_out = runner.output_path(&format!("{}-{}-s{seed}-eval", s.name, m.id), &ev, ".json");
    let done = runner.job(&format!("{} eval", m.id), &eval_out, &ev, None)?;
    row.seconds += done.seconds;
    let line = done
        .stdout
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with('{'))
        .with_context(|| format!("qn eval printed no JSON for {}", file.display()))?;
    let v: Value = serde_json::from_str(line).context("qn eval's JSON")?;
    row.accuracy = Some(
        v["accuracy"]
            .as_f64()
            .context("qn eval's JSON has no accuracy")?,
    );
    row.examples = v["examples"].as_u64();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_data_is_an_error_naming_it() {
        let o = Options {
            data_dir: Some(PathBuf::from("/nonexistent-qn-data")),
            seeds: 1,
            ..Options::default()
        };
        let err = suites(&o).unwrap_err().to_string();
        assert!(
            err.contains("/nonexistent-qn-data/models/all-MiniLM-L6-v2"),
            "{err}"
        );
    }

    #[test]
    fn options_reject_nonsense() {
        assert!(parse_options(&["--seeds".into(), "0".into()]).is_err());
        assert!(parse_options(&["--steps".into(), "x".into()]).is_err());
        assert!(parse_options(&["--bogus".into()]).is_err());
        assert!(parse_options(&["--methods".into()]).is_err());
        let o = parse_options(&["--quick".into(), "--methods".into(), "ptq, qat".into()]).unwrap();
        assert!(o.quick);
        assert_eq!(o.methods.unwrap(), ["ptq", "qat"]);
    }
}
