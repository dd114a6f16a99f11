//! The 25 registered IFEval instruction checkers of lm-evaluation-harness
//! (`instructions.py`): how each one reads its kwargs (`build_description`) and judges a
//! response (`check_following`), kept in the harness's order and with its quirks.

use std::sync::LazyLock;

use regex::Regex;
use serde_json::{Map, Value};

use super::pyre::{PyRegex, PY_S};
use super::{punkt, pyjson, pystr, word_tokenize, IfevalError};

/// `instructions_util.LANGUAGE_CODES`: `build_description` looks the code up there,
/// so any other code is a `KeyError` in the harness.
pub(crate) const LANGUAGE_CODES: &[&str] = &[
    "en", "es", "pt", "ar", "hi", "fr", "ru", "de", "ja", "it", "bn", "uk", "th", "ur", "ta", "te",
    "bg", "ko", "pl", "he", "fa", "vi", "ne", "sw", "kn", "mr", "gu", "pa", "ml", "fi",
];

/// `_CONSTRAINED_RESPONSE_OPTIONS`.
const CONSTRAINED_RESPONSES: [&str; 3] = [
    "My answer is yes.",
    "My answer is no.",
    "My answer is maybe.",
];

/// `_COMPARISON_RELATION`.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Relation {
    LessThan,
    AtLeast,
}

impl Relation {
    fn holds(self, count: usize, threshold: f64) -> bool {
        let count = count as f64;
        match self {
            Relation::LessThan => count < threshold,
            Relation::AtLeast => count >= threshold,
        }
    }
}

/// An instruction with its arguments resolved, ready to judge responses.
#[derive(Debug)]
pub(crate) enum Kind {
    KeywordExistence(Vec<PyRegex>),
    KeywordFrequency {
        keyword: PyRegex,
        frequency: f64,
        relation: Relation,
    },
    ForbiddenWords(Vec<PyRegex>),
    LetterFrequency {
        letter: char,
        frequency: f64,
        relation: Relation,
    },
    ResponseLanguage(String),
    NumberSentences {
        num: f64,
        relation: Relation,
    },
    NumberParagraphs(f64),
    NumberWords {
        num: f64,
        relation: Relation,
    },
    NthParagraphFirstWord {
        num_paragraphs: f64,
        nth: usize,
        first_word: String,
    },
    Placeholders(f64),
    Postscript(PyRegex),
    BulletLists(f64),
    ConstrainedResponse,
    Highlights(f64),
    Sections {
        splitter: PyRegex,
        num: f64,
    },
    Json,
    Title,
    TwoResponses,
    RepeatPrompt(String),
    EndPhrase(String),
    CapitalWordFrequency {
        frequency: f64,
        relation: Relation,
    },
    EnglishCapital,
    EnglishLowercase,
    NoComma,
    Quotation,
}

#[derive(Debug)]
pub(crate) struct Instruction {
    pub(crate) id: &'static str,
    pub(crate) kind: Kind,
}

/// Python truthiness of a JSON value, for `{k: v for k, v in kwargs.items() if v}`.
fn truthy(v: &Value) -> bool {
    match v {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64().is_some_and(|x| x != 0.0),
        Value::String(s) => !s.is_empty(),
        Value::Array(a) => !a.is_empty(),
        Value::Object(o) => !o.is_empty(),
    }
}

/// Reads the cleaned kwargs of one instruction and remembers which it consumed.
struct Args {
    id: &'static str,
    kw: Map<String, Value>,
}

impl Args {
    fn missing(&self, name: &str) -> IfevalError {
        IfevalError::MissingKwarg {
            instruction: self.id.to_string(),
            kwarg: name.to_string(),
        }
    }

    fn bad(&self, name: &str, reason: &str) -> IfevalError {
        IfevalError::BadKwarg {
            instruction: self.id.to_string(),
            kwarg: name.to_string(),
            reason: reason.to_string(),
        }
    }

