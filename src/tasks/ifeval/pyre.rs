//! Python `re` patterns in Rust. The harness hands strings from the IFEval data
//! (keywords, forbidden words, section splitters, postscript markers) to `re` as
//! patterns, and its own patterns use `\s`, `\w`, `\b` and `$` with Python's meanings.
//! This translates Python syntax into fancy-regex syntax with those meanings, so a
//! data string matches exactly what CPython's `re` would match.

use std::fmt::Write as _;

/// Body of a character class equal to Python's `\w` on `str` patterns:
/// `str.isalnum()` (letters, every numeric character) or `_`. Rust's `\w` differs: it
/// includes combining marks and connector punctuation and leaves out `No` (e.g. `²`).
pub(crate) const WORD_BODY: &str = r"\p{L}\p{N}_";

/// Body of a character class equal to Python's `\s` on `str` patterns: Unicode
/// White_Space plus U+001C..U+001F, which CPython counts as whitespace.
pub(crate) const SPACE_BODY: &str = r"\s\x1C-\x1F";

/// Python's `\s` outside a class, for the harness's own patterns.
pub(crate) const PY_S: &str = r"[\s\x1C-\x1F]";

/// How many backtracking steps one search may take before it is abandoned. fancy-regex's
/// default; the harness has no limit, but ordinary keywords never come near it.
const BACKTRACK_LIMIT: usize = 1_000_000;

/// A compiled Python pattern.
#[derive(Debug)]
pub(crate) struct PyRegex {
    re: fancy_regex::Regex,
}

impl PyRegex {
    /// Compiles `pattern` as `re.compile(pattern, flags)` would, with `re.IGNORECASE`
    /// and `re.MULTILINE` as asked. The error says why the pattern was refused.
    pub(crate) fn new(pattern: &str, ignore_case: bool, multiline: bool) -> Result<Self, String> {
        let translated = translate(pattern, ignore_case, multiline)?;
        let re = fancy_regex::RegexBuilder::new(&translated)
            .case_insensitive(ignore_case)
            .backtrack_limit(BACKTRACK_LIMIT)
            .build()
            .map_err(|e| format!("invalid pattern {pattern:?}: {e}"))?;
        Ok(Self { re })
    }

    /// `re.search(...) is not None`.
    pub(crate) fn is_match(&self, text: &str) -> Result<bool, String> {
        self.re
            .is_match(text)
            .map_err(|e| format!("pattern {:?} gave up: {e}", self.re.as_str()))
    }

    /// `len(re.split(...)) - 1`: `re.split` also returns every capture group of every
    /// match, so a splitter with groups counts more than its matches.
    pub(crate) fn split_count(&self, text: &str) -> Result<usize, String> {
        Ok(self.count(text)? * self.re.captures_len())
    }

    /// `len(re.findall(...))`: the number of non-overlapping matches, with CPython's
    /// rule for empty matches (one may directly follow a non-empty match, which Rust's
    /// iterators skip; after an empty match the next must not be empty at that spot).
    pub(crate) fn count(&self, text: &str) -> Result<usize, String> {
        let mut n = 0;
        let mut pos = 0;
        let mut must_advance = false;
        loop {
            let found = self
                .re
                .find_from_pos(text, pos)
                .map_err(|e| format!("pattern {:?} gave up: {e}", self.re.as_str()))?;
            let Some(m) = found else { break };
            if must_advance && m.start() == pos && m.end() == pos {
                let Some(c) = text[pos..].chars().next() else {
                    break;
                };
                pos += c.len_utf8();
                must_advance = false;
                continue;
            }
            n += 1;
            must_advance = m.start() == m.end();
            pos = m.end();
        }
        Ok(n)
    }
}

/// fancy-regex text for one literal character, safe inside and outside classes and in
/// verbose mode (where a bare space would be ignored).
fn lit(c: char, out: &mut String) {
    if c.is_ascii_punctuation() {
        out.push('\\');
        out.push(c);
    } else if c.is_whitespace() || c.is_control() {
        let _ = write!(out, "\\x{{{:X}}}", c as u32);
    } else {
        out.push(c);
    }
}

