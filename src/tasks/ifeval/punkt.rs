//! NLTK's Punkt sentence tokenizer, tokenization path only, with NLTK's pretrained
//! English parameters. `length_constraints:number_sentences` counts its sentences and
//! `nltk.word_tokenize` (for `change_case:capital_word_frequency`) splits on them, and
//! no maintained Rust crate reproduces NLTK's splits, so this ports
//! `nltk/tokenize/punkt.py` of nltk 3.10.4 line by line.
//!
//! Since nltk 3.10.3 every NLTK regex runs on the third-party `regex` module, whose
//! `\s`, `\S`, `\w` and `\d` are Unicode's (White_Space; Alphabetic, marks, Nd, Pc,
//! Join_Control; Nd), i.e. Rust's `char::is_whitespace` and `regex` classes. The few
//! plain `str` operations (`strip`, `rstrip`, `string.whitespace`) keep Python's meaning.
//!
//! `punkt_english.json` holds NLTK's `punkt_tab/english` parameters (156 abbreviation
//! types, 37 collocations, 39 sentence starters, 20,366 orthographic contexts), which are
//! those of the older `punkt/english.pickle`: the harness loads the pickle's name, and
//! nltk 3.9+ serves it from `punkt_tab`. Trained by Kiss and Strunk; redistributed by NLTK.

use std::collections::{HashMap, HashSet};
use std::sync::LazyLock;

use regex::Regex;
use serde::Deserialize;

use super::pystr;

const ORTHO_BEG_UC: u32 = 1 << 1;
const ORTHO_MID_UC: u32 = 1 << 2;
const ORTHO_UNK_UC: u32 = 1 << 3;
const ORTHO_BEG_LC: u32 = 1 << 4;
const ORTHO_MID_LC: u32 = 1 << 5;
const ORTHO_UNK_LC: u32 = 1 << 6;
const ORTHO_UC: u32 = ORTHO_BEG_UC | ORTHO_MID_UC | ORTHO_UNK_UC;
const ORTHO_LC: u32 = ORTHO_BEG_LC | ORTHO_MID_LC | ORTHO_UNK_LC;

#[derive(Deserialize, Default)]
pub(crate) struct Params {
    pub(crate) abbrev_types: HashSet<String>,
    pub(crate) collocations: HashSet<(String, String)>,
    pub(crate) sent_starters: HashSet<String>,
    pub(crate) ortho_context: HashMap<String, u32>,
}

/// The English model. The file is ours and a test checks its size, so a parse failure
/// (impossible short of a corrupted checkout) degrades to empty parameters, not a panic.
pub(crate) static ENGLISH: LazyLock<Params> =
    LazyLock::new(|| serde_json::from_str(include_str!("punkt_english.json")).unwrap_or_default());

/// `PunktToken._RE_NUMERIC`, applied to the lowercased token.
static RE_NUMERIC: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"\A-?[.,]?\d[\d,.\-]*\.?\z").expect("constant regex"));

/// `PunktToken._RE_INITIAL` (`[^\W\d]\.$` with `match`).
static RE_INITIAL: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"\A[^\W\d]\.\z").expect("constant regex"));

/// `PunktLanguageVars.sent_end_chars`.
fn is_sent_end(c: char) -> bool {
    matches!(c, '.' | '?' | '!')
}

/// The curly and angle quotes ‘ ’ “ ” « », which `_re_non_word_chars` and
/// `re_boundary_realignment` both include.
fn is_curly_or_angle_quote(c: char) -> bool {
    matches!(
        c,
        '\u{2018}' | '\u{2019}' | '\u{201C}' | '\u{201D}' | '\u{AB}' | '\u{BB}'
    )
}

/// `_re_non_word_chars` (nltk 3.10.2+ added the curly and angle quotes).
fn is_non_word(c: char) -> bool {
    is_curly_or_angle_quote(c)
        || matches!(
            c,
            ')' | '"' | ';' | '}' | ']' | '*' | ':' | '@' | '\'' | '(' | '{' | '[' | '?' | '!'
        )
}

/// Characters `_re_word_start` keeps from starting a word token.
fn is_not_word_start(c: char) -> bool {
    matches!(
        c,
        '(' | '"'
            | '`'
            | '{'
            | '['
            | ':'
            | ';'
            | '&'
            | '#'
            | '*'
            | '@'
            | ')'
            | '}'
            | ']'
            | '-'
            | ','
    )
}