    fn get(&self, name: &str) -> Option<&Value> {
        self.kw.get(name)
    }

    /// A number as Python sees it (`True` is 1); `None` when dropped or absent.
    fn number(&self, name: &str) -> Result<Option<f64>, IfevalError> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::Number(n)) => n
                .as_f64()
                .map(Some)
                .ok_or_else(|| self.bad(name, "is not a representable number")),
            Some(Value::Bool(true)) => Ok(Some(1.0)),
            Some(_) => Err(self.bad(name, "must be a number")),
        }
    }

    /// The `x is None or x < 0` pattern: both make the harness draw a random value.
    fn threshold(&self, name: &str) -> Result<f64, IfevalError> {
        match self.number(name)? {
            None => Err(self.missing(name)),
            Some(x) if x < 0.0 => Err(self.bad(
                name,
                "is negative, so the harness would draw a random value",
            )),
            Some(x) => Ok(x),
        }
    }

    fn relation(&self, name: &str) -> Result<Relation, IfevalError> {
        match self.get(name) {
            None => Err(self.missing(name)),
            Some(Value::String(s)) if s == "less than" => Ok(Relation::LessThan),
            Some(Value::String(s)) if s == "at least" => Ok(Relation::AtLeast),
            Some(_) => Err(self.bad(name, "must be \"less than\" or \"at least\"")),
        }
    }

    fn string(&self, name: &str) -> Result<&str, IfevalError> {
        match self.get(name) {
            None => Err(self.missing(name)),
            Some(Value::String(s)) => Ok(s),
            Some(_) => Err(self.bad(name, "must be a string")),
        }
    }

    /// A list of strings; a bare string is iterated by character, as Python would.
    fn strings(&self, name: &str) -> Result<Vec<String>, IfevalError> {
        match self.get(name) {
            None => Err(self.missing(name)),
            Some(Value::String(s)) => Ok(s.chars().map(String::from).collect()),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| match v {
                    Value::String(s) => Ok(s.clone()),
                    _ => Err(self.bad(name, "must be a list of strings")),
                })
                .collect(),
            Some(_) => Err(self.bad(name, "must be a list of strings")),
        }
    }

    /// `pattern` (built from kwarg `name`) compiled as Python `re` would.
    fn regex(
        &self,
        name: &str,
        pattern: &str,
        ignore_case: bool,
        multiline: bool,
    ) -> Result<PyRegex, IfevalError> {
        PyRegex::new(pattern, ignore_case, multiline).map_err(|reason| self.bad(name, &reason))
    }
}

