//! Task files: a benchmark described as data, with lm-evaluation-harness's own field names
//! (`doc_to_text`, `doc_to_target`, `doc_to_choice`, `target_delimiter`, `fewshot_delimiter`,
//! `description`, `num_fewshot`, `generation_kwargs`, `filter_list`, `metric_list`), so a user
//! adds a task by writing TOML, and the built-in MMLU / BBH / GSM8K / IFEval are such files.
//!
//! One file holds a template (`[defaults]`) and its tasks (`[[task]]`, each overriding fields),
//! plus the groups they belong to, as the harness's `group:` / `task:` YAMLs do.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::TaskError;

/// What the model is asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OutputType {
    /// Log-likelihood of each choice after the context; the best one is the answer.
    MultipleChoice,
    /// Greedy generation until a stop string.
    GenerateUntil,
}

/// How few-shot examples are drawn from the few-shot split.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Sampler {
    /// Python's `random.Random(seed).sample`, drawn doc after doc (the harness's default).
    #[default]
    Default,
    /// The first `k` documents, in order (MMLU's dev split, BBH's exemplars).
    FirstN,
}

/// Where a task's documents come from.
#[derive(Debug, Clone, Default, Deserialize, serde::Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DatasetSpec {
    /// A known layout (`mmlu`, `bbh`, `gsm8k`, `ifeval`) read from `--task-data` or the Hub, or
    /// `files` for the file paths in `data_files`.
    pub layout: String,
    /// The Hub dataset id (`cais/mmlu`), used when no local directory is given.
    #[serde(default)]
    pub path: Option<String>,
    /// The subset (MMLU subject, BBH task, GSM8K's `main`).
    #[serde(default)]
    pub name: Option<String>,
    /// `layout = "files"`: split name → file (JSONL, JSON, CSV or parquet), relative to the
    /// task file.
    #[serde(default)]
    pub data_files: BTreeMap<String, String>,
    /// Column names for a CSV file without a header row.
    #[serde(default)]
    pub columns: Option<Vec<String>>,
}

/// One filter step of a filter pipeline.
#[derive(Debug, Clone, Deserialize, serde::Serialize, PartialEq)]
#[serde(tag = "function", rename_all = "snake_case", deny_unknown_fields)]
pub enum FilterStep {
    /// Python's `re.findall(pattern, response)[group_select]` (first non-empty group of a
    /// tuple), stripped; `fallback` when nothing matches.
    Regex {
        regex_pattern: String,
        #[serde(default)]
        group_select: i64,
        #[serde(default = "default_fallback")]
        fallback: String,
    },
    TakeFirst,
    Lowercase,
    Uppercase,
    /// Strips leading whitespace, as the harness's `remove_whitespace`.
    RemoveWhitespace,
}

fn default_fallback() -> String {
    "[invalid]".into()
}

/// A named filter pipeline (`strict-match`, `get-answer`, ...).
#[derive(Debug, Clone, Deserialize, serde::Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FilterPipeline {
    pub name: String,
    pub filter: Vec<FilterStep>,
}

/// A metric and its options.
#[derive(Debug, Clone, Deserialize, serde::Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MetricSpec {
    /// `acc`, `acc_norm`, `exact_match`, or `ifeval` (IFEval's four accuracies).
    pub metric: String,
    #[serde(default)]
    pub ignore_case: bool,
    #[serde(default)]
    pub ignore_punctuation: bool,
    #[serde(default)]
    pub ignore_numbers: bool,
    #[serde(default)]
    pub regexes_to_ignore: Vec<String>,
}

/// Generation settings.
#[derive(Debug, Clone, Deserialize, serde::Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct GenerationKwargs {
    #[serde(default)]
    pub until: Vec<String>,
    /// The harness's default is 256.
    #[serde(default = "default_max_gen_toks")]
    pub max_gen_toks: usize,
}

fn default_max_gen_toks() -> usize {
    256
}

impl Default for GenerationKwargs {
    fn default() -> Self {
        Self {
            until: Vec::new(),
            max_gen_toks: default_max_gen_toks(),
        }
    }
}

/// `doc_to_choice`: a fixed list, or a template/field producing one.
#[derive(Debug, Clone, Deserialize, serde::Serialize, PartialEq)]
#[serde(untagged)]
pub enum Choices {
    List(Vec<String>),
    Template(String),
}

