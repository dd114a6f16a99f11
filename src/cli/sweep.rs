//! `peft-wit sweep`: one adapter per (λp, λr) cell, then a table and a heatmap; the cells run
//! here or on a cluster (`--launcher slurm|k8s|print`), watched with `sweep status` and read
//! back with `sweep collect`.

use std::path::PathBuf;

use peft_wit::model::BaseModel;
use peft_wit::sweep::halving::{self, TaskOutcome, TaskTarget};
use peft_wit::sweep::launch::{self, K8sOptions, SlurmOptions};
use peft_wit::sweep::plan::plan_dir;
use peft_wit::sweep::{
    benchmark_cells, cell_statuses, collect, parse_weights, run_cell, CellOutcome, CellState,
    GridSpec, Launcher, LocalSweep, Strategy, SweepPlan, SweepResult,
};
use peft_wit::train::{prepare_data, PreparedData, RunOptions};

use super::common::{load_model, open_registry, stop_on_ctrl_c, table};
use super::tasks::TaskArgs;
use super::train::ConfigArgs;

#[derive(clap::Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct Args {
    #[command(subcommand)]
    action: Option<Action>,
    #[command(flatten)]
    grid: GridArgs,
}

#[derive(clap::Subcommand)]
enum Action {
    /// Train one cell of a planned sweep (what each scheduler task runs); resumes from the
    /// cell's checkpoint, and does nothing when the cell is done.
    RunCell(RunCellArgs),
    /// One line per cell: pending, running (step n of N), interrupted, failed (with the tail of
    /// its log) or done (its metric), and the scheduler's view where its tool is on PATH.
    Status(StatusArgs),
    /// The table, heatmap(s) and sweep.json from the cells that are done.
    Collect(Box<CollectArgs>),
}

#[derive(clap::Args)]
struct GridArgs {
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
    /// The sweep's name: its plan and reports live in <registry>/.sweeps/<name>
    /// (default: <prefix>grid).
    #[arg(long)]
    sweep_name: Option<String>,
    /// grid (every cell to the end) or halving (successive halving: every cell to the first
    /// rung, the best 1/eta of them on to the next, ...). On a cluster the rungs run as waves,
    /// each after the one before.
    #[arg(long, default_value = "grid")]
    strategy: String,
    /// With halving: the number of rungs (the first ends at 1/eta^(rungs-1) of the steps).
    #[arg(long, default_value_t = 3)]
    rungs: usize,
    /// With halving: keep the best 1/eta of the cells at each rung.
    #[arg(long, default_value_t = 3)]
    eta: usize,
    /// Where the cells run: local (here, on one loaded base), slurm (a job array), k8s (an
    /// Indexed Job manifest) or print (one command line per cell).
    #[arg(long, default_value = "local")]
    launcher: Launcher,
    /// At most K cells at once. With local: K cells side by side in this process, the threads
    /// split between them (default 1; on 2 cores, 2 cells of one thread each train about 1.5×
    /// the tokens/s of one cell on both; each cell holds its own activations), and --tasks
    /// scores K cells at once. With slurm / k8s: at most K tasks at once.
    #[arg(long, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    max_parallel: Option<usize>,
    /// With slurm: sbatch options passed through, e.g. "--partition=gpu --gres=gpu:1
    /// --time=2:00:00" (repeatable).
    #[arg(long, allow_hyphen_values = true)]
    slurm_opt: Vec<String>,
    #[command(flatten)]
    k8s: K8sArgs,
    /// Where sweep.json and heatmap.svg go (default: the plan's folder).
    #[arg(long)]
    report_dir: Option<PathBuf>,
    /// Retrain cells that already exist.
    #[arg(long)]
    force: bool,
    #[command(flatten)]
    bench: SweepTaskArgs,
    #[arg(long)]
    quiet: bool,
}

#[derive(clap::Args)]
struct K8sArgs {
    /// With k8s: the container image holding peft-wit.
    #[arg(long)]
    k8s_image: Option<String>,
    /// With k8s: the PersistentVolumeClaim holding the registry and the model cache.
    #[arg(long)]
    k8s_pvc: Option<String>,
    /// With k8s: where the claim is mounted in each pod.
    #[arg(long, default_value = "/workspace")]
    k8s_mount_path: String,
    /// With k8s: the registry's path inside the pod (default: its path here).
    #[arg(long)]
    k8s_registry_path: Option<String>,
    #[arg(long)]
    k8s_namespace: Option<String>,
    /// With k8s: CPU request per cell (e.g. 4).
    #[arg(long)]
    k8s_cpu: Option<String>,
    /// With k8s: memory request and limit per cell (e.g. 8Gi).
    #[arg(long)]
    k8s_memory: Option<String>,
    /// With k8s: GPUs per cell (nvidia.com/gpu).
    #[arg(long)]
    k8s_gpus: Option<u32>,
    /// With k8s: the peft-wit program inside the image.
    #[arg(long, default_value = "peft-wit")]
    k8s_program: String,
}

