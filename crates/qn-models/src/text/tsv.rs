//! GLUE-style TSV readers: single sentences (`sentence<TAB>label`, SST-2), sentence pairs
//! (`index<TAB>sentence1<TAB>sentence2<TAB>label`, RTE, string labels) and generic
//! `text<TAB>label` (AG News). A header line is recognised and skipped; a malformed row is an error
//! naming the file and line.
//!
//! ```
//! use qn_models::text::{read_examples, Task};
//! let dir = tempfile::tempdir()?;
//! let f = dir.path().join("train.tsv");
//! std::fs::write(&f, "sentence\tlabel\ngood film\t1\nbad film\t0\n")?;
//! let ex = read_examples(&f, Task::Sst2, None, 0)?;
//! assert_eq!((ex[0].text.as_str(), ex[0].label.as_deref()), ("good film", Some("1")));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::path::Path;

use rand::{seq::SliceRandom, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::{Error, Result};

/// The layout of a data file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Task {
    /// `sentence<TAB>label`, labels 0 (negative) / 1 (positive).
    Sst2,
    /// `index<TAB>sentence1<TAB>sentence2<TAB>label`, labels entailment / not_entailment.
    Rte,
    /// `text<TAB>label` with any labels (or `text<TAB>pair<TAB>label`).
    Tsv,
}

impl std::str::FromStr for Task {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "sst2" | "sst-2" => Ok(Task::Sst2),
            "rte" => Ok(Task::Rte),
            "tsv" => Ok(Task::Tsv),
            _ => Err(format!("unknown task `{s}` (sst2, rte, tsv)")),
        }
    }
}

impl Task {
    /// The task's fixed label map, if it has one (SST-2's ids are the class indices, named as in
    /// GLUE).
    pub fn fixed_labels(self) -> Option<LabelMap> {
        match self {
            Task::Sst2 => Some(LabelMap::with_values(
                vec!["negative".into(), "positive".into()],
                vec!["0".into(), "1".into()],
            )),
            Task::Rte => Some(LabelMap::new(vec![
                "entailment".into(),
                "not_entailment".into(),
            ])),
            Task::Tsv => None,
        }
    }
}

/// One row.
#[derive(Debug, Clone, PartialEq)]
pub struct TextExample {
    /// The text (first sentence).
    pub text: String,
    /// The second sentence of a pair.
    pub pair: Option<String>,
    /// The label as written in the file.
    pub label: Option<String>,
    /// 1-based line in the file.
    pub line: usize,
}

/// Class names by index, and the values the data files write for them.
#[derive(Debug, Clone, PartialEq)]
pub struct LabelMap {
    names: Vec<String>,
    values: Vec<String>,
}

impl LabelMap {
    /// Labels written in the data as their names.
    pub fn new(names: Vec<String>) -> Self {
        Self {
            values: names.clone(),
            names,
        }
    }
    /// Labels written as `values`, named `names`.
    pub fn with_values(names: Vec<String>, values: Vec<String>) -> Self {
        Self { names, values }
    }
    /// The sorted distinct labels of `examples` (numeric labels in numeric order).
    pub fn from_examples(examples: &[TextExample]) -> Self {
        let mut v: Vec<String> = examples.iter().filter_map(|e| e.label.clone()).collect();
        v.sort_by(|a, b| match (a.parse::<i64>(), b.parse::<i64>()) {
            (Ok(x), Ok(y)) => x.cmp(&y),
            _ => a.cmp(b),
        });
        v.dedup();
        Self::new(v)
    }
    /// The class index of a label as a data file writes it, or as its name, or as the index
    /// itself (SST-2 writes 0/1 for a model whose labels are named negative/positive).
    pub fn index_of(&self, label: &str) -> Option<usize> {
        self.values
            .iter()
            .position(|v| v == label)
            .or_else(|| self.names.iter().position(|n| n == label))
            .or_else(|| {
                label
                    .parse::<usize>()
                    .ok()
                    .filter(|i| *i < self.names.len())
            })
    }
    /// Class names by index.
    pub fn names(&self) -> &[String] {
        &self.names
    }
    /// Number of classes.
    pub fn len(&self) -> usize {
        self.names.len()
    }
    /// Whether there are no classes.
    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }
}