/// Every field a task may set; `None` = inherit (from `[defaults]`, then the harness default).
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TaskFields {
    pub task: Option<String>,
    /// Groups this task belongs to, innermost last (e.g. `["mmlu", "mmlu_stem"]`).
    pub groups: Option<Vec<String>>,
    pub dataset: Option<DatasetSpec>,
    /// Overrides the dataset's subset name only (handy in `[[task]]` entries).
    pub dataset_name: Option<String>,
    pub output_type: Option<OutputType>,
    pub test_split: Option<String>,
    pub fewshot_split: Option<String>,
    pub fewshot_sampler: Option<Sampler>,
    pub num_fewshot: Option<usize>,
    pub description: Option<String>,
    pub doc_to_text: Option<String>,
    /// Other phrasings of `doc_to_text` for the prompt-robustness index (`--sensitivity`).
    pub doc_to_text_variants: Option<Vec<String>>,
    pub doc_to_target: Option<String>,
    pub doc_to_choice: Option<Choices>,
    pub target_delimiter: Option<String>,
    pub fewshot_delimiter: Option<String>,
    pub generation_kwargs: Option<GenerationKwargs>,
    pub filter_list: Option<Vec<FilterPipeline>>,
    pub metric_list: Option<Vec<MetricSpec>>,
}

/// A task file: defaults shared by its tasks, and the tasks.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskFile {
    /// Group name → alias accepted on the command line (e.g. `bbh` for `bbh_cot_fewshot`).
    #[serde(default)]
    pub aliases: BTreeMap<String, String>,
    #[serde(default)]
    pub defaults: TaskFields,
    #[serde(default, rename = "task")]
    pub tasks: Vec<TaskFields>,
}

/// A task with every field resolved.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TaskConfig {
    pub task: String,
    pub groups: Vec<String>,
    pub dataset: DatasetSpec,
    pub output_type: OutputType,
    pub test_split: String,
    pub fewshot_split: Option<String>,
    pub fewshot_sampler: Sampler,
    pub num_fewshot: usize,
    pub description: String,
    pub doc_to_text: String,
    pub doc_to_text_variants: Vec<String>,
    pub doc_to_target: String,
    pub doc_to_choice: Option<Choices>,
    pub target_delimiter: String,
    pub fewshot_delimiter: String,
    pub generation_kwargs: GenerationKwargs,
    pub filter_list: Vec<FilterPipeline>,
    pub metric_list: Vec<MetricSpec>,
    /// The task file it came from (`builtin:<name>` for the built-in ones); relative
    /// `data_files` are resolved against its folder.
    pub source: String,
    #[serde(skip)]
    pub base_dir: Option<PathBuf>,
}

impl TaskFields {
    /// `self` with unset fields taken from `defaults`.
    fn over(self, defaults: &TaskFields) -> TaskFields {
        let d = defaults.clone();
        TaskFields {
            task: self.task.or(d.task),
            groups: self.groups.or(d.groups),
            dataset: self.dataset.or(d.dataset),
            dataset_name: self.dataset_name.or(d.dataset_name),
            output_type: self.output_type.or(d.output_type),
            test_split: self.test_split.or(d.test_split),
            fewshot_split: self.fewshot_split.or(d.fewshot_split),
            fewshot_sampler: self.fewshot_sampler.or(d.fewshot_sampler),
            num_fewshot: self.num_fewshot.or(d.num_fewshot),
            description: self.description.or(d.description),
            doc_to_text: self.doc_to_text.or(d.doc_to_text),
            doc_to_text_variants: self.doc_to_text_variants.or(d.doc_to_text_variants),
            doc_to_target: self.doc_to_target.or(d.doc_to_target),
            doc_to_choice: self.doc_to_choice.or(d.doc_to_choice),
            target_delimiter: self.target_delimiter.or(d.target_delimiter),
            fewshot_delimiter: self.fewshot_delimiter.or(d.fewshot_delimiter),
            generation_kwargs: self.generation_kwargs.or(d.generation_kwargs),
            filter_list: self.filter_list.or(d.filter_list),
            metric_list: self.metric_list.or(d.metric_list),
        }
    }

