//! A task's documents: read from a local directory in the benchmark's original layout (or the
//! Hub's), or from a Hub dataset through hf-hub (cached under `HF_HOME`, offline from the cache).
//! Files may be JSONL, JSON, CSV or parquet; every reader names the file and the line or row of
//! bad input.
//!
//! Documents are JSON objects, as the harness's `datasets` rows are, so templates see the same
//! fields: MMLU `{question, subject, choices, answer}`, BBH `{input, target, description}`,
//! GSM8K `{question, answer}`, IFEval `{key, prompt, instruction_id_list, kwargs}`.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use super::config::{DatasetSpec, TaskConfig};
use super::TaskError;
use crate::model::resolve::offline;

/// One document.
pub type Doc = Map<String, Value>;

/// Where benchmark data is looked for.
#[derive(Debug, Clone, Default)]
pub struct DataSource {
    /// `--task-data DIR`: the benchmarks' original (or the Hub's) layouts under it.
    pub local_dir: Option<PathBuf>,
}

/// The documents of the splits a task needs.
#[derive(Debug, Clone, Default)]
pub struct TaskDocs {
    pub test: Vec<Doc>,
    pub fewshot: Vec<Doc>,
    /// The files read, for the results' provenance.
    pub files: Vec<PathBuf>,
}

impl DataSource {
    /// Loads the test split and, when the task takes few-shot examples, the few-shot split.
    pub fn load(&self, task: &TaskConfig) -> Result<TaskDocs, TaskError> {
        let mut docs = TaskDocs::default();
        docs.test = self.split(task, &task.test_split, &mut docs.files)?;
        if task.num_fewshot > 0 {
            let split = task
                .fewshot_split
                .as_deref()
                .ok_or_else(|| TaskError::Config {
                    file: task.source.clone(),
                    message: format!(
                        "task `{}` asks for few-shot examples but has no `fewshot_split`",
                        task.task
                    ),
                })?;
            docs.fewshot = self.split(task, split, &mut docs.files)?;
            if docs.fewshot.len() < task.num_fewshot {
                return Err(TaskError::MissingData {
                    task: task.task.clone(),
                    message: format!(
                        "{} few-shot examples asked for, the `{split}` split has {}",
                        task.num_fewshot,
                        docs.fewshot.len()
                    ),
                });
            }
        }
        Ok(docs)
    }

    fn split(
        &self,
        task: &TaskConfig,
        split: &str,
        files: &mut Vec<PathBuf>,
    ) -> Result<Vec<Doc>, TaskError> {
        let spec = &task.dataset;
        let name = spec.name.as_deref().unwrap_or("");
        let missing = |message: String| TaskError::MissingData {
            task: task.task.clone(),
            message,
        };
        match spec.layout.as_str() {
            "files" => {
                let rel = spec.data_files.get(split).ok_or_else(|| {
                    missing(format!("no `data_files.{split}` in {}", task.source))
                })?;
                let path = match &task.base_dir {
                    Some(dir) => dir.join(rel),
                    None => PathBuf::from(rel),
                };
                files.push(path.clone());
                read_table(&path, spec.columns.as_deref())
            }
            "mmlu" => {
                if let Some(dir) = self.local_layout(&["mmlu/data", "mmlu", "data", ""], |d| {
                    d.join("test").is_dir() || d.join("dev").is_dir()
                }) {
                    let path = dir.join(split).join(format!("{name}_{split}.csv"));
                    if !path.is_file() {
                        return Err(missing(format!("{} does not exist (MMLU layout: {{dev,test}}/<subject>_{{dev,test}}.csv)", path.display())));
                    }
                    files.push(path.clone());
                    let rows = read_table(
                        &path,
                        Some(&["question", "A", "B", "C", "D", "answer"].map(String::from)),
                    )?;
                    rows.into_iter()
                        .enumerate()
                        .map(|(i, row)| {
                            mmlu_doc(row, name).map_err(|m| TaskError::Data {
                                path: path.clone(),
                                location: format!("row {}", i + 1),
                                message: m,
                            })
                        })
                        .collect()
                } else {
                    self.hub_split(task, spec, split, files)
                }
            }
            "bbh" => self.bbh_split(task, name, split, files),
            "gsm8k" => {
                if let Some(dir) = self
                    .local_layout(&["gsm8k", "grade_school_math/data", ""], |d| {
                        d.join("test.jsonl").is_file() || d.join("gsm8k_test.jsonl").is_file()
                    })
                {
                    let path = [format!("{split}.jsonl"), format!("gsm8k_{split}.jsonl")]
                        .iter()
                        .map(|f| dir.join(f))
                        .find(|p| p.is_file())
                        .ok_or_else(|| missing(format!("no {split}.jsonl in {}", dir.display())))?;
                    files.push(path.clone());
                    read_table(&path, None)
                } else {
                    self.hub_split(task, spec, split, files)
                }
            }
            "ifeval" => {
                if let Some(dir) =
                    self.local_layout(&["ifeval", "instruction_following_eval/data", ""], |d| {
                        d.join("input_data.jsonl").is_file()
                            || d.join("ifeval_input_data.jsonl").is_file()
                    })
                {
                    let path = ["input_data.jsonl", "ifeval_input_data.jsonl"]
                        .iter()
                        .map(|f| dir.join(f))
                        .find(|p| p.is_file())
                        .ok_or_else(|| {
                            missing(format!("no input_data.jsonl in {}", dir.display()))
                        })?;
                    files.push(path.clone());
                    read_table(&path, None)
                } else {
                    self.hub_split(task, spec, split, files)
                }
            }
            other => Err(TaskError::Config {
                file: task.source.clone(),
                message: format!(
                    "task `{}`: unknown dataset layout `{other}` (mmlu, bbh, gsm8k, ifeval, files)",
                    task.task
                ),
            }),
        }
    }

