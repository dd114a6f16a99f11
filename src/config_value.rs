//! Typed configuration values read from text: enum names from flags (through the same serde
//! names the TOML files use, so a flag and a config key accept exactly the same words), and the
//! "did you mean" hint for an unknown key or name.

use serde::de::value::{Error as ValueError, StrDeserializer};
use serde::de::{DeserializeOwned, IntoDeserializer};

use crate::{Error, Result};

/// Parses `text` as the serde enum `T` (its TOML spelling); the error names `field`, the value
/// and the valid values.
pub fn parse_enum<T: DeserializeOwned>(field: &str, text: &str) -> Result<T> {
    let de: StrDeserializer<'_, ValueError> = text.trim().into_deserializer();
    T::deserialize(de).map_err(|e| Error::InvalidArgument(format!("{field} `{text}`: {e}")))
}

/// Levenshtein distance over chars.
pub fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.iter().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            cur[j + 1] = (prev[j] + usize::from(ca != cb))
                .min(prev[j + 1] + 1)
                .min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

/// The candidate closest to `name`, if it is close enough to be a likely typo.
pub fn nearest<'a>(name: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    candidates
        .into_iter()
        .map(|c| (edit_distance(name, c), c))
        .filter(|(d, _)| *d <= name.chars().count().max(3) / 2 + 2)
        .min()
        .map(|(_, c)| c)
}

/// Adds "did you mean `x`?" to serde's "unknown field `y`, expected one of ..." message.
pub fn with_key_hint(message: &str, valid: &[&str]) -> String {
    let unknown = message
        .split_once("unknown field `")
        .and_then(|(_, rest)| rest.split_once('`'))
        .map(|(key, _)| key);
    match unknown.and_then(|key| nearest(key, valid.iter().copied()).map(|n| (key, n))) {
        Some((key, near)) => format!("unknown key `{key}` (did you mean `{near}`?)\n{message}"),
        None => message.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, serde::Deserialize)]
    #[serde(rename_all = "kebab-case")]
    enum Colour {
        DarkRed,
        #[serde(alias = "grey")]
        Gray,
    }

    #[test]
    fn enums_parse_by_their_serde_names() {
        assert_eq!(
            parse_enum::<Colour>("colour", "dark-red").unwrap(),
            Colour::DarkRed
        );
        assert_eq!(
            parse_enum::<Colour>("colour", "grey").unwrap(),
            Colour::Gray
        );
        let err = parse_enum::<Colour>("colour", "blue")
            .unwrap_err()
            .to_string();
        assert!(err.contains("colour `blue`"), "{err}");
        assert!(err.contains("dark-red"), "{err}");
    }

    #[test]
    fn nearest_names_a_likely_typo_only() {
        assert_eq!(nearest("rnak", ["r", "rank", "seed"]), Some("rank"));
        assert_eq!(nearest("zzzzzzzz", ["r", "rank"]), None);
        let hint = with_key_hint(
            "unknown field `lora_alhpa`, expected one of `r`, `lora_alpha`",
            &["r", "lora_alpha"],
        );
        assert!(hint.starts_with("unknown key `lora_alhpa` (did you mean `lora_alpha`?)"));
    }
}
