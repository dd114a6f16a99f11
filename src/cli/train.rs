//! `peft-wit train`: config file + flag overrides -> one adapter in the registry.

use std::path::PathBuf;

use peft_wit::train::{prepare_data, train, LossPreset, RunOptions, TrainConfig, TrainOutcome};

use super::common::{load_model, open_registry, stop_on_ctrl_c, ModelArgs};

/// Every flag overrides the same-named field of the TOML config (or the default).
#[derive(clap::Args, Clone, Debug, Default)]
pub struct ConfigArgs {
    /// TOML config (see configs/).
    #[arg(long)]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub model: ModelArgs,
    /// Training data (JSONL or JSON; Alpaca, prompt/response or chat). Default: built-in tasks.
    #[arg(long)]
    pub data: Option<PathBuf>,
    #[arg(long)]
    pub eval_data: Option<PathBuf>,
    #[arg(long)]
    pub eval_fraction: Option<f64>,
    /// auto, alpaca, prompt-response, chat.
    #[arg(long)]
    pub format: Option<peft_wit::data::DataFormat>,
    /// chat, alpaca, raw, or a Jinja template file.
    #[arg(long)]
    pub template: Option<String>,
    /// Field holding the prompt (e.g. `question` for GSM8K).
    #[arg(long)]
    pub prompt_field: Option<String>,
    #[arg(long)]
    pub response_field: Option<String>,
    #[arg(long)]
    pub max_seq_len: Option<usize>,
    /// error (default) or skip.
    #[arg(long)]
    pub on_bad_row: Option<peft_wit::data::OnBadRow>,
    /// Earlier assistant turns count as prompt.
    #[arg(long)]
    pub last_turn_only: bool,
    /// standard (0/1), im (1/1) or wit (explicit weights).
    #[arg(long)]
    pub loss: Option<String>,
    #[arg(long)]
    pub prompt_weight: Option<f32>,
    #[arg(long)]
    pub response_weight: Option<f32>,
    /// λp over training: constant, linear:A->B, cosine:A->B or step:A->B@F (F: the share of
    /// the steps done when it switches); implies --loss wit.
    #[arg(long)]
    pub prompt_weight_schedule: Option<peft_wit::train::WeightSchedule>,
    /// λr over training, as --prompt-weight-schedule.
    #[arg(long)]
    pub response_weight_schedule: Option<peft_wit::train::WeightSchedule>,
    #[arg(long)]
    pub system_weight: Option<f32>,
    #[arg(long)]
    pub user_weight: Option<f32>,
    /// token-count (WIT paper) or weight-sum.
    #[arg(long)]
    pub normalization: Option<String>,
    #[arg(long)]
    pub max_steps: Option<usize>,
    #[arg(long)]
    pub epochs: Option<usize>,
    #[arg(long)]
    pub batch_size: Option<usize>,
    #[arg(long)]
    pub grad_accum: Option<usize>,
    #[arg(long)]
    pub lr: Option<f64>,
    /// constant, linear, cosine.
    #[arg(long)]
    pub schedule: Option<String>,
    #[arg(long)]
    pub warmup_steps: Option<usize>,
    #[arg(long)]
    pub weight_decay: Option<f64>,
    #[arg(long)]
    pub max_grad_norm: Option<f64>,
    #[arg(long)]
    pub rank: Option<usize>,
    #[arg(long)]
    pub alpha: Option<f64>,
    #[arg(long)]
    pub lora_dropout: Option<f32>,
    /// Comma-separated module names, all-linear, or re:<regex>.
    #[arg(long)]
    pub targets: Option<String>,
    #[arg(long)]
    pub rslora: bool,
    #[arg(long)]
    pub seed: Option<u64>,
    #[arg(long)]
    pub eval_every: Option<usize>,
    #[arg(long)]
    pub checkpoint_every: Option<usize>,
    /// Held-out examples answered by greedy generation and scored (exact match) at the end.
    #[arg(long)]
    pub eval_generate: Option<usize>,
    #[arg(long)]
    pub registry: Option<PathBuf>,
    /// Also log metrics to: tensorboard, mlflow (comma-separated; default none).
    #[arg(long)]
    pub report_to: Option<String>,
    /// TensorBoard event files go to DIR/<adapter name> (default: <registry>/<name>/tb).
    #[arg(long)]
    pub tensorboard_dir: Option<PathBuf>,
    /// MLflow experiment (default: the sweep's name, or peft-wit); the server is
    /// $MLFLOW_TRACKING_URI.
    #[arg(long)]
    pub mlflow_experiment: Option<String>,
}