    /// The first of `candidates` under `--task-data` that `looks_right` accepts.
    fn local_layout(
        &self,
        candidates: &[&str],
        looks_right: impl Fn(&Path) -> bool,
    ) -> Option<PathBuf> {
        let root = self.local_dir.as_ref()?;
        candidates
            .iter()
            .map(|c| {
                if c.is_empty() {
                    root.clone()
                } else {
                    root.join(c)
                }
            })
            .find(|d| d.is_dir() && looks_right(d))
    }

    /// BBH: `bbh/<task>.json` (`{"examples": [{"input", "target"}]}`) and
    /// `cot-prompts/<task>.txt`; the exemplars and the description line always come from the
    /// latter (the Hub datasets carry the test examples only).
    fn bbh_split(
        &self,
        task: &TaskConfig,
        name: &str,
        split: &str,
        files: &mut Vec<PathBuf>,
    ) -> Result<Vec<Doc>, TaskError> {
        let missing = |message: String| TaskError::MissingData {
            task: task.task.clone(),
            message,
        };
        let dir = self
            .local_layout(&["bbh", "BIG-Bench-Hard", ""], |d| d.join("cot-prompts").is_dir())
            .ok_or_else(|| {
                missing("BBH needs --task-data DIR holding the original repository's cot-prompts/<task>.txt (and bbh/<task>.json for the examples)".into())
            })?;
        let prompt_path = dir.join("cot-prompts").join(format!("{name}.txt"));
        let text = std::fs::read_to_string(&prompt_path).map_err(|e| TaskError::Io {
            path: prompt_path.clone(),
            error: e,
        })?;
        let (description, exemplars) = parse_cot_prompts(&text).map_err(|m| TaskError::Data {
            path: prompt_path.clone(),
            location: "header".into(),
            message: m,
        })?;
        let mut docs = if split == "cot" {
            files.push(prompt_path);
            exemplars
        } else {
            let path = dir.join("bbh").join(format!("{name}.json"));
            if path.is_file() {
                files.push(path.clone());
                let value = read_json(&path)?;
                let examples =
                    value
                        .get("examples")
                        .and_then(Value::as_array)
                        .ok_or_else(|| TaskError::Data {
                            path: path.clone(),
                            location: "top level".into(),
                            message: "expected {\"examples\": [...]}".into(),
                        })?;
                examples
                    .iter()
                    .enumerate()
                    .map(|(i, e)| {
                        e.as_object().cloned().ok_or_else(|| TaskError::Data {
                            path: path.clone(),
                            location: format!("examples[{i}]"),
                            message: "expected an object with `input` and `target`".into(),
                        })
                    })
                    .collect::<Result<Vec<Doc>, _>>()?
            } else {
                self.hub_split(task, &task.dataset, split, files)?
            }
        };
        for doc in &mut docs {
            doc.insert("description".into(), Value::String(description.clone()));
        }
        Ok(docs)
    }

