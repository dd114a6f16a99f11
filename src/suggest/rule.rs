//! The suggestion itself, a pure function of the data's statistics and the registry's past
//! sweeps, so every step can be printed and tested.
//!
//! 1. **Published findings.** Start at λp = 0.2, λr = 0.8: WIT (Chatterjee et al., TACL 2025)
//!    found low-to-moderate λp (≈0–0.4) with moderate-to-high λr (≈0.6–1.0) best overall, with
//!    no universal optimum. Instruction Modelling (Shi et al., NeurIPS 2024, "Instruction Tuning
//!    With Loss Over Instructions") found loss on the prompt helps most when prompts are long
//!    relative to responses and when the data is small (~1k examples: LIMA, AlpaGasus). So λp
//!    steps up by 0.1 for a prompt/response token ratio above 1, again at 3 or more, for fewer
//!    than 5,000 examples, and once more when long prompts and small data meet (at most 0.6);
//!    it steps down by 0.1 for a ratio below 0.5 and for 20,000 examples or more (at least 0).
//!    λr stays at 0.8, the middle of WIT's good range.
//! 2. **The registry's own results.** Each past sweep's best cell pulls the suggestion towards
//!    it with a weight: the similarity of its data, `exp(-d²/2)` where `d²` is the squared
//!    difference of the log prompt/response ratios in units of ln 2 plus that of the log example
//!    counts in units of ln 10 (a factor 2 in the ratio or 10 in size is one unit), halved when
//!    the sweep trained another base. The rule counts as weight 1 (one past sweep on identical
//!    data moves the suggestion halfway to its best cell).
//! 3. **A grid around it**: λp and λr each at the suggestion ± 0.2 within [0, 1] (three values;
//!    shifted inwards at an edge), the paper's step.

use serde::{Deserialize, Serialize};

use super::stats::DataStats;
use crate::train::config::fmt_weight;

/// Where the rule starts (WIT's good region).
pub const START_PROMPT_WEIGHT: f32 = 0.2;
pub const START_RESPONSE_WEIGHT: f32 = 0.8;
/// One adjustment of λp.
pub const STEP: f32 = 0.1;
/// Prompt/response token ratios: above `LONG`, prompts are long relative to responses.
pub const LONG_PROMPTS: f64 = 1.0;
pub const VERY_LONG_PROMPTS: f64 = 3.0;
/// Below this ratio responses dominate the tokens.
pub const SHORT_PROMPTS: f64 = 0.5;
/// Fewer examples than this is small data (Shi et al. studied ~1k-example sets).
pub const SMALL_DATA: usize = 5_000;
/// This many examples or more is large data.
pub const LARGE_DATA: usize = 20_000;
/// The weight of the published-findings rule against past sweeps.
pub const RULE_WEIGHT: f64 = 1.0;
/// A past sweep on another base counts this much of its data similarity.
pub const OTHER_BASE_FACTOR: f64 = 0.5;
/// The grid's spacing (the WIT paper's).
pub const GRID_STEP: f32 = 0.2;

const WIT: &str = "WIT, Chatterjee et al., TACL 2025";
const IM: &str = "Instruction Modelling, Shi et al., NeurIPS 2024";

/// A finished past sweep, as evidence: its data's statistics and its best cell.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PastSweep {
    pub name: String,
    pub examples: usize,
    /// Prompt/response token ratio of its data (ratio of totals).
    pub ratio: f64,
    pub metric: String,
    pub best_cell: String,
    pub best_prompt_weight: f32,
    pub best_response_weight: f32,
    /// Cells with a value of `metric`.
    pub finished_cells: usize,
    /// Trained on the base the suggestion is for.
    pub same_base: bool,
}

/// How much one past sweep moved the suggestion.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SweepEvidence {
    pub sweep: PastSweep,
    /// `exp(-d²/2)` of the data statistics (1 for identical ones).
    pub similarity: f64,
    /// Similarity, halved for another base.
    pub weight: f64,
    /// Its share of the final suggestion (the rule holds the rest with the other sweeps).
    pub share: f64,
    pub line: String,
}

/// A starting point for λp and λr, with the reasons and a grid to sweep around it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Suggestion {
    pub prompt_weight: f32,
    pub response_weight: f32,
    /// What the published-findings rule alone gives.
    pub rule_prompt_weight: f32,
    pub rule_response_weight: f32,
    /// One line per step of the rule: `λp +0.1 because <statistic> = <value> (<finding>)`.
    pub reasons: Vec<String>,
    /// One entry per past sweep used.
    pub evidence: Vec<SweepEvidence>,
    pub grid_prompt_weights: Vec<f32>,
    pub grid_response_weights: Vec<f32>,
}

