//! A `tokenizers::Tokenizer` rebuilt from GGUF metadata, matching what transformers builds from
//! the same file.
//!
//! candle's own `TokenizerFromGguf` is not used: for an unknown `tokenizer.ggml.pre` it falls back
//! to a ByteLevel pre-tokenizer that adds a prefix space, which changes the ids of SmolLM2.

use candle_core::quantized::gguf_file::{Content, Value};
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::{Prepend, Replace, Sequence as NormalizerSequence};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::SplitDelimiterBehavior;
use tokenizers::{AddedToken, Tokenizer};

use crate::{Error, Result};

/// GGUF `tokenizer.ggml.token_type` values (llama.cpp's `llama_token_type`).
const TOKEN_TYPE_CONTROL: i64 = 3;
const TOKEN_TYPE_USER_DEFINED: i64 = 4;

/// The special tokens a model declares, as `(text, id)`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SpecialTokens {
    pub bos: Option<(String, u32)>,
    pub eos: Option<(String, u32)>,
    pub pad: Option<(String, u32)>,
}

impl SpecialTokens {
    /// Reads `tokenizer.ggml.{bos,eos,padding}_token_id` and names them from the vocabulary.
    pub fn from_gguf(content: &Content) -> Result<Self> {
        let tokens = gguf_strings(content, "tokenizer.ggml.tokens")?;
        let lookup = |key: &str| -> Result<Option<(String, u32)>> {
            let Some(v) = content.metadata.get(key) else {
                return Ok(None);
            };
            let id = value_as_i64(v)
                .and_then(|i| u32::try_from(i).ok())
                .ok_or_else(|| Error::Tokenizer(format!("`{key}` is not a token id")))?;
            let text = tokens.get(id as usize).ok_or_else(|| {
                Error::Tokenizer(format!(
                    "`{key}` = {id} is outside the vocabulary ({} tokens)",
                    tokens.len()
                ))
            })?;
            Ok(Some((text.clone(), id)))
        };
        Ok(Self {
            bos: lookup("tokenizer.ggml.bos_token_id")?,
            eos: lookup("tokenizer.ggml.eos_token_id")?,
            pad: lookup("tokenizer.ggml.padding_token_id")?,
        })
    }
}

/// The model's own chat template (`tokenizer.chat_template`), if the file carries one.
pub fn chat_template_from_gguf(content: &Content) -> Option<String> {
    match content.metadata.get("tokenizer.chat_template") {
        Some(Value::String(s)) => Some(s.clone()),
        _ => None,
    }
}

/// Builds the tokenizer described by a GGUF file's `tokenizer.ggml.*` metadata.
///
/// `gpt2` (byte-level BPE) is built exactly as transformers does; `llama` (SentencePiece BPE with
/// byte fallback) follows transformers' GGUF converter but has no reference ids to check against.
pub fn tokenizer_from_gguf(content: &Content) -> Result<Tokenizer> {
    let model = match content.metadata.get("tokenizer.ggml.model") {
        Some(Value::String(s)) => s.as_str(),
        Some(_) => {
            return Err(Error::Tokenizer(
                "`tokenizer.ggml.model` is not a string".into(),
            ))
        }
        None => {
            return Err(Error::Tokenizer(
                "GGUF file has no `tokenizer.ggml.model`".into(),
            ))
        }
    };
    let tokens = gguf_strings(content, "tokenizer.ggml.tokens")?;
    let types = match content.metadata.get("tokenizer.ggml.token_type") {
        Some(Value::Array(a)) => a.iter().map(|v| value_as_i64(v).unwrap_or(1)).collect(),
        _ => vec![1; tokens.len()],
    };
    let merges = match content.metadata.get("tokenizer.ggml.merges") {
        Some(_) => Some(split_merges(&gguf_strings(
            content,
            "tokenizer.ggml.merges",
        )?)?),
        None => None,
    };
    let mut tokenizer = match model {
        "gpt2" => {
            let merges = merges.ok_or_else(|| {
                Error::Tokenizer("gpt2 tokenizer without `tokenizer.ggml.merges`".into())
            })?;
            let pre = match content.metadata.get("tokenizer.ggml.pre") {
                Some(Value::String(s)) => s.as_str(),
                _ => "default",
            };
            gpt2_tokenizer(&tokens, merges, pre)?
        }
        "llama" => {
            let scores = match content.metadata.get("tokenizer.ggml.scores") {
                Some(Value::Array(a)) => a.iter().map(|v| v.to_f32().unwrap_or(0.0)).collect(),
                _ => vec![0.0; tokens.len()],
            };
            let add_prefix = content
                .metadata
                .get("tokenizer.ggml.add_space_prefix")
                .and_then(|v| v.to_bool().ok())
                .unwrap_or(true);
            let unk = content
                .metadata
                .get("tokenizer.ggml.unknown_token_id")
                .and_then(value_as_i64)
                .and_then(|i| tokens.get(i as usize).cloned());
            llama_tokenizer(&tokens, &scores, merges, unk, add_prefix)?
        }
        other => {
            return Err(Error::Tokenizer(format!(
                "tokenizer model `{other}` is not supported (supported: gpt2, llama)"
            )))
        }
    };
    let mut special = Vec::new();
    let mut user = Vec::new();
    for (tok, ty) in tokens.iter().zip(types.iter().copied()) {
        match ty {
            TOKEN_TYPE_CONTROL => special.push(AddedToken::from(tok.clone(), true)),
            TOKEN_TYPE_USER_DEFINED => user.push(AddedToken::from(tok.clone(), false)),
            _ => {}
        }
    }
    tokenizer
        .add_special_tokens(special)
        .map_err(|e| Error::Tokenizer(format!("adding control tokens: {e}")))?;
    tokenizer
        .add_tokens(user)
        .map_err(|e| Error::Tokenizer(format!("adding user-defined tokens: {e}")))?;
    Ok(tokenizer)
}

