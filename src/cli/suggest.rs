//! `peft-wit suggest`: the data's token statistics, a suggested (λp, λr) with its reasons and
//! the registry's evidence, and a ready-to-run sweep around it.

use std::path::PathBuf;

use peft_wit::registry::Registry;
use peft_wit::suggest::{report, SuggestReport};
use peft_wit::train::TrainConfig;

use super::common::{table, ModelArgs};

#[derive(clap::Args)]
pub struct Args {
    /// The training data (JSONL or JSON; Alpaca, prompt/response or chat).
    #[arg(long)]
    data: PathBuf,
    #[command(flatten)]
    model: ModelArgs,
    /// chat, alpaca, raw, or a Jinja template file (as for `train`).
    #[arg(long, default_value = "chat")]
    template: String,
    /// Longest sequence training keeps (as for `train`; default 512).
    #[arg(long)]
    max_seq_len: Option<usize>,
    /// error (default) or skip: what to do with a row that cannot be loaded or tokenized (as
    /// for `train`; skipped rows are counted).
    #[arg(long)]
    on_bad_row: Option<peft_wit::data::OnBadRow>,
    /// The registry whose past sweeps are evidence (default: $PEFT_WIT_REGISTRY or adapters/).
    #[arg(long)]
    registry: Option<PathBuf>,
    /// Also write the statistics, the suggestion, the grid and the evidence as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let mut cfg = TrainConfig {
        model: args.model.model.clone(),
        data: Some(args.data.clone()),
        template: args.template.clone(),
        ..TrainConfig::default()
    };
    if let Some(n) = args.max_seq_len {
        cfg.max_seq_len = n;
    }
    if let Some(on_bad_row) = args.on_bad_row {
        cfg.on_bad_row = on_bad_row;
    }
    cfg.validate()?;
    let base = args.model.load()?;
    // A registry that does not exist has no sweeps; reading must not create one.
    let root = args
        .registry
        .clone()
        .unwrap_or_else(peft_wit::registry::default_root);
    let registry = if root.is_dir() {
        Some(Registry::open(root)?)
    } else {
        None
    };
    let report = report(&cfg, &base, registry.as_ref())?;
    print!("{}", render(&report));
    if let Some(path) = &args.json {
        peft_wit::fsutil::atomic_write_json(path, &report)?;
        println!("\nwrote {}", path.display());
    }
    Ok(())
}

fn render(r: &SuggestReport) -> String {
    let s = &r.stats;
    let mut out = format!(
        "Data: {} as {} sees it (template {}, max_seq_len {}; every row, no eval split)\n",
        r.data, r.model, r.template, r.max_seq_len
    );
    if let Some(rows) = &s.rows {
        out += &format!(
            "  rows: {} read, {} kept as examples; {} truncated (prompt cut), {} dropped as too long, {} skipped loading, {} failed to tokenize\n",
            rows.rows,
            s.examples,
            rows.truncated,
            rows.dropped_too_long,
            rows.skipped_loading,
            rows.failed_tokenizing
        );
        let cut = rows.truncated + rows.dropped_too_long;
        if cut * 10 > rows.rows {
            out += &format!(
                "  note: {:.0}% of rows were truncated or dropped at max_seq_len {}: these are the statistics of what training keeps (raise --max-seq-len to keep more)\n",
                100.0 * cut as f64 / rows.rows.max(1) as f64,
                r.max_seq_len
            );
        }
    }
    out += &format!(
        "  multi-turn (more than one user turn): {} of {} ({:.1}%)\n\n",
        s.multi_turn,
        s.examples,
        100.0 * s.multi_turn_share()
    );
    let row = |name: &str, l: &peft_wit::suggest::LengthSummary| {
        vec![
            name.to_string(),
            format!("{:.1}", l.mean),
            format!("{:.1}", l.median),
            format!("{:.0}", l.p90),
            l.total.to_string(),
        ]
    };
    out += &table(
        &["tokens per example", "mean", "median", "p90", "total"],
        &[
            row("prompt (weighted by λp)", &s.prompt_tokens),
            row("response (weighted by λr)", &s.response_tokens),
        ],
    );
    out += &format!(
        "  prompt/response ratio: {:.2} of totals, {:.2} mean of per-example ratios\n\n",
        s.ratio_of_totals, s.ratio_mean
    );
    let g = &r.suggestion;
    out += &format!(
        "Suggested start: λp = {}, λr = {}  (a starting point to sweep around, not an answer: no (λp, λr) is best for all data)\n",
        fmt_w(g.prompt_weight),
        fmt_w(g.response_weight)
    );
    out += "\nFrom the published findings:\n";
    for reason in &g.reasons {
        out += &format!("  - {reason}\n");
    }
    out += &format!(
        "  = λp = {}, λr = {}\n",
        fmt_w(g.rule_prompt_weight),
        fmt_w(g.rule_response_weight)
    );
    out += "\nFrom this registry's past sweeps";
    match &r.registry {
        None => out += ": no registry yet (each sweep run into one makes the next suggestion better informed)\n",
        Some(root) => {
            out += &format!(" ({root}):\n");
            if g.evidence.is_empty() {
                out += "  none with finished cells to compare: the suggestion is the rule's alone (each sweep run into this registry makes the next one better informed)\n";
            }
            for e in &g.evidence {
                out += &format!("  - {}\n", e.line);
            }
            for u in &r.unused_sweeps {
                out += &format!("  - not used: {u}\n");
            }
            if !g.evidence.is_empty() {
                out += &format!(
                    "  = λp = {}, λr = {} (the rule weighs 1 against the sweeps' weights)\n",
                    fmt_w(g.prompt_weight),
                    fmt_w(g.response_weight)
                );
            }
        }
    }
    out += &format!(
        "\nGrid to sweep ({}x{} around the suggestion):\n  {}\n",
        g.grid_prompt_weights.len(),
        g.grid_response_weights.len(),
        r.sweep_command
    );
    out
}

fn fmt_w(w: f32) -> String {
    peft_wit::train::config::fmt_weight(w)
}
