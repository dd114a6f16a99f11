//! Tokenization into ids plus a per-token [`TokenKind`], truncation, and the WIT loss weights.
//!
//! The prompt/response boundary is found on tokens, never guessed from strings: the text up to
//! the start (and end) of each trained answer is tokenized on its own and must be a prefix of the
//! full conversation's ids, otherwise the example is rejected with its file and line.

use std::collections::BTreeMap;

use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use tokenizers::Tokenizer;

use super::format::OnBadRow;
use super::template::Template;
use super::{DataError, Example};
use crate::{Error, Result};

/// What a token is, so per-role weights and λp/λr can be applied after tokenizing once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum TokenKind {
    /// Inside a system message.
    System,
    /// Inside a user message (or an Alpaca instruction/input).
    User,
    /// Template boilerplate: role headers, Alpaca preamble, generation prompt.
    Template,
    /// An earlier assistant turn not trained as a response (`last_turn_only`); counts as prompt.
    PriorAssistant,
    /// A trained assistant answer, including the template's end-of-turn tokens after it.
    Response,
}

impl TokenKind {
    /// Stable one-byte code, used by the fingerprint.
    pub fn code(self) -> u8 {
        match self {
            TokenKind::System => 0,
            TokenKind::User => 1,
            TokenKind::Template => 2,
            TokenKind::PriorAssistant => 3,
            TokenKind::Response => 4,
        }
    }

    pub fn is_prompt(self) -> bool {
        self != TokenKind::Response
    }
}

/// Token ids and, per position, the kind of the token there. The loss at position `t` predicts
/// `ids[t]` from `ids[..t]`; position 0 is never predicted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenizedExample {
    pub ids: Vec<u32>,
    pub kinds: Vec<TokenKind>,
}

impl TokenizedExample {
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Number of tokens before the first response token (the reference's `prompt_len`).
    pub fn prompt_len(&self) -> usize {
        self.kinds
            .iter()
            .position(|k| *k == TokenKind::Response)
            .unwrap_or(self.kinds.len())
    }

    /// Number of response tokens.
    pub fn response_tokens(&self) -> usize {
        self.kinds
            .iter()
            .filter(|k| **k == TokenKind::Response)
            .count()
    }
}

/// The WIT loss weights: λp for prompt tokens, λr for response tokens, optionally overridden
/// per role for system and user tokens.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LossWeights {
    pub prompt: f32,
    pub response: f32,
    pub system: Option<f32>,
    pub user: Option<f32>,
}

impl Default for LossWeights {
    /// Standard instruction tuning: loss on the response only.
    fn default() -> Self {
        Self::new(0.0, 1.0)
    }
}

impl LossWeights {
    pub fn new(prompt: f32, response: f32) -> Self {
        Self {
            prompt,
            response,
            system: None,
            user: None,
        }
    }

    pub fn weight_of(&self, kind: TokenKind) -> f32 {
        match kind {
            TokenKind::Response => self.response,
            TokenKind::System => self.system.unwrap_or(self.prompt),
            TokenKind::User => self.user.unwrap_or(self.prompt),
            TokenKind::Template | TokenKind::PriorAssistant => self.prompt,
        }
    }

    /// Per-position weights; `weights[0]` is 0 because nothing predicts the first token.
    pub fn token_weights(&self, ex: &TokenizedExample) -> Vec<f32> {
        ex.kinds
            .iter()
            .enumerate()
            .map(|(t, k)| if t == 0 { 0.0 } else { self.weight_of(*k) })
            .collect()
    }
}

/// Which end of the prompt is cut when an example is longer than `max_seq_len`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Truncation {
    /// Drop the start of the prompt (keeps the question nearest the answer).
    #[default]
    Left,
    /// Drop the end of the prompt, just before the final response.
    Right,
}

