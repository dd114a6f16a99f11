//! A built-in, seeded instruction data set whose answers can be checked exactly: small
//! deterministic tasks, some with a long paragraph of rules and a short answer (where loss on
//! the prompt matters most), for quick-starts, tests and evaluation without downloads.

use std::io::Write;
use std::path::Path;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::{Example, Role};
use crate::{Error, Result};

const WORDS: [&str; 24] = [
    "apple", "river", "candle", "orbit", "maple", "zebra", "lantern", "pepper", "violin", "garden",
    "copper", "meadow", "falcon", "harbor", "quartz", "tulip", "button", "canyon", "silver",
    "nectar", "pebble", "walnut", "breeze", "ember",
];
const NAMES: [&str; 10] = [
    "Alice", "Bruno", "Chen", "Dara", "Emil", "Farah", "Goran", "Hana", "Ivo", "Jun",
];
const CITIES: [&str; 8] = [
    "Lisbon", "Osaka", "Quito", "Tallinn", "Accra", "Perth", "Bergen", "Cusco",
];

const LONG_RULES: &str = "You are the validation step of an automated records pipeline. \
Each request contains a short record written as `key: value` pairs separated by semicolons. \
Keys are lowercase and never repeat; values never contain semicolons. Downstream systems parse \
your reply with a strict parser, so you must not add explanations, quotes, units, punctuation \
or surrounding whitespace, and you must copy the value exactly as it appears, preserving case. \
If you are unsure, still answer with your best guess of the exact value, since an empty reply \
is treated as a hard failure.";

const LONG_ARITH: &str = "You are helping a warehouse clerk reconcile stock counts at the end \
of a shift. The clerk reads out two quantities and an operation, and you must compute the \
result exactly. Quantities are whole numbers of boxes; there are no partial boxes and no \
negative stock. Reply with the resulting number only, written with digits and without \
thousands separators, because the answer is typed straight into the inventory system.";

/// `n` examples, deterministic for `seed`; `reference` is the exact expected answer.
pub fn builtin_examples(n: usize, seed: u64) -> Vec<Example> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n)
        .map(|i| {
            let (prompt, answer) = match rng.random_range(0..9u32) {
                0 => sort_words(&mut rng),
                1 => reverse_list(&mut rng),
                2 => arithmetic(&mut rng, false),
                3 => arithmetic(&mut rng, true),
                4 => extract_field(&mut rng),
                5 => convert_units(&mut rng),
                6 => count_letters(&mut rng),
                7 => capitalise(&mut rng),
                _ => count_vowels(&mut rng),
            };
            let mut ex = Example::single_turn(prompt, answer);
            ex.source_line = i + 1;
            ex
        })
        .collect()
}

fn pick_words(rng: &mut StdRng, k: usize) -> Vec<&'static str> {
    let mut pool: Vec<&str> = WORDS.to_vec();
    let mut out = Vec::with_capacity(k);
    for _ in 0..k {
        let i = rng.random_range(0..pool.len());
        out.push(pool.swap_remove(i));
    }
    out
}

fn sort_words(rng: &mut StdRng) -> (String, String) {
    let k = rng.random_range(3..=6);
    let words = pick_words(rng, k);
    let mut sorted = words.clone();
    sorted.sort();
    (
        format!(
            "Sort these words alphabetically and answer with the words separated by single spaces: {}",
            words.join(" ")
        ),
        sorted.join(" "),
    )
}

fn reverse_list(rng: &mut StdRng) -> (String, String) {
    let k = rng.random_range(3..=7);
    let items: Vec<String> = (0..k)
        .map(|_| rng.random_range(0..100).to_string())
        .collect();
    let mut rev = items.clone();
    rev.reverse();
    (
        format!("Reverse this list: {}", items.join(", ")),
        rev.join(", "),
    )
}

fn arithmetic(rng: &mut StdRng, long: bool) -> (String, String) {
    let mul = rng.random_bool(0.5);
    let (a, b) = if mul {
        (rng.random_range(2..=30u64), rng.random_range(2..=30u64))
    } else {
        (rng.random_range(10..=999u64), rng.random_range(10..=999u64))
    };
    let (op, word, r) = if mul {
        ("*", "multiplied by", a * b)
    } else {
        ("+", "plus", a + b)
    };
    let prompt = if long {
        format!("{LONG_ARITH}\n\nQuantities: {a} boxes {word} {b}.")
    } else {
        format!("What is {a} {op} {b}?")
    };
    (prompt, r.to_string())
}

fn extract_field(rng: &mut StdRng) -> (String, String) {
    let name = NAMES[rng.random_range(0..NAMES.len())];
    let city = CITIES[rng.random_range(0..CITIES.len())];
    let age = rng.random_range(18..90u32).to_string();
    let code = format!(
        "{}-{}",
        WORDS[rng.random_range(0..WORDS.len())],
        rng.random_range(100..1000u32)
    );
    let fields = [
        ("name", name.to_string()),
        ("city", city.to_string()),
        ("age", age),
        ("code", code),
    ];
    let (key, value) = fields[rng.random_range(0..fields.len())].clone();
    let record = fields
        .iter()
        .map(|(k, v)| format!("{k}: {v}"))
        .collect::<Vec<_>>()
        .join("; ");
    (
        format!("{LONG_RULES}\n\nRecord: {record}\nReturn the value of `{key}`."),
        value,
    )
}