/// `INSTRUCTION_DICT[id](id).build_description(**cleaned_kwargs)`.
///
/// The harness then calls `build_description(prompt=...)` when the instruction's args
/// include `"prompt"`; no registered instruction has such an arg, so `_prompt` is unused.
pub(crate) fn build(
    id: &str,
    kwargs: &Map<String, Value>,
    _prompt: &str,
) -> Result<Instruction, IfevalError> {
    let Some(&id) = super::INSTRUCTION_IDS.iter().find(|&&known| known == id) else {
        return Err(IfevalError::UnknownInstruction(id.to_string()));
    };
    let kw: Map<String, Value> = kwargs
        .iter()
        .filter(|(_, v)| truthy(v))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let args = Args { id, kw };
    let (accepted, kind): (&[&str], Kind) = match id {
        "keywords:existence" => {
            let keywords = args.strings("keywords")?;
            let res = keywords
                .iter()
                .map(|k| args.regex("keywords", k, true, false))
                .collect::<Result<_, _>>()?;
            (&["keywords"], Kind::KeywordExistence(res))
        }
        "keywords:frequency" => {
            let keyword = args.string("keyword")?;
            (
                &["keyword", "frequency", "relation"],
                Kind::KeywordFrequency {
                    keyword: args.regex("keyword", pystr::strip(keyword), true, false)?,
                    frequency: args.threshold("frequency")?,
                    relation: args.relation("relation")?,
                },
            )
        }
        "keywords:forbidden_words" => {
            let words = args.strings("forbidden_words")?;
            let res = words
                .iter()
                .map(|w| args.regex("forbidden_words", &format!(r"\b{w}\b"), true, false))
                .collect::<Result<_, _>>()?;
            (&["forbidden_words"], Kind::ForbiddenWords(res))
        }
        "keywords:letter_frequency" => {
            let letter = args.string("letter")?;
            let mut chars = letter.chars();
            let (Some(c), None) = (chars.next(), chars.next()) else {
                return Err(args.bad(
                    "letter",
                    "is not one character, so the harness would draw a random letter",
                ));
            };
            let lower: Vec<char> = c.to_lowercase().collect();
            let letter = match lower.as_slice() {
                [l] if l.is_ascii_lowercase() => *l,
                [_] => {
                    return Err(args.bad(
                        "letter",
                        "is not an ASCII letter, so the harness would draw a random letter",
                    ))
                }
                _ => return Err(args.bad("letter", "lowercases to several characters")),
            };
            (
                &["letter", "let_frequency", "let_relation"],
                Kind::LetterFrequency {
                    letter,
                    frequency: args.threshold("let_frequency")?,
                    relation: args.relation("let_relation")?,
                },
            )
        }
        "language:response_language" => {
            let language = match args.get("language") {
                None => return Err(args.missing("language")),
                Some(Value::String(s)) if LANGUAGE_CODES.contains(&s.as_str()) => s.clone(),
                Some(_) => {
                    return Err(args.bad("language", "is not one of the harness's LANGUAGE_CODES"))
                }
            };
            (&["language"], Kind::ResponseLanguage(language))
        }
        "length_constraints:number_sentences" => (
            &["num_sentences", "relation"],
            Kind::NumberSentences {
                num: args.threshold("num_sentences")?,
                relation: args.relation("relation")?,
            },
        ),
        "length_constraints:number_paragraphs" => (
            &["num_paragraphs"],
            Kind::NumberParagraphs(args.threshold("num_paragraphs")?),
        ),
        "length_constraints:number_words" => (
            &["num_words", "relation"],
            Kind::NumberWords {
                num: args.threshold("num_words")?,
                relation: args.relation("relation")?,
            },
        ),
        "length_constraints:nth_paragraph_first_word" => {
            let num_paragraphs = args.threshold("num_paragraphs")?;
            let nth =
                match args.number("nth_paragraph")? {
                    None => return Err(args.missing("nth_paragraph")),
                    Some(n) if n <= 0.0 || n > num_paragraphs => return Err(args.bad(
                        "nth_paragraph",
                        "is not in 1..=num_paragraphs, so the harness would draw a random value",
                    )),
                    // The harness indexes a list with it, which only an integer can do.
                    Some(n) if n.fract() != 0.0 => {
                        return Err(args.bad("nth_paragraph", "must be an integer"))
                    }
                    Some(n) => n as usize,
                };
            let first_word = pystr::lower(args.string("first_word")?);
            (
                &["num_paragraphs", "nth_paragraph", "first_word"],
                Kind::NthParagraphFirstWord {
                    num_paragraphs,
                    nth,
                    first_word,
                },
            )
        }
        "detectable_content:number_placeholders" => (
            &["num_placeholders"],
            Kind::Placeholders(args.threshold("num_placeholders")?),
        ),
        "detectable_content:postscript" => {
            let marker = pystr::strip(args.string("postscript_marker")?);
            let pattern = match marker {
                "P.P.S" => r"\s*p\.\s?p\.\s?s.*$".to_string(),
                "P.S." => r"\s*p\.\s?s\..*$".to_string(),
                other => format!(r"\s*{}.*$", pystr::lower(other)),
            };
            (
                &["postscript_marker"],
                Kind::Postscript(args.regex("postscript_marker", &pattern, false, true)?),
            )
        }
        "detectable_format:number_bullet_lists" => (
            &["num_bullets"],
            Kind::BulletLists(args.threshold("num_bullets")?),
        ),
        "detectable_format:constrained_response" => (&[], Kind::ConstrainedResponse),
        "detectable_format:number_highlighted_sections" => (
            &["num_highlights"],
            Kind::Highlights(args.threshold("num_highlights")?),
        ),
        "detectable_format:multiple_sections" => {
            let splitter = pystr::strip(args.string("section_spliter")?);
            let pattern = format!(r"\s?{splitter}\s?\d+\s?");
            (
                &["section_spliter", "num_sections"],
                Kind::Sections {
                    splitter: args.regex("section_spliter", &pattern, false, false)?,
                    num: args.threshold("num_sections")?,
                },
            )
        }
        "detectable_format:json_format" => (&[], Kind::Json),
        "detectable_format:title" => (&[], Kind::Title),
        "combination:two_responses" => (&[], Kind::TwoResponses),
        "combination:repeat_prompt" => (
            &["prompt_to_repeat"],
            Kind::RepeatPrompt(args.string("prompt_to_repeat")?.to_string()),
        ),
        "startend:end_checker" => (
            &["end_phrase"],
            Kind::EndPhrase(pystr::strip(args.string("end_phrase")?).to_string()),
        ),
        "change_case:capital_word_frequency" => {
            // No `< 0` test here in the harness: a negative frequency is kept.
            let frequency = args
                .number("capital_frequency")?
                .ok_or_else(|| args.missing("capital_frequency"))?;
            (
                &["capital_frequency", "capital_relation"],
                Kind::CapitalWordFrequency {
                    frequency,
                    relation: args.relation("capital_relation")?,
                },
            )
        }
        "change_case:english_capital" => (&[], Kind::EnglishCapital),
        "change_case:english_lowercase" => (&[], Kind::EnglishLowercase),
        "punctuation:no_comma" => (&[], Kind::NoComma),
        "startend:quotation" => (&[], Kind::Quotation),
        _ => return Err(IfevalError::UnknownInstruction(id.to_string())),
    };
    // Python passes every remaining kwarg by name: an unknown one is a TypeError.
    if let Some(extra) = args.kw.keys().find(|k| !accepted.contains(&k.as_str())) {
        return Err(IfevalError::UnexpectedKwarg {
            instruction: id.to_string(),
            kwarg: extra.clone(),
        });
    }
    Ok(Instruction { id, kind })
}

