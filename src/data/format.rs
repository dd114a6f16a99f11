//! Reading instruction data files: JSONL or a JSON array, in Alpaca, prompt/response (with a
//! field mapping) or chat-messages layout, detected per file. Every bad row is either an error
//! naming its file and line or counted in the [`LoadReport`]; none is dropped silently.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::{AlpacaFields, DataError, Example, Message, Role};
use crate::{Error, Result};

/// Which field holds the prompt and which the response, e.g. GSM8K's `question`/`answer`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FieldMap {
    pub prompt: String,
    pub response: String,
}

impl FieldMap {
    pub fn new(prompt: impl Into<String>, response: impl Into<String>) -> Self {
        Self {
            prompt: prompt.into(),
            response: response.into(),
        }
    }

    /// The mapping named by `--prompt-field` / `--response-field`; a missing half keeps its
    /// default name. `None` when neither is given (auto-detection).
    pub fn from_fields(prompt: Option<&str>, response: Option<&str>) -> Option<Self> {
        if prompt.is_none() && response.is_none() {
            return None;
        }
        Some(Self::new(
            prompt.unwrap_or("prompt"),
            response.unwrap_or("response"),
        ))
    }
}

impl Default for FieldMap {
    fn default() -> Self {
        Self::new("prompt", "response")
    }
}

/// Pairs recognised by auto-detection, in order.
const KNOWN_PAIRS: [(&str, &str); 3] = [
    ("prompt", "response"),
    ("question", "answer"),
    ("prompt", "completion"),
];

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum Format {
    /// Decide from the first row of the file.
    #[default]
    Auto,
    /// `instruction`, optional `input`, `output`.
    Alpaca,
    /// Two fields named by the map.
    PromptResponse(FieldMap),
    /// `messages: [{role, content}]` (or ShareGPT `conversations: [{from, value}]`).
    Messages,
}

/// What loading does with a malformed row.
/// The data layout a config or flag names; [`DataFormat::resolve`] gives the [`Format`] to load
/// with (a prompt/response layout takes its field names from the config's field map).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DataFormat {
    /// Detected from the first row.
    #[default]
    Auto,
    Alpaca,
    PromptResponse,
    /// `messages` (or ShareGPT `conversations`).
    #[serde(alias = "messages")]
    Chat,
}

impl std::str::FromStr for DataFormat {
    type Err = crate::Error;
    fn from_str(s: &str) -> crate::Result<Self> {
        crate::config_value::parse_enum("format", s)
    }
}

impl std::str::FromStr for OnBadRow {
    type Err = crate::Error;
    fn from_str(s: &str) -> crate::Result<Self> {
        crate::config_value::parse_enum("on_bad_row", s)
    }
}

impl DataFormat {
    /// The loader's format; `fields` names the prompt/response fields (default names if `None`).
    pub fn resolve(self, fields: Option<&FieldMap>) -> Format {
        match self {
            Self::Auto => Format::Auto,
            Self::Alpaca => Format::Alpaca,
            Self::PromptResponse => Format::PromptResponse(fields.cloned().unwrap_or_default()),
            Self::Chat => Format::Messages,
        }
    }
}

/// What loading does with a malformed row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnBadRow {
    /// Stop at the first bad row.
    #[default]
    Error,
    /// Skip it, counting it (with its reason) in the report.
    Skip,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct LoadOptions {
    pub format: Format,
    /// With `Format::Auto`, a mapping makes the file prompt/response with these fields.
    pub field_map: Option<FieldMap>,
    pub on_bad_row: OnBadRow,
}

#[derive(Debug, Clone, PartialEq)]
pub struct LoadReport {
    pub path: std::path::PathBuf,
    /// The format used (the detected one under `Format::Auto`).
    pub format: Format,
    pub kept: usize,
    pub skipped: usize,
    /// `(line, reason)` for each skipped row.
    pub skipped_rows: Vec<(usize, String)>,
}

impl LoadReport {
    /// Skipped rows counted by reason.
    pub fn reasons(&self) -> BTreeMap<String, usize> {
        let mut m = BTreeMap::new();
        for (_, r) in &self.skipped_rows {
            *m.entry(r.clone()).or_default() += 1;
        }
        m
    }
}

