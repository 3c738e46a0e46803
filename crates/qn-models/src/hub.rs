//! From a hub id or a local directory to the files of a model.
//!
//! The cache follows Hugging Face's own tools (hf-hub 0.4 reads only `HF_HOME` and downloads on a
//! miss, so the rules are here): the cache is `HF_HUB_CACHE`, else `$HF_HOME/hub`, else
//! `~/.cache/huggingface/hub`, laid out as `models--ORG--NAME/snapshots/<commit>/` with
//! `refs/<revision>` holding the commit. With `HF_HUB_OFFLINE=1` only the cache is read: optional
//! files are skipped when absent, and a missing required file is an error naming the id and the
//! cache path. Online, a miss is downloaded through hf-hub into the same cache, with progress.
//!
//! ```
//! use qn_models::hub::{resolve, ModelRef};
//! let dir = tempfile::tempdir()?;
//! std::fs::write(dir.path().join("config.json"), "{}")?;
//! std::fs::write(dir.path().join("model.safetensors"), b"")?;
//! let files = resolve(&ModelRef::parse(dir.path().to_str().unwrap()), None)?;
//! assert!(files.tokenizer.is_none());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// Files beside the weights that tokenizers and sentence-transformers use; copied verbatim when a
/// model is written back.
pub const TOKENIZER_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "sentencepiece.bpe.model",
    "added_tokens.json",
];

/// What the user named: a directory on disk or a hub id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelRef {
    /// A local directory.
    Dir(PathBuf),
    /// `org/name` or `name` on the hub.
    Hub(String),
}

impl ModelRef {
    /// A path that exists is a directory; anything else that looks like `org/name` is a hub id.
    pub fn parse(s: &str) -> ModelRef {
        let p = Path::new(s);
        if p.exists() || s.starts_with('.') || s.starts_with('/') || s.matches('/').count() > 1 {
            ModelRef::Dir(p.to_path_buf())
        } else {
            ModelRef::Hub(s.to_string())
        }
    }
}

/// The files of one model.
#[derive(Debug, Clone)]
pub struct ModelFiles {
    /// What was asked for (for messages).
    pub source: String,
    /// `config.json`.
    pub config: PathBuf,
    /// `model.safetensors`.
    pub weights: PathBuf,
    /// `tokenizer.json`, if the model has one.
    pub tokenizer: Option<PathBuf>,
    /// Every tokenizer-related file present (see [`TOKENIZER_FILES`]), by file name.
    pub tokenizer_files: Vec<(String, PathBuf)>,
    /// sentence-transformers' `1_Pooling/config.json`, if any.
    pub pooling: Option<PathBuf>,
    /// sentence-transformers' `modules.json`, if any.
    pub modules: Option<PathBuf>,
}

