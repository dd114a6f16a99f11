//! Prompt templates: the model's own Jinja chat template rendered as transformers'
//! `apply_chat_template` does, plus the Alpaca and raw layouts of the WIT paper.

use std::time::{SystemTime, UNIX_EPOCH};

use minijinja::value::{Kwargs, Value};
use minijinja::{Environment, ErrorKind, State};
use serde::Serialize;

use super::{Example, Message, Role};
use crate::{Error, Result};

const TEMPLATE_NAME: &str = "chat";

/// A compiled Jinja chat template.
///
/// transformers renders with jinja2's `trim_blocks=True, lstrip_blocks=True`, the globals
/// `raise_exception` and `strftime_now` and a `tojson` filter; this environment reproduces that so
/// the rendered text (and therefore the token ids) is the same.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos: String,
    eos: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .finish_non_exhaustive()
    }
}

#[derive(Serialize)]
struct JinjaMessage<'a> {
    role: &'a str,
    content: &'a str,
}

impl ChatTemplate {
    /// Compiles `source`; `bos`/`eos` are the token texts exposed as `bos_token`/`eos_token`.
    pub fn new(source: &str, bos: &str, eos: &str) -> Result<Self> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.set_unknown_method_callback(pycompat);
        env.add_template_owned(TEMPLATE_NAME, source.to_string())
            .map_err(|e| Error::Template(format!("compiling: {e:#}")))?;
        Ok(Self {
            env,
            bos: bos.to_string(),
            eos: eos.to_string(),
        })
    }

    /// Loads a user template file (for `Template::Custom`).
    pub fn from_file(path: &std::path::Path, bos: &str, eos: &str) -> Result<Self> {
        let source = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::new(&source, bos, eos)
            .map_err(|e| Error::invalid_file(path, format!("chat template: {e}")))
    }

    /// The model's own template from GGUF metadata, with its BOS/EOS texts; `None` when the
    /// file carries no `tokenizer.chat_template`.
    pub fn from_gguf(content: &candle_core::quantized::gguf_file::Content) -> Result<Option<Self>> {
        let Some(source) = crate::tokenizer::chat_template_from_gguf(content) else {
            return Ok(None);
        };
        let sp = crate::tokenizer::SpecialTokens::from_gguf(content)?;
        let text = |t: Option<(String, u32)>| t.map(|(s, _)| s).unwrap_or_default();
        Self::new(&source, &text(sp.bos), &text(sp.eos)).map(Some)
    }

    pub fn eos(&self) -> &str {
        &self.eos
    }

    pub fn bos(&self) -> &str {
        &self.bos
    }

    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let msgs: Vec<JinjaMessage<'_>> = messages
            .iter()
            .map(|m| JinjaMessage {
                role: m.role.as_str(),
                content: &m.content,
            })
            .collect();
        let tmpl = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| Error::Template(e.to_string()))?;
        tmpl.render(minijinja::context! {
            messages => msgs,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos.as_str(),
            eos_token => self.eos.as_str(),
        })
        .map_err(|e| Error::Template(format!("rendering: {e:#}")))
    }
}

/// How examples are laid out as text.
#[derive(Debug)]
pub enum Template {
    /// The model's own chat template (from the GGUF or tokenizer_config.json).
    Chat(ChatTemplate),
    /// Stanford Alpaca's prompt; the response is the output followed by the EOS token text.
    Alpaca { eos: String },
    /// The WIT paper's code: `prompt + " " + response + eos`.
    Raw { eos: String },
    /// A user-supplied Jinja chat template.
    Custom(ChatTemplate),
}

/// What a base model brings to templating: its own chat template and special tokens, and its
/// name for error messages.
#[derive(Debug, Clone, Copy)]
pub struct ModelTokens<'a> {
    pub model_name: &'a str,
    pub chat_template: Option<&'a str>,
    pub bos: &'a str,
    pub eos: &'a str,
}

