//! Token-level statistics of a dataset as training sees it: the rows loaded and tokenized with
//! the options training uses ([`load_options`], [`tokenize_options`]), every row kept (no eval
//! split), and counted from the token kinds, so "prompt" means exactly the tokens λp weighs.

use serde::{Deserialize, Serialize};

use crate::data::{self, TokenKind, TokenizedExample};
use crate::model::BaseModel;
use crate::train::prepare::{load_options, tokenize_options};
use crate::train::TrainConfig;
use crate::{Error, Result};

/// Mean, median and 90th percentile of a length, in tokens.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LengthSummary {
    pub total: usize,
    pub mean: f64,
    /// The middle value (the mean of the two middle values for an even count).
    pub median: f64,
    /// Nearest rank: the smallest value with at least 90% of the values at or below it.
    pub p90: f64,
}

impl LengthSummary {
    pub fn of(values: &[usize]) -> LengthSummary {
        if values.is_empty() {
            return LengthSummary {
                total: 0,
                mean: 0.0,
                median: 0.0,
                p90: 0.0,
            };
        }
        let mut sorted = values.to_vec();
        sorted.sort_unstable();
        let n = sorted.len();
        let total: usize = sorted.iter().sum();
        let median = if n % 2 == 1 {
            sorted[n / 2] as f64
        } else {
            (sorted[n / 2 - 1] + sorted[n / 2]) as f64 / 2.0
        };
        // Nearest rank ceil(0.9 n), 1-based; in integers so 0.9 * 10 is exactly rank 9.
        let rank = (9 * n).div_ceil(10).max(1);
        LengthSummary {
            total,
            mean: total as f64 / n as f64,
            median,
            p90: sorted[rank - 1] as f64,
        }
    }
}

/// Where the rows went between the file and the kept examples.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct RowCounts {
    /// Rows read from the file (kept by the loader plus skipped by it).
    pub rows: usize,
    /// Rows the loader skipped (`--on-bad-row skip`).
    pub skipped_loading: usize,
    /// Kept, with part of the prompt cut to fit `max_seq_len`.
    pub truncated: usize,
    /// Dropped because the final response alone is longer than `max_seq_len`.
    pub dropped_too_long: usize,
    /// Dropped (with `--on-bad-row skip`) because they could not be tokenized.
    pub failed_tokenizing: usize,
}

impl RowCounts {
    /// Rows that reach training as examples.
    pub fn kept(&self) -> usize {
        self.rows
            .saturating_sub(self.skipped_loading + self.dropped_too_long + self.failed_tokenizing)
    }
}

/// The statistics the suggestion rule reads, plus the ones shown for context.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DataStats {
    /// Tokenized examples kept.
    pub examples: usize,
    /// Tokens weighted by λp per example: system, user, template and earlier assistant turns
    /// not trained as responses (everything but [`TokenKind::Response`]).
    pub prompt_tokens: LengthSummary,
    /// Tokens weighted by λr per example.
    pub response_tokens: LengthSummary,
    /// Mean over examples of prompt tokens / response tokens.
    pub ratio_mean: f64,
    /// All prompt tokens / all response tokens (what the loss sees in aggregate; the rule's input).
    pub ratio_of_totals: f64,
    /// Examples with more than one user turn, counted as runs of assistant tokens (each user
    /// turn is answered by one), after truncation.
    pub multi_turn: usize,
    /// `None` when only the tokenized examples are known (a sweep plan's data).
    pub rows: Option<RowCounts>,
}

impl DataStats {
    /// Statistics of tokenized examples; `rows` says how many rows it took to get them.
    pub fn from_tokenized(examples: &[TokenizedExample], rows: Option<RowCounts>) -> DataStats {
        let response: Vec<usize> = examples.iter().map(|e| e.response_tokens()).collect();
        let prompt: Vec<usize> = examples
            .iter()
            .zip(&response)
            .map(|(e, r)| e.len() - r)
            .collect();
        let ratios: Vec<f64> = prompt
            .iter()
            .zip(&response)
            .filter(|(_, &r)| r > 0)
            .map(|(&p, &r)| p as f64 / r as f64)
            .collect();
        let (prompt, response) = (LengthSummary::of(&prompt), LengthSummary::of(&response));
        DataStats {
            examples: examples.len(),
            ratio_mean: mean(&ratios),
            ratio_of_totals: if response.total == 0 {
                0.0
            } else {
                prompt.total as f64 / response.total as f64
            },
            prompt_tokens: prompt,
            response_tokens: response,
            multi_turn: examples.iter().filter(|e| assistant_turns(e) > 1).count(),
            rows,
        }
    }