impl Suggestion {
    /// `--prompt-weights a,b,c --response-weights x,y,z` for `peft-wit sweep`.
    pub fn sweep_flags(&self) -> String {
        let list = |ws: &[f32]| {
            ws.iter()
                .map(|w| fmt_weight(*w))
                .collect::<Vec<_>>()
                .join(",")
        };
        format!(
            "--prompt-weights {} --response-weights {}",
            list(&self.grid_prompt_weights),
            list(&self.grid_response_weights)
        )
    }
}

/// The published-findings rule: (λp, λr) and one reason per step.
pub fn rule(stats: &DataStats) -> (f32, f32, Vec<String>) {
    let ratio = stats.ratio_of_totals;
    let n = stats.examples;
    let mut p = START_PROMPT_WEIGHT;
    let mut reasons = vec![format!(
        "start at λp = {}, λr = {} ({WIT}: low-to-moderate λp ≈ 0–0.4 with moderate-to-high λr ≈ 0.6–1.0 was best overall, with no universal optimum)",
        fmt_weight(START_PROMPT_WEIGHT),
        fmt_weight(START_RESPONSE_WEIGHT)
    )];
    let mut step = |delta: f32, why: String| {
        p += delta;
        let sign = if delta > 0.0 { '+' } else { '-' };
        reasons.push(format!(
            "λp {sign}{} because {why}",
            fmt_weight(delta.abs())
        ));
    };
    let long = ratio > LONG_PROMPTS;
    let small = n < SMALL_DATA;
    if long {
        step(STEP, format!("prompt/response token ratio = {ratio:.2} > {LONG_PROMPTS} ({IM}: loss on the prompt helps most when prompts are long relative to responses)"));
    }
    if ratio >= VERY_LONG_PROMPTS {
        step(STEP, format!("prompt/response token ratio = {ratio:.2} ≥ {VERY_LONG_PROMPTS} (the same finding: here prompts dominate the tokens)"));
    }
    if ratio < SHORT_PROMPTS {
        step(-STEP, format!("prompt/response token ratio = {ratio:.2} < {SHORT_PROMPTS} ({IM}: with responses much longer than prompts, loss on the prompt gains little)"));
    }
    if small {
        step(STEP, format!("examples = {n} < {SMALL_DATA} ({IM}: the gain was largest on small data, ~1k-example sets such as LIMA and AlpaGasus)"));
    }
    if n >= LARGE_DATA {
        step(-STEP, format!("examples = {n} ≥ {LARGE_DATA} ({IM}: the gain shrinks as the data grows; {WIT}: low λp)"));
    }
    if long && small {
        step(STEP, format!("both hold: ratio = {ratio:.2} > {LONG_PROMPTS} and examples = {n} < {SMALL_DATA} ({IM}: long prompts with small data is where loss on the prompt gained most)"));
    }
    if (SHORT_PROMPTS..=LONG_PROMPTS).contains(&ratio) {
        reasons.push(format!(
            "no change for prompt/response token ratio = {ratio:.2} (between {SHORT_PROMPTS} and {LONG_PROMPTS}: neither prompts nor responses dominate)"
        ));
    }
    if (SMALL_DATA..LARGE_DATA).contains(&n) {
        reasons.push(format!(
            "no change for examples = {n} (between {SMALL_DATA} and {LARGE_DATA}: neither small nor large)"
        ));
    }
    reasons.push(format!(
        "λr = {} ({WIT}: moderate-to-high λr ≈ 0.6–1.0 was best; the grid spans that range)",
        fmt_weight(START_RESPONSE_WEIGHT)
    ));
    (round2(p.clamp(0.0, 1.0)), START_RESPONSE_WEIGHT, reasons)
}

/// `exp(-d²/2)`, `d` the distance of (log ratio / ln 2, log examples / ln 10).
pub fn similarity(stats: &DataStats, past: &PastSweep) -> f64 {
    let log_ratio = |r: f64| r.max(1e-6).ln();
    let log_n = |n: usize| (n.max(1) as f64).ln();
    let dr = (log_ratio(stats.ratio_of_totals) - log_ratio(past.ratio)) / 2f64.ln();
    let dn = (log_n(stats.examples) - log_n(past.examples)) / 10f64.ln();
    (-(dr * dr + dn * dn) / 2.0).exp()
}