fn constant(pattern: &str) -> Regex {
    Regex::new(pattern).expect("constant regex")
}

static RE_WORD: LazyLock<Regex> = LazyLock::new(|| constant(r"\w+"));
static RE_PARAGRAPH_DIVIDER: LazyLock<Regex> =
    LazyLock::new(|| constant(&format!(r"{PY_S}?\*\*\*{PY_S}?")));
static RE_PLACEHOLDER: LazyLock<Regex> = LazyLock::new(|| constant(r"\[.*?\]"));
static RE_BULLET_STAR: LazyLock<Regex> =
    LazyLock::new(|| constant(&format!(r"(?m)^{PY_S}*\*[^*].*$")));
static RE_BULLET_DASH: LazyLock<Regex> = LazyLock::new(|| constant(&format!(r"(?m)^{PY_S}*-.*$")));
static RE_HIGHLIGHT: LazyLock<Regex> = LazyLock::new(|| constant(r"\*[^\n*]*\*"));
static RE_DOUBLE_HIGHLIGHT: LazyLock<Regex> = LazyLock::new(|| constant(r"\*\*[^\n*]*\*\*"));
static RE_TITLE: LazyLock<Regex> = LazyLock::new(|| constant(r"<<[^\n]+>>"));

/// The detector the harness's `langdetect.detect` stands for. The harness leaves
/// langdetect unseeded (each run may differ on borderline text); a fixed seed keeps our
/// verdicts reproducible and is one of the harness's possible outcomes.
static LANGDETECT: LazyLock<langdetect::DetectorFactory> = LazyLock::new(|| {
    let mut factory = langdetect::DetectorFactory::builtin().clone();
    factory.seed = langdetect::Seed::Int(0);
    factory
});