impl std::fmt::Display for LoadReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: {:?}, {} rows kept, {} skipped",
            self.path.display(),
            self.format,
            self.kept,
            self.skipped
        )?;
        for (r, n) in self.reasons() {
            write!(f, "\n  {n} x {r}")?;
        }
        Ok(())
    }
}

/// Reads a `.jsonl` or `.json` file of examples.
pub fn load_examples(path: &Path, opts: &LoadOptions) -> Result<(Vec<Example>, LoadReport)> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    parse_examples(&text, path, opts)
}

/// Parses file contents; `path` is only used to name rows in errors and in the examples.
pub fn parse_examples(
    text: &str,
    path: &Path,
    opts: &LoadOptions,
) -> Result<(Vec<Example>, LoadReport)> {
    let rows = split_rows(text, path)?;
    let source: Arc<Path> = Arc::from(path);
    let mut format = match (&opts.format, &opts.field_map) {
        (Format::Auto, Some(map)) => Format::PromptResponse(map.clone()),
        (f, _) => f.clone(),
    };
    let mut report = LoadReport {
        path: path.to_path_buf(),
        format: format.clone(),
        kept: 0,
        skipped: 0,
        skipped_rows: Vec::new(),
    };
    let mut examples = Vec::new();
    for (line, raw) in rows {
        let parsed = serde_json::from_str::<Value>(raw)
            .map_err(|e| format!("invalid JSON: {e}"))
            .and_then(|v| match v {
                Value::Object(o) => Ok(o),
                _ => Err("a row must be a JSON object".to_string()),
            });
        let result = parsed.and_then(|obj| {
            if format == Format::Auto {
                format = detect(&obj).ok_or_else(|| {
                    format!(
                        "cannot detect the format from keys {:?}: expected `messages`, `instruction`+`output`, or one of {:?} (or give a field mapping)",
                        obj.keys().collect::<Vec<_>>(),
                        KNOWN_PAIRS
                    )
                })?;
                report.format = format.clone();
            }
            parse_row(&obj, &format)
        });
        match result.and_then(|mut ex| {
            ex.source_line = line;
            ex.source_path = Some(source.clone());
            ex.validate().map(|_| ex)
        }) {
            Ok(ex) => {
                report.kept += 1;
                examples.push(ex);
            }
            Err(message) => match opts.on_bad_row {
                OnBadRow::Error => return Err(DataError::bad_row(path, line, message).into()),
                OnBadRow::Skip => {
                    report.skipped += 1;
                    report.skipped_rows.push((line, message));
                }
            },
        }
    }
    Ok((examples, report))
}

fn detect(obj: &Map<String, Value>) -> Option<Format> {
    if obj.contains_key("messages") || obj.contains_key("conversations") {
        return Some(Format::Messages);
    }
    if obj.contains_key("instruction") {
        return Some(Format::Alpaca);
    }
    KNOWN_PAIRS
        .iter()
        .find(|(p, r)| obj.contains_key(*p) && obj.contains_key(*r))
        .map(|(p, r)| Format::PromptResponse(FieldMap::new(*p, *r)))
}

fn get_str<'a>(obj: &'a Map<String, Value>, key: &str) -> Result<&'a str, String> {
    match obj.get(key) {
        Some(Value::String(s)) => Ok(s),
        Some(_) => Err(format!("field `{key}` is not a string")),
        None => Err(format!("missing field `{key}`")),
    }
}

fn opt_str<'a>(obj: &'a Map<String, Value>, key: &str) -> Result<Option<&'a str>, String> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(format!("field `{key}` is not a string")),
    }
}