impl std::str::FromStr for Truncation {
    type Err = crate::Error;
    fn from_str(s: &str) -> crate::Result<Self> {
        crate::config_value::parse_enum("truncate_prompt", s)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct TokenizeOptions {
    /// Longest sequence kept; `None` keeps everything.
    pub max_seq_len: Option<usize>,
    pub truncation: Truncation,
    /// Train on the final assistant turn only; earlier ones become `PriorAssistant`.
    pub last_turn_only: bool,
    /// What to do with an example that cannot be tokenized (template error, unstable boundary).
    pub on_error: OnBadRow,
    pub boundary: Boundary,
}

/// What to do when a BPE merge crosses a prompt/response boundary, i.e. the prompt's tokens are
/// not a prefix of the whole conversation's tokens (e.g. a response that starts with a newline
/// after a template ending in one).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum Boundary {
    /// Reject the example (an error naming file:line, or counted as failed with `Skip`).
    #[default]
    Strict,
    /// Tokenize prompt and response pieces separately and concatenate them, as the WIT
    /// reference code does; the boundary is exact but the ids may differ from joint
    /// tokenization by the merge across it.
    Split,
}

impl Default for TokenizeOptions {
    fn default() -> Self {
        Self {
            max_seq_len: None,
            truncation: Truncation::Left,
            last_turn_only: false,
            on_error: OnBadRow::Error,
            boundary: Boundary::Strict,
        }
    }
}

/// What happened to each example; nothing is dropped without being counted here.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TokenizeReport {
    pub kept: usize,
    /// Kept, but with part of the prompt cut.
    pub truncated: usize,
    /// Dropped because the final response alone is longer than `max_seq_len`.
    pub dropped_too_long: usize,
    /// Dropped (with `OnBadRow::Skip`) because they could not be tokenized: `(location, reason)`.
    pub failed: Vec<(String, String)>,
}

impl std::fmt::Display for TokenizeReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} kept ({} truncated), {} dropped as too long, {} failed",
            self.kept,
            self.truncated,
            self.dropped_too_long,
            self.failed.len()
        )?;
        let mut reasons: BTreeMap<&str, usize> = BTreeMap::new();
        for (_, r) in &self.failed {
            *reasons.entry(r.as_str()).or_default() += 1;
        }
        for (r, n) in reasons {
            write!(f, "\n  {n} x {r}")?;
        }
        Ok(())
    }
}

/// The tokenized data set: `examples[i]` came from input example `source_index[i]`.
#[derive(Debug, Clone, Default)]
pub struct Tokenized {
    pub examples: Vec<TokenizedExample>,
    pub source_index: Vec<usize>,
    pub report: TokenizeReport,
}

enum Outcome {
    Kept(TokenizedExample, bool),
    TooLong,
}

/// Tokenizes every example in parallel; the output order is the input order.
pub fn tokenize_examples(
    examples: &[Example],
    template: &Template,
    tokenizer: &Tokenizer,
    opts: &TokenizeOptions,
) -> Result<Tokenized> {
    let results: Vec<Result<Outcome>> = examples
        .par_iter()
        .map(|ex| {
            let full = tokenize_example(ex, template, tokenizer, opts)?;
            Ok(match opts.max_seq_len {
                Some(max) => match truncate(full, max, opts.truncation) {
                    Some((t, cut)) => Outcome::Kept(t, cut),
                    None => Outcome::TooLong,
                },
                None => Outcome::Kept(full, false),
            })
        })
        .collect();
    let mut out = Tokenized::default();
    for (i, r) in results.into_iter().enumerate() {
        match r {
            Ok(Outcome::Kept(t, cut)) => {
                out.report.kept += 1;
                out.report.truncated += usize::from(cut);
                out.examples.push(t);
                out.source_index.push(i);
            }
            Ok(Outcome::TooLong) => out.report.dropped_too_long += 1,
            Err(e) => match opts.on_error {
                OnBadRow::Error => return Err(e),
                OnBadRow::Skip => {
                    let reason = match &e {
                        Error::Data(DataError::BadRow { message, .. }) => message.clone(),
                        other => other.to_string(),
                    };
                    out.report.failed.push((examples[i].location(), reason));
                }
            },
        }
    }
    Ok(out)
}