impl Template {
    /// The template named by `spec`: `chat` (the model's own), `alpaca`, `raw`, or a path to a
    /// Jinja file.
    pub fn from_spec(spec: &str, model: ModelTokens<'_>) -> Result<Template> {
        match spec {
            "chat" => {
                let source = model.chat_template.ok_or_else(|| {
                    Error::Template(format!(
                        "model `{}` has no chat template; use --template alpaca|raw|FILE",
                        model.model_name
                    ))
                })?;
                Ok(Template::Chat(ChatTemplate::new(
                    source, model.bos, model.eos,
                )?))
            }
            "alpaca" => Ok(Template::alpaca(model.eos.to_string())),
            "raw" => Ok(Template::raw(model.eos.to_string())),
            path => Ok(Template::Custom(ChatTemplate::from_file(
                std::path::Path::new(path),
                model.bos,
                model.eos,
            )?)),
        }
    }
}

const ALPACA_NO_INPUT: &str = "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n### Instruction:\n";
const ALPACA_WITH_INPUT: &str = "Below is an instruction that describes a task, paired with an input that provides further context. Write a response that appropriately completes the request.\n\n### Instruction:\n";

/// A piece of rendered text and what its tokens are, when they fall inside the prompt.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Segment {
    pub text: String,
    pub kind: super::TokenKind,
}

/// A conversation rendered for training: the full text plus, for each assistant turn, the
/// texts whose tokenizations must end exactly where that response starts and ends.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Rendered {
    /// Concatenated, these are the full text; kinds classify prompt tokens (by byte offset).
    pub segments: Vec<Segment>,
    /// Per assistant turn: (text up to the response start, text up to the response end or
    /// `None` when the response runs to the end).
    pub turns: Vec<(String, Option<String>)>,
}

impl Template {
    /// The Alpaca template with the given EOS token text.
    pub fn alpaca(eos: impl Into<String>) -> Self {
        Template::Alpaca { eos: eos.into() }
    }

    /// The raw template with the given EOS token text.
    pub fn raw(eos: impl Into<String>) -> Self {
        Template::Raw { eos: eos.into() }
    }

    /// The prompt for generation (evaluation): everything up to where the final assistant
    /// answer would start. `messages` must not include that answer.
    pub fn render_prompt(&self, ex: &Example) -> Result<String> {
        let msgs = match ex.messages.last() {
            Some(m) if m.role == Role::Assistant => &ex.messages[..ex.messages.len() - 1],
            _ => &ex.messages[..],
        };
        match self {
            Template::Chat(t) | Template::Custom(t) => t.render(msgs, true),
            Template::Alpaca { .. } | Template::Raw { .. } => {
                let (user, _) = single_turn(ex, msgs)?;
                Ok(match self {
                    Template::Alpaca { .. } => alpaca_prompt(ex, &user).0.concat(),
                    _ => user,
                })
            }
        }
    }

    pub(crate) fn render_training(&self, ex: &Example) -> Result<Rendered> {
        use super::TokenKind as K;
        match self {
            Template::Chat(t) | Template::Custom(t) => render_chat(t, ex),
            Template::Alpaca { eos } => {
                let (user, response) = single_turn(ex, &ex.messages)?;
                let (parts, kinds) = alpaca_prompt(ex, &user);
                let prompt = parts.concat();
                let mut segments: Vec<Segment> = parts
                    .into_iter()
                    .zip(kinds)
                    .map(|(text, kind)| Segment { text, kind })
                    .collect();
                segments.push(Segment {
                    text: format!("{response}{eos}"),
                    kind: K::Response,
                });
                Ok(Rendered {
                    segments,
                    turns: vec![(prompt, None)],
                })
            }
            Template::Raw { eos } => {
                let (user, response) = single_turn(ex, &ex.messages)?;
                Ok(Rendered {
                    segments: vec![
                        Segment {
                            text: user.clone(),
                            kind: K::User,
                        },
                        Segment {
                            text: format!(" {response}{eos}"),
                            kind: K::Response,
                        },
                    ],
                    turns: vec![(user, None)],
                })
            }
        }
    }
}

