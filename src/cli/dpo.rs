//! `peft-wit dpo`: preference pairs + a registry adapter -> a new DPO adapter beside it.

use std::path::PathBuf;

use peft_wit::dpo::{
    load_pairs, prepare_pairs, train_dpo, DpoConfig, DpoMetrics, DpoOptions, PairOptions, Parent,
};

use super::common::{open_registry, ModelArgs};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The adapter to continue (registry name or PEFT folder); it is also the frozen reference.
    #[arg(long)]
    adapter: String,
    /// Preference pairs (JSONL or JSON): prompt/chosen/rejected strings or conversations, or
    /// Anthropic HH chosen/rejected dialogues.
    #[arg(long)]
    data: PathBuf,
    /// DPO β (larger keeps the policy closer to the starting adapter).
    #[arg(long, default_value_t = 0.1)]
    beta: f64,
    /// Add this weight times the parent's WIT loss on the chosen answer (RPO-style).
    #[arg(long, default_value_t = 0.0)]
    sft_weight: f64,
    /// Name of the new adapter (default: <adapter>-dpo).
    #[arg(long)]
    name: Option<String>,
    #[arg(long)]
    max_steps: Option<usize>,
    #[arg(long, default_value_t = 1)]
    epochs: usize,
    /// Pairs per micro-batch (each pair is a chosen and a rejected sequence).
    #[arg(long, default_value_t = 2)]
    batch_size: usize,
    #[arg(long, default_value_t = 1)]
    grad_accum: usize,
    #[arg(long, default_value_t = 5e-5)]
    lr: f64,
    /// constant, linear, cosine.
    #[arg(long, default_value = "linear")]
    schedule: String,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Share of the pairs held out, scored before and after training.
    #[arg(long, default_value_t = 0.1)]
    eval_fraction: f64,
    /// Longest sequence (prompt + answer); longer pairs lose prompt tokens from the left first.
    #[arg(long, default_value_t = 512)]
    max_seq_len: usize,
    /// chat (the model's own template), alpaca, raw, or a Jinja template file.
    #[arg(long, default_value = "chat")]
    template: String,
    #[arg(long)]
    registry: Option<PathBuf>,
    #[command(flatten)]
    model: ModelArgs,
    /// Overwrite an existing adapter of the same name.
    #[arg(long)]
    force: bool,
    #[arg(long)]
    quiet: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let cfg = DpoConfig {
        beta: args.beta,
        sft_weight: args.sft_weight,
        name: args.name.clone(),
        max_steps: args.max_steps,
        epochs: args.epochs,
        batch_size: args.batch_size,
        grad_accum: args.grad_accum,
        lr: args.lr,
        schedule: args.schedule.parse()?,
        seed: args.seed,
        eval_fraction: args.eval_fraction,
        max_seq_len: args.max_seq_len,
        template: args.template.clone(),
        ..Default::default()
    };
    cfg.validate()?;
    // Bad data fails before the model loads.
    let (pairs, report) = load_pairs(&args.data)?;
    let registry = open_registry(args.registry.as_deref())?;
    let base = args.model.load()?;
    let parent = Parent::load(&registry, &args.adapter, &base)?;
    let template = base.template(&cfg.template)?;
    let data = prepare_pairs(
        &pairs,
        report,
        &args.data,
        &template,
        &cfg.template,
        base.tokenizer()?,
        &PairOptions {
            max_seq_len: cfg.max_seq_len.min(base.decoder.max_positions()),
            eval_fraction: cfg.eval_fraction,
            seed: cfg.seed,
        },
    )?;
    eprintln!("data: {}", data.report);
    eprintln!(
        "data: {} train / {} held-out pairs, fingerprint {}; parent `{}`",
        data.train.len(),
        data.eval.len(),
        &data.fingerprint[..16],
        parent.name
    );
    let opts = DpoOptions {
        progress: !args.quiet,
        force: args.force,
    };
    let outcome = train_dpo(&base, &parent, &data, &cfg, &registry, &opts)?;
    let meta = &outcome.meta;
    eprintln!(
        "trained {} DPO steps ({} tokens) in {:.1}s -> {}",
        meta.steps,
        meta.tokens_seen,
        meta.wall_time_s,
        outcome.dir.display()
    );
    if let (Some(before), Some(after)) = (&outcome.eval_before, &outcome.eval_after) {
        println!("held-out pairs: {}", data.eval.len());
        println!("{:<22} {:>10} {:>10}", "", "before", "after");
        let row = |name: &str, f: fn(&DpoMetrics) -> f64| {
            println!("{name:<22} {:>10.4} {:>10.4}", f(before), f(after));
        };
        row("dpo loss", |m| m.loss);
        row("reward accuracy", |m| m.reward_accuracy);
        row("reward margin", |m| m.reward_margin);
        row("log-prob accuracy", |m| m.logp_accuracy);
        row("chosen log-prob", |m| m.chosen_logp);
        row("rejected log-prob", |m| m.rejected_logp);
    }
    Ok(())
}
