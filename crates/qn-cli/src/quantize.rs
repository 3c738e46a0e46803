//! `qn quantize`: post-training compression of any safetensors file into a `.qnz`.
//!
//! Each tensor is kept raw, scalar-quantized or product-quantized according to the command line and
//! an optional rule file. Finished tensors are saved as one-tensor `.qnz` parts in `<out>.parts/`, so
//! an interrupted run resumes where it stopped; the output is written atomically at the end.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use indicatif::{ProgressBar, ProgressStyle};
use qn_format::{header::CodebookKind, Payload, Reader, Writer, SOURCE_DTYPE_KEY};
use qn_kernels::{
    export,
    layout::{BlockLayout, LayerKind},
    pq::{self, KMeansConfig},
    scalar::{self, Granularity, ObserverKind, ScalarConfig, Scheme},
};
use regex::Regex;
use safetensors::Dtype;

use crate::args::parse_positive_count;
use crate::input::{raw_dtype, to_f32, with_safetensors};
use crate::rules::{self, load_rules, plan_for, Method, Plan};

/// Arguments of `qn quantize`.
#[derive(clap::Args, Debug)]
pub struct QuantizeArgs {
    /// The safetensors file to compress.
    input: PathBuf,
    /// The `.qnz` file to write.
    #[arg(short, long, visible_alias = "out")]
    output: PathBuf,
    /// raw, int8, int4, intN (N = 2..8) or pq.
    #[arg(long)]
    method: Method,
    /// PQ sub-vector dimension (default: the paper's per layer kind — 4 for attention projections,
    /// 8 for other linears and embeddings, whole kernels for k x k convs, 4 input channels for 1x1).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=1 << 20), allow_negative_numbers = true)]
    block_size: Option<u64>,
    /// PQ centroids per tensor.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..=65_536), allow_negative_numbers = true)]
    centroids: u64,
    /// Scalar granularity: tensor, channel[:axis] or group:<size>.
    #[arg(long, default_value = "channel", value_parser = rules::parse_granularity, allow_negative_numbers = true)]
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
    #[arg(long, default_value_t = 4096, allow_negative_numbers = true)]
    min_numel: usize,
    /// k-means seed.
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    seed: u64,
    /// k-means iterations.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..=100_000), allow_negative_numbers = true)]
    iters: u64,
    /// Train k-means on at most this many sub-vectors per tensor (all are assigned).
    #[arg(long, value_parser = parse_positive_count, allow_negative_numbers = true)]
    max_points: Option<u64>,
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

/// Why a selected tensor is kept raw instead (a warning names it), or `None` when it can be
/// compressed as planned. Tensors that cannot be quantized — empty, fewer sub-vectors than
/// centroids, a default block size that does not divide them — never stop a whole-model run.
fn cannot_quantize(name: &str, shape: &[usize], plan: &Plan) -> Result<Option<String>> {
    let numel: usize = shape.iter().product();
    if numel == 0 {
        return Ok(Some(format!("shape {shape:?} is empty")));
    }
    let Method::Pq = plan.method else {
        return Ok(None);
    };
    let Some(kind) = LayerKind::infer(name, shape.len()) else {
        return Ok(Some(format!(
            "PQ needs a 2-D (Linear, Embedding) or 4-D (Conv2d) weight, shape {shape:?} is neither"
        )));
    };
    let bs = plan.block_size_for(name, kind, shape);
    let layout = match BlockLayout::new(name, kind, shape, bs) {
        Ok(l) => l,
        Err(e) if plan.block_size.is_none() => {
            return Ok(Some(format!("the default block size does not fit: {e}")))
        }
        Err(e) => return Err(e.into()),
    };
    if layout.n_blocks() < plan.centroids {
        return Ok(Some(format!(
            "its {} sub-vectors of {bs} are fewer than the {} centroids",
            layout.n_blocks(),
            plan.centroids
        )));
    }
    Ok(None)
}

/// Compresses one float tensor according to `plan`; kernel errors name the tensor once.
fn compress(
    name: &str,
    shape: &[usize],
    values: Vec<f32>,
    plan: &Plan,
    args: &QuantizeArgs,
    bar: &ProgressBar,
) -> Result<Payload> {
    let w = Tensor::from_vec(values, shape, &Device::Cpu)?;
    let named = |e: qn_kernels::Error| e.for_tensor(name);
    match plan.method {
        Method::Raw => unreachable!("raw tensors are not compressed"),
        Method::Int(bits) => {
            let cfg = ScalarConfig::new(bits)?
                .with_granularity(plan.granularity)
                .with_observer(plan.observer)
                .with_scheme(plan.scheme);
            let params = scalar::observe(&w, &cfg).map_err(named)?;
            Ok(export::scalar_payload(
                &scalar::quantize(&w, &params).map_err(named)?,
            )?)
        }
        Method::Pq => {
            let kind = LayerKind::infer(name, shape.len()).expect("checked by cannot_quantize");
            let layout =
                BlockLayout::new(name, kind, shape, plan.block_size_for(name, kind, shape))?;
            let cfg = KMeansConfig::new(plan.centroids)
                .with_iters(args.iters as usize)
                .with_seed(args.seed)
                .with_max_points(args.max_points.map(|m| m as usize));
            let codes = pq::encode(&w, &layout, &cfg, &mut |p| {
                bar.set_message(format!("{name}: k-means {}/{}", p.iter, p.iters))
            })
            .map_err(named)?;
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
        block_size: args.block_size.map(|b| b as usize),
        centroids: args.centroids as usize,
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
    let (writer, source_bytes, reused, warnings) = with_safetensors(input, |st| {
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
        let (mut source_bytes, mut reused, mut warnings) = (0u64, 0usize, Vec::new());
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
            let mut plan = if selected {
                plan_for(name, defaults, &rules)?
            } else {
                Plan {
                    method: Method::Raw,
                    ..defaults
                }
            };
            if plan.method != Method::Raw {
                if let Some(why) = cannot_quantize(name, &shape, &plan)? {
                    warnings.push(format!("tensor `{name}` stays raw: {why}"));
                    plan.method = Method::Raw;
                } else if t.dtype() != Dtype::F32 {
                    // Decoders give the tensor back in the dtype it came in (docs/format.md).
                    let d = if t.dtype() == Dtype::F16 {
                        "f16"
                    } else {
                        "bf16"
                    };
                    writer = writer.with_metadata(format!("{SOURCE_DTYPE_KEY}{name}"), d);
                }
            }
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
        Ok((writer, source_bytes, reused, warnings))
    })
    .with_context(|| format!("{}", input.display()))
    .map_err(flatten_file_context)
    .map_err(|e| keep_parts_note(e, &parts))?;
    for w in &warnings {
        eprintln!("qn: warning: {w}");
    }
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