impl ConfigArgs {
    /// The config file (or defaults) with every given flag applied, validated.
    pub fn resolve(&self) -> anyhow::Result<TrainConfig> {
        let mut c = match &self.config {
            Some(path) => TrainConfig::from_toml_file(path)?,
            None => TrainConfig::default(),
        };
        set(&mut c.model, self.model.model.clone().map(Some));
        set(&mut c.base_dtype, self.model.base_dtype);
        set(&mut c.device, self.model.device);
        set(&mut c.data, self.data.clone().map(Some));
        set(&mut c.eval_data, self.eval_data.clone().map(Some));
        set(&mut c.eval_fraction, self.eval_fraction);
        set(&mut c.format, self.format);
        set(&mut c.template, self.template.clone());
        set(&mut c.prompt_field, self.prompt_field.clone().map(Some));
        set(&mut c.response_field, self.response_field.clone().map(Some));
        set(&mut c.max_seq_len, self.max_seq_len);
        set(&mut c.on_bad_row, self.on_bad_row);
        c.last_turn_only |= self.last_turn_only;
        if let Some(loss) = &self.loss {
            c.loss = loss.parse()?;
        }
        let scheduled =
            self.prompt_weight_schedule.is_some() || self.response_weight_schedule.is_some();
        if self.prompt_weight.is_some() || self.response_weight.is_some() || scheduled {
            if self.loss.is_none() {
                c.loss = LossPreset::Wit;
            }
            if c.loss != LossPreset::Wit {
                anyhow::bail!(
                    "--prompt-weight/--response-weight and their schedules need --loss wit"
                );
            }
        }
        set(&mut c.prompt_weight, self.prompt_weight);
        set(&mut c.response_weight, self.response_weight);
        set(&mut c.prompt_weight_schedule, self.prompt_weight_schedule);
        set(
            &mut c.response_weight_schedule,
            self.response_weight_schedule,
        );
        set(&mut c.system_weight, self.system_weight.map(Some));
        set(&mut c.user_weight, self.user_weight.map(Some));
        if let Some(n) = &self.normalization {
            c.normalization = peft_wit::loss::Normalization::parse(n)?;
        }
        set(&mut c.max_steps, self.max_steps.map(Some));
        set(&mut c.epochs, self.epochs);
        set(&mut c.batch_size, self.batch_size);
        set(&mut c.grad_accum, self.grad_accum);
        set(&mut c.lr, self.lr);
        if let Some(s) = &self.schedule {
            c.schedule = s.parse()?;
        }
        set(&mut c.warmup_steps, self.warmup_steps.map(Some));
        set(&mut c.weight_decay, self.weight_decay);
        set(&mut c.max_grad_norm, self.max_grad_norm.map(Some));
        set(&mut c.r, self.rank);
        set(&mut c.lora_alpha, self.alpha);
        set(&mut c.lora_dropout, self.lora_dropout);
        set(&mut c.target_modules, self.targets.clone());
        c.use_rslora |= self.rslora;
        set(&mut c.seed, self.seed);
        set(&mut c.eval_every, self.eval_every);
        set(&mut c.checkpoint_every, self.checkpoint_every);
        set(&mut c.eval_generate, self.eval_generate);
        set(&mut c.registry, self.registry.clone().map(Some));
        if let Some(list) = &self.report_to {
            c.report_to = peft_wit::tracking::parse_report_to(list)?;
        }
        set(
            &mut c.tensorboard_dir,
            self.tensorboard_dir.clone().map(Some),
        );
        set(
            &mut c.mlflow_experiment,
            self.mlflow_experiment.clone().map(Some),
        );
        c.validate()?;
        Ok(c)
    }
}

fn set<T>(slot: &mut T, value: Option<T>) {
    if let Some(v) = value {
        *slot = v;
    }
}

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    config: ConfigArgs,
    /// Registry name (default: derived from the loss weights, e.g. wit-p0.2-r0.8).
    #[arg(long)]
    name: Option<String>,
    /// Continue the interrupted run of this name from its last checkpoint.
    #[arg(long)]
    resume: bool,
    /// Overwrite an existing adapter (or discard an interrupted run) of the same name.
    #[arg(long)]
    force: bool,
    /// Run up to K micro-batches of a step (--grad-accum) at once, the threads split between
    /// them; the result is the same. On 2 cores, `--batch-size 2 --grad-accum 2 --lanes 2`
    /// trains a batch of 4 faster than `--batch-size 4` (dropout draws differ between those two).
    #[arg(long, default_value_t = 1, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    lanes: usize,
    #[arg(long)]
    quiet: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let mut cfg = args.config.resolve()?;
    if args.name.is_some() {
        cfg.name = args.name.clone();
    }
    if !args.quiet {
        eprintln!("resolved config:\n{}", toml::to_string(&cfg)?);
    }
    let base = load_model(cfg.model.as_deref(), cfg.base_dtype, cfg.device)?;
    let data = prepare_data(&cfg, &base)?;
    if !args.quiet {
        for line in &data.report {
            eprintln!("data: {line}");
        }
        eprintln!(
            "data: {} train / {} eval examples, fingerprint {}",
            data.train.len(),
            data.eval.len(),
            &data.fingerprint[..16]
        );
    }
    let registry = open_registry(cfg.registry.as_deref())?;
    let opts = RunOptions {
        progress: !args.quiet,
        stop: stop_on_ctrl_c(),
        resume: args.resume,
        force: args.force,
        lanes: args.lanes,
        ..Default::default()
    };
    match train(&base, &data, &cfg, &registry, &opts)? {
        TrainOutcome::Finished { dir, meta, .. } => {
            eprintln!(
                "trained {} steps ({} tokens) in {:.1}s -> {}",
                meta.steps,
                meta.tokens_seen,
                meta.wall_time_s,
                dir.display()
            );
            for (k, v) in &meta.metrics {
                eprintln!("  {k}: {v:.4}");
            }
        }
        TrainOutcome::Interrupted { step, checkpoint } => {
            eprintln!(
                "stopped at step {step}; checkpoint {}. Continue with the same command plus --resume.",
                checkpoint.display()
            );
        }
    }
    Ok(())
}
