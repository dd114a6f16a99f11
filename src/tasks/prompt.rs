//! Prompts as lm-evaluation-harness builds them: `doc_to_text` / `doc_to_target` /
//! `doc_to_choice` as Jinja over the document (a bare field name returns the field), the
//! description, few-shot examples joined by the delimiters, and optionally the model's chat
//! template (`--apply-chat-template`, `--fewshot-as-multiturn`).

use minijinja::Environment;
use serde_json::Value;

use super::config::{Choices, Sampler, TaskConfig};
use super::pyrandom::PyRandom;
use super::source::Doc;
use super::TaskError;
use crate::data::template::ChatTemplate;
use crate::data::{Message, Role};

/// The seed the harness draws few-shot examples with (`--fewshot_seed`, default 1234).
pub const FEWSHOT_SEED: u64 = 1234;

/// A doc's target: an index into the choices, or text.
#[derive(Debug, Clone, PartialEq)]
pub enum Target {
    Index(usize),
    Text(String),
}

/// Renders a task's templates.
pub struct Renderer<'t> {
    task: &'t TaskConfig,
    env: Environment<'static>,
}

impl<'t> Renderer<'t> {
    pub fn new(task: &'t TaskConfig) -> Self {
        let mut env = Environment::new();
        env.set_unknown_method_callback(crate::data::template::pycompat);
        // Python's `str` keeps a trailing newline; Jinja2 as the harness configures it too
        // (`keep_trailing_newline=True`).
        env.set_keep_trailing_newline(true);
        Self { task, env }
    }

    fn render(&self, field: &str, template: &str, doc: &Doc) -> Result<String, TaskError> {
        self.env
            .render_str(template, Value::Object(doc.clone()))
            .map_err(|e| TaskError::Template {
                task: self.task.task.clone(),
                field: field.to_string(),
                message: format!("{e:#}"),
            })
    }

    /// `doc_to_text`: a field's value when the template names a field, else the rendered
    /// template.
    pub fn text(&self, doc: &Doc) -> Result<String, TaskError> {
        let t = &self.task.doc_to_text;
        match doc.get(t) {
            Some(v) => Ok(value_text(v)),
            None => self.render("doc_to_text", t, doc),
        }
    }

    /// `doc_to_choice`.
    pub fn choices(&self, doc: &Doc) -> Result<Option<Vec<String>>, TaskError> {
        let Some(choices) = &self.task.doc_to_choice else {
            return Ok(None);
        };
        Ok(Some(match choices {
            Choices::List(list) => list.clone(),
            Choices::Template(t) => {
                let value = match doc.get(t) {
                    Some(v) => v.clone(),
                    None => {
                        let text = self.render("doc_to_choice", t, doc)?;
                        python_literal_list(&text).ok_or_else(|| TaskError::Template {
                            task: self.task.task.clone(),
                            field: "doc_to_choice".into(),
                            message: format!("`{text}` is not a list"),
                        })?
                    }
                };
                value
                    .as_array()
                    .ok_or_else(|| TaskError::Template {
                        task: self.task.task.clone(),
                        field: "doc_to_choice".into(),
                        message: "not a list".into(),
                    })?
                    .iter()
                    .map(value_text)
                    .collect()
            }
        }))
    }

    /// `doc_to_target`: a field's value, or the rendered template (digits become an index when
    /// the task has choices, as the harness's `ast.literal_eval`).
    pub fn target(&self, doc: &Doc) -> Result<Target, TaskError> {
        let t = &self.task.doc_to_target;
        let has_choices = self.task.doc_to_choice.is_some();
        let text = match doc.get(t) {
            Some(Value::Number(n)) if has_choices => {
                return n
                    .as_u64()
                    .map(|i| Target::Index(i as usize))
                    .ok_or_else(|| TaskError::Template {
                        task: self.task.task.clone(),
                        field: "doc_to_target".into(),
                        message: format!("`{n}` is not a choice index"),
                    })
            }
            Some(v) => value_text(v),
            None => self.render("doc_to_target", t, doc)?,
        };
        if has_choices && !text.is_empty() && text.chars().all(|c| c.is_ascii_digit()) {
            if let Ok(i) = text.parse() {
                return Ok(Target::Index(i));
            }
        }
        Ok(Target::Text(text))
    }

