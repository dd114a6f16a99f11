//! `peft-wit suggest`: a data-driven starting point for (λp, λr). The data's token statistics as
//! training would see them ([`stats`]), a transparent rule from the published findings, pulled
//! towards the best cells of the registry's past sweeps on similar data ([`rule`]), and a small
//! grid to sweep around it. A starting point, not an answer: the papers found no universal
//! optimum, which is what the sweep is for.

pub mod rule;
pub mod stats;

use serde::{Deserialize, Serialize};

pub use rule::{suggest, PastSweep, Suggestion, SweepEvidence};
pub use stats::{measure, DataStats, LengthSummary, RowCounts};

use crate::model::BaseModel;
use crate::registry::Registry;
use crate::sweep::plan::{list_plans, SweepPlan};
use crate::sweep::AxisValue;
use crate::train::TrainConfig;
use crate::Result;

/// Everything `suggest` found, as `--json` writes it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SuggestReport {
    pub data: String,
    pub model: String,
    pub template: String,
    pub max_seq_len: usize,
    pub stats: DataStats,
    pub suggestion: Suggestion,
    /// The ready-to-run sweep over the suggested grid.
    pub sweep_command: String,
    /// The registry read for past sweeps (`None`: there was none).
    pub registry: Option<String>,
    /// Past sweeps not used, with the reason.
    pub unused_sweeps: Vec<String>,
}

/// Measures `cfg.data` on `base`, reads the finished sweeps of `registry`, and suggests.
pub fn report(
    cfg: &TrainConfig,
    base: &BaseModel,
    registry: Option<&Registry>,
) -> Result<SuggestReport> {
    let stats = measure(cfg, base)?;
    let (past, unused_sweeps) = match registry {
        Some(r) => past_sweeps(r, &base.fingerprint)?,
        None => (Vec::new(), Vec::new()),
    };
    let suggestion = suggest(&stats, &past);
    Ok(SuggestReport {
        data: cfg
            .data
            .as_deref()
            .map(|p| p.display().to_string())
            .unwrap_or_default(),
        model: base.name.clone(),
        template: cfg.template.clone(),
        max_seq_len: cfg.max_seq_len.min(base.decoder.max_positions()),
        sweep_command: sweep_command(cfg, &suggestion),
        stats,
        suggestion,
        registry: registry.map(|r| r.root().display().to_string()),
        unused_sweeps,
    })
}

/// `peft-wit sweep` over the suggested grid, with the data, model and tokenization flags that
/// make it train on what was measured.
pub fn sweep_command(cfg: &TrainConfig, suggestion: &Suggestion) -> String {
    let defaults = TrainConfig::default();
    let mut words = vec!["peft-wit sweep".to_string()];
    if let Some(data) = &cfg.data {
        words.push(format!(
            "--data {}",
            shell_word(&data.display().to_string())
        ));
    }
    if let Some(model) = &cfg.model {
        words.push(format!("--model {}", shell_word(model)));
    }
    if cfg.template != defaults.template {
        words.push(format!("--template {}", shell_word(&cfg.template)));
    }
    if cfg.max_seq_len != defaults.max_seq_len {
        words.push(format!("--max-seq-len {}", cfg.max_seq_len));
    }
    if cfg.on_bad_row != defaults.on_bad_row {
        words.push("--on-bad-row skip".into());
    }
    words.push(suggestion.sweep_flags());
    words.join(" ")
}

fn shell_word(s: &str) -> String {
    let plain = s
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "-_./:=+,@".contains(c));
    if plain && !s.is_empty() {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// The registry's sweeps with at least two finished cells to compare, as evidence, and a line
/// for each one left out (a plan of another version, no finished cell, unreadable data): one
/// bad plan must not hide the others.
pub fn past_sweeps(
    registry: &Registry,
    base_fingerprint: &str,
) -> Result<(Vec<PastSweep>, Vec<String>)> {
    let mut used = Vec::new();
    let mut unused = Vec::new();
    for name in list_plans(registry)? {
        match past_sweep(registry, &name, base_fingerprint) {
            Ok(Ok(sweep)) => used.push(sweep),
            Ok(Err(why)) => unused.push(format!("sweep `{name}`: {why}")),
            Err(e) => unused.push(format!("sweep `{name}`: {e}")),
        }
    }
    Ok((used, unused))
}

/// One past sweep as evidence, or why it is none.
fn past_sweep(
    registry: &Registry,
    name: &str,
    base_fingerprint: &str,
) -> Result<std::result::Result<PastSweep, String>> {
    let plan = SweepPlan::load(registry, name)?;
    let result = crate::sweep::collect(registry, &plan, &plan.metric)?;
    let finished: Vec<_> = result
        .cells
        .iter()
        .filter(|c| c.metrics.get(&plan.metric).is_some_and(|v| v.is_finite()))
        .collect();
    let best = result
        .best
        .as_ref()
        .and_then(|b| finished.iter().find(|c| &c.name == b));
    let Some(best) = best else {
        return Ok(Err(format!("no finished cell with `{}` yet", plan.metric)));
    };
    if finished.len() < 2 {
        return Ok(Err(format!(
            "only one finished cell ({}): nothing to compare yet",
            best.name
        )));
    }
    if let (AxisValue::Schedule(_), _) | (_, AxisValue::Schedule(_)) =
        (best.prompt_weight, best.response_weight)
    {
        return Ok(Err(format!(
            "its best cell ({}) follows a weight schedule, not one (λp, λr) point",
            best.name
        )));
    }
    let stats = DataStats::from_tokenized(&plan.load_tokenized(registry)?, None);
    Ok(Ok(PastSweep {
        name: plan.name.clone(),
        examples: stats.examples,
        ratio: stats.ratio_of_totals,
        metric: plan.metric.clone(),
        best_cell: best.name.clone(),
        best_prompt_weight: best.prompt_weight.weight(),
        best_response_weight: best.response_weight.weight(),
        finished_cells: finished.len(),
        same_base: plan.base.fingerprint == base_fingerprint,
    }))
}