    /// A split of a Hub dataset: the files named `<subset>/<split>-*.parquet` (or `<split>-*`,
    /// or a JSONL named after the split), downloaded through hf-hub or found in its cache.
    fn hub_split(
        &self,
        task: &TaskConfig,
        spec: &DatasetSpec,
        split: &str,
        files: &mut Vec<PathBuf>,
    ) -> Result<Vec<Doc>, TaskError> {
        let repo_id = spec.path.as_deref().ok_or_else(|| TaskError::MissingData {
            task: task.task.clone(),
            message: "no local data (--task-data) and no Hub dataset `path`".into(),
        })?;
        let name = spec.name.as_deref();
        let listing = hub_files(repo_id)?;
        let wanted = |f: &str| -> bool {
            let (dir, file) = match f.rsplit_once('/') {
                Some((d, f)) => (Some(d), f),
                None => (None, f),
            };
            let dir_ok = match (name, dir) {
                (Some(n), Some(d)) => d == n || d.ends_with(&format!("/{n}")),
                (None, None) => true,
                (None, Some(_)) => false,
                (Some(_), None) => false,
            };
            let file_ok = file.starts_with(&format!("{split}-"))
                || file.starts_with(&format!("{split}."))
                || (file.ends_with(".jsonl") && listing.len() == 1);
            dir_ok && file_ok
        };
        let mut chosen: Vec<&String> = listing.iter().filter(|f| wanted(f)).collect();
        if chosen.is_empty() {
            // Single-file datasets (IFEval): the one JSONL is the split.
            chosen = listing
                .iter()
                .filter(|f| f.ends_with(".jsonl") && !f.contains('/'))
                .collect();
        }
        if chosen.is_empty() {
            return Err(TaskError::MissingData {
                task: task.task.clone(),
                message: format!(
                    "Hub dataset {repo_id} has no file for subset {:?}, split `{split}`",
                    name.unwrap_or("(none)")
                ),
            });
        }
        let mut docs = Vec::new();
        for file in chosen {
            let path = hub_get(repo_id, file)?;
            files.push(path.clone());
            docs.extend(read_table(&path, None)?);
        }
        Ok(docs)
    }
}

/// Splits a BBH `cot-prompts/<task>.txt` into its description line and its exemplars
/// (`{input, target}`): a canary header, a `-----` rule, the description, then blank-line
/// separated `Q: <input>\nA: Let's think step by step.\n<target>` blocks.
pub fn parse_cot_prompts(text: &str) -> Result<(String, Vec<Doc>), String> {
    let text = text.replace("\r\n", "\n");
    let body = match text.split_once("-----\n") {
        Some((_, body)) => body,
        None => text.as_str(),
    };
    // The description may span paragraphs (snarks); the exemplars start at the first "Q: ".
    let (description, rest) = body
        .split_once("\n\nQ: ")
        .ok_or("no description followed by a blank line and \"Q: \"")?;
    const ANSWER: &str = "\nA: Let's think step by step.";
    let mut docs = Vec::new();
    for block in rest.trim_end().split("\n\nQ: ") {
        let (input, target) = block.split_once(ANSWER).ok_or_else(|| {
            format!(
                "exemplar {} has no \"A: Let's think step by step.\" line",
                docs.len() + 1
            )
        })?;
        // The reasoning follows on the next line, or on the same one (sports_understanding).
        let target = target
            .strip_prefix('\n')
            .or_else(|| target.strip_prefix(' '))
            .unwrap_or(target);
        let mut doc = Doc::new();
        doc.insert("input".into(), Value::String(input.to_string()));
        doc.insert("target".into(), Value::String(target.to_string()));
        docs.push(doc);
    }
    Ok((description.trim().to_string(), docs))
}

/// An MMLU CSV row (`question, A, B, C, D, answer-letter`) as the Hub's `cais/mmlu` row.
fn mmlu_doc(row: Doc, subject: &str) -> Result<Doc, String> {
    let field = |k: &str| -> Result<String, String> {
        row.get(k)
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or_else(|| format!("missing column `{k}`"))
    };
    let letter = field("answer")?;
    let answer = match letter.trim() {
        "A" => 0,
        "B" => 1,
        "C" => 2,
        "D" => 3,
        other => return Err(format!("answer `{other}` is not one of A, B, C, D")),
    };
    let mut doc = Doc::new();
    doc.insert("question".into(), Value::String(field("question")?));
    doc.insert("subject".into(), Value::String(subject.to_string()));
    doc.insert(
        "choices".into(),
        Value::Array(
            ["A", "B", "C", "D"]
                .iter()
                .map(|k| field(k).map(Value::String))
                .collect::<Result<_, _>>()?,
        ),
    );
    doc.insert("answer".into(), Value::from(answer));
    Ok(doc)
}

