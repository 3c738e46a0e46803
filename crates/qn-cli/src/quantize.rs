//! `qn quantize`: post-training compression of any safetensors file into a `.qnz`.
//!
//! Each tensor is kept raw, scalar-quantized or product-quantized according to the command line and
//! an optional rule file. Finished tensors are saved as one-tensor `.qnz` parts in `<out>.parts/`, so
//! an interrupted run resumes where it stopped; the output is written atomically at the end.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use indicatif::{ProgressBar, ProgressStyle};
use qn_format::{header::CodebookKind, Payload, Reader, Writer};
use qn_kernels::{
    export,
    layout::{BlockLayout, LayerKind},
    pq::{self, KMeansConfig},
    scalar::{self, Granularity, ObserverKind, ScalarConfig, Scheme},
};
use regex::Regex;
use safetensors::Dtype;

use crate::input::{raw_dtype, to_f32, with_safetensors};
use crate::rules::{self, load_rules, plan_for, Method, Plan};

/// Arguments of `qn quantize`.
#[derive(clap::Args, Debug)]
pub struct QuantizeArgs {
    /// The safetensors file to compress.
    input: PathBuf,
    /// The `.qnz` file to write.
    #[arg(short, long)]
    output: PathBuf,
    /// raw, int8, int4, intN (N = 2..8) or pq.
    #[arg(long)]
    method: Method,
    /// PQ sub-vector dimension.
    #[arg(long, default_value_t = 8)]
    block_size: usize,
    /// PQ centroids per tensor.
    #[arg(long, default_value_t = 256)]
    centroids: usize,
    /// Scalar granularity: tensor, channel[:axis] or group:<size>.
    #[arg(long, default_value = "channel", value_parser = rules::parse_granularity)]
    granularity: Granularity,
    /// Scalar observer: minmax or histogram.
    #[arg(long, default_value = "minmax", value_parser = rules::parse_observer)]
    observer: ObserverKind,
    /// Scalar scheme: affine or symmetric.
    #[arg(long, default_value = "affine", value_parser = rules::parse_scheme)]
    scheme: Scheme,
    /// PQ codebook storage: f16, f32 or int8 (iPQ + int8).
    #[arg(long, default_value = "f16", value_parser = rules::parse_codebook)]
    codebook: CodebookKind,
    /// Only tensors whose name matches one of these regexes are compressed.
    #[arg(long)]
    include: Vec<String>,
    /// Tensors whose name matches one of these regexes stay raw.
    #[arg(long)]
    exclude: Vec<String>,
    /// Tensors with fewer elements stay raw.
    #[arg(long, default_value_t = 4096)]
    min_numel: usize,
    /// k-means seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// k-means iterations.
    #[arg(long, default_value_t = 20)]
    iters: usize,
    /// Train k-means on at most this many sub-vectors per tensor (all are assigned).
    #[arg(long)]
    max_points: Option<usize>,
    /// A TOML rule file setting method / block size / centroids per tensor-name regex.
    #[arg(long)]
    rules: Option<PathBuf>,
    /// Also try rANS coding of PQ assignments; kept per tensor only where the file gets smaller.
    #[arg(long)]
    entropy_code: bool,
    /// Start from scratch instead of reusing finished tensors of an interrupted run.
    #[arg(long)]
    no_resume: bool,
}

fn regexes(list: &[String], flag: &str) -> Result<Vec<Regex>> {
    list.iter()
        .map(|p| Regex::new(p).with_context(|| format!("--{flag} `{p}`")))
        .collect()
}

fn layer_kind(name: &str, rank: usize) -> Result<LayerKind> {
    Ok(match rank {
        2 if name.contains("embed") => LayerKind::Embedding,
        2 => LayerKind::Linear,
        4 => LayerKind::Conv2d,
        r => bail!("tensor `{name}`: PQ needs a 2-D (Linear, Embedding) or 4-D (Conv2d) weight, this one has rank {r}"),
    })
}

/// Compresses one float tensor according to `plan`.
fn compress(
    name: &str,
    shape: &[usize],
    values: Vec<f32>,
    plan: &Plan,
    args: &QuantizeArgs,
    bar: &ProgressBar,
) -> Result<Payload> {
    let w = Tensor::from_vec(values, shape, &Device::Cpu)?;
    match plan.method {
        Method::Raw => unreachable!("raw tensors are not compressed"),
        Method::Int(bits) => {
            let cfg = ScalarConfig::new(bits)?
                .with_granularity(plan.granularity)
                .with_observer(plan.observer)
                .with_scheme(plan.scheme);
            let params = scalar::observe(&w, &cfg).with_context(|| format!("tensor `{name}`"))?;
            Ok(export::scalar_payload(&scalar::quantize(&w, &params)?)?)
        }
        Method::Pq => {
            let layout =
                BlockLayout::new(name, layer_kind(name, shape.len())?, shape, plan.block_size)?;
            let cfg = KMeansConfig::new(plan.centroids)
                .with_iters(args.iters)
                .with_seed(args.seed)
                .with_max_points(args.max_points);
            let codes = pq::encode(&w, &layout, &cfg, &mut |p| {
                bar.set_message(format!("{name}: k-means {}/{}", p.iter, p.iters))
            })
            .with_context(|| format!("tensor `{name}`"))?;
            Ok(export::pq_payload(&codes, plan.codebook)?)
        }
    }
}

/// A fingerprint of everything that determines a tensor's record, naming its resume part.
fn fingerprint(name: &str, bytes: &[u8], plan: &Plan, args: &QuantizeArgs) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(name.as_bytes());
    h.update(bytes);
    h.update(
        format!(
            "{plan:?} {} {} {:?} {} v{}",
            args.seed,
            args.iters,
            args.max_points,
            args.entropy_code,
            qn_format::FORMAT_VERSION
        )
        .as_bytes(),
    );
    h.finalize()
}

