//! `peft-wit sweep`: one adapter per (λp, λr) cell, then a table and a heatmap.

use std::path::PathBuf;

use peft_wit::sweep::{benchmark_cells, parse_weights, run_sweep};
use peft_wit::train::{prepare_data, RunOptions};

use super::common::{load_model, open_registry, stop_on_ctrl_c, table};
use super::tasks::TaskArgs;
use super::train::ConfigArgs;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    config: ConfigArgs,
    /// λp values: a list (0,0.2,0.4) or a range start:end:step (the paper's grid is 0:1:0.2).
    #[arg(long, default_value = "0:1:0.2")]
    prompt_weights: String,
    /// λr values.
    #[arg(long, default_value = "0.2:1:0.2")]
    response_weights: String,
    /// Metric for the heatmap and the best cell (from the held-out eval): response_loss,
    /// exact_match, rouge_l, ...
    #[arg(long, default_value = "response_loss")]
    metric: String,
    /// Prefix for the cells' registry names (`<prefix>wit-p0.2-r0.8`).
    #[arg(long, default_value = "")]
    prefix: String,
    /// Where sweep.json and heatmap.svg go (default: <registry>/.sweeps/<prefix>grid).
    #[arg(long)]
    report_dir: Option<PathBuf>,
    /// Retrain cells that already exist.
    #[arg(long)]
    force: bool,
    #[command(flatten)]
    bench: TaskArgs,
    /// With --tasks: the first N documents of each subtask.
    #[arg(long)]
    task_limit: Option<usize>,
    /// With --tasks: sequences decoded together.
    #[arg(long, default_value_t = 8)]
    task_batch_size: usize,
    #[arg(long)]
    quiet: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let cfg = args.config.resolve()?;
    let prompt_weights = parse_weights(&args.prompt_weights)?;
    let response_weights = parse_weights(&args.response_weights)?;
    anyhow::ensure!(
        args.bench.log_samples.is_none() && args.bench.output_path.is_none(),
        "--log-samples and --output-path belong to `peft-wit eval --tasks ... --adapters <cells>`; a sweep keeps each cell's scores in <registry>/<cell>/{}",
        peft_wit::sweep::BENCHMARK_FILE
    );
    let mut base = load_model(cfg.model.as_deref(), cfg.base_dtype, cfg.device)?;
    // Benchmarks are prepared before training so a bad task or missing data stops the sweep
    // before hours of training, not after.
    let suite = args
        .bench
        .prepare(&base, args.task_limit, args.task_batch_size)?;
    let data = prepare_data(&cfg, &base)?;
    if !args.quiet {
        for line in &data.report {
            eprintln!("data: {line}");
        }
    }
    let registry = open_registry(cfg.registry.as_deref())?;
    let opts = RunOptions {
        progress: !args.quiet,
        stop: stop_on_ctrl_c(),
        resume: false,
        force: args.force,
        ..Default::default()
    };
    let started = std::time::Instant::now();
    let mut result = run_sweep(
        &base,
        &data,
        &cfg,
        &registry,
        &prompt_weights,
        &response_weights,
        &args.prefix,
        &args.metric,
        &opts,
    )?;
    let report_dir = args.report_dir.unwrap_or_else(|| {
        registry
            .root()
            .join(".sweeps")
            .join(format!("{}grid", args.prefix))
    });
    let benchmarks = match &suite {
        Some(suite) if !result.interrupted => {
            eprintln!("benchmarks: scoring the finished cells ...");
            benchmark_cells(&mut base, &registry, &mut result, suite)?
        }
        _ => Vec::new(),
    };
    result.write(&report_dir)?;
    if !benchmarks.is_empty() {
        result.write_benchmark_heatmaps(&report_dir, &benchmarks)?;
        print_gains(&result, &benchmarks);
    }
    let metric_names = ["response_loss", "wit_loss", "exact_match", "rouge_l"];
    let rows: Vec<Vec<String>> = result
        .cells
        .iter()
        .map(|c| {
            let mut row = vec![
                c.name.clone(),
                format!("{}", c.prompt_weight),
                format!("{}", c.response_weight),
                c.status.clone(),
            ];
            for m in metric_names {
                let mark = if Some(&c.name) == result.best.as_ref() && m == args.metric {
                    " *"
                } else {
                    ""
                };
                row.push(
                    c.metrics
                        .get(m)
                        .map(|v| format!("{v:.4}{mark}"))
                        .unwrap_or_else(|| "-".into()),
                );
            }
            row
        })
        .collect();
    let mut header = vec!["adapter", "λp", "λr", "status"];
    header.extend(metric_names);
    println!("{}", table(&header, &rows));
    if let Some(best) = &result.best {
        println!("best by {}: {best}", args.metric);
    }
    println!(
        "heatmap: {}  ({:.0}s){}",
        report_dir.join("heatmap.svg").display(),
        started.elapsed().as_secs_f64(),
        if result.interrupted {
            "; interrupted: run the same command again to continue"
        } else {
            ""
        }
    );
    Ok(())
}

/// The paper's summary table: every cell's score and relative gain over the standard cell
/// (λp = 0, λr = 1) per benchmark, their mean, and the best cell per benchmark.
fn print_gains(result: &peft_wit::sweep::SweepResult, benchmarks: &[String]) {
    let rows = result.gains(benchmarks);
    let table_rows: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            let mut row = vec![
                r.name.clone(),
                format!("{}", r.prompt_weight),
                format!("{}", r.response_weight),
            ];
            for b in benchmarks {
                row.push(match r.scores.get(b) {
                    Some((score, Some(gain))) => format!("{score:.4} ({gain:+.1}%)"),
                    Some((score, None)) => format!("{score:.4}"),
                    None => "-".into(),
                });
            }
            row.push(
                r.mean_gain
                    .map(|g| format!("{g:+.1}%"))
                    .unwrap_or_else(|| "-".into()),
            );
            row
        })
        .collect();
    let mut header = vec!["adapter", "λp", "λr"];
    header.extend(benchmarks.iter().map(String::as_str));
    header.push("mean gain");
    println!("\nbenchmarks (relative gain over λp=0, λr=1):");
    println!("{}", table(&header, &table_rows));
    for b in benchmarks {
        if let Some(best) = result.by_metric(b).best {
            println!("best on {b}: {best}");
        }
    }
}
