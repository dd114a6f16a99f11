//! Tests of the IFEval port. Expected verdicts were derived from the harness's Python
//! (`instructions.py`, `utils.py`, nltk 3.10.4, langdetect 1.0.9) and cross-checked by
//! running that code; the tests themselves need no Python.

use serde_json::{json, Map, Value};

use super::*;

fn kwargs(text: &str) -> Map<String, Value> {
    match serde_json::from_str(text) {
        Ok(Value::Object(map)) => map,
        other => panic!("test kwargs {text:?} are not an object: {other:?}"),
    }
}

fn kwargs_list(text: &str) -> Vec<Map<String, Value>> {
    match serde_json::from_str(text) {
        Ok(Value::Array(items)) => items
            .into_iter()
            .map(|v| match v {
                Value::Object(map) => map,
                other => panic!("test kwargs entry is not an object: {other:?}"),
            })
            .collect(),
        other => panic!("test kwargs list {text:?} is not an array: {other:?}"),
    }
}

/// (instruction, kwargs, [(response, `check_following` verdict, why)]): the cases of one
/// instruction under one set of kwargs.
type CheckerCases = (
    &'static str,
    &'static str,
    &'static [(&'static str, bool, &'static str)],
);

const CHECKER_CASES: &[CheckerCases] = &[
    (
        "keywords:existence",
        r#"{"keywords": ["apple", "Banana"]}"#,
        &[
            ("I like APPLE and banana.", true, "case-insensitive search"),
            ("I like apple.", false, "every keyword is needed"),
            (
                "pineapples and bananas",
                true,
                "plain re.search: no word boundary",
            ),
        ],
    ),
    (
        "keywords:existence",
        r#"{"keywords": ["a.b"]}"#,
        &[
            ("axb", true, "keywords are regexes: . matches any char"),
            ("a\nb", false, ". does not match a newline"),
        ],
    ),
    (
        "keywords:existence",
        r#"{"keywords": "ab"}"#,
        &[("b then a", true, "a bare string is iterated by character")],
    ),
    (
        "keywords:frequency",
        r#"{"keyword": "the", "frequency": 2, "relation": "less than"}"#,
        &[
            ("The cat and the dog", false, "2 is not less than 2"),
            ("The cat", true, ""),
            ("There then", false, "substrings count"),
        ],
    ),
    (
        "keywords:frequency",
        r#"{"keyword": "the", "frequency": 3, "relation": "at least"}"#,
        &[
            ("the the THE", true, "3 >= 3, any case"),
            ("the the", false, ""),
        ],
    ),
    (
        "keywords:frequency",
        r#"{"keyword": "  apple ", "frequency": 1.0, "relation": "at least"}"#,
        &[("APPLE", true, "keyword is stripped; float frequency")],
    ),
    (
        "keywords:frequency",
        r#"{"keyword": "aa", "frequency": 2, "relation": "at least"}"#,
        &[("aaa", false, "findall does not overlap")],
    ),
    (
        "keywords:frequency",
        r#"{"keyword": "a*", "frequency": 3, "relation": "at least"}"#,
        &[("baa", true, "empty matches count as in re.findall")],
    ),
    (
        "keywords:frequency",
        r#"{"keyword": "a?", "frequency": 4, "relation": "at least"}"#,
        &[("aab", true, "an empty match may follow a non-empty one")],
    ),
    (
        "keywords:frequency",
        r#"{"keyword": "a?", "frequency": 5, "relation": "at least"}"#,
        &[("aab", false, "")],
    ),
    (
        "keywords:forbidden_words",
        r#"{"forbidden_words": ["can", "u.s"]}"#,
        &[
            ("I CAN do it", false, "case-insensitive"),
            ("canine cans", true, "whole words only"),
        ],
    ),
    (
        "keywords:forbidden_words",
        r#"{"forbidden_words": ["can"]}"#,
        &[
            ("can_do", true, "_ is a word character for \\b"),
            (
                "can\u{b2}",
                true,
                "Python's \\w includes No digits such as \u{b2}",
            ),
            ("can\u{301}", false, "Python's \\w excludes combining marks"),
        ],
    ),
    (
        "keywords:forbidden_words",
        r#"{"forbidden_words": ["u.s"]}"#,
        &[("uxs", false, "words are regexes")],
    ),
    (
        "keywords:forbidden_words",
        r#"{"forbidden_words": ["can"]}"#,
        &[("", true, "")],
    ),
    (
        "keywords:letter_frequency",
        r#"{"letter": "A", "let_frequency": 3, "let_relation": "at least"}"#,
        &[("Banana", true, "letter is lowercased")],
    ),
    (
        "keywords:letter_frequency",
        r#"{"letter": "a", "let_frequency": 3, "let_relation": "at least"}"#,
        &[("Bnn", false, ""), ("AAA", true, "text is lowercased")],
    ),
    (
        "keywords:letter_frequency",
        r#"{"letter": "a", "let_frequency": 3, "let_relation": "less than"}"#,
        &[
            ("aaa", false, "3 is not less than 3"),
            ("aaà", true, "à is not a"),
        ],
    ),
    (
        "keywords:letter_frequency",
        r#"{"letter": "k", "let_frequency": 1, "let_relation": "at least"}"#,
        &[("\u{212a}", true, "Kelvin sign lowercases to k")],
    ),
    (
        "keywords:letter_frequency",
        r#"{"letter": "\u212a", "let_frequency": 1, "let_relation": "at least"}"#,
        &[("k", true, "Kelvin sign as the letter is k")],
    ),
    (
        "language:response_language",
        r#"{"language": "en"}"#,
        &[
            (
                "This is an English sentence about the weather today.",
                true,
                "",
            ),
            (
                "Ceci est une phrase en français sur le temps qu'il fait.",
                false,
                "",
            ),
        ],
    ),
    (
        "language:response_language",
        r#"{"language": "fr"}"#,
        &[(
            "Ceci est une phrase en français sur le temps qu'il fait.",
            true,
            "",
        )],
    ),
    (
        "language:response_language",
        r#"{"language": "hi"}"#,
        &[("नमस्ते, आप कैसे हैं? यह हिंदी पाठ है।", true, "")],
    ),
    (
        "language:response_language",
        r#"{"language": "en"}"#,
        &[(
            "12345 !!! ***",
            true,
            "no features: LangDetectException counts as followed",
        )],
    ),
    (
        "language:response_language",
        r#"{"language": "ja"}"#,
        &[("😀🎉", true, "emoji only: no features")],
    ),
    (
        "length_constraints:number_sentences",
        r#"{"num_sentences": 2, "relation": "at least"}"#,
        &[(
            "Mr. Smith went to Washington. He said hi!",
            true,
            "Mr. is an abbreviation: 2 sentences",
        )],
    ),
    (
        "length_constraints:number_sentences",
        r#"{"num_sentences": 2, "relation": "less than"}"#,
        &[
            ("Mr. Smith went to Washington. He said hi!", false, ""),
            ("Hello there", true, "1 sentence"),
        ],
    ),
    (
        "length_constraints:number_sentences",
        r#"{"num_sentences": 3, "relation": "at least"}"#,
        &[("One. Two? Three!", true, "")],
    ),
    (
        "length_constraints:number_sentences",
        r#"{"num_sentences": 2, "relation": "at least"}"#,
        &[("The U.S. economy grew. It is big.", true, "")],
    ),
    (
        "length_constraints:number_sentences",
        r#"{"num_sentences": 3, "relation": "at least"}"#,
        &[("The U.S. economy grew. It is big.", false, "")],
    ),
    (
        "length_constraints:number_sentences",
        r#"{"num_sentences": 2, "relation": "at least"}"#,
        &[(
            "(Sent one.) Sent two.",
            true,
            "closing bracket realigned into the first sentence",
        )],
    ),
    (
        "length_constraints:number_sentences",
        r#"{"num_sentences": 1, "relation": "less than"}"#,
        &[("", true, "no sentences at all")],
    ),
    (
        "length_constraints:number_sentences",
        r#"{"num_sentences": 2, "relation": "at least"}"#,
        &[(
            "He said “Stop.” Then left.",
            true,
            "curly quotes (nltk 3.10.2+)",
        )],
    ),
    (
        "length_constraints:number_paragraphs",
        r#"{"num_paragraphs": 2}"#,
        &[
            ("a\n***\nb", true, ""),
            (
                "***\na\n***\nb\n***",
                true,
                "blank first and last pieces are not paragraphs",
            ),
            ("a\n***\n\n***\nb", false, "a blank middle paragraph fails"),
            ("a***b", true, ""),
        ],
    ),
    (
        "length_constraints:number_paragraphs",
        r#"{"num_paragraphs": 1}"#,
        &[("a\n\nb", true, "only *** separates")],
    ),
    (
        "length_constraints:number_paragraphs",
        r#"{"num_paragraphs": 3}"#,
        &[("a\n***\nb", false, "")],
    ),
    (
        "length_constraints:number_words",
        r#"{"num_words": 3, "relation": "at least"}"#,
        &[
            ("one two three", true, ""),
            ("one-two", false, "2 words"),
            ("don't stop", true, "don, t, stop"),
        ],
    ),
    (
        "length_constraints:number_words",
        r#"{"num_words": 3, "relation": "less than"}"#,
        &[("naïve café", true, "2 words")],
    ),
    (
        "length_constraints:number_words",
        r#"{"num_words": 2, "relation": "at least"}"#,
        &[(
            "हिन्दी भाषा",
            true,
            "vowel signs stay inside words (nltk 3.10.3+)",
        )],
    ),
    (
        "length_constraints:number_words",
        r#"{"num_words": 3, "relation": "less than"}"#,
        &[("हिन्दी भाषा", true, "")],
    ),
    (
        "length_constraints:number_words",
        r#"{"num_words": 2, "relation": "at least"}"#,
        &[("x\u{b2} y", true, "\u{b2} is not a word character")],
    ),
    (
        "length_constraints:nth_paragraph_first_word",
        r#"{"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "Hello"}"#,
        &[
            (
                "Intro\n\n\"Hello, world\"",
                true,
                "quote and comma dropped; first_word lowercased",
            ),
            ("Intro\n\nhello", true, ""),
            ("Intro\n\nHi", false, ""),
            ("Intro\n\nhello\n\nthird", false, "3 paragraphs"),
            (
                "\n\nIntro\n\nhello",
                false,
                "the unfiltered list is indexed: paragraph 2 is Intro",
            ),
            (
                "Intro\n\n\n\nhello",
                false,
                "index lands on a blank paragraph",
            ),
            (
                "Intro\n\n'hello' there",
                true,
                "leading ' stripped, stops at '",
            ),
            ("Intro\n\nHELLO-world x", false, "- is not a stop character"),
        ],
    ),
    (
        "length_constraints:nth_paragraph_first_word",
        r#"{"num_paragraphs": 1, "nth_paragraph": 1, "first_word": "sure"}"#,
        &[("Sure!", true, "")],
    ),
    (
        "detectable_content:number_placeholders",
        r#"{"num_placeholders": 2}"#,
        &[
            ("[a] [b]", true, ""),
            ("[a]", false, ""),
            ("[a] and [ ]", true, ""),
            ("[[a]]", false, "lazy match: one placeholder"),
        ],
    ),
    (
        "detectable_content:number_placeholders",
        r#"{"num_placeholders": 1}"#,
        &[("[a\nb]", false, ". stops at newlines")],
    ),
    (
        "detectable_content:postscript",
        r#"{"postscript_marker": "P.S."}"#,
        &[
            ("Body\nP.S. hi", true, ""),
            ("Body\np.s. hi", true, "text is lowercased"),
            ("Body\nP. S. hi", true, "optional space"),
            ("Body\nPS hi", false, ""),
        ],
    ),
    (
        "detectable_content:postscript",
        r#"{"postscript_marker": "P.P.S"}"#,
        &[
            ("Body\nP.P.S. more", true, ""),
            ("Body\nP.S. more", false, ""),
        ],
    ),
    (
        "detectable_content:postscript",
        r#"{"postscript_marker": "Note"}"#,
        &[("Body\nNOTE: x", true, "custom marker is lowercased")],
    ),
    (
        "detectable_content:postscript",
        r#"{"postscript_marker": " P.S. "}"#,
        &[(
            "ps",
            false,
            "marker is stripped, so the P.S. pattern applies",
        )],
    ),
    (
        "detectable_format:number_bullet_lists",
        r#"{"num_bullets": 2}"#,
        &[
            ("* a\n* b", true, ""),
            ("* a\n- b", true, ""),
            ("* a\n** b", false, "** does not start a bullet"),
            ("*a*\n* b", true, "any line starting with * counts"),
            ("- a\n- b\n- c", false, "exactly, not at least"),
        ],
    ),
    (
        "detectable_format:number_bullet_lists",
        r#"{"num_bullets": 1}"#,
        &[("intro\n\n  * a", true, "indented bullet")],
    ),
    (
        "detectable_format:constrained_response",
        r#"{}"#,
        &[
            ("My answer is yes.", true, ""),
            ("my answer is yes.", false, "case-sensitive"),
            ("Well, My answer is maybe. Because...", true, "substring"),
            (
                "My answer is yes",
                false,
                "the period is part of the option",
            ),
        ],
    ),
    (
        "detectable_format:number_highlighted_sections",
        r#"{"num_highlights": 2}"#,
        &[
            ("*a* and *b*", true, ""),
            ("**a** only", false, "one highlight"),
            ("**a** *b*", true, ""),
        ],
    ),
    (
        "detectable_format:number_highlighted_sections",
        r#"{"num_highlights": 1}"#,
        &[
            ("* *", false, "blank highlight"),
            ("*a\nb*", false, "highlights stay on one line"),
        ],
    ),
    (
        "detectable_format:multiple_sections",
        r#"{"section_spliter": "Section", "num_sections": 2}"#,
        &[
            ("Section 1\na\nSection 2\nb", true, ""),
            ("SECTION 1\na\nSECTION 2\nb", false, "case-sensitive"),
            ("Section1 a Section2 b", true, ""),
        ],
    ),
    (
        "detectable_format:multiple_sections",
        r#"{"section_spliter": "Section", "num_sections": 1}"#,
        &[("Section X", false, "a number must follow")],
    ),
    (
        "detectable_format:multiple_sections",
        r#"{"section_spliter": " SECTION ", "num_sections": 1}"#,
        &[("SECTION 3", true, "splitter is stripped")],
    ),
    (
        "detectable_format:multiple_sections",
        r#"{"section_spliter": "Section", "num_sections": 3}"#,
        &[("Section 1 Section 2", false, "")],
    ),
    (
        "detectable_format:multiple_sections",
        r#"{"section_spliter": "(Section)", "num_sections": 4}"#,
        &[(
            "Section 1 a Section 2 b",
            true,
            "re.split also returns the captured group",
        )],
    ),
    (
        "detectable_format:multiple_sections",
        r#"{"section_spliter": "(Section)", "num_sections": 5}"#,
        &[("Section 1 a Section 2 b", false, "")],
    ),
    (
        "detectable_format:json_format",
        r#"{}"#,
        &[
            ("{\"a\": 1}", true, ""),
            ("```json\n{\"a\": 1}\n```", true, ""),
            ("```JSON {\"a\": 1}```", true, ""),
            ("{'a': 1}", false, ""),
            ("NaN", true, "Python accepts NaN"),
            ("[1, 2,]", false, "trailing comma"),
            ("{\"a\": 1} extra", false, "extra data"),
            (
                "  {\"a\": [1, -0.5e+3, true, null, \"x\\u00e9\"]}  ",
                true,
                "",
            ),
            ("\"\\ud800\"", true, "lone surrogate escape"),
            ("01", false, "leading zero"),
            ("1e5", true, ""),
            ("1.", false, ""),
            ("", false, ""),
            ("```\n[]\n```", true, ""),
            ("{\"a\"\n:\t1}", true, "JSON whitespace"),
            ("\"a\tb\"", false, "control character in a string"),
        ],
    ),
    (
        "detectable_format:title",
        r#"{}"#,
        &[
            ("<<Title>>", true, ""),
            ("<< >>", false, "blank title"),
            ("<<a\nb>>", false, ""),
            ("<<>>", false, ""),
            ("<<<a>>>", true, ""),
            ("<< >> and <<x>>", true, "greedy: one match holding both"),
        ],
    ),
    (
        "combination:two_responses",
        r#"{}"#,
        &[
            ("A\n******\nB", true, ""),
            ("A\n******\nA", false, "identical responses"),
            ("A ****** B ****** C", false, "three responses"),
            ("****** A ****** B", true, "blank ends are allowed"),
            ("A ****** ****** B", false, "blank middle"),
            (
                "A *******B",
                true,
                "seven asterisks: the seventh stays with B",
            ),
            ("A ******  A  ", false, "compared after strip"),
        ],
    ),
    (
        "combination:repeat_prompt",
        r#"{"prompt_to_repeat": "Write a poem."}"#,
        &[
            ("write a poem. Here it is", true, "case-insensitive"),
            ("Sure! Write a poem.", false, ""),
        ],
    ),
    (
        "combination:repeat_prompt",
        r#"{"prompt_to_repeat": " Write a poem. "}"#,
        &[("  Write a poem.", true, "both stripped")],
    ),
    (
        "startend:end_checker",
        r#"{"end_phrase": "Any other questions?"}"#,
        &[
            ("Text. any other questions?", true, ""),
            ("\"Text. Any other questions?\"", true, "quotes stripped"),
            ("Any other questions? Thanks", false, ""),
            ("Any other questions?\n\n", true, ""),
            ("Any other questions?.", false, ""),
        ],
    ),
    (
        "change_case:capital_word_frequency",
        r#"{"capital_frequency": 3, "capital_relation": "at least"}"#,
        &[
            ("I LOVE NYC", true, ""),
            ("I CAN'T", true, "I, CA, N'T"),
            ("I CANNOT", true, "I, CAN, NOT"),
        ],
    ),
    (
        "change_case:capital_word_frequency",
        r#"{"capital_frequency": 1, "capital_relation": "at least"}"#,
        &[("Hello World", false, "")],
    ),
    (
        "change_case:capital_word_frequency",
        r#"{"capital_frequency": 2, "capital_relation": "less than"}"#,
        &[
            ("U.S.A. rocks", true, "one token U.S.A."),
            ("WE'RE HERE", false, "WE, 'RE, HERE: 3"),
        ],
    ),
    (
        "change_case:capital_word_frequency",
        r#"{"capital_frequency": 2, "capital_relation": "at least"}"#,
        &[("THE END.", true, "END and . split")],
    ),
    (
        "change_case:capital_word_frequency",
        r#"{"capital_frequency": -1, "capital_relation": "at least"}"#,
        &[("x", true, "a negative frequency is kept")],
    ),
    (
        "change_case:english_capital",
        r#"{}"#,
        &[
            (
                "THIS IS AN ENGLISH SENTENCE ABOUT THE WEATHER TODAY.",
                true,
                "",
            ),
            ("THIS IS an english sentence.", false, "not all capitals"),
            ("12345", false, "no cased character: isupper() is False"),
            (
                "ÇA VA TRÈS BIEN, MERCI BEAUCOUP MON AMI, À DEMAIN.",
                false,
                "",
            ),
            ("\u{1c5}EMAL", false, "titlecase letter"),
        ],
    ),
    (
        "change_case:english_lowercase",
        r#"{}"#,
        &[
            (
                "this is an english sentence about the weather today.",
                true,
                "",
            ),
            ("This is an english sentence.", false, ""),
            (
                "c'est une phrase en français sur le temps qu'il fait aujourd'hui.",
                false,
                "",
            ),
            ("123 !!!", false, ""),
            (
                "\u{aa} 123",
                true,
                "ordinal indicator is lowercase; no features for langdetect",
            ),
        ],
    ),
    (
        "punctuation:no_comma",
        r#"{}"#,
        &[
            ("a, b", false, ""),
            ("a b", true, ""),
            ("a，b", true, "only the ASCII comma"),
        ],
    ),
    (
        "startend:quotation",
        r#"{}"#,
        &[
            ("\"hi\"", true, ""),
            ("\"", false, "one character"),
            (" \"hi\" \n", true, "stripped"),
            ("“hi”", false, "curly quotes"),
            ("\u{1c}\"hi\"\u{1c}", true, "U+001C is whitespace to Python"),
        ],
    ),
];

