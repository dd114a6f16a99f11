//! `peft-wit eval`: several adapters side by side on one loaded base.

use std::path::PathBuf;
use std::time::Instant;

use peft_wit::data::{self, Format, LoadOptions, LossWeights, OnBadRow};
use peft_wit::eval::{evaluate_all, EvalData, EvalReport, EvalResults, EvalRun, EvalSpec};
use peft_wit::fsutil::atomic_write;

use super::common::{open_registry, table, ModelArgs};
use super::tasks::TaskArgs;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    model: ModelArgs,
    /// Comma-separated registry names or PEFT adapter directories.
    #[arg(long, value_delimiter = ',')]
    adapters: Vec<String>,
    /// Every adapter in the registry.
    #[arg(long)]
    all: bool,
    /// Include the base model without adapter (as `base`).
    #[arg(long)]
    base: bool,
    #[arg(long)]
    registry: Option<PathBuf>,
    /// Evaluation data (JSONL/JSON in any supported format), or `builtin` for the built-in tasks.
    #[arg(long, required_unless_present = "tasks")]
    data: Option<String>,
    #[arg(long)]
    prompt_field: Option<String>,
    #[arg(long)]
    response_field: Option<String>,
    /// Use at most this many examples (with --tasks: the first N documents of each subtask, as
    /// the harness's --limit; default all; with --data: default 200).
    #[arg(long)]
    limit: Option<usize>,
    #[command(flatten)]
    bench: TaskArgs,
    /// Templates to compare (chat, alpaca, raw, or Jinja files); the first is the main one.
    #[arg(long, value_delimiter = ',', default_value = "chat")]
    templates: Vec<String>,
    /// Examples answered by greedy generation for exact match / contains / ROUGE-L.
    #[arg(long, default_value_t = 8)]
    generate: usize,
    /// Examples for the prompt-sensitivity index (with 2+ templates).
    #[arg(long, default_value_t = 4)]
    sensitivity: usize,
    /// Loss weights of the `wit_loss` column.
    #[arg(long, default_value_t = 0.0)]
    prompt_weight: f32,
    #[arg(long, default_value_t = 1.0)]
    response_weight: f32,
    #[arg(long, default_value_t = 4)]
    batch_size: usize,
    #[arg(long, default_value_t = 1024)]
    max_seq_len: usize,
    /// Apply adapters as a low-rank side path instead of merging them into a dense base.
    #[arg(long)]
    unmerged: bool,
    /// Evaluate K models at once, each on its share of the threads, adapters as side paths
    /// (as --unmerged) on the one loaded base; each holds its own activations.
    #[arg(long, default_value_t = 1,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    max_parallel: usize,
    /// Accept adapters whose sidecar names another base fingerprint.
    #[arg(long)]
    allow_other_base: bool,
    #[arg(long)]
    json: Option<PathBuf>,
    #[arg(long)]
    csv: Option<PathBuf>,
    /// Self-contained HTML report.
    #[arg(long)]
    report: Option<PathBuf>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let registry = open_registry(args.registry.as_deref())?;
    let mut names = args.adapters.clone();
    if args.all {
        // Folders of finished adapters only (not reports or other files kept beside them).
        names.extend(registry.adapter_names()?);
    }
    anyhow::ensure!(
        !names.is_empty() || args.base,
        "nothing to evaluate: give --adapters, --all or --base"
    );
    let load_started = Instant::now();
    let base = args.model.load()?;
    let base_load_seconds = load_started.elapsed().as_secs_f64();

    let data_eval = match &args.data {
        Some(data_arg) => {
            let limit = args.limit.unwrap_or(200);
            let mut examples = if data_arg == "builtin" {
                data::builtin_examples(limit, peft_wit::train::prepare::BUILTIN_DATA_SEED + 1)
            } else {
                let field_map = peft_wit::data::FieldMap::from_fields(
                    args.prompt_field.as_deref(),
                    args.response_field.as_deref(),
                );
                let opts = LoadOptions {
                    format: Format::Auto,
                    field_map,
                    on_bad_row: OnBadRow::Skip,
                };
                let (examples, report) =
                    data::load_examples(std::path::Path::new(data_arg), &opts)?;
                eprintln!("data: {report}");
                examples
            };
            examples.truncate(limit);
            let templates = args
                .templates
                .iter()
                .map(|t| Ok((t.clone(), base.template(t)?)))
                .collect::<anyhow::Result<Vec<_>>>()?;
            let spec = EvalSpec {
                templates,
                weights: LossWeights::new(args.prompt_weight, args.response_weight),
                normalization: peft_wit::loss::Normalization::TokenCount,
                batch_size: args.batch_size,
                max_seq_len: args.max_seq_len,
                generate: args.generate,
                sensitivity_examples: args.sensitivity,
            };
            let eval_data = EvalData::new(&base, examples, &spec)?;
            Some((spec, eval_data))
        }
        None => None,
    };
    let n_examples = data_eval.as_ref().map_or(0, |(_, d)| d.examples.len());
    let suite = args.bench.prepare(&base, args.limit, args.batch_size)?;

    let mut base = base;
    let run = EvalRun {
        registry: &registry,
        include_base: args.base,
        adapters: &names,
        data: data_eval.as_ref().map(|(spec, data)| (spec, data)),
        suite: suite.as_ref(),
        side_path: args.unmerged,
        allow_other_base: args.allow_other_base,
        lanes: args.max_parallel,
    };
    let EvalResults {
        adapters: results,
        suites: suite_results,
    } = evaluate_all(&mut base, &run, |name| eprintln!("evaluating {name} ..."))?;
    if let Some(suite) = &suite {
        args.bench.report(suite, &suite_results, &base.name)?;
    }
    let report = EvalReport {
        model: base.name.clone(),
        data: args
            .data
            .clone()
            .unwrap_or_else(|| args.bench.tasks.join(",")),
        examples: n_examples,
        templates: args.templates.clone(),
        base_load_seconds,
        adapters: results,
    };
    let columns: Vec<String> = report
        .metric_names()
        .into_iter()
        .filter(|m| !m.ends_with("_mean") && !m.ends_with("_std"))
        .collect();
    let mut header = vec!["adapter".to_string()];
    header.extend(columns.iter().cloned());
    let header_refs: Vec<&str> = header.iter().map(String::as_str).collect();
    println!("{}", table(&header_refs, &report.table_rows(&columns)));
    println!(
        "(* best per column; base loaded once in {base_load_seconds:.1}s; per adapter: {})",
        report
            .adapters
            .iter()
            .map(|a| format!("{} {:.1}s", a.name, a.seconds))
            .collect::<Vec<_>>()
            .join(", ")
    );
    if let Some(first) = report.adapters.first() {
        for (k, g) in first.generations.iter().enumerate().take(3) {
            println!(
                "\n--- example {} ---\nprompt: {}\nreference: {}",
                k + 1,
                g.prompt.chars().take(200).collect::<String>(),
                g.reference
            );
            for a in &report.adapters {
                if let Some(out) = a.generations.get(k) {
                    println!("{:>20}: {}", a.name, out.output.replace('\n', " "));
                }
            }
        }
    }
    if let Some(path) = &args.json {
        atomic_write(path, report.to_json().as_bytes())?;
    }
    if let Some(path) = &args.csv {
        atomic_write(path, report.to_csv().as_bytes())?;
    }
    if let Some(path) = &args.report {
        atomic_write(path, report.to_html().as_bytes())?;
        eprintln!("report: {}", path.display());
    }
    Ok(())
}