/// Tokenizes one example with `template`, classifying every token. (`opts.max_seq_len` is
/// applied by [`tokenize_examples`], not here.)
pub fn tokenize_example(
    ex: &Example,
    template: &Template,
    tokenizer: &Tokenizer,
    opts: &TokenizeOptions,
) -> Result<TokenizedExample> {
    ex.validate().map_err(|m| ex.bad(m))?;
    let rendered = template
        .render_training(ex)
        .map_err(|e| with_location(ex, e))?;
    let full: String = rendered.segments.iter().map(|s| s.text.as_str()).collect();
    let mut bounds = Vec::with_capacity(rendered.segments.len());
    let mut pos = 0;
    for s in &rendered.segments {
        pos += s.text.len();
        bounds.push((pos, s.kind));
    }
    let turn_kind = |i: usize| {
        if opts.last_turn_only && i + 1 < rendered.turns.len() {
            TokenKind::PriorAssistant
        } else {
            TokenKind::Response
        }
    };
    let enc = encode(tokenizer, &full)?;
    let ids = enc.get_ids().to_vec();
    let mut kinds: Vec<TokenKind> = enc
        .get_offsets()
        .iter()
        .map(|&(start, _)| prompt_kind_at(&bounds, start))
        .collect();
    let mut ranges = Vec::with_capacity(rendered.turns.len());
    for (start_text, end_text) in &rendered.turns {
        let start = prefix_len(tokenizer, start_text, &ids)?;
        let end = match end_text {
            Some(t) => prefix_len(tokenizer, t, &ids)?,
            None => Some(ids.len()),
        };
        match (start, end) {
            (Some(s), Some(e)) => ranges.push((s, e)),
            _ if opts.boundary == Boundary::Split => {
                return tokenize_split(ex, &rendered.turns, &full, &bounds, tokenizer, turn_kind)
            }
            _ => return Err(ex.bad(UNALIGNED).into()),
        }
    }
    for (i, (start, end)) in ranges.into_iter().enumerate() {
        if end <= start {
            return Err(ex
                .bad(format!("assistant turn {} has no tokens", i + 1))
                .into());
        }
        kinds[start..end].iter_mut().for_each(|k| *k = turn_kind(i));
    }
    Ok(TokenizedExample { ids, kinds })
}

const UNALIGNED: &str = "the tokens up to an assistant answer's start or end are not a prefix of the whole conversation's tokens (a BPE merge crosses the prompt/response boundary, e.g. a response starting with a newline), so the response cannot be located safely; `Boundary::Split` tokenizes prompt and response separately instead";

/// `Boundary::Split`: tokenize the text between every prompt/response boundary on its own and
/// concatenate, as the WIT reference code does with prompt and response.
fn tokenize_split(
    ex: &Example,
    turns: &[(String, Option<String>)],
    full: &str,
    bounds: &[(usize, TokenKind)],
    tokenizer: &Tokenizer,
    turn_kind: impl Fn(usize) -> TokenKind,
) -> Result<TokenizedExample> {
    let not_prefix = || {
        ex.bad("the template renders an earlier part of the conversation differently from the whole, so prompt and response cannot be split")
    };
    // (byte start, byte end, Some(kind) for a response piece)
    let mut pieces = Vec::new();
    let mut at = 0usize;
    for (i, (start_text, end_text)) in turns.iter().enumerate() {
        let s = start_text.len();
        let e = end_text.as_ref().map_or(full.len(), |t| t.len());
        if !full.starts_with(start_text.as_str())
            || end_text
                .as_ref()
                .is_some_and(|t| !full.starts_with(t.as_str()))
            || s < at
            || e < s
        {
            return Err(not_prefix().into());
        }
        pieces.push((at, s, None));
        pieces.push((s, e, Some(turn_kind(i))));
        at = e;
    }
    pieces.push((at, full.len(), None));
    let mut ids = Vec::new();
    let mut kinds = Vec::new();
    for (a, b, kind) in pieces {
        if a == b {
            continue;
        }
        let enc = encode(tokenizer, &full[a..b])?;
        ids.extend_from_slice(enc.get_ids());
        kinds.extend(enc.get_offsets().iter().map(|&(o, _)| match kind {
            Some(k) => k,
            None => prompt_kind_at(bounds, a + o),
        }));
    }
    Ok(TokenizedExample { ids, kinds })
}