fn parse_row(obj: &Map<String, Value>, format: &Format) -> Result<Example, String> {
    let reference = opt_str(obj, "reference")?.map(str::to_string);
    let mut ex = match format {
        Format::Auto => return Err("format not detected".into()),
        Format::Alpaca => {
            let instruction = get_str(obj, "instruction")?;
            let input = opt_str(obj, "input")?.filter(|s| !s.trim().is_empty());
            let output = get_str(obj, "output")?;
            let user = match input {
                Some(i) => format!("{instruction}\n\n{i}"),
                None => instruction.to_string(),
            };
            let mut ex = Example::single_turn(user, output);
            ex.alpaca = Some(AlpacaFields {
                instruction: instruction.to_string(),
                input: input.map(str::to_string),
            });
            ex
        }
        Format::PromptResponse(map) => {
            Example::single_turn(get_str(obj, &map.prompt)?, get_str(obj, &map.response)?)
        }
        Format::Messages => {
            let (key, role_key, content_key) = if obj.contains_key("messages") {
                ("messages", "role", "content")
            } else {
                ("conversations", "from", "value")
            };
            let list = match obj.get(key) {
                Some(Value::Array(a)) => a,
                Some(_) => return Err(format!("field `{key}` is not an array")),
                None => return Err("missing field `messages`".into()),
            };
            let mut messages = Vec::with_capacity(list.len());
            for (i, m) in list.iter().enumerate() {
                let m = m
                    .as_object()
                    .ok_or_else(|| format!("message {i} is not an object"))?;
                let role = get_str(m, role_key).map_err(|e| format!("message {i}: {e}"))?;
                let role = Role::parse(role).ok_or_else(|| {
                    format!(
                        "message {i}: unknown role `{role}` (expected system, user or assistant)"
                    )
                })?;
                let content = get_str(m, content_key).map_err(|e| format!("message {i}: {e}"))?;
                messages.push(Message::new(role, content));
            }
            let last = messages
                .iter()
                .rev()
                .find(|m| m.role == Role::Assistant)
                .map(|m| m.content.clone());
            Example {
                messages,
                reference: last,
                source_line: 0,
                source_path: None,
                alpaca: None,
            }
        }
    };
    if reference.is_some() {
        ex.reference = reference;
    }
    Ok(ex)
}

/// Splits a file into `(1-based line, row text)`: JSONL lines (blank lines ignored) or the
/// elements of a top-level JSON array, each with the line it starts on.
pub(crate) fn split_rows<'a>(text: &'a str, path: &Path) -> Result<Vec<(usize, &'a str)>> {
    let trimmed = text.trim_start_matches('\u{feff}');
    let offset = text.len() - trimmed.len();
    if trimmed.trim_start().starts_with('[') {
        return split_array(text, offset, path);
    }
    Ok(text
        .lines()
        .enumerate()
        .map(|(i, l)| (i + 1, l.trim_start_matches('\u{feff}')))
        .filter(|(_, l)| !l.trim().is_empty())
        .collect())
}