/// The Alpaca prompt as pieces with their kinds (boilerplate is `Template`).
fn alpaca_prompt(ex: &Example, user: &str) -> (Vec<String>, Vec<super::TokenKind>) {
    use super::TokenKind as K;
    let (instruction, input) = match &ex.alpaca {
        Some(a) => (
            a.instruction.clone(),
            a.input.clone().filter(|s| !s.is_empty()),
        ),
        None => (user.to_string(), None),
    };
    match input {
        Some(input) => (
            vec![
                ALPACA_WITH_INPUT.to_string(),
                instruction,
                "\n\n### Input:\n".to_string(),
                input,
                "\n\n### Response:\n".to_string(),
            ],
            vec![K::Template, K::User, K::Template, K::User, K::Template],
        ),
        None => (
            vec![
                ALPACA_NO_INPUT.to_string(),
                instruction,
                "\n\n### Response:\n".to_string(),
            ],
            vec![K::Template, K::User, K::Template],
        ),
    }
}

/// Alpaca and raw layouts have no place for a system message or several turns.
fn single_turn(ex: &Example, msgs: &[Message]) -> Result<(String, String)> {
    match msgs {
        [u] if u.role == Role::User => Ok((u.content.clone(), String::new())),
        [u, a] if u.role == Role::User && a.role == Role::Assistant => {
            Ok((u.content.clone(), a.content.clone()))
        }
        _ => Err(ex
            .bad("the alpaca and raw templates take one user and one assistant message (no system message, no multi-turn); use the chat template")
            .into()),
    }
}

fn render_chat(t: &ChatTemplate, ex: &Example) -> Result<Rendered> {
    use super::TokenKind as K;
    let msgs = &ex.messages;
    let full = t.render(msgs, false)?;
    // Message-level segments by string prefixes: a best-effort split of the prompt into
    // system/user/template kinds. The prompt/response boundaries are checked on tokens later.
    let mut segments = Vec::new();
    let mut done = 0usize;
    let mut turns = Vec::new();
    for (k, m) in msgs.iter().enumerate() {
        if m.role == Role::Assistant {
            let start = t.render(&msgs[..k], true)?;
            let end = if k + 1 == msgs.len() {
                None
            } else {
                Some(t.render(&msgs[..=k], false)?)
            };
            turns.push((start, end));
        }
        let upto = if k + 1 == msgs.len() {
            full.clone()
        } else {
            t.render(&msgs[..=k], false)?
        };
        let kind = match m.role {
            Role::System => K::System,
            Role::User => K::User,
            Role::Assistant => K::Template,
        };
        if upto.len() >= done && full.starts_with(&upto) {
            segments.push(Segment {
                text: full[done..upto.len()].to_string(),
                kind,
            });
            done = upto.len();
        }
    }
    if done < full.len() {
        segments.push(Segment {
            text: full[done..].to_string(),
            kind: K::Template,
        });
    }
    Ok(Rendered { segments, turns })
}

fn raise_exception(msg: String) -> std::result::Result<String, minijinja::Error> {
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
}

/// `strftime_now(fmt)`: the current UTC time (transformers uses local time; templates only use it
/// for a "today is" date line, so UTC is close enough and reproducible across machines).
fn strftime_now(fmt: String) -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    crate::fsutil::strftime_utc(secs, &fmt)
}

/// Python's `json.dumps` layout (`", "` and `": "` separators, or `indent`), non-ASCII kept.
fn tojson(value: Value, kwargs: Kwargs) -> std::result::Result<Value, minijinja::Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    kwargs.assert_all_used()?;
    let mut buf = Vec::new();
    let res = match indent {
        Some(n) => {
            let ind = vec![b' '; n];
            let fmt = serde_json::ser::PrettyFormatter::with_indent(&ind);
            let mut ser = serde_json::Serializer::with_formatter(&mut buf, fmt);
            value.serialize(&mut ser)
        }
        None => {
            let mut ser = serde_json::Serializer::with_formatter(&mut buf, PyFormatter);
            value.serialize(&mut ser)
        }
    };
    res.map_err(|e| minijinja::Error::new(ErrorKind::InvalidOperation, e.to_string()))?;
    let s = String::from_utf8(buf)
        .map_err(|e| minijinja::Error::new(ErrorKind::InvalidOperation, e.to_string()))?;
    Ok(Value::from_safe_string(s))
}