/// Closing characters of `re_boundary_realignment`.
fn is_realign_closer(c: char) -> bool {
    is_curly_or_angle_quote(c) || matches!(c, '"' | '\'' | ')' | ']' | '}')
}

/// `\s` of the `regex` module.
fn ws(c: char) -> bool {
    c.is_whitespace()
}

/// `_re_multi_char_punct` (`\-{2,}|\.{2,}|(?:\.\s){2,}\.`) anchored at `j`: its end.
fn multi_char_at(s: &[char], j: usize) -> Option<usize> {
    let at = |k: usize| s.get(k).copied();
    if at(j) == Some('-') && at(j + 1) == Some('-') {
        let mut k = j + 2;
        while at(k) == Some('-') {
            k += 1;
        }
        return Some(k);
    }
    if at(j) == Some('.') && at(j + 1) == Some('.') {
        let mut k = j + 2;
        while at(k) == Some('.') {
            k += 1;
        }
        return Some(k);
    }
    let mut pairs = 0;
    while at(j + 2 * pairs) == Some('.') && at(j + 2 * pairs + 1).is_some_and(ws) {
        pairs += 1;
    }
    // Greedy pairs, then back off one pair at a time until a final period follows.
    (2..=pairs)
        .rev()
        .find(|&p| at(j + 2 * p) == Some('.'))
        .map(|p| j + 2 * p + 1)
}

/// The lookahead that ends a `\S+?` word in `_word_tokenize_fmt`.
fn word_ends_at(s: &[char], j: usize) -> bool {
    let Some(&c) = s.get(j) else { return true };
    if ws(c) || is_non_word(c) || multi_char_at(s, j).is_some() {
        return true;
    }
    c == ','
        && match s.get(j + 1) {
            None => true,
            Some(&n) => ws(n) || is_non_word(n) || multi_char_at(s, j + 1).is_some(),
        }
}

/// `PunktLanguageVars.word_tokenize`: `findall` of `_word_tokenize_fmt` on one line.
fn punkt_word_tokenize(line: &[char]) -> Vec<String> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < line.len() {
        if let Some(end) = multi_char_at(line, i) {
            out.push(line[i..end].iter().collect());
            i = end;
            continue;
        }
        let c = line[i];
        if ws(c) {
            i += 1;
            continue;
        }
        if is_not_word_start(c) {
            out.push(c.to_string());
            i += 1;
            continue;
        }
        // Lazy `\S+?`: the lookahead holds at the latest where the non-space run ends.
        let mut j = i + 1;
        while !word_ends_at(line, j) {
            j += 1;
        }
        out.push(line[i..j].iter().collect());
        i = j;
    }
    out
}

/// `PunktToken` with the annotations the tokenizer reads.
struct Token {
    tok: String,
    typ: String,
    period_final: bool,
    sentbreak: bool,
    abbr: bool,
    ellipsis: bool,
}

impl Token {
    fn new(tok: String) -> Self {
        let lower = pystr::lower(&tok);
        let typ = if RE_NUMERIC.is_match(&lower) {
            "##number##".to_string()
        } else {
            lower
        };
        let period_final = tok.ends_with('.');
        Token {
            tok,
            typ,
            period_final,
            sentbreak: false,
            abbr: false,
            ellipsis: false,
        }
    }

    fn type_no_period(&self) -> &str {
        if self.typ.chars().count() > 1 && self.typ.ends_with('.') {
            &self.typ[..self.typ.len() - 1]
        } else {
            &self.typ
        }
    }

    fn type_no_sentperiod(&self) -> &str {
        if self.sentbreak {
            self.type_no_period()
        } else {
            &self.typ
        }
    }

    fn first_upper(&self) -> bool {
        self.tok.chars().next().is_some_and(pystr::char_isupper)
    }

    fn first_lower(&self) -> bool {
        self.tok.chars().next().is_some_and(pystr::char_islower)
    }

    fn is_ellipsis(&self) -> bool {
        self.tok.len() >= 2 && self.tok.chars().all(|c| c == '.')
    }

    fn is_initial(&self) -> bool {
        RE_INITIAL.is_match(&self.tok)
    }
}

/// `_tokenize_words`: lines that are blank after `strip()` only mark paragraphs, which
/// tokenization ignores.
fn tokenize_words(text: &str) -> Vec<Token> {
    let mut out = Vec::new();
    for line in text.split('\n') {
        if !pystr::strip(line).is_empty() {
            let chars: Vec<char> = line.chars().collect();
            out.extend(punkt_word_tokenize(&chars).into_iter().map(Token::new));
        }
    }
    out
}