/// Under `re.IGNORECASE` CPython also equates `i`, `I`, `ı` and `İ` (simple
/// lowercase plus its special fixes); Rust's case folding leaves the last two apart.
const I_FAMILY: &str = "iI\u{131}\u{130}";

fn is_i_family(c: char) -> bool {
    matches!(c, 'i' | 'I' | '\u{131}' | '\u{130}')
}

/// A literal outside a class, widened to the `i` family when case is ignored.
fn lit_outside(c: char, ignore_case: bool, out: &mut String) {
    if ignore_case && is_i_family(c) {
        let _ = write!(out, "[{I_FAMILY}]");
    } else {
        lit(c, out);
    }
}

fn word_boundary() -> String {
    format!("(?:(?<=[{w}])(?![{w}])|(?<![{w}])(?=[{w}]))", w = WORD_BODY)
}

fn not_word_boundary() -> String {
    format!("(?:(?<=[{w}])(?=[{w}])|(?<![{w}])(?![{w}]))", w = WORD_BODY)
}

/// One element of a character class: a single character (which may start a range) or
/// a ready-made fragment such as `\p{L}\p{N}_`.
enum ClassItem {
    Char(char),
    Set(String),
}

fn hex_escape(chars: &[char], i: usize, len: usize) -> Result<(char, usize), String> {
    let digits: String = chars.iter().skip(i).take(len).collect();
    if digits.chars().count() != len || !digits.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(format!("incomplete escape of {len} hex digits"));
    }
    let code = u32::from_str_radix(&digits, 16).map_err(|e| e.to_string())?;
    let c = char::from_u32(code).ok_or_else(|| format!("bad character code {code:#x}"))?;
    Ok((c, i + len))
}

/// Parses the escape whose letter is at `chars[i]` inside a class.
fn class_escape(chars: &[char], i: usize) -> Result<(ClassItem, usize), String> {
    let Some(&c) = chars.get(i) else {
        return Err("pattern ends with a backslash".into());
    };
    let item = match c {
        'w' => ClassItem::Set(WORD_BODY.into()),
        'W' => ClassItem::Set(format!("[^{WORD_BODY}]")),
        's' => ClassItem::Set(SPACE_BODY.into()),
        'S' => ClassItem::Set(format!("[^{SPACE_BODY}]")),
        'd' => ClassItem::Set(r"\d".into()),
        'D' => ClassItem::Set(r"\D".into()),
        'b' => ClassItem::Char('\u{8}'),
        'a' => ClassItem::Char('\u{7}'),
        'f' => ClassItem::Char('\u{c}'),
        'n' => ClassItem::Char('\n'),
        'r' => ClassItem::Char('\r'),
        't' => ClassItem::Char('\t'),
        'v' => ClassItem::Char('\u{b}'),
        'x' => {
            let (ch, next) = hex_escape(chars, i + 1, 2)?;
            return Ok((ClassItem::Char(ch), next));
        }
        'u' => {
            let (ch, next) = hex_escape(chars, i + 1, 4)?;
            return Ok((ClassItem::Char(ch), next));
        }
        'U' => {
            let (ch, next) = hex_escape(chars, i + 1, 8)?;
            return Ok((ClassItem::Char(ch), next));
        }
        '0'..='7' => {
            // Inside a class Python reads up to three octal digits.
            let mut j = i;
            let mut code = 0u32;
            while j < chars.len() && j < i + 3 && ('0'..='7').contains(&chars[j]) {
                code = code * 8 + (chars[j] as u32 - '0' as u32);
                j += 1;
            }
            let ch = char::from_u32(code).ok_or("bad octal escape")?;
            return Ok((ClassItem::Char(ch), j));
        }
        c if c.is_ascii_alphanumeric() => return Err(format!("bad escape \\{c}")),
        c => ClassItem::Char(c),
    };
    Ok((item, i + 1))
}