/// Split regex of Llama 3 style BPE (numbers in groups of up to three).
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Split regex of Qwen2 BPE (single digits).
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// `pre` is `tokenizer.ggml.pre`: llama.cpp's name for the pre-tokenizer regex. Unknown names
/// (SmolLM2's `smollm` included) use GPT-2's regex, which is what transformers does for them.
fn gpt2_tokenizer(
    tokens: &[String],
    merges: Vec<(String, String)>,
    pre: &str,
) -> Result<Tokenizer> {
    let bpe = BPE::builder()
        .vocab_and_merges(vocab_map(tokens), merges)
        .build()
        .map_err(|e| Error::Tokenizer(format!("building BPE: {e}")))?;
    let mut tokenizer = Tokenizer::new(bpe);
    let split = match pre {
        "llama3" | "llama-bpe" | "llama-v3" => Some(LLAMA3_SPLIT),
        "qwen2" => Some(QWEN2_SPLIT),
        _ => None,
    };
    match split {
        // transformers' GGUF GPT-2 converter: no prefix space, GPT-2 regex split.
        None => {
            tokenizer.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
        }
        Some(re) => {
            let split = Split::new(
                SplitPattern::Regex(re.into()),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .map_err(|e| Error::Tokenizer(format!("pre-tokenizer regex: {e}")))?;
            tokenizer.with_pre_tokenizer(Some(PreTokenizerSequence::new(vec![
                split.into(),
                ByteLevel::new(false, false, false).into(),
            ])));
        }
    }
    tokenizer.with_decoder(Some(ByteLevel::default()));
    tokenizer.with_post_processor(Some(ByteLevel::new(false, false, true)));
    Ok(tokenizer)
}

fn llama_tokenizer(
    tokens: &[String],
    scores: &[f32],
    merges: Option<Vec<(String, String)>>,
    unk: Option<String>,
    add_prefix: bool,
) -> Result<Tokenizer> {
    let vocab = vocab_map(tokens);
    let merges = merges.unwrap_or_else(|| merges_from_scores(tokens, scores, &vocab));
    let mut builder = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .fuse_unk(true)
        .byte_fallback(true);
    if let Some(unk) = unk {
        builder = builder.unk_token(unk);
    }
    let bpe = builder
        .build()
        .map_err(|e| Error::Tokenizer(format!("building BPE: {e}")))?;
    let mut tokenizer = Tokenizer::new(bpe);
    let replace = Replace::new(" ", "▁").map_err(|e| Error::Tokenizer(e.to_string()))?;
    let normalizer = if add_prefix {
        NormalizerSequence::new(vec![Prepend::new("▁".into()).into(), replace.into()])
    } else {
        NormalizerSequence::new(vec![replace.into()])
    };
    tokenizer
        .with_normalizer(Some(normalizer))
        .map_err(|e| Error::Tokenizer(e.to_string()))?;
    let unspace = tokenizers::decoders::DecoderWrapper::Replace(
        Replace::new("▁", " ").map_err(|e| Error::Tokenizer(e.to_string()))?,
    );
    let mut steps = vec![unspace, ByteFallback::new().into(), Fuse::new().into()];
    if add_prefix {
        steps.push(Strip::new(' ', 1, 0).into());
    }
    tokenizer.with_decoder(Some(DecoderSequence::new(steps)));
    Ok(tokenizer)
}

/// SentencePiece files carry scores, not merges: derive merges the way transformers'
/// `SentencePieceExtractor` does (every split of a piece into two known pieces, best score first).
fn merges_from_scores(tokens: &[String], scores: &[f32], vocab: &Vocab) -> Vec<(String, String)> {
    let mut merges: Vec<(f32, u32, u32, String, String)> = Vec::new();
    for (id, piece) in tokens.iter().enumerate() {
        let score = scores.get(id).copied().unwrap_or(0.0);
        for (i, _) in piece.char_indices().skip(1) {
            let (l, r) = piece.split_at(i);
            if let (Some(&li), Some(&ri)) = (vocab.get(l), vocab.get(r)) {
                merges.push((score, li, ri, l.to_string(), r.to_string()));
            }
        }
    }
    merges.sort_by(|a, b| {
        b.0.partial_cmp(&a.0)
            .unwrap_or(std::cmp::Ordering::Equal)
            .then(a.1.cmp(&b.1))
            .then(a.2.cmp(&b.2))
    });
    merges.into_iter().map(|m| (m.3, m.4)).collect()
}

/// tokenizers wants its own `AHashMap`-based `Vocab`, which collects from an iterator.
fn vocab_map(tokens: &[String]) -> Vocab {
    tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), i as u32))
        .collect()
}

