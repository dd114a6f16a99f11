//! Standard benchmarks scored exactly as lm-evaluation-harness (v0.4) scores them — MMLU, BBH
//! (`bbh_cot_fewshot`), GSM8K, IFEval, and any task a user describes in a TOML task file — for
//! every adapter on one loaded base.
//!
//! Layers, bottom up: [`config`] (task files) → [`source`] (documents) → [`prompt`] (contexts)
//! → [`lm`] (log-likelihoods and generation on the model) → [`scoring`] / [`ifeval`] (filters
//! and metrics) → [`run`] (one task, one model) → [`results`] (groups, the harness's JSON).
//! [`Suite`] ties them together for callers.

pub mod config;
pub mod ifeval;
pub mod lm;
pub mod prompt;
pub mod pyrandom;
pub mod results;
pub mod run;
pub mod scoring;
pub mod source;

use std::path::PathBuf;
use std::time::Instant;

use indicatif::{MultiProgress, ProgressBar, ProgressStyle};

pub use config::{TaskCatalog, TaskConfig};
pub use results::SuiteResult;
pub use run::{PreparedTask, RunOptions, Sample};
pub use source::DataSource;

use crate::data::template::ChatTemplate;
use crate::lora::LoraAdapter;
use crate::model::BaseModel;
use crate::Result;

/// Bad task files, data or templates; every variant names what to fix.
#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    #[error("task file {file}: {message}")]
    Config { file: String, message: String },
    #[error("unknown task `{name}`{}", suggestion.as_ref().map(|s| format!(" (did you mean `{s}`?)")).unwrap_or_default())]
    UnknownTask {
        name: String,
        suggestion: Option<String>,
    },
    #[error("{}: {error}", path.display())]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{}, {location}: {message}", path.display())]
    Data {
        path: PathBuf,
        location: String,
        message: String,
    },
    #[error("task `{task}`: {message}")]
    MissingData { task: String, message: String },
    #[error("task `{task}`: `{field}` does not render: {message}")]
    Template {
        task: String,
        field: String,
        message: String,
    },
    #[error("hub: {0}")]
    Hub(String),
    #[error("ifeval: {0}")]
    Ifeval(#[from] ifeval::IfevalError),
}

/// The tasks of a run, prepared once and evaluated for each model.
pub struct Suite {
    pub tasks: Vec<PreparedTask>,
    pub options: RunOptions,
    /// Whether to show progress bars (off in tests and non-terminal runs that ask so).
    pub progress: bool,
}

impl Suite {
    /// Selects `names` from the built-in tasks and `task_files`, loads their documents and
    /// builds every context.
    pub fn prepare(
        names: &[String],
        task_files: &[PathBuf],
        data: &DataSource,
        options: RunOptions,
        base: &BaseModel,
    ) -> Result<Self> {
        let catalog = TaskCatalog::load(task_files)?;
        let selected = catalog.select(names)?;
        let chat = match (&base.chat_template, options.apply_chat_template) {
            (Some(source), true) => Some(ChatTemplate::new(
                source,
                base.bos_token.as_deref().unwrap_or(""),
                base.eos_token.as_deref().unwrap_or(""),
            )?),
            _ => None,
        };
        let tasks = selected
            .into_iter()
            .map(|t| PreparedTask::prepare(t, data, &options, chat.as_ref()))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            tasks,
            options,
            progress: true,
        })
    }

    /// What the scores depend on besides the model (tasks and options), to tell whether stored
    /// scores are still valid.
    pub fn settings(&self) -> String {
        let names: Vec<&str> = self.tasks.iter().map(|t| t.config.task.as_str()).collect();
        format!(
            "tasks={}; {:?}; harness v0.4",
            names.join(","),
            self.options
        )
    }

    /// Scores one model: the base (`adapter = None`, or an adapter already merged into it) or
    /// the base with `adapter` as a low-rank side path.
    pub fn evaluate(
        &self,
        base: &BaseModel,
        adapter: Option<&LoraAdapter>,
        name: &str,
    ) -> Result<SuiteResult> {
        self.evaluate_with(base, adapter, name, None)
    }

    /// [`Suite::evaluate`], its progress bar drawn in `bars` (below other models' bars) when
    /// given.
    pub fn evaluate_with(
        &self,
        base: &BaseModel,
        adapter: Option<&LoraAdapter>,
        name: &str,
        bars: Option<&MultiProgress>,
    ) -> Result<SuiteResult> {
        let started = Instant::now();
        let tokenizer = base.tokenizer()?;
        let bos_id = base
            .bos_token
            .as_deref()
            .and_then(|t| tokenizer.token_to_id(t));
        let total: usize = self.tasks.iter().map(|t| t.docs.len()).sum();
        let bar = if self.progress {
            let bar = ProgressBar::new(total as u64);
            bar.set_style(
                ProgressStyle::with_template(
                    "{prefix} [{bar:30}] {pos}/{len} docs {msg} {elapsed_precise} ETA {eta}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            bar.set_prefix(name.to_string());
            match bars {
                Some(bars) => bars.add(bar),
                None => bar,
            }
        } else {
            ProgressBar::hidden()
        };
        let mut outcomes = Vec::with_capacity(self.tasks.len());
        for task in &self.tasks {
            bar.set_message(task.config.task.clone());
            let mut lm = lm::LanguageModel::new(&base.decoder, adapter, tokenizer, bos_id);
            let outcome = task.evaluate(&mut lm, name, self.options.batch_size.max(1), |n| {
                bar.inc(n as u64)
            })?;
            outcomes.push(outcome);
        }
        bar.finish_and_clear();
        Ok(SuiteResult::new(
            name,
            outcomes,
            started.elapsed().as_secs_f64(),
        ))
    }
}