/// Translates the class starting at `chars[i] == '['`; returns the index after `]`.
fn translate_class(
    chars: &[char],
    mut i: usize,
    ignore_case: bool,
    out: &mut String,
) -> Result<usize, String> {
    i += 1;
    out.push('[');
    if chars.get(i) == Some(&'^') {
        out.push('^');
        i += 1;
    }
    let mut first = true;
    loop {
        let Some(&c) = chars.get(i) else {
            return Err("unterminated character set".into());
        };
        if c == ']' && !first {
            out.push(']');
            return Ok(i + 1);
        }
        first = false;
        let (item, next) = if c == '\\' {
            class_escape(chars, i + 1)?
        } else {
            (ClassItem::Char(c), i + 1)
        };
        i = next;
        let is_range = chars.get(i) == Some(&'-') && chars.get(i + 1).is_some_and(|&c| c != ']');
        match item {
            ClassItem::Set(body) => {
                if is_range {
                    return Err("bad character range".into());
                }
                out.push_str(&body);
            }
            ClassItem::Char(lo) if is_range => {
                let (hi, next) = if chars[i + 1] == '\\' {
                    class_escape(chars, i + 2)?
                } else {
                    (ClassItem::Char(chars[i + 1]), i + 2)
                };
                let ClassItem::Char(hi) = hi else {
                    return Err("bad character range".into());
                };
                if hi < lo {
                    return Err("bad character range".into());
                }
                lit(lo, out);
                out.push('-');
                lit(hi, out);
                if ignore_case
                    && ['i', 'I', '\u{131}', '\u{130}']
                        .iter()
                        .any(|c| (lo..=hi).contains(c))
                {
                    out.push_str(I_FAMILY);
                }
                i = next;
            }
            ClassItem::Char(c) if ignore_case && is_i_family(c) => out.push_str(I_FAMILY),
            ClassItem::Char(c) => lit(c, out),
        }
    }
}

/// Parses `{m}`, `{m,}`, `{,n}`, `{m,n}` or `{,}` at `chars[i] == '{'` as Python does;
/// `None` when the brace is a literal.
fn repeat(chars: &[char], i: usize) -> Option<(String, usize)> {
    let mut j = i + 1;
    let mut lo = String::new();
    while let Some(&c) = chars.get(j).filter(|c| c.is_ascii_digit()) {
        lo.push(c);
        j += 1;
    }
    let mut hi = None;
    if chars.get(j) == Some(&',') {
        j += 1;
        let mut h = String::new();
        while let Some(&c) = chars.get(j).filter(|c| c.is_ascii_digit()) {
            h.push(c);
            j += 1;
        }
        hi = Some(h);
    }
    if chars.get(j) != Some(&'}') || (lo.is_empty() && hi.is_none()) {
        return None;
    }
    let lo = if lo.is_empty() { "0".to_string() } else { lo };
    let text = match hi {
        None => format!("{{{lo}}}"),
        Some(h) if h.is_empty() => format!("{{{lo},}}"),
        Some(h) => format!("{{{lo},{h}}}"),
    };
    Some((text, j + 1))
}

