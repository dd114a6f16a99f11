//! `nltk.word_tokenize` (Punkt sentences, then `NLTKWordTokenizer`) as in nltk 3.10.4,
//! for `change_case:capital_word_frequency`, which counts its upper-case tokens: how
//! contractions and punctuation are split decides the count (`CAN'T` is `CA` + `N'T`).
//!
//! nltk 3.10.3+ compiles these patterns with the `regex` module (Rust's `\w`, `\s`,
//! `\b`), except the contraction patterns, which still use the standard `re` module and
//! so get Python's `\w`/`\b`/`\s`; both are kept apart below.

use std::sync::LazyLock;

use fancy_regex::Regex as FancyRegex;
use regex::Regex;

use super::{punkt, pyre, pystr};

/// A substitution step: the pattern and its replacement (`$n` for Python's `\n`).
struct Step {
    re: Regex,
    rep: &'static str,
}

fn step(pattern: &str, rep: &'static str) -> Step {
    Step {
        re: Regex::new(pattern).expect("constant regex"),
        rep,
    }
}

struct FancyStep {
    re: FancyRegex,
    rep: &'static str,
}

fn fancy_step(pattern: &str, rep: &'static str) -> FancyStep {
    FancyStep {
        re: FancyRegex::new(pattern).expect("constant regex"),
        rep,
    }
}

struct Tables {
    starting_quotes: Vec<Step>,
    /// The apostrophe rule of `STARTING_QUOTES` needs look-around.
    opening_apostrophe: FancyStep,
    punctuation_head: Vec<Step>,
    /// `([:,])$`: Python's `$` also matches before a final newline.
    final_colon_comma: FancyStep,
    punctuation_tail: Vec<Step>,
    ending_quotes: Vec<Step>,
    contractions: Vec<FancyStep>,
}

static TABLES: LazyLock<Tables> = LazyLock::new(|| {
    // Python `re` (not `regex`) semantics for the contraction patterns.
    let w = pyre::WORD_BODY;
    let not_before = format!("(?<![{w}])");
    let not_after = format!("(?![{w}])");
    let contraction = |a: &str, b: &str| {
        fancy_step(
            &format!("(?i){not_before}({a})({b}){not_after}"),
            " ${1} ${2} ",
        )
    };
    let mut contractions = vec![
        contraction("can", "not"),
        contraction("d", "'ye"),
        contraction("gim", "me"),
        contraction("gon", "na"),
        contraction("got", "ta"),
        contraction("lem", "me"),
        contraction("more", "'n"),
        fancy_step(
            &format!("(?i){not_before}(wan)(na)(?=[{}])", pyre::SPACE_BODY),
            " ${1} ${2} ",
        ),
    ];
    contractions.push(fancy_step(
        &format!("(?i) ('t)(is){not_after}"),
        " ${1} ${2} ",
    ));
    contractions.push(fancy_step(
        &format!("(?i) ('t)(was){not_after}"),
        " ${1} ${2} ",
    ));

    Tables {
        starting_quotes: vec![
            step("([«“‘„]|`+)", " ${1} "),
            step(r#"^""#, "``"),
            step("(``)", " ${1} "),
            step(r#"([ (\[{<])("|'{2})"#, "${1} `` "),
        ],
        opening_apostrophe: fancy_step(
            r"(?i)(?<!\w)(')(?!(?:re|ve|ll|m|t|s|d|n)\b)(?=\w)",
            "${1} ",
        ),
        punctuation_head: vec![
            // Possessive in nltk; the backtracking cannot change the outcome here.
            step(r#"([^.])(\.)([\])}>"'»”’ ]*)\s*\z"#, "${1} ${2} ${3} "),
            step(r"([:,])([^\d])", " ${1} ${2}"),
        ],
        final_colon_comma: fancy_step(r"([:,])(?=\n?\z)", " ${1} "),
        punctuation_tail: vec![
            step(r"\.{2,}", " ${0} "),
            step(r"[;@#$%&]", " ${0} "),
            step("[\u{2012}-\u{2015}]", " ${0} "),
            step(r#"([^.])(\.)([\])}>"']*)\s*\z"#, "${1} ${2}${3} "),
            step(r"[?!]", " ${0} "),
            step(r"([^'])' ", "${1} ' "),
            step(r"[*]", " ${0} "),
            // PARENS_BRACKETS and DOUBLE_DASHES run right after.
            step(r"[\]\[(){}<>]", " ${0} "),
            step("--", " -- "),
        ],
        ending_quotes: vec![
            step("([»”’])", " ${1} "),
            step("''", " '' "),
            step("\"", " '' "),
            step(r"\s+", " "),
            step(r"([^' ])('[sS]|'[mM]|'[dD]|') ", "${1} ${2} "),
            step(r"([^' ])('ll|'LL|'re|'RE|'ve|'VE|n't|N'T) ", "${1} ${2} "),
        ],
        contractions,
    }
});

fn apply(steps: &[Step], mut text: String) -> String {
    for s in steps {
        text = s.re.replace_all(&text, s.rep).into_owned();
    }
    text
}

/// A fancy substitution; these patterns look at most one character around, so the
/// backtracking limit cannot be reached, and the text is left as is if it were.
fn apply_fancy(s: &FancyStep, text: String) -> String {
    match s.re.try_replacen(&text, 0, s.rep) {
        Ok(out) => out.into_owned(),
        Err(_) => text,
    }
}

/// `NLTKWordTokenizer().tokenize(sentence)`.
fn tokenize_sentence(sentence: &str) -> Vec<String> {
    let t = &*TABLES;
    let mut text = apply(&t.starting_quotes, sentence.to_string());
    text = apply_fancy(&t.opening_apostrophe, text);
    text = apply(&t.punctuation_head, text);
    text = apply_fancy(&t.final_colon_comma, text);
    text = apply(&t.punctuation_tail, text);
    text = format!(" {text} ");
    text = apply(&t.ending_quotes, text);
    for c in &t.contractions {
        text = apply_fancy(c, text);
    }
    pystr::split_ws(&text).map(str::to_string).collect()
}

/// `nltk.word_tokenize(text)` with English Punkt.
pub(crate) fn word_tokenize(text: &str) -> Vec<String> {
    punkt::sent_tokenize(text)
        .iter()
        .flat_map(|s| tokenize_sentence(s))
        .collect()
}
