//! Preference pairs: reading them in the layouts TRL accepts, rendering both answers with the
//! model's chat template, and tokenizing them so the response tokens are marked.
//!
//! Accepted rows (JSONL, or a JSON array):
//! - `prompt`, `chosen`, `rejected` as strings (the prompt becomes one user message);
//! - `prompt` as a conversation (a list of `{role, content}`), `chosen`/`rejected` as the
//!   assistant continuation (a one-message list, or a string);
//! - no `prompt`, `chosen`/`rejected` as full conversations: the prompt is their common message
//!   prefix;
//! - no `prompt`, `chosen`/`rejected` as Anthropic HH dialogues (`"\n\nHuman: ...\n\nAssistant:
//!   ..."`): both are parsed into turns, the prompt is every turn before the final Assistant
//!   answer (the two dialogues must agree on it, as they do in HH) and the answers are the two
//!   final Assistant turns. An HH-style `prompt` string is parsed the same way. Parsing into turns
//!   (instead of taking the longest common text prefix) gives the prompt/response split exactly
//!   at the answer, and the model's own chat template then renders the dialogue as it would any
//!   conversation.
//!
//! Structural problems (a missing field, a wrong type, an unknown role, a broken role order) are
//! errors naming `file:line`. Pairs that are well-formed but useless are skipped and counted:
//! identical chosen and rejected answers, an empty answer, HH dialogues that differ before their
//! final answer. Pairs longer than the context are truncated, never dropped: the shared prompt
//! loses tokens from its start (down to half the context at most), then an answer still too long
//! loses its end; both are counted.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rayon::prelude::*;
use serde_json::Value;
use tokenizers::Tokenizer;

use crate::data::{
    tokenize_example, Boundary, DataError, Example, Message, OnBadRow, Role, Template,
    TokenizeOptions, TokenizedExample,
};
use crate::{Error, Result};

/// One preference pair as read: the shared prompt conversation and the two answers.
#[derive(Debug, Clone, PartialEq)]
pub struct PreferencePair {
    /// Optional system message, then user/assistant turns ending with a user turn.
    pub prompt: Vec<Message>,
    pub chosen: String,
    pub rejected: String,
    /// 1-based line of the row.
    pub line: usize,
}

/// A pair tokenized with the template: the same prompt tokens, then each answer's tokens
/// (marked [`crate::data::TokenKind::Response`]).
#[derive(Debug, Clone, PartialEq)]
pub struct PairTokens {
    pub chosen: TokenizedExample,
    pub rejected: TokenizedExample,
}

impl PairTokens {
    /// The longer of the two sequences (what a batch pads to).
    pub fn len(&self) -> usize {
        self.chosen.len().max(self.rejected.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What happened to the rows of a preference file; nothing is dropped without a count here.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PairReport {
    pub rows: usize,
    pub kept: usize,
    /// Skipped pairs by reason (identical answers, empty answer, ...), with the first location.
    pub skipped: BTreeMap<String, (usize, String)>,
    /// Kept with tokens cut from the start of the prompt.
    pub prompt_truncated: usize,
    /// Kept with tokens cut from the end of an answer (after the prompt was cut to half the
    /// context).
    pub response_truncated: usize,
}

impl PairReport {
    pub fn skipped_total(&self) -> usize {
        self.skipped.values().map(|(n, _)| n).sum()
    }

    fn skip(&mut self, reason: &str, location: String) {
        let slot = self
            .skipped
            .entry(reason.to_string())
            .or_insert((0, location));
        slot.0 += 1;
    }

    /// Pairs skipped because chosen and rejected were the same.
    pub fn identical(&self) -> usize {
        self.skipped.get(IDENTICAL).map_or(0, |(n, _)| *n)
    }
}

impl std::fmt::Display for PairReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} rows: {} pairs kept ({} with the prompt cut from the left, {} with an answer cut at the end), {} skipped",
            self.rows,
            self.kept,
            self.prompt_truncated,
            self.response_truncated,
            self.skipped_total()
        )?;
        for (reason, (n, first)) in &self.skipped {
            write!(f, "\n  {n} x {reason} (first at {first})")?;
        }
        Ok(())
    }
}

const IDENTICAL: &str = "chosen and rejected are identical";
const EMPTY: &str = "empty chosen or rejected answer";
const HH_PROMPTS_DIFFER: &str = "chosen and rejected dialogues differ before their final answer";