/// Reads a JSONL, JSON (array of objects), CSV or parquet file into documents.
pub fn read_table(path: &Path, columns: Option<&[String]>) -> Result<Vec<Doc>, TaskError> {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase();
    match ext.as_str() {
        "jsonl" => read_jsonl(path),
        "json" => {
            let value = read_json(path)?;
            let rows = value.as_array().ok_or_else(|| TaskError::Data {
                path: path.to_path_buf(),
                location: "top level".into(),
                message: "expected an array of objects".into(),
            })?;
            rows.iter()
                .enumerate()
                .map(|(i, r)| {
                    r.as_object().cloned().ok_or_else(|| TaskError::Data {
                        path: path.to_path_buf(),
                        location: format!("item {}", i + 1),
                        message: "expected an object".into(),
                    })
                })
                .collect()
        }
        "csv" => read_csv(path, columns),
        "parquet" => read_parquet(path),
        _ => Err(TaskError::Data {
            path: path.to_path_buf(),
            location: "file name".into(),
            message: "unknown format (expected .jsonl, .json, .csv or .parquet)".into(),
        }),
    }
}

fn read_json(path: &Path) -> Result<Value, TaskError> {
    let text = std::fs::read_to_string(path).map_err(|e| TaskError::Io {
        path: path.to_path_buf(),
        error: e,
    })?;
    serde_json::from_str(&text).map_err(|e| TaskError::Data {
        path: path.to_path_buf(),
        location: format!("line {}, column {}", e.line(), e.column()),
        message: e.to_string(),
    })
}

fn read_jsonl(path: &Path) -> Result<Vec<Doc>, TaskError> {
    let text = std::fs::read_to_string(path).map_err(|e| TaskError::Io {
        path: path.to_path_buf(),
        error: e,
    })?;
    let mut docs = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let bad = |message: String| TaskError::Data {
            path: path.to_path_buf(),
            location: format!("line {}", i + 1),
            message,
        };
        match serde_json::from_str::<Value>(line).map_err(|e| bad(e.to_string()))? {
            Value::Object(map) => docs.push(map),
            _ => return Err(bad("expected a JSON object".into())),
        }
    }
    Ok(docs)
}

fn read_csv(path: &Path, columns: Option<&[String]>) -> Result<Vec<Doc>, TaskError> {
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(columns.is_none())
        .flexible(false)
        .from_path(path)
        .map_err(|e| TaskError::Data {
            path: path.to_path_buf(),
            location: "open".into(),
            message: e.to_string(),
        })?;
    let header: Vec<String> = match columns {
        Some(c) => c.to_vec(),
        None => reader
            .headers()
            .map_err(|e| TaskError::Data {
                path: path.to_path_buf(),
                location: "header".into(),
                message: e.to_string(),
            })?
            .iter()
            .map(str::to_string)
            .collect(),
    };
    let mut docs = Vec::new();
    for (i, record) in reader.records().enumerate() {
        let record = record.map_err(|e| TaskError::Data {
            path: path.to_path_buf(),
            location: e
                .position()
                .map(|p| format!("line {}", p.line()))
                .unwrap_or_else(|| format!("record {}", i + 1)),
            message: e.to_string(),
        })?;
        if record.len() != header.len() {
            return Err(TaskError::Data {
                path: path.to_path_buf(),
                location: format!(
                    "line {}",
                    record.position().map(|p| p.line()).unwrap_or(i as u64 + 1)
                ),
                message: format!(
                    "{} fields, expected {} ({})",
                    record.len(),
                    header.len(),
                    header.join(", ")
                ),
            });
        }
        docs.push(
            header
                .iter()
                .zip(record.iter())
                .map(|(k, v)| (k.clone(), Value::String(v.to_string())))
                .collect(),
        );
    }
    Ok(docs)
}

