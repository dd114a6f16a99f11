//! Benchmark flags shared by `eval` and `sweep` (`--tasks mmlu,bbh,gsm8k,ifeval`, the harness's
//! options), and printing / writing their results.

use std::path::PathBuf;

use peft_wit::fsutil::atomic_write;
use peft_wit::model::BaseModel;
use peft_wit::tasks::{DataSource, RunOptions, Suite, SuiteResult};

use super::common::table;

#[derive(clap::Args, Clone, Debug, Default)]
pub struct TaskArgs {
    /// Benchmarks by lm-evaluation-harness's names: groups (mmlu, bbh, gsm8k, ifeval,
    /// mmlu_stem, ...) or single subtasks (mmlu_anatomy, bbh_cot_fewshot_navigate, ...).
    #[arg(long, value_delimiter = ',')]
    pub tasks: Vec<String>,
    /// Extra task files (TOML, the harness's fields); a task of the same name replaces the
    /// built-in one.
    #[arg(long = "task-file")]
    pub task_files: Vec<PathBuf>,
    /// Local benchmark data in the original or the Hub's layouts (mmlu/{dev,test}/*.csv,
    /// bbh/{bbh,cot-prompts}/, gsm8k/*.jsonl, ifeval/input_data.jsonl); default: the Hub through
    /// hf-hub (HF_HOME, HF_HUB_OFFLINE).
    #[arg(long)]
    pub task_data: Option<PathBuf>,
    /// Few-shot examples for every task (default: each task's own, e.g. MMLU 0, GSM8K 5).
    #[arg(long)]
    pub num_fewshot: Option<usize>,
    /// Cap on generated tokens (the harness's defaults: 256; BBH 1024; IFEval 1280).
    #[arg(long)]
    pub max_gen_toks: Option<usize>,
    /// Render contexts with the model's chat template.
    #[arg(long)]
    pub apply_chat_template: bool,
    /// With --apply-chat-template: few-shot examples as separate user/assistant turns.
    #[arg(long, requires = "apply_chat_template")]
    pub fewshot_as_multiturn: bool,
    /// Documents per task for the prompt-robustness index over the task's prompt variants
    /// (`doc_to_text_variants`; MMLU and GSM8K have two each). 0: off.
    #[arg(long = "task-sensitivity", default_value_t = 0)]
    pub task_sensitivity: usize,
    /// Per-example prompts, outputs, extracted answers and verdicts (JSONL, every adapter).
    #[arg(long)]
    pub log_samples: Option<PathBuf>,
    /// Results in lm-evaluation-harness's layout: <DIR>/<adapter>/results.json.
    #[arg(long)]
    pub output_path: Option<PathBuf>,
}

impl TaskArgs {
    /// Loads and prepares the selected tasks; `None` when no task was asked for.
    pub fn prepare(
        &self,
        base: &BaseModel,
        limit: Option<usize>,
        batch_size: usize,
    ) -> anyhow::Result<Option<Suite>> {
        if self.tasks.is_empty() {
            return Ok(None);
        }
        let data = DataSource {
            local_dir: self.task_data.clone(),
        };
        let options = RunOptions {
            limit,
            num_fewshot: self.num_fewshot,
            max_gen_toks: self.max_gen_toks,
            batch_size,
            apply_chat_template: self.apply_chat_template,
            fewshot_as_multiturn: self.fewshot_as_multiturn,
            sensitivity: self.task_sensitivity,
        };
        let suite = Suite::prepare(&self.tasks, &self.task_files, &data, options, base)?;
        let docs: usize = suite.tasks.iter().map(|t| t.docs.len()).sum();
        eprintln!("tasks: {} subtasks, {docs} documents", suite.tasks.len());
        Ok(Some(suite))
    }

    /// Prints the per-task table (scores ± standard error, best per column marked) and writes
    /// the requested files.
    pub fn report(
        &self,
        suite: &Suite,
        results: &[SuiteResult],
        model: &str,
    ) -> anyhow::Result<()> {
        print_task_table(results);
        let truncated: usize = results
            .iter()
            .flat_map(|r| &r.tasks)
            .map(|t| t.truncated)
            .sum();
        if truncated > 0 {
            eprintln!("note: {truncated} contexts were longer than the model's window and were cut from the left, as the harness does");
        }
        if let Some(path) = &self.log_samples {
            let mut text = String::new();
            for r in results {
                for t in &r.tasks {
                    for s in &t.samples {
                        text.push_str(&serde_json::to_string(s)?);
                        text.push('\n');
                    }
                }
            }
            atomic_write(path, text.as_bytes())?;
            eprintln!("samples: {}", path.display());
        }
        if let Some(dir) = &self.output_path {
            for r in results {
                let path = dir.join(&r.adapter).join("results.json");
                let json = serde_json::to_string_pretty(&r.harness_json(&suite.tasks, model))?;
                atomic_write(&path, json.as_bytes())?;
                eprintln!("results: {}", path.display());
            }
        }
        Ok(())
    }
}

/// One row per adapter, one column per benchmark score (with its standard error).
pub fn print_task_table(results: &[SuiteResult]) {
    let Some(first) = results.first() else {
        return;
    };
    let columns: Vec<Vec<(String, f64, Option<f64>)>> =
        results.iter().map(|r| r.columns()).collect();
    let labels: Vec<String> = first.columns().into_iter().map(|(l, _, _)| l).collect();
    let score = |i: usize, label: &str| columns[i].iter().find(|(l, _, _)| l == label);
    let best: Vec<Option<usize>> = labels
        .iter()
        .map(|label| {
            let higher = peft_wit::eval::higher_is_better(label);
            let mut best: Option<(usize, f64)> = None;
            for i in 0..results.len() {
                if let Some(&(_, s, _)) = score(i, label) {
                    let better = best.is_none_or(|(_, b)| if higher { s > b } else { s < b });
                    if s.is_finite() && better {
                        best = Some((i, s));
                    }
                }
            }
            best.map(|(i, _)| i)
        })
        .collect();
    let rows: Vec<Vec<String>> = results
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let mut row = vec![r.adapter.clone()];
            for (j, label) in labels.iter().enumerate() {
                let cell = score(i, label)
                    .map(|(_, s, se)| {
                        let mark = if results.len() > 1 && best[j] == Some(i) {
                            " *"
                        } else {
                            ""
                        };
                        match se {
                            Some(se) => format!("{s:.4} ± {se:.4}{mark}"),
                            None => format!("{s:.4}{mark}"),
                        }
                    })
                    .unwrap_or_else(|| "-".into());
                row.push(cell);
            }
            row.push(format!("{:.0}s", r.seconds));
            row
        })
        .collect();
    let mut header: Vec<&str> = vec!["adapter"];
    header.extend(labels.iter().map(String::as_str));
    header.push("time");
    println!("{}", table(&header, &rows));
    if results.len() > 1 {
        println!("(* best per column)");
    }
}