/// `_first_pass_annotation`.
fn first_pass(tok: &mut Token, params: &Params) {
    let t = tok.tok.as_str();
    if t == "." || t == "?" || t == "!" {
        tok.sentbreak = true;
    } else if tok.is_ellipsis() {
        tok.ellipsis = true;
    } else if tok.period_final && !t.ends_with("..") {
        let stem = pystr::lower(&t[..t.len() - 1]);
        let last_part = stem.rsplit('-').next().unwrap_or("");
        if params.abbrev_types.contains(&stem) || params.abbrev_types.contains(last_part) {
            tok.abbr = true;
        } else {
            tok.sentbreak = true;
        }
    }
}

#[derive(PartialEq)]
enum Ortho {
    Starter,
    NotStarter,
    Unknown,
}

/// `_ortho_heuristic`.
fn ortho_heuristic(tok: &Token, params: &Params) -> Ortho {
    if matches!(tok.tok.as_str(), ";" | ":" | "," | "." | "!" | "?") {
        return Ortho::NotStarter;
    }
    let ctx = params
        .ortho_context
        .get(tok.type_no_sentperiod())
        .copied()
        .unwrap_or(0);
    if tok.first_upper() && ctx & ORTHO_LC != 0 && ctx & ORTHO_MID_UC == 0 {
        return Ortho::Starter;
    }
    if tok.first_lower() && (ctx & ORTHO_UC != 0 || ctx & ORTHO_BEG_LC == 0) {
        return Ortho::NotStarter;
    }
    Ortho::Unknown
}

/// `_second_pass_annotation` of `tok1` given its successor.
fn second_pass(tok1: &mut Token, tok2: &Token, params: &Params) {
    if !tok1.period_final {
        return;
    }
    let typ = tok1.type_no_period().to_string();
    let next_typ = tok2.type_no_sentperiod();
    let is_initial = tok1.is_initial();
    if params
        .collocations
        .contains(&(typ.clone(), next_typ.to_string()))
    {
        tok1.sentbreak = false;
        tok1.abbr = true;
        return;
    }
    if (tok1.abbr || tok1.ellipsis) && !is_initial {
        if ortho_heuristic(tok2, params) == Ortho::Starter {
            tok1.sentbreak = true;
            return;
        }
        if tok2.first_upper() && params.sent_starters.contains(next_typ) {
            tok1.sentbreak = true;
            return;
        }
    }
    if is_initial || typ == "##number##" {
        let starter = ortho_heuristic(tok2, params);
        if starter == Ortho::NotStarter {
            tok1.sentbreak = false;
            tok1.abbr = true;
            return;
        }
        let next_ctx = params.ortho_context.get(next_typ).copied().unwrap_or(0);
        if starter == Ortho::Unknown && is_initial && tok2.first_upper() && next_ctx & ORTHO_LC == 0
        {
            tok1.sentbreak = false;
            tok1.abbr = true;
        }
    }
}

/// `text_contains_sentbreak`: a sentence break with a token after it.
fn text_contains_sentbreak(text: &str, params: &Params) -> bool {
    let mut toks = tokenize_words(text);
    for t in toks.iter_mut() {
        first_pass(t, params);
    }
    for i in 0..toks.len() {
        if i + 1 < toks.len() {
            let (head, tail) = toks.split_at_mut(i + 1);
            second_pass(&mut head[i], &tail[0], params);
        }
        // Python returns once a token follows a break, i.e. a break that is not last.
        if toks[i].sentbreak && i + 1 < toks.len() {
            return true;
        }
    }
    false
}

/// A match of `period_context_re`: the end character and its lookahead groups.
struct EndContext {
    start: usize,
    after_end: usize,
    next_tok: Option<usize>,
}

/// `period_context_re().finditer`: every sentence-end character followed by a non-word
/// character, or by whitespace and a token.
fn period_contexts(s: &[char]) -> Vec<EndContext> {
    let mut out = Vec::new();
    for i in 0..s.len() {
        if !is_sent_end(s[i]) {
            continue;
        }
        match s.get(i + 1) {
            Some(&c) if is_non_word(c) => out.push(EndContext {
                start: i,
                after_end: i + 2,
                next_tok: None,
            }),
            Some(&c) if ws(c) => {
                let mut j = i + 1;
                while j < s.len() && ws(s[j]) {
                    j += 1;
                }
                if j < s.len() {
                    let mut k = j;
                    while k < s.len() && !ws(s[k]) {
                        k += 1;
                    }
                    out.push(EndContext {
                        start: i,
                        after_end: k,
                        next_tok: Some(j),
                    });
                }
            }
            _ => {}
        }
    }
    out
}