fn read_parquet(path: &Path) -> Result<Vec<Doc>, TaskError> {
    use parquet::file::reader::{FileReader, SerializedFileReader};
    let bad = |location: String, message: String| TaskError::Data {
        path: path.to_path_buf(),
        location,
        message,
    };
    let file = std::fs::File::open(path).map_err(|e| TaskError::Io {
        path: path.to_path_buf(),
        error: e,
    })?;
    let reader =
        SerializedFileReader::new(file).map_err(|e| bad("footer".into(), e.to_string()))?;
    let rows = reader
        .get_row_iter(None)
        .map_err(|e| bad("schema".into(), e.to_string()))?;
    let mut docs = Vec::new();
    for (i, row) in rows.enumerate() {
        let row = row.map_err(|e| bad(format!("row {}", i + 1), e.to_string()))?;
        match row.to_json_value() {
            Value::Object(map) => docs.push(map),
            _ => return Err(bad(format!("row {}", i + 1), "not a record".into())),
        }
    }
    Ok(docs)
}

/// The files of a Hub dataset repository (from the cached snapshot when offline).
fn hub_files(repo_id: &str) -> Result<Vec<String>, TaskError> {
    let cache = hf_hub::Cache::from_env();
    if !offline() {
        let api = hf_hub::api::sync::ApiBuilder::from_env()
            .build()
            .map_err(|e| TaskError::Hub(format!("{repo_id}: {e}")))?;
        match api.dataset(repo_id.to_string()).info() {
            Ok(info) => return Ok(info.siblings.into_iter().map(|s| s.rfilename).collect()),
            Err(e) => eprintln!(
                "warning: Hub listing of {repo_id} failed ({e}); looking in the local cache"
            ),
        }
    }
    let snapshots = cache
        .path()
        .join(format!("datasets--{}", repo_id.replace('/', "--")))
        .join("snapshots");
    let mut files = Vec::new();
    if let Ok(entries) = std::fs::read_dir(&snapshots) {
        for snapshot in entries.flatten() {
            collect_files(&snapshot.path(), &snapshot.path(), &mut files);
        }
    }
    if files.is_empty() {
        return Err(TaskError::Hub(format!(
            "{repo_id} is not in the local cache {} and the Hub is unreachable or HF_HUB_OFFLINE is set; give --task-data DIR with local files",
            cache.path().display()
        )));
    }
    files.sort();
    files.dedup();
    Ok(files)
}

fn collect_files(root: &Path, dir: &Path, out: &mut Vec<String>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            collect_files(root, &path, out);
        } else if let Ok(rel) = path.strip_prefix(root) {
            out.push(rel.to_string_lossy().replace('\\', "/"));
        }
    }
}

fn hub_get(repo_id: &str, file: &str) -> Result<PathBuf, TaskError> {
    let cache = hf_hub::Cache::from_env();
    if let Some(path) = cache.dataset(repo_id.to_string()).get(file) {
        return Ok(path);
    }
    // A file of another cached revision than `refs/main`.
    let snapshots = cache
        .path()
        .join(format!("datasets--{}", repo_id.replace('/', "--")))
        .join("snapshots");
    if let Some(path) = std::fs::read_dir(&snapshots)
        .into_iter()
        .flatten()
        .flatten()
        .map(|s| s.path().join(file))
        .find(|p| p.is_file())
    {
        return Ok(path);
    }
    if offline() {
        return Err(TaskError::Hub(format!(
            "{repo_id}/{file} is not in the local cache and HF_HUB_OFFLINE is set"
        )));
    }
    let api = hf_hub::api::sync::ApiBuilder::from_env()
        .build()
        .map_err(|e| TaskError::Hub(format!("{repo_id}: {e}")))?;
    api.dataset(repo_id.to_string())
        .get(file)
        .map_err(|e| TaskError::Hub(format!("{repo_id}/{file}: {e}")))
}