/// (instruction, kwargs, response, `check_following` verdict, why).
type CheckerCase = (&'static str, &'static str, &'static str, bool, &'static str);

/// Every case of [`CHECKER_CASES`], one by one.
fn checker_cases() -> impl Iterator<Item = CheckerCase> {
    CHECKER_CASES.iter().flat_map(|&(id, kw, cases)| {
        cases
            .iter()
            .map(move |&(response, expected, why)| (id, kw, response, expected, why))
    })
}

#[test]
fn every_checker_matches_the_harness() {
    let mut failures = Vec::new();
    for (id, kw, response, expected, why) in checker_cases() {
        match check_following(id, &kwargs(kw), "", response) {
            Ok(got) if got == expected => {}
            other => failures.push(format!(
                "{id} {kw} on {response:?}: expected {expected} ({why}), got {other:?}"
            )),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn every_instruction_has_true_and_false_cases() {
    for id in INSTRUCTION_IDS {
        let verdicts: Vec<bool> = checker_cases()
            .filter(|c| c.0 == *id)
            .map(|c| c.3)
            .collect();
        assert!(verdicts.contains(&true), "{id} lacks a true case");
        assert!(verdicts.contains(&false), "{id} lacks a false case");
    }
}

/// (prompt, instructions, kwargs, response, strict, loose, why).
type EvalCase = (
    &'static str,
    &'static [&'static str],
    &'static str,
    &'static str,
    &'static [bool],
    &'static [bool],
    &'static str,
);

const EVAL_CASES: &[EvalCase] = &[
    (
        "p",
        &["punctuation:no_comma"],
        r#"[{}]"#,
        "Sure, here it is:\nhello world",
        &[false],
        &[true],
        "preamble line fails strict only",
    ),
    (
        "p",
        &["detectable_format:json_format"],
        r#"[{}]"#,
        "Here is the JSON:\n{\"a\": 1}",
        &[false],
        &[true],
        "JSON after a preamble",
    ),
    (
        "p",
        &["startend:quotation"],
        r#"[{}]"#,
        "\"Hello world\"\nHope this helps!",
        &[false],
        &[true],
        "closing remark after the quote",
    ),
    (
        "p",
        &["detectable_format:number_bullet_lists"],
        r#"[{"num_bullets": 2}]"#,
        "Here:\n* a\n* b\n* c",
        &[false],
        &[true],
        "dropping the last line leaves 2 bullets",
    ),
    (
        "p",
        &["punctuation:no_comma"],
        r#"[{}]"#,
        "",
        &[false],
        &[false],
        "empty response",
    ),
    (
        "p",
        &["punctuation:no_comma", "startend:quotation"],
        r#"[{}, {}]"#,
        "  \n\t ",
        &[false, false],
        &[false, false],
        "blank response",
    ),
    (
        "p",
        &["startend:quotation"],
        r#"[{}]"#,
        "*\"quoted\"*",
        &[false],
        &[true],
        "markdown asterisks removed",
    ),
    (
        "p",
        &[
            "punctuation:no_comma",
            "length_constraints:number_words",
            "startend:end_checker",
        ],
        r#"[{}, {"num_words": 3, "relation": "at least"}, {"end_phrase": "bye"}]"#,
        "Sure, here:\nhello world foo bar bye\nThanks",
        &[false, true, false],
        &[true, true, true],
        "several instructions",
    ),
    (
        "p",
        &["change_case:english_capital"],
        r#"[{}]"#,
        "Sure:\nTHIS IS AN ENGLISH SENTENCE ABOUT THE WEATHER TODAY.",
        &[false],
        &[true],
        "lowercase preamble",
    ),
    (
        "Write a poem.",
        &["combination:repeat_prompt"],
        r#"[{"prompt_to_repeat": "Write a poem."}]"#,
        "Write a poem.\nRoses are red.",
        &[true],
        &[true],
        "prompt repeated",
    ),
    (
        "p",
        &["startend:quotation"],
        r#"[{}]"#,
        "Intro\n*\"x\"*\nOutro",
        &[false],
        &[true],
        "only the last variant passes",
    ),
    (
        "p",
        &["detectable_format:title", "keywords:existence"],
        r#"[{"keywords": null, "num_words": null, "relation": null}, {"keywords": ["poem"], "frequency": null}]"#,
        "<<A Poem>>\nA poem.",
        &[true, true],
        &[true, true],
        "HF-style kwargs with nulls",
    ),
    (
        "p",
        &["punctuation:no_comma"],
        r#"[{}, {"num_words": 5}]"#,
        "a b",
        &[true],
        &[true],
        "extra kwargs entries are ignored",
    ),
    (
        "p",
        &["length_constraints:number_paragraphs"],
        r#"[{"num_paragraphs": 2}]"#,
        "Title\n***\nOne\n***\nTwo",
        &[false],
        &[true],
        "first line is a preamble paragraph",
    ),
    (
        "p",
        &["detectable_format:number_highlighted_sections"],
        r#"[{"num_highlights": 1}]"#,
        "**\n*x*",
        &[true],
        &[true],
        "strict passes",
    ),
];

#[test]
fn strict_and_loose_match_the_harness() {
    for &(prompt, ids, kw, response, strict, loose, why) in EVAL_CASES {
        let ids: Vec<String> = ids.iter().map(|s| s.to_string()).collect();
        let got = evaluate(prompt, &ids, &kwargs_list(kw), response);
        let Ok(v) = got else {
            panic!("{why}: {got:?}");
        };
        assert_eq!(v.strict, strict, "strict, {why}: {response:?}");
        assert_eq!(v.loose, loose, "loose, {why}: {response:?}");
    }
}

#[test]
fn check_instruction_is_the_strict_verdict() {
    type Check = fn(&str, &Map<String, Value>, &str, &str) -> Result<bool, IfevalError>;
    let strict: Check = check_instruction;
    let bare: Check = check_following;
    // (checker, response, verdict). The bare checker passes an empty text; the harness's
    // guard does not.
    let cases = [
        ("check_instruction", strict, "Sure, here:\nhi", false),
        ("check_instruction", strict, "hi", true),
        ("check_following", bare, "", true),
        ("check_instruction", strict, " \n", false),
    ];
    let none = Map::new();
    for (name, check, response, expected) in cases {
        assert_eq!(
            check("punctuation:no_comma", &none, "", response).ok(),
            Some(expected),
            "{name} on {response:?}"
        );
    }
}

#[test]
fn prompt_level_accuracy() {
    let ids = vec![
        "punctuation:no_comma".to_string(),
        "startend:quotation".to_string(),
    ];
    let kw = vec![Map::new(), Map::new()];
    let v = evaluate("p", &ids, &kw, "Here you go:\n\"hi there\"").expect("valid example");
    assert!(!v.strict_all());
    assert!(v.loose_all());
}

fn error_of(id: &str, kw: Value) -> IfevalError {
    let Value::Object(map) = kw else {
        panic!("kwargs must be an object")
    };
    match check_instruction(id, &map, "", "some response") {
        Err(e) => e,
        Ok(v) => panic!("{id} {map:?} gave {v}, expected an error"),
    }
}

fn assert_names(e: IfevalError, kwarg_name: &str) {
    let text = e.to_string();
    assert!(text.contains(&format!("`{kwarg_name}`")), "{text}");
}

#[test]
fn unknown_instruction_is_an_error() {
    let e = error_of("keywords:key_sentences", json!({}));
    assert!(matches!(e, IfevalError::UnknownInstruction(ref id) if id == "keywords:key_sentences"));
}

#[test]
fn falsy_kwargs_are_dropped_and_then_missing() {
    // 0 is falsy, so the harness drops it and draws a random frequency.
    let e = error_of(
        "keywords:frequency",
        json!({"keyword": "a", "frequency": 0, "relation": "at least"}),
    );
    assert!(matches!(e, IfevalError::MissingKwarg { .. }));
    assert_names(e, "frequency");
    let e = error_of("length_constraints:number_words", json!({"num_words": 3}));
    assert_names(e, "relation");
    let e = error_of("combination:repeat_prompt", json!({"prompt_to_repeat": ""}));
    assert_names(e, "prompt_to_repeat");
    let e = error_of("keywords:existence", json!({"keywords": []}));
    assert_names(e, "keywords");
    let e = error_of("startend:end_checker", json!({"end_phrase": null}));
    assert_names(e, "end_phrase");
}

#[test]
fn values_the_harness_would_replace_or_refuse_are_errors() {
    let cases = [
        (
            "length_constraints:number_words",
            json!({"num_words": -1, "relation": "at least"}),
            "num_words",
        ),
        (
            "length_constraints:number_words",
            json!({"num_words": 3, "relation": "at most"}),
            "relation",
        ),
        (
            "length_constraints:number_words",
            json!({"num_words": "3", "relation": "at least"}),
            "num_words",
        ),
        (
            "language:response_language",
            json!({"language": "zh"}),
            "language",
        ),
        (
            "language:response_language",
            json!({"language": 5}),
            "language",
        ),
        ("keywords:existence", json!({"keywords": ["("]}), "keywords"),
        (
            "keywords:existence",
            json!({"keywords": [1, 2]}),
            "keywords",
        ),
        (
            "keywords:forbidden_words",
            json!({"forbidden_words": ["a("]}),
            "forbidden_words",
        ),
        (
            "keywords:letter_frequency",
            json!({"letter": "ab", "let_frequency": 1, "let_relation": "at least"}),
            "letter",
        ),
        (
            "keywords:letter_frequency",
            json!({"letter": "1", "let_frequency": 1, "let_relation": "at least"}),
            "letter",
        ),
        (
            "keywords:letter_frequency",
            json!({"letter": "\u{130}", "let_frequency": 1, "let_relation": "at least"}),
            "letter",
        ),
        (
            "length_constraints:nth_paragraph_first_word",
            json!({"num_paragraphs": 2, "nth_paragraph": 3, "first_word": "a"}),
            "nth_paragraph",
        ),
        (
            "length_constraints:nth_paragraph_first_word",
            json!({"num_paragraphs": 2, "nth_paragraph": 1.5, "first_word": "a"}),
            "nth_paragraph",
        ),
        (
            "length_constraints:nth_paragraph_first_word",
            json!({"num_paragraphs": 2, "nth_paragraph": 1, "first_word": 7}),
            "first_word",
        ),
        (
            "detectable_format:multiple_sections",
            json!({"section_spliter": 5, "num_sections": 1}),
            "section_spliter",
        ),
        ("punctuation:no_comma", json!({"num_words": 3}), "num_words"),
        (
            "change_case:capital_word_frequency",
            json!({"capital_frequency": 2, "capital_relation": "at most"}),
            "capital_relation",
        ),
    ];
    for (id, kw, name) in cases {
        assert_names(error_of(id, kw), name);
    }
}

#[test]
fn integer_kwargs_may_be_floats_or_true() {
    let ok = |id: &str, kw: Value, response: &str| {
        let Value::Object(map) = kw else {
            unreachable!()
        };
        check_instruction(id, &map, "", response)
    };
    let nth = json!({"num_paragraphs": 2.0, "nth_paragraph": 2.0, "first_word": "b"});
    assert_eq!(
        ok("length_constraints:nth_paragraph_first_word", nth, "a\n\nb").ok(),
        Some(true)
    );
    // Python's True is 1.
    let one = json!({"num_placeholders": true});
    assert_eq!(
        ok("detectable_content:number_placeholders", one, "[x]").ok(),
        Some(true)
    );
    // A falsy kwarg of an instruction that takes none is dropped, not refused.
    assert_eq!(
        ok(
            "punctuation:no_comma",
            json!({"num_words": 0, "x": null}),
            "a"
        )
        .ok(),
        Some(true)
    );
}

#[test]
fn too_few_kwargs_entries_is_an_error() {
    let ids = vec![
        "punctuation:no_comma".to_string(),
        "startend:quotation".to_string(),
    ];
    let e = evaluate("p", &ids, &[Map::new()], "x");
    assert!(matches!(
        e,
        Err(IfevalError::KwargsCount {
            instructions: 2,
            kwargs: 1
        })
    ));
}

#[test]
fn instruction_ids_are_the_harness_registry() {
    assert_eq!(INSTRUCTION_IDS.len(), 25);
    let mut sorted = INSTRUCTION_IDS.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(sorted.len(), 25);
    assert_eq!(INSTRUCTION_IDS[0], "keywords:existence");
    assert_eq!(INSTRUCTION_IDS[24], "startend:quotation");
}

/// Text and NLTK's `sent_tokenize` of it.
const SENTENCES: &[(&str, &[&str])] = &[
    (
        "Mr. Smith went to Washington. He said hi!",
        &["Mr. Smith went to Washington.", "He said hi!"],
    ),
    (
        "The U.S. economy grew 3.5% last year. It was big.",
        &["The U.S. economy grew 3.5% last year.", "It was big."],
    ),
    (
        "Wait... what? Really!? Yes.",
        &["Wait... what?", "Really!?", "Yes."],
    ),
    ("(Sent one.) Sent two.", &["(Sent one.)", "Sent two."]),
    (
        "He said “Stop.” Then he left.",
        &["He said “Stop.”", "Then he left."],
    ),
    (
        "J. R. R. Tolkien wrote books. They sold.",
        &["J. R. R. Tolkien wrote books.", "They sold."],
    ),
    (
        "I bought it at 5 p.m. Then I left.",
        &["I bought it at 5 p.m. Then I left."],
    ),
    (
        "Dr. Jones, Ph.D., disagreed! No.",
        &["Dr. Jones, Ph.D., disagreed!", "No."],
    ),
    ("Yes... . . . ok.", &["Yes... .", ".", ".", "ok."]),
    (
        "It costs $5.50. That is cheap.",
        &["It costs $5.50.", "That is cheap."],
    ),
    (
        "\"Hello,\" she said. \"How are you?\" He smiled.",
        &["\"Hello,\" she said.", "\"How are you?\"", "He smiled."],
    ),
    (
        "first line\nsecond line. third",
        &["first line\nsecond line.", "third"],
    ),
    ("A. B. C.", &["A.", "B. C."]),
    ("Hello", &["Hello"]),
    ("", &[]),
];

#[test]
fn punkt_splits_like_nltk() {
    for &(text, expected) in SENTENCES {
        assert_eq!(punkt::sent_tokenize(text), expected, "{text:?}");
    }
}

/// Text and NLTK's `word_tokenize` of it.
const WORDS: &[(&str, &[&str])] = &[
    ("I CAN'T DO IT.", &["I", "CA", "N'T", "DO", "IT", "."]),
    (
        "\"Hello,\" she said.",
        &["``", "Hello", ",", "''", "she", "said", "."],
    ),
    (
        "We gonna do it, cannot stop, wanna go.",
        &[
            "We", "gon", "na", "do", "it", ",", "can", "not", "stop", ",", "wan", "na", "go", ".",
        ],
    ),
    ("'Tis the season.", &["'", "Tis", "the", "season", "."]),
    (
        "U.S.A. is big... isn't it?",
        &["U.S.A.", "is", "big", "...", "is", "n't", "it", "?"],
    ),
    (
        "Prices rose 5.5% -- a record (again)!",
        &[
            "Prices", "rose", "5.5", "%", "--", "a", "record", "(", "again", ")", "!",
        ],
    ),
    (
        "He's here; they're there: I'd go.",
        &[
            "He", "'s", "here", ";", "they", "'re", "there", ":", "I", "'d", "go", ".",
        ],
    ),
    (
        "Good muffins cost $3.88\nin New York.  Please buy me\ntwo of them.\nThanks.",
        &[
            "Good", "muffins", "cost", "$", "3.88", "in", "New", "York", ".", "Please", "buy",
            "me", "two", "of", "them", ".", "Thanks", ".",
        ],
    ),
    ("«Bonjour» dit-il.", &["«", "Bonjour", "»", "dit-il", "."]),
    (
        "a*b [x] {y} <z>",
        &["a", "*", "b", "[", "x", "]", "{", "y", "}", "<", "z", ">"],
    ),
];

#[test]
fn word_tokenize_like_nltk() {
    for &(text, expected) in WORDS {
        assert_eq!(word_tokenize::word_tokenize(text), expected, "{text:?}");
    }
}

#[test]
fn punkt_parameters_are_complete() {
    let p = &*punkt::ENGLISH;
    assert_eq!(p.abbrev_types.len(), 156);
    assert_eq!(p.collocations.len(), 37);
    assert_eq!(p.sent_starters.len(), 39);
    assert_eq!(p.ortho_context.len(), 20366);
    // An abbreviation with a trailing space, reachable through `. . .` tokens.
    assert!(p.abbrev_types.contains(". . "));
}

#[test]
fn word_counts() {
    assert_eq!(checkers::count_words("Hello, world! It's 3pm."), 5);
    assert_eq!(checkers::count_words(""), 0);
    assert_eq!(checkers::count_words("snake_case x\u{b2}"), 2);
}

#[test]
fn json_edge_cases() {
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    assert!(pyjson::python_json_loads_ok(&deep));
    assert!(!pyjson::python_json_loads_ok(&"[".repeat(100_000)));
    // Python 3.11+ refuses int literals over 4300 digits, but not such floats.
    assert!(pyjson::python_json_loads_ok(&"9".repeat(4300)));
    assert!(!pyjson::python_json_loads_ok(&"9".repeat(4301)));
    assert!(pyjson::python_json_loads_ok(&format!(
        "{}.5",
        "9".repeat(5000)
    )));
    assert!(pyjson::python_json_loads_ok("1e999"));
    assert!(pyjson::python_json_loads_ok("-Infinity"));
    assert!(!pyjson::python_json_loads_ok("-"));
    assert!(!pyjson::python_json_loads_ok("\u{feff}{}"));
    assert!(!pyjson::python_json_loads_ok("{\"a\" 1}"));
    assert!(!pyjson::python_json_loads_ok("{\"a\": 1,}"));
    assert!(!pyjson::python_json_loads_ok("\"\\x41\""));
    assert!(!pyjson::python_json_loads_ok("\"\\u12\""));
}

#[test]
fn python_regex_translation() {
    let re = |p: &str, text: &str| {
        pyre::PyRegex::new(p, false, false)
            .and_then(|r| r.is_match(text))
            .unwrap_or_else(|e| panic!("{p:?}: {e}"))
    };
    // `$` also matches before a final newline.
    assert!(re("end$", "the end\n"));
    assert!(!re("end$", "the end\n\n"));
    assert!(re("^the", "the end"));
    assert!(!re("^end", "the\nend"));
    // Python's \s includes U+001C..U+001F; its \w excludes marks and includes No.
    assert!(re(r"a\sb", "a\u{1c}b"));
    assert!(re(r"^\w+$", "x\u{b2}"));
    assert!(!re(r"^\w+$", "e\u{301}"));
    assert!(re(r"\bcan\b", "can\u{301}"));
    // Literal braces and class syntax Rust would read differently.
    assert!(re("a{b}", "a{b}"));
    assert!(re("x{,2}y", "xxy"));
    assert!(re("[&&]", "&"));
    assert!(re("[a-c-]", "-"));
    assert!(re(r"[\w]", "_"));
    assert!(re("(?i)ABC", "abc"));
    assert!(re("a(?#comment)b", "ab"));
    assert!(re(r"(?P<x>a)(?P=x)", "aa"));
    // Octal escapes, verbose mode, and CPython's dotted/dotless i under IGNORECASE.
    assert!(re(r"\101\0", "A\u{0}"));
    assert!(re("(?x) a b # comment", "ab"));
    assert!(re("(?i)\u{130}", "i"));
    let ci = |p: &str, text: &str| {
        pyre::PyRegex::new(p, true, false)
            .and_then(|r| r.is_match(text))
            .unwrap_or_else(|e| panic!("{p:?}: {e}"))
    };
    assert!(ci("[h-j]", "\u{131}"));
    assert!(ci("I", "\u{130}"));
    assert!(!ci("[^i]", "\u{130}"));
    assert!(ci("K", "\u{212a}"));
    // Python 3.11+ refuses global flags after the start.
    assert!(pyre::PyRegex::new("a(?i)b", false, false).is_err());
    assert!(pyre::PyRegex::new(r"\q", false, false).is_err());
    assert!(pyre::PyRegex::new("[a", false, false).is_err());
    assert!(pyre::PyRegex::new("a\\", false, false).is_err());
}

#[test]
fn python_string_predicates() {
    assert_eq!(pystr::strip("\u{1c} a \u{85}"), "a");
    assert!(pystr::isupper("HELLO 123"));
    assert!(!pystr::isupper("123"));
    assert!(!pystr::isupper("\u{1c5}"));
    assert!(pystr::islower("\u{aa}"));
    assert!(pystr::isupper("\u{24b6}"));
    assert_eq!(
        pystr::split_ws("a\u{1f}b  c").collect::<Vec<_>>(),
        ["a", "b", "c"]
    );
}

/// Valid kwargs for every instruction, to run all checkers on odd input.
fn all_instructions() -> (Vec<String>, Vec<Map<String, Value>>) {
    let table = [
        ("keywords:existence", json!({"keywords": ["a", "\\bb"]})),
        (
            "keywords:frequency",
            json!({"keyword": "a", "frequency": 2, "relation": "at least"}),
        ),
        (
            "keywords:forbidden_words",
            json!({"forbidden_words": ["x", "y.z"]}),
        ),
        (
            "keywords:letter_frequency",
            json!({"letter": "e", "let_frequency": 2, "let_relation": "less than"}),
        ),
        ("language:response_language", json!({"language": "en"})),
        (
            "length_constraints:number_sentences",
            json!({"num_sentences": 3, "relation": "at least"}),
        ),
        (
            "length_constraints:number_paragraphs",
            json!({"num_paragraphs": 2}),
        ),
        (
            "length_constraints:number_words",
            json!({"num_words": 10, "relation": "less than"}),
        ),
        (
            "length_constraints:nth_paragraph_first_word",
            json!({"num_paragraphs": 2, "nth_paragraph": 1, "first_word": "a"}),
        ),
        (
            "detectable_content:number_placeholders",
            json!({"num_placeholders": 1}),
        ),
        (
            "detectable_content:postscript",
            json!({"postscript_marker": "P.S."}),
        ),
        (
            "detectable_format:number_bullet_lists",
            json!({"num_bullets": 1}),
        ),
        ("detectable_format:constrained_response", json!({})),
        (
            "detectable_format:number_highlighted_sections",
            json!({"num_highlights": 1}),
        ),
        (
            "detectable_format:multiple_sections",
            json!({"section_spliter": "Section", "num_sections": 1}),
        ),
        ("detectable_format:json_format", json!({})),
        ("detectable_format:title", json!({})),
        ("combination:two_responses", json!({})),
        (
            "combination:repeat_prompt",
            json!({"prompt_to_repeat": "Say hi."}),
        ),
        ("startend:end_checker", json!({"end_phrase": "Bye."})),
        (
            "change_case:capital_word_frequency",
            json!({"capital_frequency": 2, "capital_relation": "at least"}),
        ),
        ("change_case:english_capital", json!({})),
        ("change_case:english_lowercase", json!({})),
        ("punctuation:no_comma", json!({})),
        ("startend:quotation", json!({})),
    ];
    assert_eq!(table.len(), INSTRUCTION_IDS.len());
    let ids = table.iter().map(|(id, _)| id.to_string()).collect();
    let kws = table
        .into_iter()
        .map(|(_, kw)| match kw {
            Value::Object(map) => map,
            _ => unreachable!(),
        })
        .collect();
    (ids, kws)
}

#[test]
fn odd_input_never_panics() {
    let (ids, kws) = all_instructions();
    let big_sentences = "Mr. A. went to the U.S. on Jan. 3. He said: \"Hi!\" ".repeat(2_000);
    let big_token = "x".repeat(200_000);
    let no_spaces = "a!)".repeat(20_000);
    let inputs = [
        "",
        " ",
        "\n",
        "\u{0}",
        "\u{301}\u{301}",
        "\u{1c}\u{1d}\u{1e}\u{1f}",
        "\r\n\r\n",
        "*",
        "******",
        "***",
        "<<",
        ">>",
        "[",
        "]",
        "\"",
        "'",
        "...",
        ". . .",
        "--",
        "?!",
        "\u{1F600}",
        "\u{5d0}\u{5d1}\u{5d2} \u{627}\u{644}\u{639}\u{631}\u{628}\u{64a}\u{629}",
        "\u{130}\u{131}\u{3a3}\u{3c2}",
        "\u{FEFF}{}",
        "{\"a\": [1, {\"b\": null}]}",
        "Section 1 Section 2 P.S. [x] *y* <<t>>",
        big_sentences.as_str(),
        big_token.as_str(),
        no_spaces.as_str(),
    ];
    for text in inputs {
        let v = evaluate("Say hi.", &ids, &kws, text).expect("kwargs are valid");
        assert_eq!(v.strict.len(), 25);
        assert_eq!(v.loose.len(), 25);
        if pystr::strip(text).is_empty() {
            assert!(v.strict.iter().chain(&v.loose).all(|&b| !b), "{text:?}");
        }
    }
}