/// Why a row was not turned into a pair.
enum RowOutcome {
    Pair(PreferencePair),
    Skip(&'static str),
}

/// Reads the pairs of a preference file; `report` counts the rows skipped.
pub fn load_pairs(path: &Path) -> Result<(Vec<PreferencePair>, PairReport)> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    parse_pairs(&text, path)
}

/// [`load_pairs`] on text already read (`path` names it in errors).
pub fn parse_pairs(text: &str, path: &Path) -> Result<(Vec<PreferencePair>, PairReport)> {
    let rows = crate::data::format::split_rows(text, path)?;
    let mut report = PairReport::default();
    let mut pairs = Vec::new();
    for (line, raw) in rows {
        report.rows += 1;
        let bad = |message: String| Error::from(DataError::bad_row(path, line, message));
        let value: Value =
            serde_json::from_str(raw).map_err(|e| bad(format!("invalid JSON: {e}")))?;
        let Value::Object(obj) = value else {
            return Err(bad("a row must be a JSON object".into()));
        };
        match parse_row(&obj).map_err(bad)? {
            RowOutcome::Pair(mut pair) => {
                pair.line = line;
                pairs.push(pair);
            }
            RowOutcome::Skip(reason) => report.skip(reason, format!("{}:{line}", path.display())),
        }
    }
    Ok((pairs, report))
}

fn parse_row(obj: &serde_json::Map<String, Value>) -> std::result::Result<RowOutcome, String> {
    let field = |name: &str| {
        obj.get(name)
            .filter(|v| !v.is_null())
            .ok_or_else(|| format!("missing field `{name}`"))
    };
    let chosen = field("chosen")?;
    let rejected = field("rejected")?;
    let (prompt, chosen, rejected) = match obj.get("prompt").filter(|v| !v.is_null()) {
        Some(prompt) => {
            let prompt = match prompt {
                Value::String(s) if is_hh(s) => {
                    let mut turns = parse_hh(s)?;
                    // TRL's HH prompts end with an empty "Assistant:" header.
                    if matches!(turns.last(), Some(m) if m.role == Role::Assistant && m.content.is_empty())
                    {
                        turns.pop();
                    }
                    turns
                }
                Value::String(s) => vec![Message::new(Role::User, s.clone())],
                Value::Array(_) => messages(prompt, "prompt")?,
                _ => return Err("`prompt` must be a string or a list of messages".into()),
            };
            (
                prompt,
                continuation(chosen, "chosen")?,
                continuation(rejected, "rejected")?,
            )
        }
        None => match (chosen, rejected) {
            (Value::String(c), Value::String(r)) => {
                if !is_hh(c) || !is_hh(r) {
                    return Err("missing field `prompt` (and `chosen`/`rejected` are not Anthropic HH dialogues)".into());
                }
                let (c, r) = (parse_hh(c)?, parse_hh(r)?);
                match split_common(c, r) {
                    Some(split) => split,
                    None => return Ok(RowOutcome::Skip(HH_PROMPTS_DIFFER)),
                }
            }
            (Value::Array(_), Value::Array(_)) => {
                let (c, r) = (messages(chosen, "chosen")?, messages(rejected, "rejected")?);
                if c == r {
                    return Ok(RowOutcome::Skip(IDENTICAL));
                }
                split_common(c, r).ok_or(
                    "without `prompt`, `chosen` and `rejected` must be the same conversation up to a different final assistant message",
                )?
            }
            _ => return Err("missing field `prompt` (`chosen` and `rejected` are neither conversations nor HH dialogues)".into()),
        },
    };
    if chosen.trim().is_empty() || rejected.trim().is_empty() {
        return Ok(RowOutcome::Skip(EMPTY));
    }
    if chosen == rejected {
        return Ok(RowOutcome::Skip(IDENTICAL));
    }
    Ok(RowOutcome::Pair(PreferencePair {
        prompt,
        chosen,
        rejected,
        line: 0,
    }))
}

/// Two conversations that share everything but their final assistant message: (prompt, the
/// two answers).
fn split_common(
    mut c: Vec<Message>,
    mut r: Vec<Message>,
) -> Option<(Vec<Message>, String, String)> {
    let last_c = c.pop().filter(|m| m.role == Role::Assistant)?;
    let last_r = r.pop().filter(|m| m.role == Role::Assistant)?;
    (c == r).then_some((c, last_c.content, last_r.content))
}

