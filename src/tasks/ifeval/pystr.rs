//! Python `str` semantics that IFEval verdicts hinge on (`isspace`, `strip`, `split`,
//! `isupper`, `islower`), because Rust's std counterparts draw the lines elsewhere.

/// `str.isspace()` for one character. CPython counts U+001C..U+001F (information
/// separators) as whitespace; Unicode's White_Space, which Rust uses, does not.
pub(crate) fn is_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// `str.strip()` with no argument.
pub(crate) fn strip(s: &str) -> &str {
    s.trim_matches(is_space)
}

/// `str.rstrip()` with no argument.
pub(crate) fn rstrip(s: &str) -> &str {
    s.trim_end_matches(is_space)
}

/// `str.split()` with no argument: runs of whitespace separate, empty pieces vanish.
pub(crate) fn split_ws(s: &str) -> impl Iterator<Item = &str> {
    s.split(is_space).filter(|piece| !piece.is_empty())
}

/// `str.lower()`. Both languages apply full case mapping, final sigma included.
pub(crate) fn lower(s: &str) -> String {
    s.to_lowercase()
}

/// General category Lt. Python's `isupper`/`islower` reject titlecase letters, and
/// Rust's std has no predicate for them; the set is small and stable.
fn is_titlecase(c: char) -> bool {
    matches!(
        c,
        '\u{1C5}'
            | '\u{1C8}'
            | '\u{1CB}'
            | '\u{1F2}'
            | '\u{1F88}'..='\u{1F8F}'
            | '\u{1F98}'..='\u{1F9F}'
            | '\u{1FA8}'..='\u{1FAF}'
            | '\u{1FBC}'
            | '\u{1FCC}'
            | '\u{1FFC}'
    )
}

/// `str.isupper()`: at least one cased character and none lowercase or titlecase.
/// CPython's flags are the derived Uppercase/Lowercase properties, as Rust's are.
pub(crate) fn isupper(s: &str) -> bool {
    let mut cased = false;
    for c in s.chars() {
        if c.is_lowercase() || is_titlecase(c) {
            return false;
        }
        if c.is_uppercase() {
            cased = true;
        }
    }
    cased
}

/// `str.islower()`: at least one cased character and none uppercase or titlecase.
pub(crate) fn islower(s: &str) -> bool {
    let mut cased = false;
    for c in s.chars() {
        if c.is_uppercase() || is_titlecase(c) {
            return false;
        }
        if c.is_lowercase() {
            cased = true;
        }
    }
    cased
}

/// `c.isupper()` for a one-character string.
pub(crate) fn char_isupper(c: char) -> bool {
    c.is_uppercase() && !c.is_lowercase() && !is_titlecase(c)
}

/// `c.islower()` for a one-character string.
pub(crate) fn char_islower(c: char) -> bool {
    c.is_lowercase() && !c.is_uppercase() && !is_titlecase(c)
}