#[derive(clap::Args)]
struct RunCellArgs {
    /// The sweep's name (its plan is <registry>/.sweeps/<name>).
    #[arg(long)]
    sweep: String,
    /// The cell's index in the plan (0-based; a Slurm array task id, a Kubernetes completion
    /// index). In a halving sweep: the cell's next rung.
    #[arg(long, required_unless_present = "rung", conflicts_with_all = ["rung", "slot"])]
    index: Option<usize>,
    /// A halving sweep's wave task: the rung (1-based) ...
    #[arg(long, requires = "slot")]
    rung: Option<usize>,
    /// ... and the slot in it (0-based), resolved to a cell from the rung before's promotions.
    #[arg(long, requires = "rung")]
    slot: Option<usize>,
    #[arg(long)]
    registry: Option<PathBuf>,
    #[arg(long)]
    quiet: bool,
}

#[derive(clap::Args)]
struct StatusArgs {
    /// The sweep's name.
    name: String,
    #[arg(long)]
    registry: Option<PathBuf>,
}

#[derive(clap::Args)]
struct CollectArgs {
    /// The sweep's name.
    name: String,
    #[arg(long)]
    registry: Option<PathBuf>,
    /// Rank by this metric (default: the sweep's).
    #[arg(long)]
    metric: Option<String>,
    /// Where sweep.json and the heatmaps go (default: the plan's folder).
    #[arg(long)]
    report_dir: Option<PathBuf>,
    /// Also score the done cells on benchmarks (the base loaded once; scores kept per cell).
    #[command(flatten)]
    bench: SweepTaskArgs,
    /// With --tasks: score K cells at once, each on its share of the threads, adapters as
    /// side paths on the one loaded base.
    #[arg(long, default_value_t = 1,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    max_parallel: usize,
}

/// Benchmarks for a sweep's cells.
#[derive(clap::Args)]
struct SweepTaskArgs {
    #[command(flatten)]
    tasks: TaskArgs,
    /// With --tasks: the first N documents of each subtask.
    #[arg(long)]
    task_limit: Option<usize>,
    /// With --tasks: sequences decoded together.
    #[arg(long, default_value_t = 8)]
    task_batch_size: usize,
}

impl SweepTaskArgs {
    fn prepare(&self, base: &BaseModel) -> anyhow::Result<Option<peft_wit::tasks::Suite>> {
        self.tasks
            .prepare(base, self.task_limit, self.task_batch_size)
    }
}

pub fn run(args: Args) -> anyhow::Result<()> {
    match args.action {
        Some(Action::RunCell(a)) => run_one_cell(a),
        Some(Action::Status(a)) => status(a),
        Some(Action::Collect(a)) => collect_sweep(*a),
        None => run_grid(args.grid),
    }
}

