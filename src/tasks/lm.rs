//! The model side of benchmark scoring, as lm-evaluation-harness's Hugging Face backend asks it:
//! the log-likelihood of continuations after a context, and greedy generation until a stop
//! string. Tokenization follows the harness (`_encode_pair`: trailing context whitespace moves
//! to the continuation; the continuation's tokens are the pair's tokens after the context's; no
//! BOS; contexts truncated from the left), so the numbers are the harness's numbers.
//!
//! What it does faster: contexts that share a prefix with the previous one (few-shot examples,
//! the same question with several choices) reuse its KV cache, and generation runs batched
//! with a KV cache, each sequence stopping on its own.

use candle_core::{DType, Tensor};
use tokenizers::Tokenizer;

use crate::lora::LoraAdapter;
use crate::model::decoder::{Decoder, ForwardContext, KvCache};
use crate::{Error, Result};

/// Shortest shared prefix worth reusing from the previous context's cache.
const MIN_REUSE: usize = 8;

/// The log-likelihood of one continuation and whether greedy decoding would produce it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Loglikelihood {
    pub logprob: f64,
    pub is_greedy: bool,
}

/// The cache of the last context run, reused when the next context starts the same way.
struct Prefix {
    tokens: Vec<u32>,
    cache: KvCache,
    /// Pre-norm hidden state of the last context position, `[1, H]`.
    last_hidden: Tensor,
}

/// A base model (with or without an adapter) answering the harness's requests.
pub struct LanguageModel<'m> {
    decoder: &'m Decoder,
    adapter: Option<&'m LoraAdapter>,
    tokenizer: &'m Tokenizer,
    eos_id: Option<u32>,
    /// Token used as the context of an empty context (the harness's `prefix_token_id`).
    prefix_id: u32,
    /// The harness's `max_length`: the model's positions.
    max_length: usize,
    prefix: Option<Prefix>,
    /// Contexts cut from the left to fit the window, counted for the report.
    pub truncated: usize,
}