/// An answer: a string, or a list holding one assistant message.
fn continuation(value: &Value, name: &str) -> std::result::Result<String, String> {
    match value {
        Value::String(s) => Ok(s.clone()),
        Value::Array(_) => {
            let msgs = messages(value, name)?;
            match msgs.as_slice() {
                [m] if m.role == Role::Assistant => Ok(m.content.clone()),
                _ => Err(format!(
                    "`{name}` must be the assistant's answer: a string or a list of one assistant message"
                )),
            }
        }
        _ => Err(format!("`{name}` must be a string or a list of messages")),
    }
}

fn messages(value: &Value, name: &str) -> std::result::Result<Vec<Message>, String> {
    let Value::Array(items) = value else {
        return Err(format!("`{name}` must be a list of messages"));
    };
    items
        .iter()
        .enumerate()
        .map(|(i, item)| {
            let role = item
                .get("role")
                .and_then(Value::as_str)
                .ok_or_else(|| format!("`{name}` message {i}: missing field `role` (a string)"))?;
            let content = item.get("content").and_then(Value::as_str).ok_or_else(|| {
                format!("`{name}` message {i}: missing field `content` (a string)")
            })?;
            let role = Role::parse(role).ok_or_else(|| {
                format!("`{name}` message {i}: unknown role `{role}` (system, user, assistant)")
            })?;
            Ok(Message::new(role, content))
        })
        .collect()
}

const HUMAN: &str = "\n\nHuman:";
const ASSISTANT: &str = "\n\nAssistant:";

fn is_hh(text: &str) -> bool {
    text.trim_start().starts_with("Human:") && text.contains(ASSISTANT)
}

/// Turns of an HH dialogue. Text before the first marker is an error; consecutive turns of one
/// speaker are joined with a blank line (the chat template needs alternating roles).
fn parse_hh(text: &str) -> std::result::Result<Vec<Message>, String> {
    let trimmed = text.trim_start();
    if !trimmed.starts_with("Human:") {
        return Err("an HH dialogue must start with \"\\n\\nHuman:\"".into());
    }
    let normalized = format!("\n\n{trimmed}");
    let mut turns: Vec<Message> = Vec::new();
    let mut rest = normalized.as_str();
    while !rest.is_empty() {
        let (role, marker) = if rest.starts_with(HUMAN) {
            (Role::User, HUMAN)
        } else {
            (Role::Assistant, ASSISTANT)
        };
        rest = &rest[marker.len()..];
        let end = [rest.find(HUMAN), rest.find(ASSISTANT)]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(rest.len());
        let content = rest[..end].trim().to_string();
        rest = &rest[end..];
        match turns.last_mut() {
            Some(prev) if prev.role == role => {
                if !content.is_empty() {
                    prev.content = format!("{}\n\n{content}", prev.content);
                }
            }
            _ => turns.push(Message::new(role, content)),
        }
    }
    Ok(turns)
}

/// Tokenized pairs, split into training and held-out pairs.
pub struct PreparedPairs {
    pub train: Vec<PairTokens>,
    pub eval: Vec<PairTokens>,
    pub source: String,
    pub template_name: String,
    /// sha256 of every tokenized pair (ids and token kinds).
    pub fingerprint: String,
    pub report: PairReport,
}

/// How pairs are tokenized and split.
#[derive(Debug, Clone)]
pub struct PairOptions {
    pub max_seq_len: usize,
    pub eval_fraction: f64,
    pub seed: u64,
}