fn run_grid(args: GridArgs) -> anyhow::Result<()> {
    let cfg = args.config.resolve()?;
    let prompt_weights = parse_weights(&args.prompt_weights)?;
    let response_weights = parse_weights(&args.response_weights)?;
    let sweep_name = args
        .sweep_name
        .clone()
        .unwrap_or_else(|| format!("{}grid", args.prefix));
    peft_wit::sweep::plan::validate_sweep_name(&sweep_name)?;
    anyhow::ensure!(
        args.bench.tasks.log_samples.is_none() && args.bench.tasks.output_path.is_none(),
        "--log-samples and --output-path belong to `peft-wit eval --tasks ... --adapters <cells>`; a sweep keeps each cell's scores in <registry>/<cell>/{}",
        peft_wit::sweep::BENCHMARK_FILE
    );
    let strategy = match args.strategy.as_str() {
        "grid" => Strategy::Grid,
        "halving" => Strategy::Halving {
            rungs: args.rungs,
            eta: args.eta,
        },
        other => anyhow::bail!("--strategy `{other}`: use grid or halving"),
    };
    strategy.validate()?;
    // Everything a launcher needs is checked before the model loads and the plan is written.
    match args.launcher {
        Launcher::Local => {}
        other => {
            anyhow::ensure!(
                args.bench.tasks.tasks.is_empty(),
                "--tasks runs with --launcher local; for cluster cells score them once they are done with `peft-wit sweep collect {sweep_name} --tasks ...` (one loaded base for all)"
            );
            if other == Launcher::Slurm {
                launch::check_sbatch()?;
            }
            if other == Launcher::K8s {
                anyhow::ensure!(
                    args.k8s.k8s_image.is_some() && args.k8s.k8s_pvc.is_some(),
                    "--launcher k8s needs --k8s-image and --k8s-pvc (the claim holding the registry and model cache)"
                );
            }
        }
    }
    let slurm = SlurmOptions {
        max_parallel: args.max_parallel,
        sbatch_options: split_options(&args.slurm_opt)?,
    };
    let mut base = load_model(cfg.model.as_deref(), cfg.base_dtype, cfg.device)?;
    // Benchmarks are prepared before training so a bad task or missing data stops the sweep
    // before hours of training, not after.
    let suite = args.bench.prepare(&base)?;
    let data = prepare_data(&cfg, &base)?;
    if !args.quiet {
        for line in &data.report {
            eprintln!("data: {line}");
        }
    }
    let registry = open_registry(cfg.registry.as_deref())?;
    let grid = GridSpec {
        strategy,
        name: sweep_name,
        prefix: args.prefix.clone(),
        metric: args.metric.clone(),
        prompt_weights,
        response_weights,
    };
    let plan = SweepPlan::new(&grid, &cfg, &base, &data)?;
    let new = plan.write_or_match(&registry, &data)?;
    let dir = plan_dir(&registry, &plan.name);
    eprintln!(
        "sweep `{}`: {} cells, {} steps each; plan {} {}",
        plan.name,
        plan.cells.len(),
        plan.total_steps,
        if new { "written to" } else { "already in" },
        dir.display()
    );
    let exe = std::env::current_exe()?;
    match args.launcher {
        Launcher::Local => {}
        Launcher::Slurm => {
            anyhow::ensure!(
                !args.force,
                "--force retrains cells here only: remove the cells to redo them, then submit again"
            );
            let pending = launch::pending_tasks(&registry, &plan, false)?;
            if pending.is_empty() {
                eprintln!("every cell is done: `peft-wit sweep collect {}`", plan.name);
                return Ok(());
            }
            let jobs = launch::submit_slurm(&exe, &registry, &plan, &pending, &slurm)?;
            for (job, set) in jobs.iter().zip(&pending) {
                let what = match set.rung {
                    None => format!("cells {}", launch::array_spec(&set.ids)),
                    Some(k) => format!(
                        "rung {} ({} cells, after the job before)",
                        k + 1,
                        set.ids.len()
                    ),
                };
                eprintln!("submitted Slurm job {job}: {what}");
            }
            eprintln!(
                "{} cells; watch with `peft-wit sweep status {}`, then `peft-wit sweep collect {}`",
                plan.cells.len(),
                plan.name,
                plan.name
            );
            println!("{}", jobs.join("\n"));
            return Ok(());
        }
        Launcher::K8s => {
            let opts = K8sOptions {
                image: args.k8s.k8s_image.clone().unwrap_or_default(),
                pvc: args.k8s.k8s_pvc.clone().unwrap_or_default(),
                mount_path: args.k8s.k8s_mount_path.clone(),
                registry_path: args.k8s.k8s_registry_path.clone(),
                namespace: args.k8s.k8s_namespace.clone(),
                max_parallel: args.max_parallel,
                cpu: args.k8s.k8s_cpu.clone(),
                memory: args.k8s.k8s_memory.clone(),
                gpus: args.k8s.k8s_gpus,
                program: args.k8s.k8s_program.clone(),
            };
            let paths = launch::write_k8s_manifests(&registry, &plan, &opts)?;
            match paths.last() {
                Some(script) if paths.len() > 1 => eprintln!(
                    "one Indexed Job per rung; `sh {}` applies each once the one before has completed",
                    script.display()
                ),
                _ => eprintln!(
                    "Indexed Job for {} cells (done cells exit at once): kubectl apply -f {}",
                    plan.cells.len(),
                    paths.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(" ")
                ),
            }
            for path in &paths {
                println!("{}", path.display());
            }
            return Ok(());
        }
        Launcher::Print => {
            let pending = launch::pending_tasks(&registry, &plan, args.force)?;
            for line in launch::cell_commands(&exe, &registry, &plan, &pending) {
                println!("{line}");
            }
            return Ok(());
        }
    }

    let opts = RunOptions {
        progress: !args.quiet,
        stop: stop_on_ctrl_c(),
        resume: false,
        force: args.force,
        ..Default::default()
    };
    let started = std::time::Instant::now();
    let lanes = args.max_parallel.unwrap_or(1);
    let local = LocalSweep {
        base: &base,
        data: &data,
        plan: &plan,
        registry: &registry,
        opts: &opts,
        lanes,
    };
    let mut result = local.run(|cell, outcome| {
        if let CellOutcome::Interrupted { step, .. } = outcome {
            eprintln!(
                "cell {} ({}) interrupted at step {step}",
                cell.index, cell.name
            );
        }
    })?;
    let report_dir = args.report_dir.unwrap_or(dir);
    let benchmarks = match &suite {
        Some(suite) if !result.interrupted => {
            eprintln!("benchmarks: scoring the finished cells ...");
            benchmark_cells(&mut base, &registry, &mut result, suite, lanes)?
        }
        _ => Vec::new(),
    };
    write_and_print(&result, &benchmarks, &report_dir)?;
    println!(
        "({:.0}s){}",
        started.elapsed().as_secs_f64(),
        if result.interrupted {
            " interrupted: run the same command again to continue"
        } else {
            ""
        }
    );
    Ok(())
}