impl<'m> LanguageModel<'m> {
    pub fn new(
        decoder: &'m Decoder,
        adapter: Option<&'m LoraAdapter>,
        tokenizer: &'m Tokenizer,
        bos_id: Option<u32>,
    ) -> Self {
        let eos_id = decoder.config.eos_token_id;
        Self {
            decoder,
            adapter,
            tokenizer,
            eos_id,
            prefix_id: bos_id.or(eos_id).unwrap_or(0),
            max_length: decoder.max_positions(),
            prefix: None,
            truncated: 0,
        }
    }

    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self
            .tokenizer
            .encode(text, false)
            .map_err(|e| Error::Tokenizer(e.to_string()))?
            .get_ids()
            .to_vec())
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer
            .decode(ids, true)
            .map_err(|e| Error::Tokenizer(e.to_string()))
    }

    /// Context and continuation token ids as the harness's `_encode_pair` makes them.
    pub fn encode_pair(&self, context: &str, continuation: &str) -> Result<(Vec<u32>, Vec<u32>)> {
        let trimmed = context.trim_end();
        let spaces = &context[trimmed.len()..];
        let (context, continuation) = (trimmed, format!("{spaces}{continuation}"));
        let whole = self.encode(&format!("{context}{continuation}"))?;
        let ctx = if context.is_empty() {
            Vec::new()
        } else {
            self.encode(context)?
        };
        let cont = whole.get(ctx.len()..).unwrap_or_default().to_vec();
        let ctx = if ctx.is_empty() {
            vec![self.prefix_id]
        } else {
            ctx
        };
        Ok((ctx, cont))
    }

    fn forward_ctx(
        &self,
        cache: &mut KvCache,
        ids: &[u32],
        mask: Option<&Tensor>,
        batch: usize,
    ) -> Result<Tensor> {
        let t = ids.len() / batch;
        let input = Tensor::from_slice(ids, (batch, t), self.decoder.device())?;
        let mut ctx = ForwardContext {
            adapter: self.adapter.map(|a| a as _),
            cache: Some(cache),
            no_grad: true,
            ..Default::default()
        };
        self.decoder.forward_hidden(&input, mask, &mut ctx)
    }

    /// Runs `tokens` (one sequence), reusing the previous context's cache for the shared
    /// prefix; returns the cache and the last position's hidden state.
    fn run_context(&mut self, tokens: &[u32]) -> Result<(KvCache, Tensor)> {
        if let Some(p) = &self.prefix {
            if p.tokens == tokens {
                return Ok((p.cache.clone(), p.last_hidden.clone()));
            }
        }
        let shared = self
            .prefix
            .as_ref()
            .map(|p| common_prefix(&p.tokens, tokens))
            .unwrap_or(0)
            .min(tokens.len().saturating_sub(1));
        let mut cache = match (&self.prefix, shared >= MIN_REUSE) {
            (Some(p), true) => {
                let mut c = p.cache.clone();
                c.truncate(shared)?;
                c
            }
            _ => KvCache::new(self.decoder.config.num_hidden_layers),
        };
        let start = cache.len();
        let hidden = self.forward_ctx(&mut cache, &tokens[start..], None, 1)?;
        let t = hidden.dim(1)?;
        let last = hidden.narrow(1, t - 1, 1)?.squeeze(0)?;
        self.prefix = Some(Prefix {
            tokens: tokens.to_vec(),
            cache: cache.clone(),
            last_hidden: last.clone(),
        });
        Ok((cache, last))
    }

    /// Log-likelihoods of `continuations` after `context` (the same context for all: the
    /// harness's multiple-choice requests).
    pub fn loglikelihoods(
        &mut self,
        context: &str,
        continuations: &[String],
    ) -> Result<Vec<Loglikelihood>> {
        let mut out = Vec::with_capacity(continuations.len());
        for continuation in continuations {
            let (ctx, cont) = self.encode_pair(context, continuation)?;
            if cont.is_empty() {
                out.push(Loglikelihood {
                    logprob: 0.0,
                    is_greedy: true,
                });
                continue;
            }
            // (context + continuation)[-(max_length + 1):][:-1], as the harness feeds it.
            let mut full = ctx.clone();
            full.extend_from_slice(&cont);
            let ctx = if full.len() > self.max_length + 1 {
                self.truncated += 1;
                let cut = full.len() - (self.max_length + 1);
                if cont.len() > self.max_length {
                    return Err(Error::InvalidArgument(format!(
                        "a continuation of {} tokens does not fit the model's {} positions",
                        cont.len(),
                        self.max_length
                    )));
                }
                ctx[cut..].to_vec()
            } else {
                ctx
            };
            let (mut cache, last) = self.run_context(&ctx)?;
            let mut rows = vec![last];
            if cont.len() > 1 {
                let hidden = self.forward_ctx(&mut cache, &cont[..cont.len() - 1], None, 1)?;
                rows.push(hidden.squeeze(0)?);
            }
            let hidden = Tensor::cat(&rows, 0)?;
            let logits = self
                .decoder
                .logits(&hidden)?
                .to_dtype(DType::F64)?
                .to_vec2::<f64>()?;
            let mut logprob = 0.0;
            let mut is_greedy = true;
            for (row, &token) in logits.iter().zip(&cont) {
                let (lp, argmax) = log_softmax_at(row, token as usize);
                logprob += lp;
                is_greedy &= argmax == token as usize;
            }
            out.push(Loglikelihood { logprob, is_greedy });
        }
        Ok(out)
    }

    /// Greedy continuations of `contexts`, each cut at the first of `until` (and at the end of
    /// sequence), at most `max_gen_toks` tokens. Runs `batch_size` contexts at a time, longest
    /// first, and calls `progress` after each finished context.
    pub fn generate_until(
        &mut self,
        contexts: &[String],
        until: &[String],
        max_gen_toks: usize,
        batch_size: usize,
        mut progress: impl FnMut(usize),
    ) -> Result<Vec<String>> {
        let max_ctx = self.max_length.saturating_sub(max_gen_toks).max(1);
        let mut encoded = Vec::with_capacity(contexts.len());
        for c in contexts {
            let mut ids = self.encode(c)?;
            if ids.is_empty() {
                ids.push(self.prefix_id);
            }
            if ids.len() > max_ctx {
                self.truncated += 1;
                ids.drain(..ids.len() - max_ctx);
            }
            encoded.push(ids);
        }
        let mut order: Vec<usize> = (0..contexts.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(encoded[i].len()));
        let mut outputs = vec![String::new(); contexts.len()];
        for chunk in order.chunks(batch_size.max(1)) {
            let prompts: Vec<&[u32]> = chunk.iter().map(|&i| encoded[i].as_slice()).collect();
            let texts = self.generate_batch(&prompts, until, max_gen_toks)?;
            for (&i, text) in chunk.iter().zip(texts) {
                outputs[i] = text;
            }
            progress(chunk.len());
        }
        Ok(outputs)
    }

    fn generate_batch(
        &mut self,
        prompts: &[&[u32]],
        until: &[String],
        max_gen_toks: usize,
    ) -> Result<Vec<String>> {
        let b = prompts.len();
        let t = prompts.iter().map(|p| p.len()).max().unwrap_or(0);
        let pad = self.eos_id.unwrap_or(0);
        let mut ids = Vec::with_capacity(b * t);
        let mut mask = Vec::with_capacity(b * t);
        for p in prompts {
            let n = t - p.len();
            ids.extend(std::iter::repeat_n(pad, n));
            ids.extend_from_slice(p);
            mask.extend(std::iter::repeat_n(0u8, n));
            mask.extend(std::iter::repeat_n(1u8, p.len()));
        }
        let padded = prompts.iter().any(|p| p.len() < t);
        let mut cache = KvCache::new(self.decoder.config.num_hidden_layers);
        let device = self.decoder.device().clone();
        let mask_tensor = |m: &[u8], cols: usize| Tensor::from_slice(m, (b, cols), &device);
        let hidden = if padded {
            self.forward_ctx(&mut cache, &ids, Some(&mask_tensor(&mask, t)?), b)?
        } else {
            self.forward_ctx(&mut cache, &ids, None, b)?
        };
        let mut last = hidden.narrow(1, t - 1, 1)?.squeeze(1)?;
        let room = self.max_length.saturating_sub(t);
        let steps = max_gen_toks.min(room);
        let mut generated: Vec<Vec<u32>> = vec![Vec::new(); b];
        let mut done = vec![false; b];
        let mut mask_cols = t;
        for step in 0..steps {
            let logits = self
                .decoder
                .logits(&last)?
                .to_dtype(DType::F32)?
                .to_vec2::<f32>()?;
            let mut next = Vec::with_capacity(b);
            for (row, logit) in logits.iter().enumerate() {
                if done[row] {
                    next.push(pad);
                    continue;
                }
                let token = argmax(logit) as u32;
                if Some(token) == self.eos_id {
                    done[row] = true;
                } else {
                    generated[row].push(token);
                    if !until.is_empty() {
                        // Only the tail can hold a new stop string.
                        let tail_start = generated[row].len().saturating_sub(16);
                        let tail = self.decode(&generated[row][tail_start..])?;
                        if until
                            .iter()
                            .any(|u| !u.is_empty() && tail.contains(u.as_str()))
                        {
                            done[row] = true;
                        }
                    }
                }
                next.push(token);
            }
            if done.iter().all(|d| *d) || step + 1 == steps {
                break;
            }
            if padded {
                mask.clear();
                for p in prompts {
                    let n = t - p.len();
                    mask.extend(std::iter::repeat_n(0u8, n));
                    mask.extend(std::iter::repeat_n(1u8, mask_cols + 1 - n));
                }
                mask_cols += 1;
                let m = mask_tensor(&mask, mask_cols)?;
                last = self
                    .forward_ctx(&mut cache, &next, Some(&m), b)?
                    .squeeze(1)?;
            } else {
                last = self.forward_ctx(&mut cache, &next, None, b)?.squeeze(1)?;
            }
        }
        generated
            .iter()
            .map(|g| {
                let mut text = self.decode(g)?;
                for u in until.iter().filter(|u| !u.is_empty()) {
                    if let Some(i) = text.find(u.as_str()) {
                        text.truncate(i);
                    }
                }
                Ok(text)
            })
            .collect()
    }
}

fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// `log_softmax(row)[index]` and the row's argmax (first maximum, as torch's).
fn log_softmax_at(row: &[f64], index: usize) -> (f64, usize) {
    let mut max = f64::NEG_INFINITY;
    let mut argmax = 0;
    for (i, &v) in row.iter().enumerate() {
        if v > max {
            max = v;
            argmax = i;
        }
    }
    let sum: f64 = row.iter().map(|v| (v - max).exp()).sum();
    (row[index] - max - sum.ln(), argmax)
}

fn argmax(row: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in row.iter().enumerate() {
        if v > row[best] {
            best = i;
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_softmax_and_argmax() {
        let (lp, am) = log_softmax_at(&[0.0, 2.0f64.ln(), 0.0], 1);
        assert!((lp - 0.5f64.ln()).abs() < 1e-12);
        assert_eq!(am, 1);
        assert_eq!(argmax(&[1.0, 3.0, 3.0]), 1);
        assert_eq!(common_prefix(&[1, 2, 3], &[1, 2, 4, 5]), 2);
    }
}