/// The prompt kind of the segment containing byte `at` (response segments count as template:
/// response tokens are marked from the checked boundaries, never from string offsets).
fn prompt_kind_at(bounds: &[(usize, TokenKind)], at: usize) -> TokenKind {
    match bounds.iter().find(|(end, _)| at < *end) {
        Some((_, TokenKind::Response)) | None => TokenKind::Template,
        Some((_, k)) => *k,
    }
}

fn with_location(ex: &Example, e: Error) -> Error {
    match e {
        Error::Template(m) => ex.bad(format!("chat template: {m}")).into(),
        other => other,
    }
}

fn encode(tokenizer: &Tokenizer, text: &str) -> Result<tokenizers::Encoding> {
    // No BOS/EOS added: special tokens in the rendered text are still parsed as such.
    tokenizer
        .encode(text, false)
        .map_err(|e| Error::Tokenizer(e.to_string()))
}

/// Length of `text`'s tokenization if it is a prefix of the full ids.
fn prefix_len(tokenizer: &Tokenizer, text: &str, full: &[u32]) -> Result<Option<usize>> {
    let enc = encode(tokenizer, text)?;
    let p = enc.get_ids();
    Ok((p.len() <= full.len() && full[..p.len()] == *p).then_some(p.len()))
}

/// Cuts the prompt to fit `max`, keeping the final response; `None` if the final response alone
/// does not fit. The bool says whether anything was cut.
fn truncate(
    ex: TokenizedExample,
    max: usize,
    side: Truncation,
) -> Option<(TokenizedExample, bool)> {
    let n = ex.len();
    if n <= max {
        return Some((ex, false));
    }
    // The final response run starts after the last non-response token before the end run.
    let last_prompt = ex.kinds.iter().rposition(|k| *k != TokenKind::Response);
    let resp_start = match last_prompt {
        Some(i) if i + 1 < n => i + 1,
        Some(_) => return None, // no response at the end: nothing to protect sensibly
        None => 0,
    };
    if n - resp_start > max {
        return None;
    }
    let excess = n - max;
    let (ids, kinds) = match side {
        Truncation::Left => (ex.ids[excess..].to_vec(), ex.kinds[excess..].to_vec()),
        Truncation::Right => {
            let cut = resp_start - excess..resp_start;
            let keep = |v: &[u32]| {
                let mut o = v[..cut.start].to_vec();
                o.extend_from_slice(&v[cut.end..]);
                o
            };
            let mut k = ex.kinds[..cut.start].to_vec();
            k.extend_from_slice(&ex.kinds[cut.end..]);
            (keep(&ex.ids), k)
        }
    };
    Some((TokenizedExample { ids, kinds }, true))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::data::{Batch, Message, Role};
    use tokenizers::models::wordlevel::WordLevel;
    use tokenizers::pre_tokenizers::whitespace::WhitespaceSplit;
    use tokenizers::AddedToken;

    /// A word-level tokenizer over a small vocabulary: words split on whitespace (which is
    /// dropped), `<s>`, `</s>` and `<|eot|>` special. Every test vocabulary word is listed.
    pub(crate) fn word_tokenizer() -> Tokenizer {
        let words = [
            "<unk>", "<s>", "</s>", "<|eot|>", "[S]", "[U]", "[A]", "sys", "hi", "hello", "q1",
            "a1", "q2", "a2", "long", "prompt", "words", "here", "ans", "x", "y", "z",
        ];
        let vocab = words
            .iter()
            .enumerate()
            .map(|(i, w)| (w.to_string(), i as u32))
            .collect::<std::collections::HashMap<_, _>>();
        let model = WordLevel::builder()
            .vocab(vocab.into_iter().collect())
            .unk_token("<unk>".into())
            .build()
            .unwrap();
        let mut t = Tokenizer::new(model);
        t.with_pre_tokenizer(Some(WhitespaceSplit));
        t.add_special_tokens(vec![
            AddedToken::from("<s>", true),
            AddedToken::from("</s>", true),
            AddedToken::from("<|eot|>", true),
        ])
        .unwrap();
        t
    }

    /// Roles as marker words, an end-of-turn token after every message.
    pub(crate) fn word_chat() -> Template {
        let src = "{{ bos_token }}{% for m in messages %}{% if m.role == 'system' %} [S] {% elif m.role == 'user' %} [U] {% else %} [A] {% endif %}{{ m.content }} <|eot|>{% endfor %}{% if add_generation_prompt %} [A] {% endif %}";
        Template::Chat(crate::data::ChatTemplate::new(src, "<s>", "</s>").unwrap())
    }

    fn conv(msgs: &[(Role, &str)]) -> Example {
        Example {
            messages: msgs.iter().map(|(r, c)| Message::new(*r, *c)).collect(),
            reference: None,
            source_line: 7,
            source_path: Some(std::path::Path::new("conv.jsonl").into()),
            alpaca: None,
        }
    }

    use TokenKind::{PriorAssistant as P, Response as R, System as S, Template as T, User as U};

    #[test]
    fn single_turn_chat_kinds_and_weights() {
        let tok = word_tokenizer();
        let ex = conv(&[(Role::User, "hi"), (Role::Assistant, "hello")]);
        let t = tokenize_example(&ex, &word_chat(), &tok, &TokenizeOptions::default()).unwrap();
        // <s> [U] hi <|eot|> [A] hello <|eot|>
        assert_eq!(t.ids, vec![1, 5, 8, 3, 6, 9, 3]);
        assert_eq!(t.kinds, vec![U, U, U, U, T, R, R]);
        assert_eq!(t.prompt_len(), 5);
        let w = LossWeights::new(0.25, 1.0).token_weights(&t);
        assert_eq!(w, vec![0.0, 0.25, 0.25, 0.25, 0.25, 1.0, 1.0]);
    }

    #[test]
    fn system_prompt_and_per_role_weights() {
        let tok = word_tokenizer();
        let ex = conv(&[
            (Role::System, "sys"),
            (Role::User, "hi"),
            (Role::Assistant, "hello"),
        ]);
        let t = tokenize_example(&ex, &word_chat(), &tok, &TokenizeOptions::default()).unwrap();
        // <s> [S] sys <|eot|> [U] hi <|eot|> [A] hello <|eot|>
        assert_eq!(t.ids, vec![1, 4, 7, 3, 5, 8, 3, 6, 9, 3]);
        assert_eq!(t.kinds, vec![S, S, S, S, U, U, U, T, R, R]);
        let w = LossWeights {
            prompt: 0.5,
            response: 2.0,
            system: Some(0.0),
            user: Some(0.1),
        };
        assert_eq!(
            w.token_weights(&t),
            vec![0.0, 0.0, 0.0, 0.0, 0.1, 0.1, 0.1, 0.5, 2.0, 2.0]
        );
    }

    #[test]
    fn multi_turn_all_and_last_turn_only() {
        let tok = word_tokenizer();
        let ex = conv(&[
            (Role::User, "q1"),
            (Role::Assistant, "a1"),
            (Role::User, "q2"),
            (Role::Assistant, "a2"),
        ]);
        let all = tokenize_example(&ex, &word_chat(), &tok, &TokenizeOptions::default()).unwrap();
        // <s> [U] q1 <|eot|> [A] a1 <|eot|> [U] q2 <|eot|> [A] a2 <|eot|>
        assert_eq!(all.ids, vec![1, 5, 10, 3, 6, 11, 3, 5, 12, 3, 6, 13, 3]);
        assert_eq!(all.kinds, vec![U, U, U, U, T, R, R, U, U, U, T, R, R]);
        let last = tokenize_example(
            &ex,
            &word_chat(),
            &tok,
            &TokenizeOptions {
                last_turn_only: true,
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(last.kinds, vec![U, U, U, U, T, P, P, U, U, U, T, R, R]);
        assert_eq!(
            LossWeights::new(0.0, 1.0).token_weights(&last),
            vec![0.0, 0., 0., 0., 0., 0., 0., 0., 0., 0., 0., 1., 1.]
        );
    }

    #[test]
    fn alpaca_and_raw_kinds() {
        let tok = word_tokenizer();
        let ex = conv(&[(Role::User, "hi"), (Role::Assistant, "hello")]);
        let raw = tokenize_example(
            &ex,
            &Template::raw("</s>"),
            &tok,
            &TokenizeOptions::default(),
        )
        .unwrap();
        // "hi hello</s>" -> hi hello </s>
        assert_eq!(raw.ids, vec![8, 9, 2]);
        assert_eq!(raw.kinds, vec![U, R, R]);
        let alp = tokenize_example(
            &ex,
            &Template::alpaca("</s>"),
            &tok,
            &TokenizeOptions::default(),
        )
        .unwrap();
        // The preamble words are unknown to the word vocabulary (<unk>) but still Template.
        let n = alp.len();
        assert_eq!(&alp.ids[n - 2..], &[9, 2]);
        assert_eq!(&alp.kinds[n - 2..], &[R, R]);
        assert!(alp.kinds[..n - 2].contains(&U));
        assert_eq!(alp.kinds[0], T);
        let sys = conv(&[
            (Role::System, "sys"),
            (Role::User, "hi"),
            (Role::Assistant, "hello"),
        ]);
        let err = tokenize_example(
            &sys,
            &Template::alpaca("</s>"),
            &tok,
            &TokenizeOptions::default(),
        )
        .unwrap_err();
        assert!(err.to_string().starts_with("conv.jsonl:7:"), "{err}");
    }

    #[test]
    fn alpaca_input_is_user_and_preamble_is_template() {
        let tok = word_tokenizer();
        let mut ex = conv(&[(Role::User, "q1\n\nx"), (Role::Assistant, "a1")]);
        ex.alpaca = Some(crate::data::AlpacaFields {
            instruction: "q1".into(),
            input: Some("x".into()),
        });
        let t =
            tokenize_example(&ex, &Template::alpaca("</s>"), &tok, &Default::default()).unwrap();
        let user: Vec<u32> = t
            .ids
            .iter()
            .zip(&t.kinds)
            .filter(|(_, k)| **k == U)
            .map(|(i, _)| *i)
            .collect();
        assert_eq!(user, vec![10, 19]); // q1, x
        assert_eq!(t.response_tokens(), 2); // a1 </s>
        assert!(t.kinds[..t.prompt_len()].iter().all(|k| *k == U || *k == T));
    }

    #[test]
    fn truncation_left_right_and_drop() {
        let tok = word_tokenizer();
        let ex = conv(&[
            (Role::User, "long prompt words here"),
            (Role::Assistant, "ans"),
        ]);
        let t = tokenize_example(&ex, &word_chat(), &tok, &TokenizeOptions::default()).unwrap();
        // <s> [U] long prompt words here <|eot|> [A] ans <|eot|>
        assert_eq!(t.len(), 10);
        let (l, cut) = truncate(t.clone(), 6, Truncation::Left).unwrap();
        assert!(cut);
        assert_eq!(l.ids, vec![16, 17, 3, 6, 18, 3]);
        assert_eq!(l.kinds, vec![U, U, U, T, R, R]);
        let (r, _) = truncate(t.clone(), 6, Truncation::Right).unwrap();
        // keeps <s> [U] long prompt, cuts words here <|eot|> [A]
        assert_eq!(r.ids, vec![1, 5, 14, 15, 18, 3]);
        assert_eq!(r.kinds, vec![U, U, U, U, R, R]);
        assert!(truncate(t.clone(), 1, Truncation::Left).is_none());
        let (same, cut) = truncate(t.clone(), 10, Truncation::Left).unwrap();
        assert!(!cut);
        assert_eq!(same, t);
    }

    #[test]
    fn tokenize_all_reports_and_keeps_order() {
        let tok = word_tokenizer();
        let exs = vec![
            conv(&[(Role::User, "hi"), (Role::Assistant, "hello")]),
            conv(&[
                (Role::User, "long prompt words here"),
                (Role::Assistant, "ans"),
            ]),
            conv(&[(Role::User, "hi"), (Role::Assistant, "x y z x y z x y z")]),
            conv(&[(Role::Assistant, "x"), (Role::User, "hi")]),
        ];
        let opts = TokenizeOptions {
            max_seq_len: Some(8),
            on_error: OnBadRow::Skip,
            ..Default::default()
        };
        let out = tokenize_examples(&exs, &word_chat(), &tok, &opts).unwrap();
        assert_eq!(out.source_index, vec![0, 1]);
        assert_eq!(out.report.kept, 2);
        assert_eq!(out.report.truncated, 1);
        assert_eq!(out.report.dropped_too_long, 1);
        assert_eq!(out.report.failed.len(), 1);
        assert_eq!(out.report.failed[0].0, "conv.jsonl:7");
        let strict = TokenizeOptions {
            on_error: OnBadRow::Error,
            ..opts
        };
        let err = tokenize_examples(&exs, &word_chat(), &tok, &strict).unwrap_err();
        assert!(
            err.to_string().contains("conv.jsonl:7: wrong role order"),
            "{err}"
        );
    }

    /// The real SmolLM2 tokenizer and chat template, or `None` (skipped loudly) without the model.
    fn smollm() -> Option<(Tokenizer, Template)> {
        let content = crate::tokenizer::tests::smollm_content()?;
        let tok = crate::tokenizer::tokenizer_from_gguf(&content).unwrap();
        let t = crate::data::ChatTemplate::from_gguf(&content)
            .unwrap()
            .unwrap();
        Some((tok, Template::Chat(t)))
    }

    #[test]
    fn reference_batch_is_reproduced() {
        let Some((tok, chat)) = smollm() else { return };
        let Some(r) = crate::tokenizer::tests::reference("lora_loss.json") else {
            return;
        };
        let b = &r["batch"];
        let ex1 = Example::single_turn(
            "What is the capital of France?",
            "The capital of France is Paris.",
        );
        let ex2 = Example::single_turn("Sort the words: pear apple fig", "apple fig pear");
        let t1 = tokenize_example(&ex1, &chat, &tok, &TokenizeOptions::default()).unwrap();
        let t2 = tokenize_example(
            &ex2,
            &Template::alpaca("<|im_end|>"),
            &tok,
            &TokenizeOptions::default(),
        )
        .unwrap();
        let seq_lens: Vec<usize> = serde_json::from_value(b["seq_lens"].clone()).unwrap();
        let prompt_lens: Vec<usize> = serde_json::from_value(b["prompt_lens"].clone()).unwrap();
        let rows: Vec<Vec<u32>> = serde_json::from_value(b["input_ids"].clone()).unwrap();
        for (i, t) in [&t1, &t2].into_iter().enumerate() {
            assert_eq!(t.ids, rows[i][..seq_lens[i]], "example {}", i + 1);
            assert_eq!(t.prompt_len(), prompt_lens[i], "example {}", i + 1);
            assert_eq!(t.response_tokens(), seq_lens[i] - prompt_lens[i]);
        }
        let pad = b["pad_id"].as_u64().unwrap() as u32;
        let batch = Batch::new(&[&t1, &t2], &LossWeights::new(0.25, 1.0), pad);
        assert_eq!(batch.ids, rows.concat());
        assert_eq!(batch.seq_lens, seq_lens);
        for (row, (&n, &p)) in seq_lens.iter().zip(&prompt_lens).enumerate() {
            for t in 0..batch.seq_len {
                let want = if t == 0 || t >= n {
                    0.0
                } else if t < p {
                    0.25
                } else {
                    1.0
                };
                assert_eq!(
                    batch.weights[row * batch.seq_len + t],
                    want,
                    "row {row} t {t}"
                );
            }
        }
    }

    #[test]
    fn real_chat_data_tokenizes_with_smollm_template() {
        let Some((tok, chat)) = smollm() else { return };
        let path = std::path::Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../shared/data/lima_data.jsonl"
        ));
        if !path.exists() {
            eprintln!("SKIPPED: {} is absent", path.display());
            return;
        }
        let (exs, _) = crate::data::load_examples(path, &Default::default()).unwrap();
        let strict = TokenizeOptions {
            max_seq_len: Some(1024),
            on_error: OnBadRow::Skip,
            ..Default::default()
        };
        let out = tokenize_examples(&exs, &chat, &tok, &strict).unwrap();
        eprintln!("LIMA, strict boundary: {}", out.report);
        assert!(out.report.failed.iter().all(|(_, r)| r == UNALIGNED));
        let opts = TokenizeOptions {
            boundary: Boundary::Split,
            on_error: OnBadRow::Error,
            ..strict
        };
        let out = tokenize_examples(&exs, &chat, &tok, &opts).unwrap();
        eprintln!("LIMA, split boundary: {}", out.report);
        assert_eq!(out.report.kept + out.report.dropped_too_long, exs.len());
        assert!(out.report.truncated > 0, "{}", out.report);
        for t in &out.examples {
            assert!(t.len() <= 1024 && t.response_tokens() > 0);
            assert_eq!(*t.kinds.last().unwrap(), TokenKind::Response);
        }
        // Multi-turn rows train every assistant turn: several response runs.
        let multi = out
            .source_index
            .iter()
            .position(|&i| exs[i].messages.len() > 2)
            .unwrap();
        let t = &out.examples[multi];
        let runs = t
            .kinds
            .windows(2)
            .filter(|w| w[0] != TokenKind::Response && w[1] == TokenKind::Response)
            .count();
        assert!(runs >= 1);
    }

    #[test]
    fn merge_across_boundary_is_strict_error_or_split() {
        let Some((tok, chat)) = smollm() else { return };
        let mut ex = Example::single_turn("Hi", "\n\nHello");
        ex.source_path = Some(std::path::Path::new("x.jsonl").into());
        ex.source_line = 3;
        let err = tokenize_example(&ex, &chat, &tok, &TokenizeOptions::default()).unwrap_err();
        assert!(
            err.to_string().starts_with("x.jsonl:3: the tokens up to"),
            "{err}"
        );
        let split = TokenizeOptions {
            boundary: Boundary::Split,
            ..Default::default()
        };
        let t = tokenize_example(&ex, &chat, &tok, &split).unwrap();
        let prompt = chat.render_prompt(&ex).unwrap();
        let p = tok.encode(prompt.as_str(), false).unwrap();
        let r = tok.encode("\n\nHello<|im_end|>\n", false).unwrap();
        assert_eq!(t.ids, [p.get_ids(), r.get_ids()].concat());
        assert_eq!(t.prompt_len(), p.len());
        assert_eq!(t.response_tokens(), r.len());
    }
}