fn convert_units(rng: &mut StdRng) -> (String, String) {
    match rng.random_range(0..4u32) {
        0 => {
            let km = rng.random_range(1..=50u64);
            (
                format!("Convert {km} km to metres. Answer with the number only."),
                (km * 1000).to_string(),
            )
        }
        1 => {
            let m = rng.random_range(1..=50u64) * 1000;
            (
                format!("Convert {m} m to kilometres. Answer with the number only."),
                (m / 1000).to_string(),
            )
        }
        2 => {
            let h = rng.random_range(1..=24u64);
            (
                format!("How many minutes are in {h} hours? Answer with the number only."),
                (h * 60).to_string(),
            )
        }
        _ => {
            let min = rng.random_range(1..=12u64) * 60;
            (
                format!("How many hours are {min} minutes? Answer with the number only."),
                (min / 60).to_string(),
            )
        }
    }
}

fn count_letters(rng: &mut StdRng) -> (String, String) {
    let word = WORDS[rng.random_range(0..WORDS.len())];
    let chars: Vec<char> = word.chars().collect();
    let letter = chars[rng.random_range(0..chars.len())];
    let n = chars.iter().filter(|c| **c == letter).count();
    (
        format!("How many times does the letter '{letter}' appear in the word \"{word}\"?"),
        n.to_string(),
    )
}

fn count_vowels(rng: &mut StdRng) -> (String, String) {
    let word = WORDS[rng.random_range(0..WORDS.len())];
    let n = word.chars().filter(|c| "aeiou".contains(*c)).count();
    (
        format!("How many vowels (a, e, i, o, u) are in the word \"{word}\"?"),
        n.to_string(),
    )
}

fn capitalise(rng: &mut StdRng) -> (String, String) {
    let k = rng.random_range(2..=5);
    let words = pick_words(rng, k);
    let caps: Vec<String> = words
        .iter()
        .map(|w| {
            let mut c = w.chars();
            c.next()
                .map(|f| f.to_uppercase().collect::<String>() + c.as_str())
                .unwrap_or_default()
        })
        .collect();
    (
        format!(
            "Capitalise the first letter of each word: {}",
            words.join(" ")
        ),
        caps.join(" "),
    )
}

/// Writes examples as JSONL in the `messages` format (plus `reference`), readable by
/// [`super::load_examples`].
pub fn write_jsonl(path: &Path, examples: &[Example]) -> Result<()> {
    let file = std::fs::File::create(path).map_err(|e| Error::io(path, e))?;
    let mut w = std::io::BufWriter::new(file);
    for ex in examples {
        let row = serde_json::json!({
            "messages": ex.messages,
            "reference": ex.reference,
        });
        writeln!(w, "{row}").map_err(|e| Error::io(path, e))?;
    }
    w.flush().map_err(|e| Error::io(path, e))
}

/// The answer of a built-in example, for checking generations.
pub fn answer_of(ex: &Example) -> Option<&str> {
    ex.reference.as_deref().or_else(|| {
        ex.messages
            .iter()
            .rev()
            .find(|m| m.role == Role::Assistant)
            .map(|m| m.content.as_str())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::{load_examples, LoadOptions};

    #[test]
    fn deterministic_and_checkable() {
        let a = builtin_examples(200, 7);
        assert_eq!(a, builtin_examples(200, 7));
        assert_ne!(a, builtin_examples(200, 8));
        for ex in &a {
            assert!(ex.validate().is_ok());
            assert_eq!(answer_of(ex), Some(ex.messages[1].content.as_str()));
            assert!(!ex.messages[1].content.is_empty());
        }
        let long = a
            .iter()
            .filter(|e| e.messages[0].content.len() > 400)
            .count();
        assert!(long > 20, "{long} long-prompt examples");
        let sort = a
            .iter()
            .find(|e| e.messages[0].content.starts_with("Sort"))
            .unwrap();
        let words: Vec<&str> = sort.messages[0]
            .content
            .rsplit(": ")
            .next()
            .unwrap()
            .split(' ')
            .collect();
        let mut sorted = words.clone();
        sorted.sort();
        assert_eq!(sort.reference.as_deref(), Some(sorted.join(" ").as_str()));
    }

    #[test]
    fn jsonl_round_trip() {
        let exs = builtin_examples(20, 1);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("builtin.jsonl");
        write_jsonl(&path, &exs).unwrap();
        let (back, rep) = load_examples(&path, &LoadOptions::default()).unwrap();
        assert_eq!(rep.kept, 20);
        for (a, b) in exs.iter().zip(&back) {
            assert_eq!(a.messages, b.messages);
            assert_eq!(a.reference, b.reference);
        }
    }
}
