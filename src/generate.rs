//! Text generation with a KV cache: greedy at temperature 0, otherwise seeded sampling
//! (temperature, top-p) through candle-transformers' `LogitsProcessor`.

use candle_core::{DType, Tensor};
use candle_transformers::generation::{LogitsProcessor, Sampling};

use crate::data::{Message, Role, Template};
use crate::lora::LoraAdapter;
use crate::model::decoder::{Decoder, ForwardContext, KvCache};
use crate::model::BaseModel;
use crate::{Error, Result};

/// Text in, text out: renders `prompt` as one user turn with the model's chat template when
/// `chat`, tokenizes it, generates (stopping at the model's EOS), and calls `on_text` with each
/// newly decoded piece of text as it appears. Returns the whole generated text.
pub fn generate_text(
    base: &BaseModel,
    adapter: Option<&LoraAdapter>,
    prompt: &str,
    chat: bool,
    config: &GenerationConfig,
    mut on_text: impl FnMut(&str),
) -> Result<String> {
    let tokenizer = base.tokenizer()?;
    // The model's own template, built as training builds it (`BaseModel::template`).
    let text = if chat {
        match base.template("chat")? {
            Template::Chat(template) | Template::Custom(template) => {
                template.render(&[Message::new(Role::User, prompt)], true)?
            }
            other => {
                return Err(Error::Template(format!(
                    "`chat` gave a {other:?} template, not a chat template"
                )))
            }
        }
    } else {
        prompt.to_string()
    };
    let ids = tokenizer
        .encode(text.as_str(), false)
        .map_err(|e| Error::Tokenizer(format!("tokenizing the prompt: {e}")))?
        .get_ids()
        .to_vec();
    let mut config = config.clone();
    config.stop_ids.extend(base.decoder.config.eos_token_id);
    let mut printed = String::new();
    let mut all = Vec::new();
    generate(&base.decoder, adapter, &ids, &config, |id| {
        // Decode everything so far and pass on what is new (multi-byte tokens stay whole).
        all.push(id);
        if let Ok(text) = tokenizer.decode(&all, true) {
            if text.len() > printed.len() && text.starts_with(&printed) {
                on_text(&text[printed.len()..]);
                printed = text;
            }
        }
    })?;
    Ok(printed)
}

/// Sampling settings.
#[derive(Debug, Clone)]
pub struct GenerationConfig {
    pub max_new_tokens: usize,
    /// 0 means greedy.
    pub temperature: f64,
    pub top_p: Option<f64>,
    pub seed: u64,
    /// Generation stops after any of these ids (emitted, then stop).
    pub stop_ids: Vec<u32>,
}

impl Default for GenerationConfig {
    fn default() -> Self {
        Self {
            max_new_tokens: 64,
            temperature: 0.0,
            top_p: None,
            seed: 0,
            stop_ids: Vec::new(),
        }
    }
}

/// Generates up to `max_new_tokens` ids after `prompt`; returns only the new ids.
pub fn generate(
    decoder: &Decoder,
    adapter: Option<&LoraAdapter>,
    prompt: &[u32],
    config: &GenerationConfig,
    mut on_token: impl FnMut(u32),
) -> Result<Vec<u32>> {
    if prompt.is_empty() {
        return Err(Error::InvalidArgument("empty prompt".into()));
    }
    if prompt.len() + config.max_new_tokens > decoder.max_positions() {
        return Err(Error::InvalidArgument(format!(
            "prompt ({} tokens) + max_new_tokens ({}) exceeds the model's context of {}",
            prompt.len(),
            config.max_new_tokens,
            decoder.max_positions()
        )));
    }
    let sampling = if config.temperature <= 0.0 {
        Sampling::ArgMax
    } else {
        match config.top_p {
            Some(p) if p < 1.0 => Sampling::TopP {
                p,
                temperature: config.temperature,
            },
            _ => Sampling::All {
                temperature: config.temperature,
            },
        }
    };
    let mut processor = LogitsProcessor::from_sampling(config.seed, sampling);
    let mut cache = KvCache::new(decoder.config.num_hidden_layers);
    let mut input: Vec<u32> = prompt.to_vec();
    let mut out = Vec::new();
    for _ in 0..config.max_new_tokens {
        let ids = Tensor::from_slice(&input, (1, input.len()), decoder.device())?;
        let mut ctx = ForwardContext {
            adapter: adapter.map(|a| a as _),
            cache: Some(&mut cache),
            no_grad: true,
            ..Default::default()
        };
        let hidden = decoder.forward_hidden(&ids, None, &mut ctx)?;
        let last = hidden.narrow(1, input.len() - 1, 1)?.flatten_all()?;
        let logits = decoder
            .logits(&last.unsqueeze(0)?)?
            .squeeze(0)?
            .to_dtype(DType::F32)?;
        let next = processor.sample(&logits)?;
        out.push(next);
        on_token(next);
        if config.stop_ids.contains(&next) {
            break;
        }
        input = vec![next];
    }
    Ok(out)
}