fn parts_dir(output: &Path) -> PathBuf {
    let mut p = output.as_os_str().to_owned();
    p.push(".parts");
    PathBuf::from(p)
}

/// Runs `qn quantize`.
pub fn run(args: &QuantizeArgs) -> Result<()> {
    let rules = match &args.rules {
        Some(p) => load_rules(p)?,
        None => Vec::new(),
    };
    let include = regexes(&args.include, "include")?;
    let exclude = regexes(&args.exclude, "exclude")?;
    let defaults = Plan {
        method: args.method,
        block_size: args.block_size,
        centroids: args.centroids,
        codebook: args.codebook,
        granularity: args.granularity,
        observer: args.observer,
        scheme: args.scheme,
    };
    let parts = parts_dir(&args.output);
    if args.no_resume && parts.exists() {
        std::fs::remove_dir_all(&parts)
            .with_context(|| format!("{}: cannot remove", parts.display()))?;
    }
    std::fs::create_dir_all(&parts)
        .with_context(|| format!("{}: cannot create", parts.display()))?;
    let input = &args.input;
    let (writer, source_bytes, reused) = with_safetensors(input, |st| {
        let mut names: Vec<String> = st.names().into_iter().map(String::from).collect();
        names.sort();
        let bar = ProgressBar::new(names.len() as u64).with_style(
            ProgressStyle::with_template(
                "{bar:30} {pos}/{len} tensors [{elapsed_precise} < {eta}] {msg}",
            )
            .expect("valid template"),
        );
        let mut writer = Writer::new()
            .with_entropy_coding(args.entropy_code)
            .with_metadata("producer", format!("qn {}", env!("CARGO_PKG_VERSION")))
            .with_metadata(
                "source",
                input
                    .file_name()
                    .map(|n| n.to_string_lossy().to_string())
                    .unwrap_or_default(),
            );
        let (mut source_bytes, mut reused) = (0u64, 0usize);
        for (i, name) in names.iter().enumerate() {
            bar.set_message(name.clone());
            let t = st
                .tensor(name)
                .map_err(|e| anyhow::anyhow!("tensor `{name}`: {e}"))?;
            let shape = t.shape().to_vec();
            source_bytes += t.data().len() as u64;
            let is_float = matches!(t.dtype(), Dtype::F32 | Dtype::F16 | Dtype::BF16);
            let numel: usize = shape.iter().product();
            let selected = is_float
                && shape.len() >= 2
                && numel >= args.min_numel
                && (include.is_empty() || include.iter().any(|r| r.is_match(name)))
                && !exclude.iter().any(|r| r.is_match(name));
            let plan = if selected {
                plan_for(name, defaults, &rules)?
            } else {
                Plan {
                    method: Method::Raw,
                    ..defaults
                }
            };
            let part = parts.join(format!(
                "{i:05}-{:08x}.qnz",
                fingerprint(name, t.data(), &plan, args)
            ));
            if let Ok(r) = Reader::open(&part) {
                if let Ok(view) = r.tensor(name) {
                    writer.add_record(view)?;
                    reused += 1;
                    bar.inc(1);
                    continue;
                }
            }
            let payload = if plan.method == Method::Raw {
                Payload::Raw {
                    dtype: raw_dtype(name, t.dtype())?,
                    bytes: t.data().to_vec(),
                }
            } else {
                compress(name, &shape, to_f32(t.dtype(), t.data()), &plan, args, &bar)?
            };
            let mut one = Writer::new().with_entropy_coding(args.entropy_code);
            one.add(name, &shape, &payload)
                .with_context(|| format!("{}", input.display()))?;
            one.write_file(&part)?;
            writer.add_record(Reader::from_bytes(&std::fs::read(&part)?)?.tensor(name)?)?;
            bar.inc(1);
        }
        bar.finish_and_clear();
        Ok((writer, source_bytes, reused))
    })
    .with_context(|| format!("{}", input.display()))
    .map_err(flatten_file_context)
    .map_err(|e| keep_parts_note(e, &parts))?;
    let written = writer.write_file(&args.output)?;
    std::fs::remove_dir_all(&parts)
        .with_context(|| format!("{}: cannot remove", parts.display()))?;
    println!(
        "wrote {}: {} tensors, {} bytes ({:.2} MB), {:.1}x smaller than the {:.2} MB input{}",
        args.output.display(),
        writer.len(),
        written,
        written as f64 / 1e6,
        source_bytes as f64 / written.max(1) as f64,
        source_bytes as f64 / 1e6,
        if reused > 0 {
            format!(" ({reused} tensors reused from an interrupted run)")
        } else {
            String::new()
        }
    );
    Ok(())
}

/// After a failure, an empty parts directory goes; one with finished tensors stays for the rerun.
fn keep_parts_note(e: anyhow::Error, parts: &Path) -> anyhow::Error {
    let kept = std::fs::read_dir(parts).map(|d| d.count()).unwrap_or(0);
    if kept == 0 {
        let _ = std::fs::remove_dir(parts);
        e
    } else {
        anyhow::anyhow!(
            "{e:#} ({kept} finished tensors kept in {} for a rerun)",
            parts.display()
        )
    }
}

/// `with_context(file)` around an error that already names the file would say it twice.
fn flatten_file_context(e: anyhow::Error) -> anyhow::Error {
    let chain: Vec<String> = e.chain().map(|c| c.to_string()).collect();
    if chain.len() >= 2 && chain[1].starts_with(&chain[0]) {
        anyhow::anyhow!(chain[1..].join(": "))
    } else {
        e
    }
}