/// Reads the rows of `path` as `task` lays them out. `max_examples` keeps a subset drawn with
/// `seed` (in file order).
pub fn read_examples(
    path: &Path,
    task: Task,
    max_examples: Option<usize>,
    seed: u64,
) -> Result<Vec<TextExample>> {
    read_examples_with(path, task, max_examples, seed, false)
}

/// [`read_examples`], where `unlabelled` also accepts rows without their label column (`sentence`
/// alone for SST-2 and `tsv`, `index<TAB>sentence1<TAB>sentence2` for RTE, as in GLUE's test
/// files): their [`TextExample::label`] is `None`. For training on a teacher's outputs
/// ([`qn_train::distill`]), which needs no labels.
pub fn read_examples_with(
    path: &Path,
    task: Task,
    max_examples: Option<usize>,
    seed: u64,
    unlabelled: bool,
) -> Result<Vec<TextExample>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::file(path, e))?;
    let bad = |line: usize, reason: String| Error::Dataset {
        file: path.display().to_string(),
        reason: format!("line {line}: {reason}"),
    };
    let mut out = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        let raw = raw.strip_suffix('\r').unwrap_or(raw);
        if raw.trim().is_empty() {
            continue;
        }
        let f: Vec<&str> = raw.split('\t').collect();
        let named = |c: &&str| matches!(c.trim(), "sentence" | "sentence1" | "text" | "index");
        // A labelled file's header ends in `label`; an unlabelled one has only column names.
        let header = line == 1
            && f.iter().any(named)
            && (matches!(f.last().map(|s| s.trim()), Some("label"))
                || unlabelled && f.iter().all(|c| named(c) || c.trim() == "sentence2"));
        if header {
            continue;
        }
        let (text, pair, label) = match (task, f.len()) {
            (Task::Sst2, 2) | (Task::Tsv, 2) => (f[0], None, Some(f[1])),
            (Task::Tsv, 3) => (f[0], Some(f[1]), Some(f[2])),
            (Task::Rte, 4) => (f[1], Some(f[2]), Some(f[3])),
            (Task::Sst2, 1) | (Task::Tsv, 1) if unlabelled => (f[0], None, None),
            (Task::Rte, 3) if unlabelled => (f[1], Some(f[2]), None),
            (t, n) => {
                let want = match (t, unlabelled) {
                    (Task::Sst2, false) => "2 (sentence, label)",
                    (Task::Rte, false) => "4 (index, sentence1, sentence2, label)",
                    (Task::Tsv, false) => "2 (text, label) or 3 (text, pair, label)",
                    (Task::Sst2, true) => "2 (sentence, label) or 1 (sentence)",
                    (Task::Rte, true) => {
                        "4 (index, sentence1, sentence2, label) or 3 (index, sentence1, sentence2)"
                    }
                    (Task::Tsv, true) => "2 (text, label), 3 (text, pair, label) or 1 (text)",
                };
                return Err(bad(
                    line,
                    format!("{n} tab-separated fields, expected {want}"),
                ));
            }
        };
        let label = label.map(str::trim);
        if label == Some("") {
            return Err(bad(line, "empty label".into()));
        }
        if text.trim().is_empty() {
            return Err(bad(line, "empty text".into()));
        }
        if let (Some(fixed), Some(label)) = (task.fixed_labels(), label) {
            if fixed.index_of(label).is_none() {
                return Err(bad(
                    line,
                    format!("label `{label}` is not one of {:?}", fixed.values),
                ));
            }
        }
        out.push(TextExample {
            text: text.trim().to_string(),
            pair: pair.map(|p| p.trim().to_string()),
            label: label.map(str::to_string),
            line,
        });
    }
    if out.is_empty() {
        return Err(Error::Dataset {
            file: path.display().to_string(),
            reason: "holds no examples".into(),
        });
    }
    if let Some(n) = max_examples {
        if n == 0 {
            return Err(Error::Input("--max-examples must be at least 1".into()));
        }
        if n < out.len() {
            let mut idx: Vec<usize> = (0..out.len()).collect();
            idx.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
            idx.truncate(n);
            idx.sort_unstable();
            out = idx.into_iter().map(|i| out[i].clone()).collect();
        }
    }
    Ok(out)
}