/// The hub cache directory by Hugging Face's rules.
pub fn cache_dir() -> PathBuf {
    if let Some(p) = std::env::var_os("HF_HUB_CACHE").filter(|v| !v.is_empty()) {
        return PathBuf::from(p);
    }
    if let Some(p) = std::env::var_os("HF_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(p).join("hub");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_default();
    home.join(".cache").join("huggingface").join("hub")
}

/// Whether `HF_HUB_OFFLINE` asks for the cache only.
pub fn offline() -> bool {
    std::env::var("HF_HUB_OFFLINE")
        .map(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"))
        .unwrap_or(false)
}

/// Resolves `model` (at `revision`, default `main`) to its files.
pub fn resolve(model: &ModelRef, revision: Option<&str>) -> Result<ModelFiles> {
    match model {
        ModelRef::Dir(d) => from_dir(d),
        ModelRef::Hub(id) => from_hub(id, revision.unwrap_or("main")),
    }
}

fn from_dir(dir: &Path) -> Result<ModelFiles> {
    if !dir.is_dir() {
        return Err(Error::file(dir, "is not a model directory (nor a hub id)"));
    }
    let opt = |name: &str| Some(dir.join(name)).filter(|p| p.is_file());
    let config = opt("config.json")
        .ok_or_else(|| Error::file(&dir.join("config.json"), "not found in the model directory"))?;
    let weights = weights_in(dir, &dir.display().to_string(), |n| opt(n))?;
    Ok(ModelFiles {
        source: dir.display().to_string(),
        config,
        weights,
        tokenizer: opt("tokenizer.json"),
        tokenizer_files: TOKENIZER_FILES
            .iter()
            .filter_map(|n| opt(n).map(|p| (n.to_string(), p)))
            .collect(),
        pooling: opt("1_Pooling/config.json"),
        modules: opt("modules.json"),
    })
}

fn weights_in(dir: &Path, source: &str, find: impl Fn(&str) -> Option<PathBuf>) -> Result<PathBuf> {
    if let Some(p) = find("model.safetensors") {
        return Ok(p);
    }
    if find("pytorch_model.bin").is_some() {
        return Err(Error::Hub {
            id: source.to_string(),
            reason: format!(
                "has only pytorch_model.bin; convert it to model.safetensors first, e.g. \
                 python -c \"from transformers import AutoModel; AutoModel.from_pretrained('{source}').save_pretrained('{}-safetensors', safe_serialization=True)\"",
                dir.display()
            ),
        });
    }
    if find("model.safetensors.index.json").is_some() {
        return Err(Error::Hub {
            id: source.to_string(),
            reason: "sharded safetensors (model.safetensors.index.json) are not supported yet: \
                     save the model as one model.safetensors"
                .into(),
        });
    }
    Err(Error::file(&dir.join("model.safetensors"), "not found"))
}

fn repo_dir(id: &str) -> PathBuf {
    cache_dir().join(format!("models--{}", id.replace('/', "--")))
}

/// The snapshot directory of `id` at `revision` in the cache, if the cache has the revision.
fn cached_snapshot(id: &str, revision: &str) -> Option<PathBuf> {
    let repo = repo_dir(id);
    let commit = std::fs::read_to_string(repo.join("refs").join(revision))
        .map(|s| s.trim().to_string())
        .ok()
        .or_else(|| {
            (revision.len() == 40 && revision.bytes().all(|b| b.is_ascii_hexdigit()))
                .then(|| revision.to_string())
        })?;
    Some(repo.join("snapshots").join(commit)).filter(|p| p.is_dir())
}

fn from_hub(id: &str, revision: &str) -> Result<ModelFiles> {
    let valid = !id.is_empty()
        && id.split('/').count() <= 2
        && id.split('/').all(|p| {
            !p.is_empty()
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        });
    if !valid {
        return Err(Error::Hub {
            id: id.to_string(),
            reason: "is neither a directory nor a hub id (`org/name`)".into(),
        });
    }
    let snapshot = cached_snapshot(id, revision);
    let in_cache = |name: &str| {
        snapshot
            .as_ref()
            .map(|s| s.join(name))
            .filter(|p| p.is_file())
    };
    let fetch = |name: &str, required: bool| -> Result<Option<PathBuf>> {
        if let Some(p) = in_cache(name) {
            return Ok(Some(p));
        }
        if offline() {
            return if required {
                Err(Error::Hub {
                    id: id.to_string(),
                    reason: format!(
                        "`{name}` (revision {revision}) is not in the cache {} and HF_HUB_OFFLINE is set",
                        repo_dir(id).display()
                    ),
                })
            } else {
                Ok(None)
            };
        }
        match download(id, revision, name) {
            Ok(p) => Ok(Some(p)),
            Err(_) if !required => Ok(None),
            Err(e) => Err(e),
        }
    };
    let config = fetch("config.json", true)?.expect("required");
    let weights = match fetch("model.safetensors", false)? {
        Some(p) => p,
        None => {
            // Explain a PyTorch-only or sharded repo before reporting the miss.
            let dir = snapshot.clone().unwrap_or_else(|| repo_dir(id));
            let probe = |n: &str| fetch(n, false).ok().flatten();
            return Err(match weights_in(&dir, id, probe) {
                Err(Error::File { .. }) | Ok(_) => Error::Hub {
                    id: id.to_string(),
                    reason: format!(
                        "`model.safetensors` (revision {revision}) is not in the cache {}{}",
                        repo_dir(id).display(),
                        if offline() {
                            " and HF_HUB_OFFLINE is set"
                        } else {
                            " and could not be downloaded"
                        }
                    ),
                },
                Err(e) => e,
            });
        }
    };
    let mut tokenizer_files = Vec::new();
    for n in TOKENIZER_FILES {
        if let Some(p) = fetch(n, false)? {
            tokenizer_files.push((n.to_string(), p));
        }
    }
    Ok(ModelFiles {
        source: id.to_string(),
        config,
        weights,
        tokenizer: tokenizer_files
            .iter()
            .find(|(n, _)| n == "tokenizer.json")
            .map(|(_, p)| p.clone()),
        tokenizer_files,
        pooling: fetch("1_Pooling/config.json", false)?,
        modules: fetch("modules.json", false)?,
    })
}

fn download(id: &str, revision: &str, name: &str) -> Result<PathBuf> {
    let api = hf_hub::api::sync::ApiBuilder::new()
        .with_cache_dir(cache_dir())
        .with_progress(true)
        .build()
        .map_err(|e| Error::Hub {
            id: id.to_string(),
            reason: format!("cannot reach the hub: {e}"),
        })?;
    api.repo(hf_hub::Repo::with_revision(
        id.to_string(),
        hf_hub::RepoType::Model,
        revision.to_string(),
    ))
    .get(name)
    .map_err(|e| Error::Hub {
        id: id.to_string(),
        reason: format!("cannot download `{name}` (revision {revision}): {e}"),
    })
}