struct PyFormatter;

/// Python's item separator, before every item but the first.
fn separator<W: ?Sized + std::io::Write>(w: &mut W, first: bool) -> std::io::Result<()> {
    if first {
        Ok(())
    } else {
        w.write_all(b", ")
    }
}

impl serde_json::ser::Formatter for PyFormatter {
    fn begin_array_value<W: ?Sized + std::io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        separator(w, first)
    }
    fn begin_object_key<W: ?Sized + std::io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        separator(w, first)
    }
    fn begin_object_value<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        w.write_all(b": ")
    }
}

/// The Python string/dict methods chat templates call most (`.strip()`, `.split()`, ...), which
/// minijinja lacks without `minijinja-contrib`.
pub(crate) fn pycompat(
    _state: &State,
    value: &Value,
    method: &str,
    args: &[Value],
) -> std::result::Result<Value, minijinja::Error> {
    let arg_str = |i: usize| args.get(i).and_then(|v| v.as_str());
    if let Some(s) = value.as_str() {
        let chars: Option<Vec<char>> = arg_str(0).map(|c| c.chars().collect());
        let trim = |c: char| match &chars {
            Some(set) => set.contains(&c),
            None => c.is_whitespace(),
        };
        return Ok(match method {
            "strip" => Value::from(s.trim_matches(trim)),
            "lstrip" => Value::from(s.trim_start_matches(trim)),
            "rstrip" => Value::from(s.trim_end_matches(trim)),
            "upper" => Value::from(s.to_uppercase()),
            "lower" => Value::from(s.to_lowercase()),
            "startswith" => Value::from(arg_str(0).is_some_and(|p| s.starts_with(p))),
            "endswith" => Value::from(arg_str(0).is_some_and(|p| s.ends_with(p))),
            "replace" => match (arg_str(0), arg_str(1)) {
                (Some(a), Some(b)) => Value::from(s.replace(a, b)),
                _ => return Err(minijinja::Error::from(ErrorKind::MissingArgument)),
            },
            "split" => {
                let parts: Vec<Value> = match arg_str(0) {
                    Some(sep) => s.split(sep).map(Value::from).collect(),
                    None => s.split_whitespace().map(Value::from).collect(),
                };
                Value::from(parts)
            }
            "title" => Value::from(
                s.split(' ')
                    .map(|w| {
                        let mut c = w.chars();
                        match c.next() {
                            Some(f) => {
                                f.to_uppercase().collect::<String>() + &c.as_str().to_lowercase()
                            }
                            None => String::new(),
                        }
                    })
                    .collect::<Vec<_>>()
                    .join(" "),
            ),
            _ => return Err(minijinja::Error::from(ErrorKind::UnknownMethod)),
        });
    }
    if value.kind() == minijinja::value::ValueKind::Map {
        return match method {
            "get" => {
                let key = args
                    .first()
                    .ok_or_else(|| minijinja::Error::from(ErrorKind::MissingArgument))?;
                let v = value.get_item(key)?;
                Ok(if v.is_undefined() {
                    args.get(1).cloned().unwrap_or(Value::from(()))
                } else {
                    v
                })
            }
            "keys" => Ok(Value::from(value.try_iter()?.collect::<Vec<_>>())),
            "values" => {
                let keys: Vec<Value> = value.try_iter()?.collect();
                let vals = keys
                    .iter()
                    .map(|k| value.get_item(k))
                    .collect::<std::result::Result<Vec<_>, _>>()?;
                Ok(Value::from(vals))
            }
            "items" => {
                let keys: Vec<Value> = value.try_iter()?.collect();
                let items = keys
                    .into_iter()
                    .map(|k| {
                        let v = value.get_item(&k)?;
                        Ok(Value::from(vec![k, v]))
                    })
                    .collect::<std::result::Result<Vec<_>, minijinja::Error>>()?;
                Ok(Value::from(items))
            }
            _ => Err(minijinja::Error::from(ErrorKind::UnknownMethod)),
        };
    }
    Err(minijinja::Error::from(ErrorKind::UnknownMethod))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokenizer::tests::reference;

    fn messages_of(v: &serde_json::Value) -> Vec<Message> {
        serde_json::from_value(v.clone()).unwrap()
    }

    #[test]
    fn reference_chats_render_exactly() {
        let Some(r) = reference("tokenizer.json") else {
            return;
        };
        let t = ChatTemplate::new(
            r["chat_template"].as_str().unwrap(),
            "<|im_start|>",
            "<|im_end|>",
        )
        .unwrap();
        for chat in r["chat"].as_array().unwrap() {
            let msgs = messages_of(&chat["messages"]);
            let out = t
                .render(&msgs, chat["add_generation_prompt"].as_bool().unwrap())
                .unwrap();
            assert_eq!(out, chat["rendered"].as_str().unwrap());
        }
    }

    #[test]
    fn jinja_environment_matches_transformers() {
        let src = "{% for m in messages %}\n  {% if m.role == 'user' %}\n{{ m.content.strip() | tojson }}\n  {% endif %}\n{% endfor %}{{ {'a': [1, 2]} | tojson }}{{ bos_token }}";
        let t = ChatTemplate::new(src, "<s>", "</s>").unwrap();
        let out = t
            .render(&[Message::new(Role::User, "  héllo \"x\" ")], false)
            .unwrap();
        // trim_blocks + lstrip_blocks drop the block lines; tojson keeps non-ASCII and uses
        // Python's separators.
        assert_eq!(out, "\"héllo \\\"x\\\"\"\n{\"a\": [1, 2]}<s>");
    }

    #[test]
    fn raise_exception_is_an_error() {
        let t = ChatTemplate::new(
            "{% if messages[0]['role'] != 'user' %}{{ raise_exception('user first') }}{% endif %}",
            "",
            "",
        )
        .unwrap();
        let err = t
            .render(&[Message::new(Role::Assistant, "x")], false)
            .unwrap_err();
        assert!(err.to_string().contains("user first"), "{err}");
        assert!(ChatTemplate::new("{% if %}", "", "").is_err());
    }

    #[test]
    fn strftime_known_dates() {
        assert_eq!(
            crate::fsutil::strftime_utc(0, "%Y-%m-%d %H:%M:%S %A"),
            "1970-01-01 00:00:00 Thursday"
        );
        // 2024-02-29 12:34:56 UTC
        assert_eq!(
            crate::fsutil::strftime_utc(1_709_210_096, "%d %B %Y, %a %j"),
            "29 February 2024, Thu 060"
        );
        assert_eq!(
            crate::fsutil::strftime_utc(1_709_210_096, "%-d %b"),
            "29 Feb"
        );
    }

    #[test]
    fn alpaca_prompt_text() {
        let mut ex = Example::single_turn("Sort the words: pear apple fig", "apple fig pear");
        let t = Template::alpaca("<|im_end|>");
        assert_eq!(
            t.render_prompt(&ex).unwrap(),
            "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n### Instruction:\nSort the words: pear apple fig\n\n### Response:\n"
        );
        ex.alpaca = Some(super::super::AlpacaFields {
            instruction: "Add".into(),
            input: Some("2 and 3".into()),
        });
        assert_eq!(
            t.render_prompt(&ex).unwrap(),
            "Below is an instruction that describes a task, paired with an input that provides further context. Write a response that appropriately completes the request.\n\n### Instruction:\nAdd\n\n### Input:\n2 and 3\n\n### Response:\n"
        );
        assert_eq!(
            Template::raw("</s>").render_prompt(&ex).unwrap(),
            "Sort the words: pear apple fig"
        );
    }
}