fn split_array<'a>(text: &'a str, from: usize, path: &Path) -> Result<Vec<(usize, &'a str)>> {
    let bytes = text.as_bytes();
    let mut rows = Vec::new();
    let mut depth = 0usize;
    let mut in_str = false;
    let mut escaped = false;
    let mut start: Option<usize> = None;
    let mut line = 1usize;
    let mut start_line = 1usize;
    let mut closed = false;
    for (i, &b) in bytes.iter().enumerate().skip(from) {
        if b == b'\n' {
            line += 1;
        }
        if in_str {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_str = false,
                _ => {}
            }
            continue;
        }
        if closed {
            if !b.is_ascii_whitespace() {
                return Err(Error::invalid_file(
                    path,
                    format!("line {line}: text after the closing `]` of the JSON array"),
                ));
            }
            continue;
        }
        match b {
            b'"' => in_str = true,
            b'[' | b'{' => depth += 1,
            b']' | b'}' => {
                if depth == 1 && b == b']' {
                    if let Some(s) = start.take() {
                        rows.push((start_line, text[s..i].trim_end()));
                    }
                    closed = true;
                }
                depth = depth.saturating_sub(1);
                continue;
            }
            b',' if depth == 1 => {
                match start.take() {
                    Some(s) => rows.push((start_line, text[s..i].trim_end())),
                    None => rows.push((line, "")),
                }
                continue;
            }
            _ => {}
        }
        if depth >= 1 && start.is_none() && !b.is_ascii_whitespace() && !(depth == 1 && b == b'[') {
            start = Some(i);
            start_line = line;
        }
    }
    if !closed {
        return Err(Error::invalid_file(
            path,
            "the JSON array is not closed (missing `]`)",
        ));
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str, opts: &LoadOptions) -> Result<(Vec<Example>, LoadReport)> {
        parse_examples(text, Path::new("data/train.jsonl"), opts)
    }

    fn err_of(text: &str) -> String {
        parse(text, &LoadOptions::default())
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn alpaca_rows() {
        let text = r#"{"instruction": "Add", "input": "2 and 3", "output": "5"}

{"instruction": "Say hi", "input": "", "output": "hi"}"#;
        let (exs, rep) = parse(text, &LoadOptions::default()).unwrap();
        assert_eq!(rep.format, Format::Alpaca);
        assert_eq!(rep.kept, 2);
        assert_eq!(exs[0].messages[0].content, "Add\n\n2 and 3");
        assert_eq!(
            exs[0].alpaca.as_ref().unwrap().input.as_deref(),
            Some("2 and 3")
        );
        assert_eq!(exs[1].source_line, 3);
        assert_eq!(exs[1].alpaca.as_ref().unwrap().input, None);
        assert_eq!(exs[1].reference.as_deref(), Some("hi"));
        assert_eq!(exs[1].location(), "data/train.jsonl:3");
    }

    #[test]
    fn prompt_response_and_field_map() {
        let (exs, rep) = parse(
            r#"{"prompt": "p", "response": "r"}"#,
            &LoadOptions::default(),
        )
        .unwrap();
        assert_eq!(rep.format, Format::PromptResponse(FieldMap::default()));
        assert_eq!(exs[0].messages[1], Message::new(Role::Assistant, "r"));
        let gsm = r#"{"question": "1+1?", "answer": "1+1=2\n#### 2"}"#;
        let (exs, rep) = parse(gsm, &LoadOptions::default()).unwrap();
        assert_eq!(
            rep.format,
            Format::PromptResponse(FieldMap::new("question", "answer"))
        );
        assert_eq!(exs[0].messages[0].content, "1+1?");
        let opts = LoadOptions {
            field_map: Some(FieldMap::new("q", "a")),
            ..Default::default()
        };
        let (exs, _) = parse(r#"{"q": "x", "a": "y", "reference": "Y"}"#, &opts).unwrap();
        assert_eq!(exs[0].messages[1].content, "y");
        assert_eq!(exs[0].reference.as_deref(), Some("Y"));
    }

    #[test]
    fn chat_rows_multi_turn_system_and_sharegpt() {
        let text = r#"{"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u1"}, {"role": "assistant", "content": "a1"}, {"role": "user", "content": "u2"}, {"role": "assistant", "content": "a2"}]}
{"conversations": [{"from": "human", "value": "u"}, {"from": "gpt", "value": "a"}]}"#;
        let (exs, rep) = parse(text, &LoadOptions::default()).unwrap();
        assert_eq!(rep.format, Format::Messages);
        assert_eq!(exs[0].messages.len(), 5);
        assert_eq!(exs[0].reference.as_deref(), Some("a2"));
        assert_eq!(exs[1].messages[1], Message::new(Role::Assistant, "a"));
    }

    #[test]
    fn json_array_rows_have_their_lines() {
        let text = "[\n  {\"prompt\": \"a, [b]\", \"response\": \"c\"},\n  {\"prompt\": \"d\",\n   \"response\": \"\"}\n]\n";
        let err = parse(text, &LoadOptions::default())
            .unwrap_err()
            .to_string();
        assert_eq!(err, "data/train.jsonl:3: empty response");
        let opts = LoadOptions {
            on_bad_row: OnBadRow::Skip,
            ..Default::default()
        };
        let (exs, rep) = parse(text, &opts).unwrap();
        assert_eq!(exs.len(), 1);
        assert_eq!(exs[0].messages[0].content, "a, [b]");
        assert_eq!(rep.skipped_rows, vec![(3, "empty response".to_string())]);
        assert!(parse("[{\"prompt\": \"a\"", &opts).is_err());
    }

    #[test]
    fn bad_invalid_json_names_file_and_line() {
        let e = err_of("{\"prompt\": \"a\", \"response\": \"b\"}\n{\"prompt\": oops}\n");
        assert!(e.starts_with("data/train.jsonl:2: invalid JSON"), "{e}");
    }

    #[test]
    fn bad_missing_field_names_file_and_line() {
        let e = err_of("{\"instruction\": \"a\", \"output\": \"b\"}\n{\"instruction\": \"a\"}\n");
        assert_eq!(e, "data/train.jsonl:2: missing field `output`");
    }

    #[test]
    fn bad_empty_response_names_file_and_line() {
        let e = err_of("{\"prompt\": \"a\", \"response\": \"  \"}\n");
        assert_eq!(e, "data/train.jsonl:1: empty response");
    }

    #[test]
    fn bad_role_order_names_file_and_line() {
        let e = err_of(
            "{\"messages\": [{\"role\": \"user\", \"content\": \"a\"}, {\"role\": \"user\", \"content\": \"b\"}]}",
        );
        assert!(e.starts_with("data/train.jsonl:1: wrong role order"), "{e}");
        let e = err_of("{\"messages\": [{\"role\": \"user\", \"content\": \"a\"}]}");
        assert_eq!(
            e,
            "data/train.jsonl:1: the last message must be from the assistant"
        );
    }

    #[test]
    fn bad_unknown_role_names_file_and_line() {
        let e = err_of(
            "{\"messages\": [{\"role\": \"tool\", \"content\": \"a\"}, {\"role\": \"assistant\", \"content\": \"b\"}]}",
        );
        assert!(
            e.starts_with("data/train.jsonl:1: message 0: unknown role `tool`"),
            "{e}"
        );
    }

    #[test]
    fn skip_counts_every_reason() {
        let text = "{\"prompt\": \"a\", \"response\": \"b\"}\nnot json\n{\"prompt\": \"a\"}\n{\"prompt\": \"a\", \"response\": \"\"}\n";
        let opts = LoadOptions {
            on_bad_row: OnBadRow::Skip,
            ..Default::default()
        };
        let (exs, rep) = parse(text, &opts).unwrap();
        assert_eq!((exs.len(), rep.kept, rep.skipped), (1, 1, 3));
        assert_eq!(
            rep.skipped_rows.iter().map(|r| r.0).collect::<Vec<_>>(),
            vec![2, 3, 4]
        );
        assert_eq!(rep.reasons().get("missing field `response`"), Some(&1));
    }

    #[test]
    fn format_override_is_enforced_on_every_row() {
        let opts = LoadOptions {
            format: Format::Alpaca,
            ..Default::default()
        };
        let e = parse("{\"prompt\": \"a\", \"response\": \"b\"}", &opts)
            .unwrap_err()
            .to_string();
        assert_eq!(e, "data/train.jsonl:1: missing field `instruction`");
        let mixed = "{\"messages\": [{\"role\": \"user\", \"content\": \"a\"}, {\"role\": \"assistant\", \"content\": \"b\"}]}\n{\"prompt\": \"a\", \"response\": \"b\"}";
        let e = err_of(mixed);
        assert_eq!(e, "data/train.jsonl:2: missing field `messages`");
    }

    #[test]
    fn undetectable_format_is_an_error() {
        let e = err_of("{\"foo\": 1}");
        assert!(
            e.starts_with("data/train.jsonl:1: cannot detect the format"),
            "{e}"
        );
    }

    #[test]
    fn real_data_files_load() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/data");
        for (name, rows) in [("gsm8k_test.jsonl", 1319), ("lima_data.jsonl", 1030)] {
            let path = Path::new(dir).join(name);
            if !path.exists() {
                eprintln!("SKIPPED: {} is absent", path.display());
                continue;
            }
            let (exs, rep) = load_examples(&path, &LoadOptions::default()).unwrap();
            assert_eq!(exs.len(), rows, "{rep}");
        }
    }
}