/// `langdetect.detect(text)`; `None` for `LangDetectException` (no features in text).
fn detect_language(text: &str) -> Option<String> {
    LANGDETECT.detect(text).ok()
}

/// `nltk.tokenize.RegexpTokenizer(r"\w+")` count; nltk 3.10.3+ runs it on the `regex`
/// module, whose `\w` is Rust's.
pub(crate) fn count_words(text: &str) -> usize {
    RE_WORD.find_iter(text).count()
}

/// `instructions_util.count_sentences`.
pub(crate) fn count_sentences(text: &str) -> usize {
    punkt::sent_tokenize(text).len()
}

impl Instruction {
    fn regex_error(&self, reason: String) -> IfevalError {
        IfevalError::RegexLimit {
            instruction: self.id.to_string(),
            reason,
        }
    }

    /// `check_following(value)`.
    pub(crate) fn check_following(&self, value: &str) -> Result<bool, IfevalError> {
        let err = |e| self.regex_error(e);
        Ok(match &self.kind {
            Kind::KeywordExistence(keywords) => {
                for k in keywords {
                    if !k.is_match(value).map_err(err)? {
                        return Ok(false);
                    }
                }
                true
            }
            Kind::KeywordFrequency {
                keyword,
                frequency,
                relation,
            } => relation.holds(keyword.count(value).map_err(err)?, *frequency),
            Kind::ForbiddenWords(words) => {
                for w in words {
                    if w.is_match(value).map_err(err)? {
                        return Ok(false);
                    }
                }
                true
            }
            Kind::LetterFrequency {
                letter,
                frequency,
                relation,
            } => {
                let count = pystr::lower(value).chars().filter(|c| c == letter).count();
                relation.holds(count, *frequency)
            }
            Kind::ResponseLanguage(language) => {
                detect_language(value).is_none_or(|detected| &detected == language)
            }
            Kind::NumberSentences { num, relation } => relation.holds(count_sentences(value), *num),
            Kind::NumberParagraphs(num) => check_paragraphs(value, *num),
            Kind::NumberWords { num, relation } => relation.holds(count_words(value), *num),
            Kind::NthParagraphFirstWord {
                num_paragraphs,
                nth,
                first_word,
            } => check_nth_paragraph(value, *num_paragraphs, *nth, first_word),
            Kind::Placeholders(num) => RE_PLACEHOLDER.find_iter(value).count() as f64 >= *num,
            Kind::Postscript(re) => re.is_match(&pystr::lower(value)).map_err(err)?,
            Kind::BulletLists(num) => {
                let n = RE_BULLET_STAR.find_iter(value).count()
                    + RE_BULLET_DASH.find_iter(value).count();
                n as f64 == *num
            }
            Kind::ConstrainedResponse => {
                let value = pystr::strip(value);
                CONSTRAINED_RESPONSES.iter().any(|r| value.contains(r))
            }
            Kind::Highlights(num) => {
                let single = RE_HIGHLIGHT
                    .find_iter(value)
                    .filter(|m| !pystr::strip(m.as_str().trim_matches('*')).is_empty())
                    .count();
                let double = RE_DOUBLE_HIGHLIGHT
                    .find_iter(value)
                    .filter(|m| {
                        let h = m.as_str();
                        let h = h.strip_prefix("**").unwrap_or(h);
                        let h = h.strip_suffix("**").unwrap_or(h);
                        !pystr::strip(h).is_empty()
                    })
                    .count();
                (single + double) as f64 >= *num
            }
            Kind::Sections { splitter, num } => {
                splitter.split_count(value).map_err(err)? as f64 >= *num
            }
            Kind::Json => {
                let v = pystr::strip(value);
                let v = v.strip_prefix("```json").unwrap_or(v);
                let v = v.strip_prefix("```Json").unwrap_or(v);
                let v = v.strip_prefix("```JSON").unwrap_or(v);
                let v = v.strip_prefix("```").unwrap_or(v);
                let v = v.strip_suffix("```").unwrap_or(v);
                pyjson::python_json_loads_ok(pystr::strip(v))
            }
            Kind::Title => RE_TITLE.find_iter(value).any(|m| {
                let t = m.as_str().trim_start_matches('<').trim_end_matches('>');
                !pystr::strip(t).is_empty()
            }),
            Kind::TwoResponses => check_two_responses(value),
            Kind::RepeatPrompt(prompt) => {
                pystr::lower(pystr::strip(value)).starts_with(&pystr::lower(pystr::strip(prompt)))
            }
            Kind::EndPhrase(phrase) => pystr::lower(pystr::strip(value).trim_matches('"'))
                .ends_with(&pystr::lower(pystr::strip(phrase))),
            Kind::CapitalWordFrequency {
                frequency,
                relation,
            } => {
                let n = word_tokenize::word_tokenize(value)
                    .iter()
                    .filter(|w| pystr::isupper(w))
                    .count();
                relation.holds(n, *frequency)
            }
            // `isupper() and detect() == "en"`: detection runs only when the case test
            // passes, and a failed detection counts as followed.
            Kind::EnglishCapital => {
                pystr::isupper(value) && detect_language(value).is_none_or(|l| l == "en")
            }
            Kind::EnglishLowercase => {
                pystr::islower(value) && detect_language(value).is_none_or(|l| l == "en")
            }
            Kind::NoComma => !value.contains(','),
            Kind::Quotation => {
                let v = pystr::strip(value);
                v.chars().count() > 1 && v.starts_with('"') && v.ends_with('"')
            }
        })
    }
}