/// A document built by hand, for tests.
#[cfg(test)]
pub(crate) fn doc_from_pairs(pairs: &[(&str, Value)]) -> Doc {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cot_prompts_split_into_description_and_exemplars() {
        let text = "CANARY line\n-----\nEvaluate the result.\n\nQ: 1 + 1?\nOptions:\n(A) 2\nA: Let's think step by step.\nOne and one is two. So the answer is (A).\n\nQ: 2 + 2?\nA: Let's think step by step.\nFour. So the answer is 4.\n";
        let (description, docs) = parse_cot_prompts(text).unwrap();
        assert_eq!(description, "Evaluate the result.");
        assert_eq!(docs.len(), 2);
        assert_eq!(docs[0]["input"], "1 + 1?\nOptions:\n(A) 2");
        assert_eq!(
            docs[0]["target"],
            "One and one is two. So the answer is (A)."
        );
        assert_eq!(docs[1]["target"], "Four. So the answer is 4.");
        assert!(parse_cot_prompts("-----\nDesc\n\nQ: x\nA: y").is_err());
        // A description of several paragraphs, and reasoning on the answer line itself.
        let (description, docs) = parse_cot_prompts(
            "-----\nDetermine it.\n\nAccording to a dictionary, it is so.\n\nQ: Plausible?\nA: Let's think step by step. It is. So the answer is yes.",
        )
        .unwrap();
        assert_eq!(
            description,
            "Determine it.\n\nAccording to a dictionary, it is so."
        );
        assert_eq!(docs[0]["target"], "It is. So the answer is yes.");
    }

    #[test]
    fn malformed_files_are_named_with_their_line() {
        let dir = tempfile::tempdir().unwrap();
        let jsonl = dir.path().join("a.jsonl");
        std::fs::write(&jsonl, "{\"q\": 1}\n{\"q\": \n").unwrap();
        let err = read_table(&jsonl, None).unwrap_err().to_string();
        assert!(err.contains("a.jsonl") && err.contains("line 2"), "{err}");

        let csv = dir.path().join("s_test.csv");
        std::fs::write(&csv, "q1,a,b,c,d,A\nq2,a,b,c\n").unwrap();
        let cols: Vec<String> = ["question", "A", "B", "C", "D", "answer"]
            .map(String::from)
            .to_vec();
        let err = read_table(&csv, Some(&cols)).unwrap_err().to_string();
        assert!(
            err.contains("s_test.csv") && err.contains("line 2"),
            "{err}"
        );

        let parquet = dir.path().join("x.parquet");
        std::fs::write(&parquet, b"not parquet").unwrap();
        let err = read_table(&parquet, None).unwrap_err().to_string();
        assert!(err.contains("x.parquet"), "{err}");
    }

    /// A Hub-style parquet split (as `openai/gsm8k` stores them) reads into documents.
    #[test]
    fn parquet_rows_become_docs() {
        use parquet::data_type::{ByteArray, ByteArrayType, Int64Type};
        use parquet::file::properties::WriterProperties;
        use parquet::file::writer::SerializedFileWriter;
        use parquet::schema::parser::parse_message_type;
        use std::sync::Arc;

        let schema = Arc::new(
            parse_message_type(
                "message schema { REQUIRED BYTE_ARRAY question (UTF8); REQUIRED INT64 answer; }",
            )
            .unwrap(),
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("test-00000-of-00001.parquet");
        let file = std::fs::File::create(&path).unwrap();
        let mut writer =
            SerializedFileWriter::new(file, schema, Arc::new(WriterProperties::builder().build()))
                .unwrap();
        let mut group = writer.next_row_group().unwrap();
        let mut col = group.next_column().unwrap().unwrap();
        let questions: Vec<ByteArray> = vec!["one?".into(), "two?".into()];
        col.typed::<ByteArrayType>()
            .write_batch(&questions, None, None)
            .unwrap();
        col.close().unwrap();
        let mut col = group.next_column().unwrap().unwrap();
        col.typed::<Int64Type>()
            .write_batch(&[1, 2], None, None)
            .unwrap();
        col.close().unwrap();
        group.close().unwrap();
        writer.close().unwrap();

        let docs = read_table(&path, None).unwrap();
        assert_eq!(docs.len(), 2);
        assert_eq!(docs[1]["question"], "two?");
        assert_eq!(docs[1]["answer"], 2);
    }

    #[test]
    fn mmlu_rows_become_hub_shaped_docs() {
        let row = doc_from_pairs(&[
            ("question", "Q?".into()),
            ("A", "a".into()),
            ("B", "b".into()),
            ("C", "c".into()),
            ("D", "d".into()),
            ("answer", "C".into()),
        ]);
        let doc = mmlu_doc(row, "anatomy").unwrap();
        assert_eq!(doc["answer"], 2);
        assert_eq!(doc["choices"][3], "d");
        assert_eq!(doc["subject"], "anatomy");
    }
}