/// The suggestion for data with `stats`, given the registry's finished sweeps.
pub fn suggest(stats: &DataStats, past: &[PastSweep]) -> Suggestion {
    let (rule_p, rule_r, reasons) = rule(stats);
    let weighted: Vec<(PastSweep, f64, f64)> = past
        .iter()
        .map(|s| {
            let sim = similarity(stats, s);
            let w = if s.same_base {
                sim
            } else {
                sim * OTHER_BASE_FACTOR
            };
            (s.clone(), sim, w)
        })
        .collect();
    let total = RULE_WEIGHT + weighted.iter().map(|(_, _, w)| w).sum::<f64>();
    let blend = |rule: f32, best: fn(&PastSweep) -> f32| {
        let sum = RULE_WEIGHT * rule as f64
            + weighted
                .iter()
                .map(|(s, _, w)| w * best(s) as f64)
                .sum::<f64>();
        (sum / total) as f32
    };
    let p = round_to_twentieth(blend(rule_p, |s| s.best_prompt_weight));
    let r = round_to_twentieth(blend(rule_r, |s| s.best_response_weight));
    let evidence = weighted
        .into_iter()
        .map(|(sweep, similarity, weight)| {
            let share = weight / total;
            let line = format!(
                "sweep `{}`: {} examples, prompt/response ratio {:.2}; best λp = {}, λr = {} ({} by {} over {} finished cells){}; similarity {:.2} -> weight {:.2} ({:.0}% of the suggestion)",
                sweep.name,
                sweep.examples,
                sweep.ratio,
                fmt_weight(sweep.best_prompt_weight),
                fmt_weight(sweep.best_response_weight),
                sweep.best_cell,
                sweep.metric,
                sweep.finished_cells,
                if sweep.same_base { "" } else { ", another base (weight halved)" },
                similarity,
                weight,
                100.0 * share
            );
            SweepEvidence {
                sweep,
                similarity,
                weight,
                share,
                line,
            }
        })
        .collect();
    Suggestion {
        prompt_weight: p,
        response_weight: r,
        rule_prompt_weight: rule_p,
        rule_response_weight: rule_r,
        reasons,
        evidence,
        grid_prompt_weights: window(p),
        grid_response_weights: window(r),
    }
}

fn round2(x: f32) -> f32 {
    (x * 100.0).round() / 100.0
}

fn round_to_twentieth(x: f32) -> f32 {
    ((x * 20.0).round() / 20.0).clamp(0.0, 1.0)
}