/// `ParagraphChecker.check_following`: paragraphs split on `***`; blank ones count
/// against the total at either end and fail the check in the middle.
fn check_paragraphs(value: &str, expected: f64) -> bool {
    let paragraphs: Vec<&str> = RE_PARAGRAPH_DIVIDER.split(value).collect();
    let last = paragraphs.len() - 1;
    let mut num = paragraphs.len();
    for (index, p) in paragraphs.iter().enumerate() {
        if pystr::strip(p).is_empty() {
            if index == 0 || index == last {
                num -= 1;
            } else {
                return false;
            }
        }
    }
    num as f64 == expected
}

/// `ParagraphFirstWordCheck.check_following`.
fn check_nth_paragraph(value: &str, expected: f64, nth: usize, first_word: &str) -> bool {
    let paragraphs: Vec<&str> = value.split("\n\n").collect();
    let num = paragraphs
        .iter()
        .filter(|p| !pystr::strip(p).is_empty())
        .count();
    // The harness indexes the unfiltered list with a count of non-blank paragraphs.
    if nth > num {
        return false;
    }
    let paragraph = pystr::strip(paragraphs[nth - 1]);
    let Some(word) = pystr::split_ws(paragraph).next() else {
        return false;
    };
    let word = pystr::strip(word)
        .trim_start_matches('\'')
        .trim_start_matches('"');
    let mut found = String::new();
    for c in word.chars() {
        if matches!(c, '.' | ',' | '?' | '!' | '\'' | '"') {
            break;
        }
        found.push_str(&c.to_lowercase().to_string());
    }
    num as f64 == expected && found == first_word
}

/// `TwoResponsesChecker.check_following`.
fn check_two_responses(value: &str) -> bool {
    let responses: Vec<&str> = value.split("******").collect();
    let last = responses.len() - 1;
    let mut valid: Vec<&str> = Vec::new();
    for (index, r) in responses.iter().enumerate() {
        if pystr::strip(r).is_empty() {
            if index != 0 && index != last {
                return false;
            }
        } else {
            valid.push(r);
        }
    }
    valid.len() == 2 && pystr::strip(valid[0]) != pystr::strip(valid[1])
}