/// `--slurm-opt` values split as a shell would split them.
fn split_options(values: &[String]) -> anyhow::Result<Vec<String>> {
    let mut out = Vec::new();
    for v in values {
        let parts = shlex::split(v)
            .ok_or_else(|| anyhow::anyhow!("--slurm-opt {v:?}: unbalanced quotes"))?;
        out.extend(parts);
    }
    Ok(out)
}

fn run_one_cell(args: RunCellArgs) -> anyhow::Result<()> {
    let registry = open_registry(args.registry.as_deref())?;
    let opts = RunOptions {
        progress: !args.quiet,
        stop: stop_on_ctrl_c(),
        ..Default::default()
    };
    let host = peft_wit::fsutil::hostname();
    let plan = SweepPlan::load(&registry, &args.sweep)?;
    let announce = |index: usize, rung: Option<usize>, base: &BaseModel, data: &PreparedData| {
        let at = rung
            .map(|k| format!(" (rung {})", k + 1))
            .unwrap_or_default();
        eprintln!(
            "cell {index}{at} of sweep `{}` on {host}: base {} ({}), {} train / {} eval examples",
            args.sweep,
            base.name,
            base.base_dtype.name(),
            data.train.len(),
            data.eval.len()
        );
    };
    if plan.strategy != Strategy::Grid {
        let target = match (args.index, args.rung, args.slot) {
            (Some(index), _, _) => TaskTarget::Cell(index),
            (None, Some(rung), Some(slot)) => {
                anyhow::ensure!(rung >= 1, "--rung counts from 1");
                TaskTarget::Slot {
                    rung: rung - 1,
                    slot,
                }
            }
            _ => anyhow::bail!("run-cell needs --index, or --rung and --slot"),
        };
        let outcome = halving::run_task(&registry, &plan, target, &opts, |index, rung, b, d| {
            announce(index, Some(rung), b, d)
        })?;
        return match outcome {
            TaskOutcome::Finished { index, rung } => {
                let name = &plan.cell(index)?.name;
                eprintln!(
                    "cell {index} (`{name}`) has nothing to run: halving took it through rung {rung}"
                );
                Ok(())
            }
            TaskOutcome::Scored {
                index, rung, score, ..
            } => {
                let name = &plan.cell(index)?.name;
                eprintln!(
                    "cell {index} (`{name}`) rung {} done: {} {score:.4}",
                    rung + 1,
                    plan.metric
                );
                Ok(())
            }
            TaskOutcome::Interrupted { index, rung, .. } => Err(anyhow::anyhow!(
                "cell {index} interrupted in rung {}; its checkpoint is saved and the cell resumes from it when run again",
                rung + 1
            )),
        };
    }
    let Some(index) = args.index else {
        anyhow::bail!(
            "sweep `{}` is a grid sweep: run its cells with --index (--rung/--slot are for halving sweeps)",
            args.sweep
        );
    };
    let outcome = run_cell(&registry, &args.sweep, index, &opts, |base, data| {
        announce(index, None, base, data)
    })?;
    match outcome {
        CellOutcome::AlreadyDone { name, .. } => {
            eprintln!("cell {index} (`{name}`) is already done");
            Ok(())
        }
        CellOutcome::Trained { name, metrics, .. } => {
            let shown: Vec<String> = metrics.iter().map(|(k, v)| format!("{k} {v:.4}")).collect();
            eprintln!("cell {index} (`{name}`) done: {}", shown.join(", "));
            Ok(())
        }
        CellOutcome::Interrupted { name, step } => Err(anyhow::anyhow!(
            "cell {index} (`{name}`) interrupted at step {step}; its checkpoint is saved and the cell resumes from it when run again"
        )),
    }
}

