//! Instruction data: formats, templates, token-level loss weights, batches.
//!
//! The pipeline is `load_examples` (any supported file format -> [`Example`]s) ->
//! [`tokenize_examples`] (one template, tokenized once, every token classified by [`TokenKind`]) ->
//! [`LossWeights::token_weights`] / [`Batch::new`] (λp/λr and per-role weights applied without
//! re-tokenizing, so a weight sweep shares one tokenization).

pub mod batch;
pub mod builtin;
pub mod format;
pub mod mask;
pub mod template;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

pub use batch::{fingerprint, length_grouped_batches, Batch};
pub use builtin::{builtin_examples, write_jsonl};
pub use format::{
    load_examples, parse_examples, DataFormat, FieldMap, Format, LoadOptions, LoadReport, OnBadRow,
};
pub use mask::{
    tokenize_example, tokenize_examples, Boundary, LossWeights, TokenKind, TokenizeOptions,
    TokenizeReport, Tokenized, TokenizedExample, Truncation,
};
pub use template::{ChatTemplate, ModelTokens, Template};

/// Errors in user data, always naming the file and line.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{path}:{line}: {message}")]
    BadRow {
        path: PathBuf,
        line: usize,
        message: String,
    },
}

impl DataError {
    pub(crate) fn bad_row(path: &Path, line: usize, message: impl Into<String>) -> Self {
        DataError::BadRow {
            path: path.to_path_buf(),
            line,
            message: message.into(),
        }
    }
}

/// Who speaks a message; serialized as the lowercase names chat templates expect.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    User,
    Assistant,
}

impl Role {
    /// A conversation's role name: `system`, `user` (or ShareGPT's `human`), `assistant` (or
    /// `gpt`); `None` for any other.
    pub fn parse(name: &str) -> Option<Role> {
        match name {
            "system" => Some(Role::System),
            "user" | "human" => Some(Role::User),
            "assistant" | "gpt" => Some(Role::Assistant),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub role: Role,
    pub content: String,
}

impl Message {
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        Self {
            role,
            content: content.into(),
        }
    }
}

/// The Alpaca fields of a row, kept so that the Alpaca template can lay out `### Input:` itself
/// (the chat messages only carry `instruction` and `input` joined).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AlpacaFields {
    pub instruction: String,
    pub input: Option<String>,
}

/// One training or evaluation example, whatever file format it came from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Example {
    /// Optional system message first, then user/assistant alternating, ending with assistant.
    pub messages: Vec<Message>,
    /// The exact answer, for evaluation (the last assistant turn unless the row gives one).
    pub reference: Option<String>,
    /// 1-based line of the row in its file (0 for generated examples).
    pub source_line: usize,
    /// The file the row came from, so later errors (tokenization) can still name file:line.
    pub source_path: Option<Arc<Path>>,
    /// Set for Alpaca rows.
    pub alpaca: Option<AlpacaFields>,
}

impl Example {
    /// A single-turn example from a prompt and a response.
    pub fn single_turn(prompt: impl Into<String>, response: impl Into<String>) -> Self {
        let response = response.into();
        Self {
            messages: vec![
                Message::new(Role::User, prompt),
                Message::new(Role::Assistant, response.clone()),
            ],
            reference: Some(response),
            source_line: 0,
            source_path: None,
            alpaca: None,
        }
    }

    /// `file:line` for messages, or `example` when generated in memory.
    pub fn location(&self) -> String {
        match &self.source_path {
            Some(p) => format!("{}:{}", p.display(), self.source_line),
            None if self.source_line > 0 => format!("line {}", self.source_line),
            None => "generated example".to_string(),
        }
    }

    pub(crate) fn bad(&self, message: impl Into<String>) -> DataError {
        DataError::BadRow {
            path: self
                .source_path
                .as_deref()
                .map(Path::to_path_buf)
                .unwrap_or_else(|| PathBuf::from("<memory>")),
            line: self.source_line,
            message: message.into(),
        }
    }

    /// Checks the role order every template relies on.
    pub fn validate(&self) -> Result<(), String> {
        let mut msgs = self.messages.as_slice();
        if let Some(first) = msgs.first() {
            if first.role == Role::System {
                msgs = &msgs[1..];
            }
        }
        if msgs.is_empty() {
            return Err("no user/assistant messages".into());
        }
        for (i, m) in msgs.iter().enumerate() {
            let expected = if i % 2 == 0 {
                Role::User
            } else {
                Role::Assistant
            };
            if m.role != expected {
                return Err(format!(
                    "wrong role order: message {} is `{}`, expected `{}` (optional system first, then user and assistant alternating)",
                    i + usize::from(msgs.len() != self.messages.len()),
                    m.role.as_str(),
                    expected.as_str()
                ));
            }
        }
        match msgs.last() {
            Some(m) if m.role == Role::Assistant => {}
            _ => return Err("the last message must be from the assistant".into()),
        }
        for m in msgs.iter().filter(|m| m.role == Role::Assistant) {
            if m.content.trim().is_empty() {
                return Err("empty response".into());
            }
        }
        Ok(())
    }
}
