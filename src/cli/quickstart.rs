//! `peft-wit quickstart`: the README's first command. Fetches the default model if missing,
//! generates the built-in tasks, trains three loss settings on one loaded base, and prints them
//! side by side with the untouched base.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use peft_wit::data::write_jsonl;
use peft_wit::train::presets::{
    base_scores, quickstart_config, QuickstartOptions, QUICKSTART_SETTINGS,
};
use peft_wit::train::{prepare_data, train, RunOptions, TrainOutcome};

use super::common::{load_model, open_registry, stop_on_ctrl_c, table};

#[derive(clap::Args)]
pub struct Args {
    /// Optimizer steps per setting.
    #[arg(long, default_value_t = 30)]
    steps: usize,
    /// Built-in examples to generate (10% are held out).
    #[arg(long, default_value_t = 240)]
    examples: usize,
    /// Held-out examples answered by greedy generation for exact match.
    #[arg(long, default_value_t = 12)]
    generate: usize,
    #[arg(long, default_value = "f32")]
    base_dtype: peft_wit::model::BaseDType,
    #[arg(long, default_value = "cpu")]
    device: peft_wit::device::DeviceSpec,
    #[arg(long)]
    registry: Option<PathBuf>,
    #[arg(long)]
    quiet: bool,
}

/// Runs `scripts/fetch-model.sh` when the default model is missing.
fn ensure_default_model() -> anyhow::Result<()> {
    let path = peft_wit::model::resolve::default_model_path();
    if path.is_file() {
        return Ok(());
    }
    let script = [
        PathBuf::from("scripts/fetch-model.sh"),
        Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/fetch-model.sh"),
    ]
    .into_iter()
    .find(|p| p.is_file())
    .context("the default model is missing and scripts/fetch-model.sh was not found")?;
    eprintln!("fetching the default model with {} ...", script.display());
    // The script honours PEFT_WIT_MODELS: point it at the directory we will read from, so a
    // run from outside the checkout fetches into ./models, not the checkout's models/.
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let status = std::process::Command::new("bash")
        .arg(&script)
        .env("PEFT_WIT_MODELS", std::path::absolute(dir)?)
        .status()
        .with_context(|| format!("running {}", script.display()))?;
    anyhow::ensure!(status.success(), "{} failed", script.display());
    anyhow::ensure!(
        path.is_file(),
        "{} did not produce {}",
        script.display(),
        path.display()
    );
    Ok(())
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let started = Instant::now();
    ensure_default_model()?;
    let base = load_model(None, args.base_dtype, args.device)?;
    let registry = open_registry(args.registry.as_deref())?;

    let cfg = quickstart_config(&QuickstartOptions {
        base_dtype: args.base_dtype,
        device: args.device,
        examples: args.examples,
        steps: args.steps,
        generate: args.generate,
    });
    let data = prepare_data(&cfg, &base)?;
    let data_file = registry.root().join(".runs").join("quickstart-data.jsonl");
    write_jsonl(
        &data_file,
        &peft_wit::data::builtin_examples(
            args.examples,
            peft_wit::train::prepare::BUILTIN_DATA_SEED,
        ),
    )?;
    eprintln!(
        "built-in tasks: {} train / {} held-out examples (written to {})",
        data.train.len(),
        data.eval.len(),
        data_file.display()
    );

    let mut rows = Vec::new();
    // The untouched base, for reference.
    let reference = base_scores(&base, &data, &cfg, args.generate)?;
    rows.push(vec![
        "base".to_string(),
        "-".into(),
        "-".into(),
        fmt(reference.response_loss),
        fmt(reference.exact_match),
        "-".into(),
    ]);
    let stop = stop_on_ctrl_c();
    for setting in QUICKSTART_SETTINGS {
        let (name, lp, lr) = (setting.name, setting.prompt_weight, setting.response_weight);
        let cfg = setting.apply(&cfg);
        let opts = RunOptions {
            progress: !args.quiet,
            stop: stop.clone(),
            resume: false,
            force: true,
            ..Default::default()
        };
        match train(&base, &data, &cfg, &registry, &opts)? {
            TrainOutcome::Finished { meta, .. } => rows.push(vec![
                name.to_string(),
                format!("{lp}"),
                format!("{lr}"),
                fmt(meta.metrics.get("response_loss").copied()),
                fmt(meta.metrics.get("exact_match").copied()),
                format!("{:.0}s", meta.wall_time_s),
            ]),
            TrainOutcome::Interrupted { .. } => anyhow::bail!("interrupted"),
        }
    }
    println!(
        "\nHeld-out built-in tasks ({} examples; exact match on {}), {} steps per setting:\n",
        data.eval.len(),
        args.generate.min(data.eval_examples.len()),
        args.steps
    );
    println!(
        "{}",
        table(
            &[
                "adapter",
                "λp",
                "λr",
                "response loss",
                "exact match",
                "train time"
            ],
            &rows
        )
    );
    println!(
        "adapters are in {}; total time {:.0}s",
        registry.root().display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn fmt(v: Option<f64>) -> String {
    v.map(|x| format!("{x:.4}")).unwrap_or_else(|| "-".into())
}