/// GGUF merges are `"left right"`; the pieces themselves never contain a space (byte-level BPE
/// maps it to `Ġ`), so the first space is the separator.
fn split_merges(raw: &[String]) -> Result<Vec<(String, String)>> {
    raw.iter()
        .enumerate()
        .map(|(i, m)| {
            m.split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .ok_or_else(|| Error::Tokenizer(format!("merge {i} `{m}` has no space")))
        })
        .collect()
}

fn gguf_strings(content: &Content, key: &str) -> Result<Vec<String>> {
    let arr = match content.metadata.get(key) {
        Some(Value::Array(a)) => a,
        Some(_) => return Err(Error::Tokenizer(format!("`{key}` is not an array"))),
        None => return Err(Error::Tokenizer(format!("GGUF file has no `{key}`"))),
    };
    arr.iter()
        .enumerate()
        .map(|(i, v)| match v {
            Value::String(s) => Ok(s.clone()),
            _ => Err(Error::Tokenizer(format!("`{key}`[{i}] is not a string"))),
        })
        .collect()
}

fn value_as_i64(v: &Value) -> Option<i64> {
    match v {
        Value::U8(x) => Some(*x as i64),
        Value::I8(x) => Some(*x as i64),
        Value::U16(x) => Some(*x as i64),
        Value::I16(x) => Some(*x as i64),
        Value::U32(x) => Some(*x as i64),
        Value::I32(x) => Some(*x as i64),
        Value::U64(x) => i64::try_from(*x).ok(),
        Value::I64(x) => Some(*x),
        _ => None,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) const MODEL: &str = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/models/SmolLM2-135M-Instruct.Q4_1.gguf"
    );
    pub(crate) const REFERENCE: &str = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../shared/reference/smollm2-135m-instruct"
    );

    /// The real SmolLM2 GGUF content, or `None` (with a loud message) when the file is absent.
    pub(crate) fn smollm_content() -> Option<Content> {
        let Ok(mut f) = std::fs::File::open(MODEL) else {
            eprintln!("SKIPPED: model file {MODEL} is absent");
            return None;
        };
        Some(Content::read(&mut f).expect("reading the GGUF header"))
    }

    pub(crate) fn reference(name: &str) -> Option<serde_json::Value> {
        let path = format!("{REFERENCE}/{name}");
        let Ok(text) = std::fs::read_to_string(&path) else {
            eprintln!("SKIPPED: reference file {path} is absent");
            return None;
        };
        Some(serde_json::from_str(&text).expect("reference JSON"))
    }

    fn ids_of(v: &serde_json::Value) -> Vec<u32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect()
    }

    #[test]
    fn smollm_tokenizer_matches_transformers() {
        let (Some(content), Some(reference)) = (smollm_content(), reference("tokenizer.json"))
        else {
            return;
        };
        let tok = tokenizer_from_gguf(&content).unwrap();
        assert_eq!(tok.get_vocab_size(true), 49152);
        let cases = reference["cases"].as_array().unwrap();
        assert_eq!(cases.len(), 7);
        for case in cases {
            let text = case["text"].as_str().unwrap();
            let enc = tok.encode(text, false).unwrap();
            assert_eq!(enc.get_ids(), ids_of(&case["ids"]).as_slice(), "{text:?}");
            assert_eq!(tok.decode(enc.get_ids(), false).unwrap(), text);
        }
        for chat in reference["chat"].as_array().unwrap() {
            let text = chat["rendered"].as_str().unwrap();
            let enc = tok.encode(text, false).unwrap();
            assert_eq!(enc.get_ids(), ids_of(&chat["ids"]).as_slice());
            assert_eq!(tok.decode(enc.get_ids(), false).unwrap(), text);
        }
    }

    #[test]
    fn smollm_special_tokens_and_template() {
        let (Some(content), Some(reference)) = (smollm_content(), reference("tokenizer.json"))
        else {
            return;
        };
        let sp = SpecialTokens::from_gguf(&content).unwrap();
        assert_eq!(sp.bos, Some(("<|im_start|>".into(), 1)));
        assert_eq!(sp.eos, Some(("<|im_end|>".into(), 2)));
        assert_eq!(
            chat_template_from_gguf(&content).as_deref(),
            reference["chat_template"].as_str()
        );
    }

    #[test]
    fn merges_split_on_first_space_only() {
        let m = split_merges(&["Ġ t".into(), "a b c".into()]).unwrap();
        assert_eq!(m[0], ("Ġ".into(), "t".into()));
        assert_eq!(m[1], ("a".into(), "b c".into()));
        assert!(split_merges(&["ab".into()]).is_err());
    }

    #[test]
    fn llama_style_tokenizer_from_scores() {
        let tokens: Vec<String> = ["<unk>", "<s>", "</s>", "▁", "h", "i", "▁h", "▁hi", "<0x21>"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let scores = [0.0, 0.0, 0.0, -1.0, -2.0, -2.0, -0.5, -0.1, 0.0];
        let tok = llama_tokenizer(&tokens, &scores, None, Some("<unk>".into()), true).unwrap();
        let enc = tok.encode("hi hi!", false).unwrap();
        // "▁hi▁hi!" -> ▁hi ▁hi and `!` through byte fallback.
        assert_eq!(enc.get_ids(), &[7, 7, 8]);
        assert_eq!(tok.decode(enc.get_ids(), false).unwrap(), "hi hi!");
    }

    #[test]
    fn named_pre_tokenizer_regexes_split_digits() {
        // Byte-level alphabet for the digits and a space only: enough to see the split.
        let tokens: Vec<String> = ["1", "2", "3", "4", "Ġ", "12", "123", "34"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let merges = vec![
            ("1".to_string(), "2".to_string()),
            ("12".to_string(), "3".to_string()),
            ("3".to_string(), "4".to_string()),
        ];
        let ids = |pre: &str| {
            let t = gpt2_tokenizer(&tokens, merges.clone(), pre).unwrap();
            t.encode("1234", false).unwrap().get_ids().to_vec()
        };
        assert_eq!(ids("smollm"), vec![6, 3]); // GPT-2: "1234" one piece -> 123 4
        assert_eq!(ids("llama-bpe"), vec![6, 3]); // groups of three: 123 | 4
        assert_eq!(ids("qwen2"), vec![0, 1, 2, 3]); // single digits
    }
}