fn status(args: StatusArgs) -> anyhow::Result<()> {
    let registry = open_registry(args.registry.as_deref())?;
    let plan = SweepPlan::load(&registry, &args.name)?;
    let statuses = cell_statuses(&registry, &plan)?;
    let scheduler = launch::scheduler_view(&registry, &plan);
    let rows: Vec<Vec<String>> = statuses
        .iter()
        .map(|s| {
            let metric = match &s.state {
                CellState::Done { metrics } => metrics
                    .get(&plan.metric)
                    .map(|v| format!("{v:.4}"))
                    .unwrap_or_else(|| "-".into()),
                _ => "-".into(),
            };
            vec![
                s.cell.index.to_string(),
                s.cell.name.clone(),
                format!("{}", s.cell.prompt_weight),
                format!("{}", s.cell.response_weight),
                s.state.describe(plan.total_steps),
                metric,
                scheduler.get(&s.cell.index).cloned().unwrap_or_default(),
            ]
        })
        .collect();
    println!(
        "{}",
        table(
            &[
                "cell",
                "adapter",
                "λp",
                "λr",
                "state",
                &plan.metric,
                "scheduler"
            ],
            &rows
        )
    );
    for s in &statuses {
        if let CellState::Failed { log_tail, .. } = &s.state {
            if !log_tail.is_empty() {
                println!("\ncell {} log (last lines):", s.cell.index);
                for line in log_tail {
                    println!("  {line}");
                }
            }
        }
    }
    let count = |f: fn(&CellState) -> bool| statuses.iter().filter(|s| f(&s.state)).count();
    println!(
        "\n{} cells: {} done, {} running, {} interrupted, {} failed, {} pending",
        statuses.len(),
        count(|s| matches!(s, CellState::Done { .. })),
        count(|s| matches!(s, CellState::Running { .. })),
        count(|s| matches!(s, CellState::Interrupted { .. })),
        count(|s| matches!(s, CellState::Failed { .. })),
        count(|s| matches!(s, CellState::Pending)),
    );
    for line in halving::rung_summary(&registry, &plan)? {
        println!("{line}");
    }
    Ok(())
}

fn collect_sweep(args: CollectArgs) -> anyhow::Result<()> {
    let registry = open_registry(args.registry.as_deref())?;
    let plan = SweepPlan::load(&registry, &args.name)?;
    let metric = args.metric.clone().unwrap_or_else(|| plan.metric.clone());
    let mut result = collect(&registry, &plan, &metric)?;
    let mut benchmarks = Vec::new();
    if !args.bench.tasks.tasks.is_empty() {
        let cfg = &plan.train_config;
        let mut base = load_model(cfg.model.as_deref(), cfg.base_dtype, cfg.device)?;
        plan.check_base(&base)?;
        if let Some(suite) = args.bench.prepare(&base)? {
            eprintln!("benchmarks: scoring the done cells ...");
            benchmarks =
                benchmark_cells(&mut base, &registry, &mut result, &suite, args.max_parallel)?;
        }
    }
    let report_dir = args
        .report_dir
        .unwrap_or_else(|| plan_dir(&registry, &plan.name));
    write_and_print(&result, &benchmarks, &report_dir)?;
    if result.interrupted {
        println!(
            "not every cell is done: `peft-wit sweep status {}` shows them",
            plan.name
        );
    }
    Ok(())
}

/// Writes sweep.json and the heatmap(s) into `report_dir` and prints the sweep's table.
fn write_and_print(
    result: &SweepResult,
    benchmarks: &[String],
    report_dir: &std::path::Path,
) -> anyhow::Result<()> {
    result.write(report_dir)?;
    if !benchmarks.is_empty() {
        result.write_benchmark_heatmaps(report_dir, benchmarks)?;
        print_gains(result, benchmarks);
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
                let mark = if Some(&c.name) == result.best.as_ref() && m == result.metric {
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
        println!("best by {}: {best}", result.metric);
    }
    println!("heatmap: {}", report_dir.join("heatmap.svg").display());
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