/// Renders every pair with `template` (prompt + each answer as the final assistant turn),
/// tokenizes, truncates to `max_seq_len`, skips pairs whose token ids are the same, and splits
/// off a seeded `eval_fraction` of held-out pairs.
pub fn prepare_pairs(
    pairs: &[PreferencePair],
    mut report: PairReport,
    path: &Path,
    template: &Template,
    template_name: &str,
    tokenizer: &Tokenizer,
    opts: &PairOptions,
) -> Result<PreparedPairs> {
    if opts.max_seq_len < 4 {
        return Err(Error::InvalidArgument(format!(
            "--max-seq-len {} is too short for a prompt and an answer",
            opts.max_seq_len
        )));
    }
    let source: Arc<Path> = Arc::from(path);
    let tok_opts = TokenizeOptions {
        max_seq_len: None,
        last_turn_only: true,
        on_error: OnBadRow::Error,
        boundary: Boundary::Split,
        ..Default::default()
    };
    let tokenized: Vec<Result<(PairTokens, usize)>> = pairs
        .par_iter()
        .map(|pair| {
            let example = |answer: &str| {
                let mut messages = pair.prompt.clone();
                messages.push(Message::new(Role::Assistant, answer));
                Example {
                    messages,
                    reference: None,
                    source_line: pair.line,
                    source_path: Some(source.clone()),
                    alpaca: None,
                }
            };
            let chosen = tokenize_example(&example(&pair.chosen), template, tokenizer, &tok_opts)?;
            let rejected =
                tokenize_example(&example(&pair.rejected), template, tokenizer, &tok_opts)?;
            Ok((PairTokens { chosen, rejected }, pair.line))
        })
        .collect();
    let mut kept = Vec::with_capacity(pairs.len());
    for result in tokenized {
        let (tokens, line) = result?;
        let location = format!("{}:{line}", path.display());
        let (tokens, cut_prompt, cut_answer) = truncate_pair(tokens, opts.max_seq_len);
        if tokens.chosen.ids == tokens.rejected.ids {
            report.skip(IDENTICAL, location);
            continue;
        }
        report.prompt_truncated += usize::from(cut_prompt);
        report.response_truncated += usize::from(cut_answer);
        kept.push(tokens);
    }
    report.kept = kept.len();
    if kept.is_empty() {
        return Err(Error::InvalidArgument(format!(
            "no preference pair left in {} ({report})",
            path.display()
        )));
    }
    let mut all = Vec::with_capacity(2 * kept.len());
    for p in &kept {
        all.push(p.chosen.clone());
        all.push(p.rejected.clone());
    }
    let fingerprint = crate::data::fingerprint(&all);

    let n_eval = ((kept.len() as f64) * opts.eval_fraction).round() as usize;
    let n_eval = n_eval.min(kept.len() - 1);
    let mut order: Vec<usize> = (0..kept.len()).collect();
    order.shuffle(&mut rand::rngs::StdRng::seed_from_u64(opts.seed ^ 0x5eed));
    let mut is_eval = vec![false; kept.len()];
    for &i in &order[..n_eval] {
        is_eval[i] = true;
    }
    let (mut train, mut eval) = (Vec::new(), Vec::new());
    for (i, p) in kept.into_iter().enumerate() {
        if is_eval[i] {
            eval.push(p);
        } else {
            train.push(p);
        }
    }
    Ok(PreparedPairs {
        train,
        eval,
        source: path.display().to_string(),
        template_name: template_name.to_string(),
        fingerprint,
        report,
    })
}