    /// Resolves the harness's defaults and checks what must be present.
    fn resolve(self, source: &str, base_dir: Option<&Path>) -> Result<TaskConfig, TaskError> {
        let missing = |field: &str, task: &str| TaskError::Config {
            file: source.to_string(),
            message: format!("task `{task}` has no `{field}`"),
        };
        let task = self.task.ok_or_else(|| missing("task", "?"))?;
        let output_type = self
            .output_type
            .ok_or_else(|| missing("output_type", &task))?;
        let mut dataset = self.dataset.ok_or_else(|| missing("dataset", &task))?;
        if let Some(name) = self.dataset_name {
            dataset.name = Some(name);
        }
        let doc_to_text = self
            .doc_to_text
            .ok_or_else(|| missing("doc_to_text", &task))?;
        let doc_to_target = self
            .doc_to_target
            .ok_or_else(|| missing("doc_to_target", &task))?;
        if output_type == OutputType::MultipleChoice && self.doc_to_choice.is_none() {
            return Err(missing("doc_to_choice", &task));
        }
        let metric_list = self.metric_list.unwrap_or_else(|| {
            let metric = match output_type {
                OutputType::MultipleChoice => "acc",
                OutputType::GenerateUntil => "exact_match",
            };
            vec![MetricSpec {
                metric: metric.into(),
                ignore_case: false,
                ignore_punctuation: false,
                ignore_numbers: false,
                regexes_to_ignore: Vec::new(),
            }]
        });
        for m in &metric_list {
            let known = match output_type {
                OutputType::MultipleChoice => ["acc", "acc_norm"].contains(&m.metric.as_str()),
                OutputType::GenerateUntil => ["exact_match", "ifeval"].contains(&m.metric.as_str()),
            };
            if !known {
                return Err(TaskError::Config {
            file: source.to_string(),
                    message: format!(
                        "task `{task}`: metric `{}` is not available for {output_type:?} (multiple_choice: acc, acc_norm; generate_until: exact_match, ifeval)",
                        m.metric
                    ),
                });
            }
        }
        Ok(TaskConfig {
            groups: self.groups.unwrap_or_default(),
            dataset,
            output_type,
            test_split: self.test_split.unwrap_or_else(|| "test".into()),
            fewshot_split: self.fewshot_split,
            fewshot_sampler: self.fewshot_sampler.unwrap_or_default(),
            num_fewshot: self.num_fewshot.unwrap_or(0),
            description: self.description.unwrap_or_default(),
            doc_to_text,
            doc_to_text_variants: self.doc_to_text_variants.unwrap_or_default(),
            doc_to_target,
            doc_to_choice: self.doc_to_choice,
            target_delimiter: self.target_delimiter.unwrap_or_else(|| " ".into()),
            fewshot_delimiter: self.fewshot_delimiter.unwrap_or_else(|| "\n\n".into()),
            generation_kwargs: self.generation_kwargs.unwrap_or_default(),
            filter_list: self.filter_list.unwrap_or_default(),
            metric_list,
            source: source.to_string(),
            base_dir: base_dir.map(Path::to_path_buf),
            task,
        })
    }
}

impl TaskFile {
    /// Parses a task file's text; `source` names it in errors.
    pub fn parse(text: &str, source: &str) -> Result<Self, TaskError> {
        toml::from_str(text).map_err(|e| TaskError::Config {
            file: source.to_string(),
            message: e.to_string(),
        })
    }

    /// Every task of the file with its fields resolved.
    pub fn tasks(
        self,
        source: &str,
        base_dir: Option<&Path>,
    ) -> Result<Vec<TaskConfig>, TaskError> {
        let entries = if self.tasks.is_empty() {
            vec![TaskFields::default()]
        } else {
            self.tasks
        };
        entries
            .into_iter()
            .map(|t| t.over(&self.defaults).resolve(source, base_dir))
            .collect()
    }
}

/// The built-in task files, compiled into the binary.
pub const BUILTIN_TASK_FILES: &[(&str, &str)] = &[
    ("mmlu", include_str!("builtin/mmlu.toml")),
    ("bbh", include_str!("builtin/bbh.toml")),
    ("gsm8k", include_str!("builtin/gsm8k.toml")),
    ("ifeval", include_str!("builtin/ifeval.toml")),
];

/// All tasks a run can name: the built-in ones plus those of the user's task files.
#[derive(Debug, Clone, Default)]
pub struct TaskCatalog {
    pub tasks: Vec<TaskConfig>,
    /// Alias → group name.
    pub aliases: BTreeMap<String, String>,
}

impl TaskCatalog {
    /// The built-in tasks and, after them, those of `extra_files` (a later task of the same name
    /// replaces an earlier one, so a user can override a built-in task).
    pub fn load(extra_files: &[PathBuf]) -> Result<Self, TaskError> {
        let mut catalog = TaskCatalog::default();
        for (name, text) in BUILTIN_TASK_FILES {
            let source = format!("builtin:{name}");
            catalog.add(TaskFile::parse(text, &source)?, &source, None)?;
        }
        for path in extra_files {
            let text = std::fs::read_to_string(path).map_err(|e| TaskError::Io {
                path: path.clone(),
                error: e,
            })?;
            let source = path.display().to_string();
            catalog.add(TaskFile::parse(&text, &source)?, &source, path.parent())?;
        }
        Ok(catalog)
    }