fn sub(s: &[char], start: usize, end: usize) -> String {
    let end = end.min(s.len());
    if start >= end {
        return String::new();
    }
    s[start..end].iter().collect()
}

/// `_get_last_whitespace_index`: `string.whitespace` is ASCII only; 0 when none.
fn last_ascii_ws_index(s: &[char], start: usize, end: usize) -> usize {
    let end = end.min(s.len());
    (start..end)
        .rev()
        .find(|&k| matches!(s[k], ' ' | '\t' | '\n' | '\r' | '\u{b}' | '\u{c}'))
        .map_or(0, |k| k - start)
}

/// `_match_potential_end_contexts` followed by `_slices_from_text`.
fn slices_from_text(s: &[char], params: &Params) -> Vec<(usize, usize)> {
    let mut contexts: Vec<(usize, String)> = Vec::new();
    let mut prev_slice = (0usize, 0usize);
    let mut prev_match: Option<usize> = None;
    let matches = period_contexts(s);
    let context_of = |slice: (usize, usize), m: &EndContext| {
        let mut text = sub(s, slice.0, slice.1);
        text.push_str(&sub(s, m.start, m.after_end));
        text
    };
    for (idx, m) in matches.iter().enumerate() {
        let before_start = prev_slice.1;
        let index = if before_start < m.start {
            last_ascii_ws_index(s, before_start, m.start)
        } else {
            0
        };
        let word_start = if index != 0 {
            index + prev_slice.1 + 1
        } else {
            prev_slice.0
        };
        let word_slice = (word_start, m.start);
        if let Some(p) = prev_match {
            if prev_slice.1 <= word_slice.0 {
                contexts.push((p, context_of(prev_slice, &matches[p])));
            }
        }
        prev_match = Some(idx);
        prev_slice = word_slice;
    }
    if let Some(p) = prev_match {
        contexts.push((p, context_of(prev_slice, &matches[p])));
    }

    let mut slices = Vec::new();
    let mut last_break = 0;
    for (p, context) in contexts {
        if text_contains_sentbreak(&context, params) {
            let m = &matches[p];
            slices.push((last_break, m.start + 1));
            last_break = m.next_tok.unwrap_or(m.start + 1);
        }
    }
    let text: String = s.iter().collect();
    slices.push((last_break, pystr::rstrip(&text).chars().count()));
    slices
}

/// `re_boundary_realignment.match` on a sentence: closing quotes or brackets (lazily)
/// followed by whitespace, `--` or the end. Returns (closers, match length).
fn realignment(sentence: &[char]) -> Option<(usize, usize)> {
    let mut k = 0;
    while k < sentence.len() && is_realign_closer(sentence[k]) {
        k += 1;
        match sentence.get(k) {
            None => return Some((k, k)),
            Some(&c) if ws(c) => {
                let mut end = k;
                while end < sentence.len() && ws(sentence[end]) {
                    end += 1;
                }
                return Some((k, end));
            }
            Some('-') if sentence.get(k + 1) == Some(&'-') => return Some((k, k)),
            _ => {}
        }
    }
    None
}

/// `_realign_boundaries`.
fn realign_boundaries(s: &[char], slices: &[(usize, usize)]) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut realign = 0;
    for (idx, &(start, end)) in slices.iter().enumerate() {
        let s1 = (start + realign, end);
        let nonempty = s1.0 < s1.1.min(s.len());
        let Some(&(s2_start, s2_end)) = slices.get(idx + 1) else {
            if nonempty {
                out.push(s1);
            }
            continue;
        };
        let s2: Vec<char> = sub(s, s2_start, s2_end).chars().collect();
        if let Some((closers, len)) = realignment(&s2) {
            out.push((s1.0, s2_start + closers));
            realign = len;
        } else {
            realign = 0;
            if nonempty {
                out.push(s1);
            }
        }
    }
    out
}

/// `PunktSentenceTokenizer.tokenize(text)` with the English parameters.
pub(crate) fn sent_tokenize(text: &str) -> Vec<String> {
    let params = &*ENGLISH;
    let chars: Vec<char> = text.chars().collect();
    let slices = slices_from_text(&chars, params);
    realign_boundaries(&chars, &slices)
        .into_iter()
        .map(|(start, end)| sub(&chars, start, end))
        .collect()
}