    /// The target as the text written after a few-shot question.
    pub fn target_text(&self, doc: &Doc) -> Result<String, TaskError> {
        Ok(match self.target(doc)? {
            Target::Text(t) => t,
            Target::Index(i) => {
                let choices = self.choices(doc)?.unwrap_or_default();
                choices.get(i).cloned().ok_or_else(|| TaskError::Template {
                    task: self.task.task.clone(),
                    field: "doc_to_target".into(),
                    message: format!("index {i} is out of range for {} choices", choices.len()),
                })?
            }
        })
    }

    pub fn description(&self, doc: &Doc) -> Result<String, TaskError> {
        if self.task.description.is_empty() {
            return Ok(String::new());
        }
        self.render("description", &self.task.description, doc)
    }
}

/// How contexts are laid out.
#[derive(Debug, Clone, Copy, Default)]
pub struct PromptOptions<'a> {
    pub num_fewshot: usize,
    /// The model's chat template, when `--apply-chat-template` is given.
    pub chat_template: Option<&'a ChatTemplate>,
    pub fewshot_as_multiturn: bool,
}

/// Builds each test doc's context, drawing few-shot examples doc after doc as the harness does.
pub struct ContextBuilder<'t> {
    renderer: Renderer<'t>,
    rng: PyRandom,
}

impl<'t> ContextBuilder<'t> {
    pub fn new(task: &'t TaskConfig) -> Self {
        Self {
            renderer: Renderer::new(task),
            rng: PyRandom::new(FEWSHOT_SEED),
        }
    }

    pub fn renderer(&self) -> &Renderer<'t> {
        &self.renderer
    }

    /// The context of `doc`: description, few-shot examples, then the question. Must be called
    /// for the docs in order (the default sampler's draws depend on it).
    pub fn context(
        &mut self,
        doc: &Doc,
        fewshot_pool: &[Doc],
        opts: &PromptOptions<'_>,
    ) -> Result<String, TaskError> {
        let task = self.renderer.task;
        let r = &self.renderer;
        // (role, content, delimiter after it in the plain-text rendering)
        let mut messages: Vec<(Role, String, String)> = Vec::new();
        let description = r.description(doc)?;
        if !description.is_empty() {
            messages.push((Role::System, description, String::new()));
        }
        if opts.num_fewshot > 0 {
            let same_split = task.fewshot_split.as_deref() == Some(task.test_split.as_str());
            let shots = match task.fewshot_sampler {
                Sampler::FirstN => {
                    let pool: Vec<&Doc> = fewshot_pool
                        .iter()
                        .filter(|d| !same_split || *d != doc)
                        .collect();
                    pool.into_iter()
                        .take(opts.num_fewshot)
                        .cloned()
                        .collect::<Vec<_>>()
                }
                Sampler::Default => {
                    if same_split {
                        let drawn = self.rng.sample(fewshot_pool, opts.num_fewshot + 1);
                        drawn
                            .into_iter()
                            .filter(|d| *d != doc)
                            .take(opts.num_fewshot)
                            .cloned()
                            .collect()
                    } else {
                        self.rng
                            .sample(fewshot_pool, opts.num_fewshot)
                            .into_iter()
                            .cloned()
                            .collect()
                    }
                }
            };
            for shot in &shots {
                let q = r.text(shot)?;
                let a = r.target_text(shot)?;
                messages.push((Role::User, q, task.target_delimiter.clone()));
                messages.push((Role::Assistant, a, task.fewshot_delimiter.clone()));
            }
        }
        messages.push((Role::User, r.text(doc)?, String::new()));

        let Some(chat) = opts.chat_template else {
            return Ok(messages.iter().map(|(_, c, d)| format!("{c}{d}")).collect());
        };
        let chat_messages: Vec<Message> = if opts.fewshot_as_multiturn {
            messages
                .into_iter()
                .map(|(role, content, _)| Message { role, content })
                .collect()
        } else {
            // The harness's multiturn_to_singleturn: the system message stays, everything else
            // is one user message in its plain-text form.
            let mut out = Vec::new();
            let mut rest = messages.as_slice();
            if let Some((Role::System, content, _)) = rest.first() {
                out.push(Message {
                    role: Role::System,
                    content: content.clone(),
                });
                rest = &rest[1..];
            }
            let last = rest.len().saturating_sub(1);
            let content: String = rest
                .iter()
                .enumerate()
                .map(|(i, (_, c, d))| {
                    if i == last {
                        c.clone()
                    } else {
                        format!("{c}{d}")
                    }
                })
                .collect();
            out.push(Message {
                role: Role::User,
                content,
            });
            out
        };
        chat.render(&chat_messages, true)
            .map_err(|e| TaskError::Template {
                task: task.task.clone(),
                field: "chat template".into(),
                message: e.to_string(),
            })
    }
}