/// Translates Python `re` syntax to fancy-regex syntax. `ignore_case` and `multiline`
/// are `re.IGNORECASE` and `re.MULTILINE`.
pub(crate) fn translate(
    pattern: &str,
    ignore_case: bool,
    multiline: bool,
) -> Result<String, String> {
    let chars: Vec<char> = pattern.chars().collect();
    let mut out = String::with_capacity(pattern.len() + 16);
    let mut flags = Flags {
        ignore_case,
        multiline,
        verbose: false,
    };
    let mut i = 0;
    // Python 3.11+ accepts global flags only before anything else.
    let mut at_start = true;
    while i < chars.len() {
        let c = chars[i];
        let is_flag_group = c == '(' && chars.get(i + 1) == Some(&'?');
        if !is_flag_group {
            at_start = false;
        }
        let (ignore_case, multiline) = (flags.ignore_case, flags.multiline);
        if flags.verbose && (is_verbose_space(c) || c == '#') {
            // Verbose mode: whitespace and `#` comments outside classes are ignored.
            if c == '#' {
                while i < chars.len() && chars[i] != '\n' {
                    i += 1;
                }
            }
            i += 1;
            continue;
        }
        match c {
            '\\' => {
                let Some(&e) = chars.get(i + 1) else {
                    return Err("pattern ends with a backslash".into());
                };
                i += 2;
                match e {
                    'w' => {
                        let _ = write!(out, "[{WORD_BODY}]");
                    }
                    'W' => {
                        let _ = write!(out, "[^{WORD_BODY}]");
                    }
                    's' => {
                        let _ = write!(out, "[{SPACE_BODY}]");
                    }
                    'S' => {
                        let _ = write!(out, "[^{SPACE_BODY}]");
                    }
                    'd' => out.push_str(r"\d"),
                    'D' => out.push_str(r"\D"),
                    'b' => out.push_str(&word_boundary()),
                    'B' => out.push_str(&not_word_boundary()),
                    'A' => out.push_str(r"\A"),
                    'Z' => out.push_str(r"\z"),
                    'a' => lit('\u{7}', &mut out),
                    'f' => lit('\u{c}', &mut out),
                    'n' => lit('\n', &mut out),
                    'r' => lit('\r', &mut out),
                    't' => lit('\t', &mut out),
                    'v' => lit('\u{b}', &mut out),
                    '0' => {
                        // `\0` and up to two more octal digits.
                        let mut code = 0u32;
                        let mut n = 0;
                        while n < 2 && chars.get(i).is_some_and(|c| ('0'..='7').contains(c)) {
                            code = code * 8 + (chars[i] as u32 - '0' as u32);
                            i += 1;
                            n += 1;
                        }
                        let ch = char::from_u32(code).ok_or("bad octal escape")?;
                        lit_outside(ch, ignore_case, &mut out);
                    }
                    '1'..='9' => {
                        // Three octal digits are a character; otherwise one or two
                        // digits are a group reference.
                        let d1 = chars.get(i).copied();
                        let d2 = chars.get(i + 1).copied();
                        let octal = |c: Option<char>| c.is_some_and(|c| ('0'..='7').contains(&c));
                        if ('1'..='7').contains(&e) && octal(d1) && octal(d2) {
                            let code: String = [e, chars[i], chars[i + 1]].iter().collect();
                            let code = u32::from_str_radix(&code, 8).map_err(|e| e.to_string())?;
                            if code > 0o377 {
                                return Err("octal escape out of range".into());
                            }
                            let ch = char::from_u32(code).ok_or("bad octal escape")?;
                            lit_outside(ch, ignore_case, &mut out);
                            i += 2;
                        } else {
                            out.push('\\');
                            out.push(e);
                            if let Some(d) = d1.filter(char::is_ascii_digit) {
                                out.push(d);
                                i += 1;
                            }
                        }
                    }
                    'x' | 'u' | 'U' => {
                        let len = match e {
                            'x' => 2,
                            'u' => 4,
                            _ => 8,
                        };
                        let (ch, next) = hex_escape(&chars, i, len)?;
                        lit_outside(ch, ignore_case, &mut out);
                        i = next;
                    }
                    e if e.is_ascii_alphanumeric() => return Err(format!("bad escape \\{e}")),
                    e => lit_outside(e, ignore_case, &mut out),
                }
            }
            '[' => i = translate_class(&chars, i, ignore_case, &mut out)?,
            '{' => match repeat(&chars, i) {
                Some((text, next)) => {
                    out.push_str(&text);
                    i = next;
                }
                None => {
                    lit('{', &mut out);
                    i += 1;
                }
            },
            '}' => {
                lit('}', &mut out);
                i += 1;
            }
            '$' => {
                out.push_str(if multiline { "(?m:$)" } else { r"(?=\n?\z)" });
                i += 1;
            }
            '^' => {
                out.push_str(if multiline { "(?m:^)" } else { r"\A" });
                i += 1;
            }
            '(' if is_flag_group => {
                i = translate_group_start(&chars, i, &mut out, &mut flags, &mut at_start)?;
            }
            '.' | '*' | '+' | '?' | '|' | '(' | ')' => {
                out.push(c);
                i += 1;
            }
            _ => {
                lit_outside(c, ignore_case, &mut out);
                i += 1;
            }
        }
    }
    // A leading `(?i)` was consumed above; it still governs the whole pattern.
    if flags.ignore_case && !ignore_case {
        out.insert_str(0, "(?i)");
    }
    Ok(out)
}

/// Whitespace that `re.VERBOSE` skips (`string.whitespace`).
fn is_verbose_space(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\n' | '\r' | '\u{b}' | '\u{c}')
}