    /// Share of examples with more than one user turn.
    pub fn multi_turn_share(&self) -> f64 {
        if self.examples == 0 {
            0.0
        } else {
            self.multi_turn as f64 / self.examples as f64
        }
    }
}

fn mean(values: &[f64]) -> f64 {
    if values.is_empty() {
        0.0
    } else {
        values.iter().sum::<f64>() / values.len() as f64
    }
}

/// Runs of assistant tokens (trained or not): one per assistant turn.
fn assistant_turns(ex: &TokenizedExample) -> usize {
    let assistant = |k: &TokenKind| matches!(k, TokenKind::Response | TokenKind::PriorAssistant);
    let mut runs = 0;
    let mut inside = false;
    for k in &ex.kinds {
        let a = assistant(k);
        runs += usize::from(a && !inside);
        inside = a;
    }
    runs
}

/// Statistics of the data `cfg.data` names, loaded, rendered with `cfg.template` and tokenized
/// with `base`'s tokenizer exactly as training would, but with every row kept (no eval split).
pub fn measure(cfg: &TrainConfig, base: &BaseModel) -> Result<DataStats> {
    let path = cfg
        .data
        .as_deref()
        .ok_or_else(|| Error::InvalidArgument("suggest needs a data file (--data FILE)".into()))?;
    let (examples, load_report) = data::load_examples(path, &load_options(cfg))?;
    let template = base.template(&cfg.template)?;
    let tokenized = data::tokenize_examples(
        &examples,
        &template,
        base.tokenizer()?,
        &tokenize_options(cfg, base),
    )?;
    if tokenized.examples.is_empty() {
        return Err(Error::InvalidArgument(format!(
            "no example left from {}: {load_report}; {}",
            path.display(),
            tokenized.report
        )));
    }
    let report = &tokenized.report;
    let rows = RowCounts {
        rows: load_report.kept + load_report.skipped,
        skipped_loading: load_report.skipped,
        truncated: report.truncated,
        dropped_too_long: report.dropped_too_long,
        failed_tokenizing: report.failed.len(),
    };
    Ok(DataStats::from_tokenized(&tokenized.examples, Some(rows)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use TokenKind::{PriorAssistant as Pa, Response as R, Template as T, User as U};

    fn ex(kinds: &[TokenKind]) -> TokenizedExample {
        TokenizedExample {
            ids: vec![0; kinds.len()],
            kinds: kinds.to_vec(),
        }
    }

    #[test]
    fn lengths_are_summarised_by_hand_counted_values() {
        let s = LengthSummary::of(&[24, 33, 25, 33]);
        assert_eq!((s.total, s.mean, s.median, s.p90), (115, 28.75, 29.0, 33.0));
        let s = LengthSummary::of(&[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]);
        assert_eq!((s.median, s.p90), (5.5, 9.0));
        assert_eq!(LengthSummary::of(&[7]).p90, 7.0);
    }

    #[test]
    fn prompt_response_and_turns_come_from_the_token_kinds() {
        let data = [
            ex(&[T, U, U, T, R, R]),             // 4 prompt, 2 response, 1 turn
            ex(&[T, U, T, Pa, Pa, T, U, T, R]),  // 8 prompt (earlier turn), 1 response, 2 turns
            ex(&[U, T, R, R, T, U, T, R, R, R]), // 5 prompt, 5 response, 2 turns
        ];
        let s = DataStats::from_tokenized(&data, None);
        assert_eq!(s.examples, 3);
        assert_eq!(s.prompt_tokens.total, 17);
        assert_eq!(s.response_tokens.total, 8);
        assert!((s.ratio_of_totals - 17.0 / 8.0).abs() < 1e-12);
        assert!((s.ratio_mean - (2.0 + 8.0 + 1.0) / 3.0).abs() < 1e-12);
        assert_eq!(s.multi_turn, 2);
    }
}