/// A JSON value as Python's `str()` would print a document field used as text.
fn value_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Parses a rendered Python list literal of strings (`['a', 'b']`, `["a", "b"]`).
fn python_literal_list(text: &str) -> Option<Value> {
    let t = text.trim();
    if let Ok(v @ Value::Array(_)) = serde_json::from_str::<Value>(t) {
        return Some(v);
    }
    let inner = t.strip_prefix('[')?.strip_suffix(']')?;
    let mut items = Vec::new();
    let mut chars = inner.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace() || *c == ',') {
            chars.next();
        }
        let Some(quote) = chars.next() else { break };
        if quote != '\'' && quote != '"' {
            return None;
        }
        let mut item = String::new();
        loop {
            match chars.next()? {
                '\\' => item.push(chars.next()?),
                c if c == quote => break,
                c => item.push(c),
            }
        }
        items.push(Value::String(item));
    }
    Some(Value::Array(items))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tasks::config::TaskCatalog;
    use crate::tasks::source::doc_from_pairs;

    fn task_named(name: &str) -> TaskConfig {
        TaskCatalog::load(&[])
            .unwrap()
            .select(&[name.into()])
            .unwrap()
            .remove(0)
    }

    fn mmlu_doc(q: &str, answer: usize) -> Doc {
        doc_from_pairs(&[
            ("question", Value::from(q)),
            ("choices", serde_json::json!(["w", "x", "y", "z"])),
            ("answer", Value::from(answer)),
        ])
    }

    #[test]
    fn mmlu_five_shot_prompt_byte_for_byte() {
        let task = task_named("mmlu_anatomy");
        let dev: Vec<Doc> = (0..6)
            .map(|i| mmlu_doc(&format!(" dev {i}? "), i % 4))
            .collect();
        let mut b = ContextBuilder::new(&task);
        let opts = PromptOptions {
            num_fewshot: 2,
            ..Default::default()
        };
        let ctx = b.context(&mmlu_doc("Test?", 1), &dev, &opts).unwrap();
        assert_eq!(
            ctx,
            "The following are multiple choice questions (with answers) about anatomy.\n\n\
             dev 0?\nA. w\nB. x\nC. y\nD. z\nAnswer: A\n\n\
             dev 1?\nA. w\nB. x\nC. y\nD. z\nAnswer: B\n\n\
             Test?\nA. w\nB. x\nC. y\nD. z\nAnswer:"
        );
        assert_eq!(
            b.renderer().target(&mmlu_doc("q", 3)).unwrap(),
            Target::Index(3)
        );
    }

    #[test]
    fn bbh_and_gsm8k_prompts_byte_for_byte() {
        let task = task_named("bbh_cot_fewshot_navigate");
        let shot = |i: usize| {
            doc_from_pairs(&[
                ("input", Value::from(format!("In {i}?"))),
                (
                    "target",
                    Value::from(format!("Step. So the answer is {i}.")),
                ),
                ("description", Value::from("Navigate.")),
            ])
        };
        let cot: Vec<Doc> = (0..3).map(shot).collect();
        let mut b = ContextBuilder::new(&task);
        let opts = PromptOptions {
            num_fewshot: 3,
            ..Default::default()
        };
        let ctx = b.context(&shot(9), &cot, &opts).unwrap();
        assert_eq!(
            ctx,
            "Navigate.\n\nQ: In 0?\nA: Let's think step by step.\nStep. So the answer is 0.\n\n\
             Q: In 1?\nA: Let's think step by step.\nStep. So the answer is 1.\n\n\
             Q: In 2?\nA: Let's think step by step.\nStep. So the answer is 2.\n\n\
             Q: In 9?\nA: Let's think step by step.\n"
        );

        let task = task_named("gsm8k");
        let train: Vec<Doc> = (0..10)
            .map(|i| {
                doc_from_pairs(&[
                    ("question", Value::from(format!("q{i}"))),
                    ("answer", Value::from(format!("a{i}\n#### {i}"))),
                ])
            })
            .collect();
        let mut b = ContextBuilder::new(&task);
        let opts = PromptOptions {
            num_fewshot: 2,
            ..Default::default()
        };
        let test = doc_from_pairs(&[
            ("question", Value::from("Q")),
            ("answer", Value::from("#### 1")),
        ]);
        let ctx = b.context(&test, &train, &opts).unwrap();
        // random.Random(1234).sample(range(10), 2) == [7, 1]
        assert_eq!(
            ctx,
            "Question: q7\nAnswer: a7\n#### 7\n\nQuestion: q1\nAnswer: a1\n#### 1\n\nQuestion: Q\nAnswer:"
        );
    }

    #[test]
    fn chat_template_single_and_multi_turn() {
        let task = task_named("mmlu_anatomy");
        let chat = ChatTemplate::new(
            "{% for m in messages %}<{{ m.role }}>{{ m.content }}</>{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}",
            "",
            "",
        )
        .unwrap();
        let dev: Vec<Doc> = (0..2).map(|i| mmlu_doc(&format!("d{i}"), i)).collect();
        let q = "\nA. w\nB. x\nC. y\nD. z\nAnswer:";
        let desc = "The following are multiple choice questions (with answers) about anatomy.\n\n";
        let mut opts = PromptOptions {
            num_fewshot: 1,
            chat_template: Some(&chat),
            fewshot_as_multiturn: false,
        };
        let single = ContextBuilder::new(&task)
            .context(&mmlu_doc("T", 0), &dev, &opts)
            .unwrap();
        assert_eq!(
            single,
            format!("<system>{desc}</><user>d0{q} A\n\nT{q}</><assistant>")
        );
        opts.fewshot_as_multiturn = true;
        let multi = ContextBuilder::new(&task)
            .context(&mmlu_doc("T", 0), &dev, &opts)
            .unwrap();
        assert_eq!(
            multi,
            format!("<system>{desc}</><user>d0{q}</><assistant>A</><user>T{q}</><assistant>")
        );
    }

    #[test]
    fn template_errors_name_the_field() {
        let mut task = task_named("gsm8k");
        task.doc_to_text = "{{ question | nosuchfilter }}".into();
        let r = Renderer::new(&task);
        let err = r
            .text(&doc_from_pairs(&[("question", Value::from("q"))]))
            .unwrap_err();
        assert!(err.to_string().contains("doc_to_text"), "{err}");
    }

    #[test]
    fn python_list_literals() {
        assert_eq!(
            python_literal_list("['a', \"b\"]"),
            Some(serde_json::json!(["a", "b"]))
        );
        assert_eq!(
            python_literal_list("[1, 2]"),
            Some(serde_json::json!([1, 2]))
        );
        assert_eq!(python_literal_list("nope"), None);
    }
}