/// Fits a pair into `max` tokens: first the shared prompt loses tokens from its start (keeping
/// at least half the context, or all of it when shorter), then a sequence still too long loses
/// the end of its answer. Returns (pair, prompt cut, answer cut).
pub fn truncate_pair(pair: PairTokens, max: usize) -> (PairTokens, bool, bool) {
    if pair.len() <= max {
        return (pair, false, false);
    }
    let prompt = pair.chosen.prompt_len().min(pair.rejected.prompt_len());
    let longest_answer = (pair.chosen.len() - prompt).max(pair.rejected.len() - prompt);
    let keep_prompt = max
        .saturating_sub(longest_answer)
        .max(prompt.min(max / 2))
        .min(prompt);
    let drop = prompt - keep_prompt;
    let mut cut_answer = false;
    let mut fit = |ex: TokenizedExample| {
        let mut ids = ex.ids[drop..].to_vec();
        let mut kinds = ex.kinds[drop..].to_vec();
        if ids.len() > max {
            ids.truncate(max);
            kinds.truncate(max);
            cut_answer = true;
        }
        TokenizedExample { ids, kinds }
    };
    let chosen = fit(pair.chosen);
    let rejected = fit(pair.rejected);
    (PairTokens { chosen, rejected }, drop > 0, cut_answer)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::TokenKind;

    fn parse(rows: &[Value]) -> Result<(Vec<PreferencePair>, PairReport)> {
        let text: String = rows.iter().map(|r| format!("{r}\n")).collect();
        parse_pairs(&text, Path::new("prefs.jsonl"))
    }

    #[test]
    fn reads_strings_conversations_and_hh() {
        let rows = [
            serde_json::json!({"prompt": "Say hi.", "chosen": "hi", "rejected": "no"}),
            serde_json::json!({
                "prompt": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Q?"}],
                "chosen": [{"role": "assistant", "content": "A."}],
                "rejected": "B."
            }),
            serde_json::json!({
                "chosen": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."}],
                "rejected": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "B."}]
            }),
            serde_json::json!({
                "chosen": "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: Help me?\n\nAssistant: Sure.",
                "rejected": "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: Help me?\n\nAssistant: No."
            }),
            serde_json::json!({"prompt": "\n\nHuman: Hi\n\nAssistant:", "chosen": " Hello.", "rejected": " Go."}),
        ];
        let (pairs, report) = parse(&rows).unwrap();
        assert_eq!(report.rows, 5);
        assert_eq!(pairs.len(), 5, "{report}");
        assert_eq!(pairs[0].prompt, vec![Message::new(Role::User, "Say hi.")]);
        assert_eq!(pairs[1].prompt.len(), 2);
        assert_eq!(
            (pairs[1].chosen.as_str(), pairs[1].rejected.as_str()),
            ("A.", "B.")
        );
        assert_eq!(pairs[2].prompt, vec![Message::new(Role::User, "Q?")]);
        let hh = &pairs[3];
        assert_eq!(
            hh.prompt,
            vec![
                Message::new(Role::User, "Hi"),
                Message::new(Role::Assistant, "Hello."),
                Message::new(Role::User, "Help me?"),
            ]
        );
        assert_eq!((hh.chosen.as_str(), hh.rejected.as_str()), ("Sure.", "No."));
        assert_eq!(hh.line, 4);
        assert_eq!(pairs[4].prompt, vec![Message::new(Role::User, "Hi")]);
    }

    #[test]
    fn skips_identical_and_empty_pairs_with_counts() {
        let rows = [
            serde_json::json!({"prompt": "p", "chosen": "same", "rejected": "same"}),
            serde_json::json!({"prompt": "p", "chosen": "", "rejected": "x"}),
            serde_json::json!({"prompt": "p", "chosen": "a", "rejected": "b"}),
            serde_json::json!({
                "chosen": "\n\nHuman: A\n\nAssistant: x",
                "rejected": "\n\nHuman: B\n\nAssistant: y"
            }),
        ];
        let (pairs, report) = parse(&rows).unwrap();
        assert_eq!(pairs.len(), 1);
        assert_eq!(report.identical(), 1);
        assert_eq!(report.skipped_total(), 3);
        assert!(report.to_string().contains("prefs.jsonl:1"), "{report}");
    }

    #[test]
    fn missing_fields_name_the_line() {
        let rows = [
            serde_json::json!({"prompt": "p", "chosen": "a", "rejected": "b"}),
            serde_json::json!({"prompt": "p", "chosen": "a"}),
        ];
        let err = parse(&rows).unwrap_err().to_string();
        assert!(err.starts_with("prefs.jsonl:2:"), "{err}");
        assert!(err.contains("missing field `rejected`"), "{err}");
        let err = parse(&[serde_json::json!({"chosen": "a", "rejected": "b"})])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("prefs.jsonl:1: missing field `prompt`"),
            "{err}"
        );
        let err = parse(&[serde_json::json!({"prompt": [{"role": "robot", "content": "x"}], "chosen": "a", "rejected": "b"})])
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown role `robot`"), "{err}");
    }

    fn ex(prompt: usize, answer: usize, first: u32) -> TokenizedExample {
        let ids: Vec<u32> = (0..(prompt + answer) as u32).map(|i| first + i).collect();
        let kinds = (0..prompt + answer)
            .map(|i| {
                if i < prompt {
                    TokenKind::User
                } else {
                    TokenKind::Response
                }
            })
            .collect();
        TokenizedExample { ids, kinds }
    }

    #[test]
    fn truncation_cuts_the_prompt_from_the_left_then_answers_at_the_end() {
        let pair = PairTokens {
            chosen: ex(10, 4, 0),
            rejected: ex(10, 6, 0),
        };
        let (fit, cut_p, cut_a) = truncate_pair(pair.clone(), 12);
        assert!(cut_p && !cut_a);
        assert_eq!(fit.rejected.len(), 12);
        assert_eq!(fit.chosen.ids[0], 4, "the first 4 prompt tokens are gone");
        assert_eq!(fit.chosen.prompt_len(), 6);
        let (fit, cut_p, cut_a) = truncate_pair(pair, 8);
        assert!(cut_p && cut_a);
        assert_eq!(fit.chosen.prompt_len(), 4, "half the context stays prompt");
        assert_eq!((fit.chosen.len(), fit.rejected.len()), (8, 8));
    }
}