/// Three values around `center` spaced [`GRID_STEP`] within [0, 1]: one step below and above,
/// or the edge when it is nearer; at an edge itself, two steps inwards.
pub fn window(center: f32) -> Vec<f32> {
    const EPS: f32 = 1e-4;
    let c = round2(center.clamp(0.0, 1.0));
    let below = if c >= GRID_STEP - EPS {
        Some(c - GRID_STEP)
    } else {
        (c > 0.0).then_some(0.0)
    };
    let above = if c + GRID_STEP <= 1.0 + EPS {
        Some(c + GRID_STEP)
    } else {
        (c < 1.0).then_some(1.0)
    };
    let mut values = vec![c];
    values.extend(below);
    values.extend(above);
    if below.is_none() {
        values.push(c + 2.0 * GRID_STEP);
    }
    if above.is_none() {
        values.push(c - 2.0 * GRID_STEP);
    }
    let mut values: Vec<f32> = values
        .into_iter()
        .map(|v| round2(v).clamp(0.0, 1.0))
        .collect();
    values.sort_by(f32::total_cmp);
    values.dedup();
    values
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::suggest::stats::LengthSummary;

    fn stats(examples: usize, ratio: f64) -> DataStats {
        let lengths = |mean: f64| LengthSummary {
            total: (mean * examples as f64) as usize,
            mean,
            median: mean,
            p90: mean,
        };
        DataStats {
            examples,
            prompt_tokens: lengths(100.0 * ratio),
            response_tokens: lengths(100.0),
            ratio_mean: ratio,
            ratio_of_totals: ratio,
            multi_turn: 0,
            rows: None,
        }
    }

    fn past(name: &str, examples: usize, ratio: f64, p: f32, r: f32) -> PastSweep {
        PastSweep {
            name: name.into(),
            examples,
            ratio,
            metric: "response_loss".into(),
            best_cell: format!("wit-p{p}-r{r}"),
            best_prompt_weight: p,
            best_response_weight: r,
            finished_cells: 9,
            same_base: true,
        }
    }

    #[test]
    fn long_prompts_and_small_data_get_more_prompt_weight_than_short_prompts_and_large_data() {
        let im_regime = suggest(&stats(1_000, 2.5), &[]);
        let standard_regime = suggest(&stats(50_000, 0.2), &[]);
        assert!(
            im_regime.prompt_weight > standard_regime.prompt_weight,
            "{im_regime:?}\n{standard_regime:?}"
        );
        assert_eq!(im_regime.prompt_weight, 0.5);
        assert_eq!(standard_regime.prompt_weight, 0.0);
        assert_eq!(suggest(&stats(500, 5.0), &[]).prompt_weight, 0.6);
        // Neutral data stays at the start, and says why.
        let neutral = suggest(&stats(10_000, 0.8), &[]);
        assert_eq!((neutral.prompt_weight, neutral.response_weight), (0.2, 0.8));
        assert!(neutral.reasons.iter().any(|r| r.contains("no change")));
        // Every adjustment names its statistic and value.
        assert!(
            im_regime
                .reasons
                .iter()
                .any(|r| r.starts_with("λp +0.1 because prompt/response token ratio = 2.50")),
            "{:#?}",
            im_regime.reasons
        );
        assert!(im_regime
            .reasons
            .iter()
            .any(|r| r.starts_with("λp +0.1 because examples = 1000 < 5000")));
    }

    #[test]
    fn the_grid_contains_the_suggestion_and_stays_within_0_and_1() {
        for center in [0.0, 0.05, 0.1, 0.2, 0.35, 0.5, 0.8, 0.85, 0.95, 1.0] {
            let grid = window(center);
            assert_eq!(grid.len(), 3, "{center}: {grid:?}");
            assert!(grid.contains(&center), "{center}: {grid:?}");
            assert!(grid.iter().all(|v| (0.0..=1.0).contains(v)), "{grid:?}");
        }
        assert_eq!(window(0.0), vec![0.0, 0.2, 0.4]);
        assert_eq!(window(0.8), vec![0.6, 0.8, 1.0]);
        assert_eq!(window(1.0), vec![0.6, 0.8, 1.0]);
        for (n, ratio) in [(100, 10.0), (1_000_000, 0.01), (3_000, 0.7)] {
            let s = suggest(&stats(n, ratio), &[past("x", n, ratio, 1.0, 0.2)]);
            assert!(s.grid_prompt_weights.contains(&s.prompt_weight), "{s:?}");
            assert!(
                s.grid_response_weights.contains(&s.response_weight),
                "{s:?}"
            );
            let all = s.grid_prompt_weights.iter().chain(&s.grid_response_weights);
            assert!(all.into_iter().all(|v| (0.0..=1.0).contains(v)), "{s:?}");
        }
        let s = suggest(&stats(1_000, 2.5), &[]);
        assert_eq!(
            s.sweep_flags(),
            "--prompt-weights 0.3,0.5,0.7 --response-weights 0.6,0.8,1"
        );
    }

    #[test]
    fn past_sweeps_pull_the_suggestion_towards_their_best_cells_by_similarity() {
        let data = stats(1_000, 0.8);
        let alone = suggest(&data, &[]);
        assert_eq!((alone.prompt_weight, alone.response_weight), (0.3, 0.8));
        // Identical data: weight 1 against the rule's 1, so halfway to its best cell.
        let same = suggest(&data, &[past("same", 1_000, 0.8, 0.7, 1.0)]);
        assert_eq!((same.prompt_weight, same.response_weight), (0.5, 0.9));
        assert!((same.evidence[0].similarity - 1.0).abs() < 1e-12);
        assert!((same.evidence[0].share - 0.5).abs() < 1e-12);
        assert!(same.evidence[0].line.contains("sweep `same`"));
        // Dissimilar data (100x the examples, 8x the ratio) barely moves it.
        let far = suggest(&data, &[past("far", 100_000, 6.4, 1.0, 1.0)]);
        assert!(far.evidence[0].similarity < 0.02, "{far:?}");
        assert_eq!(far.prompt_weight, alone.prompt_weight);
        // The nearer of two sweeps pulls harder.
        let both = suggest(
            &data,
            &[
                past("near", 1_200, 0.9, 0.0, 1.0),
                past("farther", 4_000, 2.0, 0.6, 1.0),
            ],
        );
        assert!(both.prompt_weight < alone.prompt_weight, "{both:?}");
        assert!(both.evidence[0].weight > both.evidence[1].weight);
        // Another base counts half.
        let mut other = past("other", 1_000, 0.8, 0.7, 1.0);
        other.same_base = false;
        let s = suggest(&data, &[other]);
        assert!((s.evidence[0].weight - 0.5).abs() < 1e-12);
        assert!(s.prompt_weight > alone.prompt_weight && s.prompt_weight < same.prompt_weight);
    }
}