    fn add(
        &mut self,
        file: TaskFile,
        source: &str,
        base_dir: Option<&Path>,
    ) -> Result<(), TaskError> {
        self.aliases.extend(file.aliases.clone());
        for task in file.tasks(source, base_dir)? {
            self.tasks.retain(|t| t.task != task.task);
            self.tasks.push(task);
        }
        Ok(())
    }

    /// Every group any task belongs to.
    pub fn groups(&self) -> Vec<String> {
        let mut groups: Vec<String> = self.tasks.iter().flat_map(|t| t.groups.clone()).collect();
        groups.sort();
        groups.dedup();
        groups
    }

    /// The tasks that `names` select (task names, group names or aliases), in catalog order,
    /// each once.
    pub fn select(&self, names: &[String]) -> Result<Vec<TaskConfig>, TaskError> {
        let mut chosen: Vec<&TaskConfig> = Vec::new();
        for raw in names {
            let name = self.aliases.get(raw).unwrap_or(raw);
            let found: Vec<&TaskConfig> = self
                .tasks
                .iter()
                .filter(|t| &t.task == name || t.groups.iter().any(|g| g == name))
                .collect();
            if found.is_empty() {
                return Err(TaskError::UnknownTask {
                    name: raw.clone(),
                    suggestion: self.nearest(raw),
                });
            }
            for t in found {
                if !chosen.iter().any(|c| c.task == t.task) {
                    chosen.push(t);
                }
            }
        }
        Ok(chosen.into_iter().cloned().collect())
    }

    /// The known name closest to `name` (edit distance), for "did you mean".
    fn nearest(&self, name: &str) -> Option<String> {
        let candidates: Vec<String> = self
            .tasks
            .iter()
            .map(|t| t.task.clone())
            .chain(self.groups())
            .chain(self.aliases.keys().cloned())
            .collect();
        crate::config_value::nearest(name, candidates.iter().map(String::as_str))
            .map(str::to_string)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_catalog_has_the_harness_tasks() {
        let catalog = TaskCatalog::load(&[]).unwrap();
        let mmlu = catalog.select(&["mmlu".into()]).unwrap();
        assert_eq!(mmlu.len(), 57);
        let stem = catalog.select(&["mmlu_stem".into()]).unwrap();
        assert_eq!(stem.len(), 19);
        let bbh = catalog.select(&["bbh".into()]).unwrap();
        assert_eq!(bbh.len(), 27);
        assert!(bbh.iter().all(|t| t.task.starts_with("bbh_cot_fewshot_")));
        let one = catalog
            .select(&["mmlu_anatomy".into(), "gsm8k".into(), "ifeval".into()])
            .unwrap();
        assert_eq!(one.len(), 3);
        assert_eq!(
            one[0].description,
            "The following are multiple choice questions (with answers) about anatomy.\n\n"
        );
        assert_eq!(one[1].num_fewshot, 5);
        assert_eq!(one[1].filter_list.len(), 2);
    }

    #[test]
    fn unknown_task_suggests_the_nearest_name() {
        let catalog = TaskCatalog::load(&[]).unwrap();
        let err = catalog.select(&["mmlu_anatomi".into()]).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("mmlu_anatomi"), "{text}");
        assert!(text.contains("mmlu_anatomy"), "{text}");
    }

    #[test]
    fn user_task_file_overrides_and_reports_bad_fields() {
        let file = TaskFile::parse(
            r#"
[defaults]
output_type = "generate_until"
dataset = { layout = "files", data_files = { test = "t.jsonl" } }
doc_to_text = "Q: {{q}}\nA:"
doc_to_target = "{{a}}"
[[task]]
task = "mine"
"#,
            "mine.toml",
        )
        .unwrap();
        let tasks = file.tasks("mine.toml", None).unwrap();
        assert_eq!(tasks[0].target_delimiter, " ");
        assert_eq!(tasks[0].metric_list[0].metric, "exact_match");

        let err = TaskFile::parse("[defaults]\ndoc_to_txt = \"x\"\n", "bad.toml").unwrap_err();
        assert!(err.to_string().contains("doc_to_txt"), "{err}");
        let missing = TaskFile::parse(
            "[[task]]\ntask = \"x\"\noutput_type = \"generate_until\"\n",
            "m.toml",
        )
        .unwrap()
        .tasks("m.toml", None)
        .unwrap_err();
        assert!(missing.to_string().contains("`dataset`"), "{missing}");
    }
}