/// Whether `chars[i..]` starts with a global flags group such as `(?i)`.
fn is_global_flags(chars: &[char], i: usize) -> bool {
    let mut j = i + 2;
    while chars
        .get(j)
        .is_some_and(|c| matches!(c, 'i' | 's' | 'x' | 'm' | 'u' | 'a' | 'L'))
    {
        j += 1;
    }
    j > i + 2 && chars.get(j) == Some(&')')
}

/// Flags in force for the rest of the pattern.
struct Flags {
    ignore_case: bool,
    multiline: bool,
    verbose: bool,
}

/// Translates a `(?...` construct at `chars[i]`; returns the index after what it consumed.
fn translate_group_start(
    chars: &[char],
    i: usize,
    out: &mut String,
    flags: &mut Flags,
    at_start: &mut bool,
) -> Result<usize, String> {
    let rest: String = chars.iter().skip(i + 2).take(3).collect();
    if !rest.starts_with('#') && !is_global_flags(chars, i) {
        *at_start = false;
    }
    if rest.starts_with('#') {
        // Comment: dropped up to the first `)`.
        let mut j = i + 3;
        while j < chars.len() && chars[j] != ')' {
            j += 1;
        }
        if j >= chars.len() {
            return Err("missing ), unterminated comment".into());
        }
        return Ok(j + 1);
    }
    if rest.starts_with("P=") {
        let mut j = i + 4;
        let mut name = String::new();
        while j < chars.len() && chars[j] != ')' {
            name.push(chars[j]);
            j += 1;
        }
        if j >= chars.len() {
            return Err("missing ) after group name".into());
        }
        let _ = write!(out, "\\k<{name}>");
        return Ok(j + 1);
    }
    // Introducers that mean the same in both syntaxes, copied whole so the loop
    // does not read them as literals.
    for intro in ["<=", "<!", ":", "=", "!", ">"] {
        if rest.starts_with(intro) {
            let _ = write!(out, "(?{intro}");
            return Ok(i + 2 + intro.len());
        }
    }
    if rest.starts_with("P<") || rest.starts_with('(') {
        // A group name `(?P<name>` or a condition `(?(name)`: copied up to its end.
        let close = if rest.starts_with('(') { ')' } else { '>' };
        let mut j = i + 3;
        while j < chars.len() && chars[j] != close {
            j += 1;
        }
        if j >= chars.len() {
            return Err("unterminated group name".into());
        }
        out.extend(&chars[i..=j]);
        return Ok(j + 1);
    }
    // Inline flags: `(?imsx)` for the whole pattern or `(?imsx-imsx:...)` for a group.
    let mut j = i + 2;
    let mut on = String::new();
    let mut off = String::new();
    let mut negate = false;
    while let Some(&f) = chars.get(j) {
        match f {
            'i' | 's' | 'x' | 'm' | 'u' => {
                if negate {
                    off.push(f);
                } else {
                    on.push(f);
                }
            }
            '-' => negate = true,
            ')' | ':' => break,
            'a' | 'L' => return Err(format!("flag {f} is not supported")),
            _ => return Err(format!("unknown flag {f}")),
        }
        j += 1;
    }
    let Some(&end) = chars.get(j) else {
        return Err("missing -, : or ) after flags".into());
    };
    if end == ')' {
        if !*at_start {
            return Err("global flags not at the start of the expression".into());
        }
        if !off.is_empty() {
            return Err("missing : after flags".into());
        }
        flags.multiline |= on.contains('m');
        flags.ignore_case |= on.contains('i');
        flags.verbose |= on.contains('x');
        if on.contains('s') {
            out.push_str("(?s)");
        }
        return Ok(j + 1);
    }
    // Scoped flags: `i` and `s` mean the same in fancy-regex (without the `i`-family
    // widening); `m` and `x` change how this translation reads the group, so no.
    if [&on, &off]
        .iter()
        .any(|f| f.contains('m') || f.contains('x'))
    {
        return Err("scoped MULTILINE or VERBOSE flags are not supported".into());
    }
    let keep = |s: &str| -> String { s.chars().filter(|c| matches!(c, 'i' | 's')).collect() };
    let (on, off) = (keep(&on), keep(&off));
    if off.is_empty() {
        let _ = write!(out, "(?{on}:");
    } else {
        let _ = write!(out, "(?{on}-{off}:");
    }
    Ok(j + 1)
}
