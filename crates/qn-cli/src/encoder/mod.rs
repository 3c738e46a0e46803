//! The encoder commands: `finetune`, `eval`, `predict`, `embed`, `compress`, sharing how a model
//! is named (directory, hub id or `.qnz`), how text data is read and how results are printed.

pub mod compress;
pub mod eval;
pub mod finetune;
pub mod predict;

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::Device;
use qn_models::bundle::{load_bundle, EncoderBundle, LoadRequest};
use qn_models::text::{read_examples, LabelMap, Task, TextExample, TextTokenizer};
use qn_train::data::Dataset;

/// How a model is named, shared by every encoder command.
#[derive(clap::Args, Debug, Clone)]
pub struct ModelArgs {
    /// A local directory, a Hugging Face hub id, or a `.qnz` written by `qn compress`.
    #[arg(long)]
    pub model: String,
    /// Hub revision (branch, tag or commit).
    #[arg(long)]
    pub revision: Option<String>,
    /// Worker threads (default: all cores).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=1024), allow_negative_numbers = true)]
    pub threads: Option<u64>,
}

impl ModelArgs {
    /// Applies `--threads` (before any tensor work starts its pools).
    pub fn apply_threads(&self) {
        if let Some(n) = self.threads {
            std::env::set_var("RAYON_NUM_THREADS", n.to_string());
        }
    }

    /// Loads the model to train or compress it (its head sized for `labels` when given; a
    /// `.qnz`'s weights decoded to float), printing its warnings.
    pub fn load(
        &self,
        labels: Option<LabelMap>,
        seed: u64,
        quiet_head: bool,
    ) -> Result<EncoderBundle> {
        self.load_with(labels, seed, quiet_head, false)
    }

    /// Loads the model to run it: a `.qnz`'s quantized layers run from their codes, never
    /// expanded to a dense copy.
    pub fn load_for_inference(&self, quiet_head: bool) -> Result<EncoderBundle> {
        self.load_with(None, 0, quiet_head, true)
    }

    fn load_with(
        &self,
        labels: Option<LabelMap>,
        seed: u64,
        quiet_head: bool,
        keep_codes: bool,
    ) -> Result<EncoderBundle> {
        let b = load_bundle(
            &self.model,
            self.revision.as_deref(),
            &LoadRequest { labels, keep_codes },
            seed,
            &Device::Cpu,
        )?;
        for w in &b.warnings {
            if quiet_head && w.contains("classification head") {
                continue;
            }
            eprintln!("qn: warning: {w}");
        }
        Ok(b)
    }
}

/// `--task` of the commands that take text or images: a text layout, `idx` or `imagefolder`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AnyTask {
    /// sst2, rte, tsv.
    Text(Task),
    /// (Fashion-)MNIST IDX files: a directory with `train-*` and `t10k-*`.
    Idx,
    /// `<dir>/<class>/<image>.png|jpg`, as torchvision's `ImageFolder`.
    ImageFolder,
}

impl AnyTask {
    /// Whether the task is image classification.
    pub fn is_image(self) -> bool {
        matches!(self, AnyTask::Idx | AnyTask::ImageFolder)
    }
}

/// `--task`: sst2, rte, tsv, idx or imagefolder.
pub fn parse_any_task(s: &str) -> Result<AnyTask, String> {
    match s {
        "idx" => Ok(AnyTask::Idx),
        "imagefolder" => Ok(AnyTask::ImageFolder),
        _ => s
            .parse()
            .map(AnyTask::Text)
            .map_err(|e: String| format!("{e}, or idx / imagefolder for images")),
    }
}

/// `--max-len`: 1..=8192.
pub fn parse_max_len(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if (1..=8192).contains(&n) => Ok(n),
        _ => Err(format!("`{s}` is not a length in 1..=8192")),
    }
}

/// Reads a data file for `task`, checking it exists first.
pub fn read_data(
    path: &Path,
    task: Task,
    max_examples: Option<usize>,
    seed: u64,
) -> Result<Vec<TextExample>> {
    if !path.is_file() {
        bail!("dataset `{}`: no such file", path.display());
    }
    Ok(read_examples(path, task, max_examples, seed)?)
}

/// Tokenized, packed data with labels from `labels`.
pub fn to_dataset(
    examples: &[TextExample],
    labels: &LabelMap,
    tok: &TextTokenizer,
    file: &Path,
) -> Result<Dataset> {
    qn_models::text::to_dataset(
        examples,
        labels,
        tok,
        &file.display().to_string(),
        &Device::Cpu,
    )
    .with_context(|| format!("dataset `{}`", file.display()))
}

/// The label map of a task: fixed for SST-2 and RTE, else the training file's labels.
pub fn task_labels(task: Task, train: &[TextExample]) -> LabelMap {
    task.fixed_labels()
        .unwrap_or_else(|| LabelMap::from_examples(train))
}

/// Texts from `--text`/`--text-pair` or `--input FILE` (one per line, a tab separating a pair).
pub fn texts(
    text: &[String],
    pair: &[String],
    input: &Option<PathBuf>,
) -> Result<Vec<(String, Option<String>)>> {
    if !pair.is_empty() && pair.len() != text.len() {
        bail!(
            "--text-pair: {} given for {} --text (give one per --text)",
            pair.len(),
            text.len()
        );
    }
    let mut out: Vec<(String, Option<String>)> = text
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), pair.get(i).cloned()))
        .collect();
    if let Some(i) = out
        .iter()
        .position(|(t, p)| t.trim().is_empty() || p.as_ref().is_some_and(|p| p.trim().is_empty()))
    {
        bail!("--text {}: empty text (or --text-pair)", i + 1);
    }
    if let Some(f) = input {
        let body = std::fs::read_to_string(f).with_context(|| format!("file `{}`", f.display()))?;
        let before = out.len();
        for (n, line) in body.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            // One text, or a pair split by one tab: a second tab would silently glue two fields
            // into the pair's text.
            let fields: Vec<&str> = line.split('\t').collect();
            let at = || format!("file `{}`: line {}", f.display(), n + 1);
            if fields.len() > 2 {
                bail!(
                    "{}: {} tab-separated fields, expected a text or a pair (text<TAB>pair)",
                    at(),
                    fields.len()
                );
            }
            if fields.iter().any(|t| t.trim().is_empty()) {
                bail!("{}: empty text", at());
            }
            out.push((fields[0].to_string(), fields.get(1).map(|t| t.to_string())));
        }
        if out.len() == before {
            bail!(
                "file `{}`: no text in it (one text per line, a tab separating a pair)",
                f.display()
            );
        }
    }
    if out.is_empty() {
        bail!("no input: give --text (one or more) or --input FILE");
    }
    Ok(out)
}
