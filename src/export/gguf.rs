//! GGUF files for llama.cpp: a merged model, and a LoRA adapter (`general.type = "adapter"`).
//!
//! Both follow llama.cpp's converters: GGUF tensor names, llama-arch q/k rows permuted to the
//! interleaved-rope layout (the inverse of what the loader undoes), norms and 1-D tensors in F32.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;
use std::str::FromStr;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};

use super::merge::{MergedTensors, Slot};
use super::{publish, remove_any, staging_path};
use crate::lora::LoraAdapter;
use crate::model::config::{Architecture, ModelConfig, PROJECTIONS};
use crate::model::{BaseModel, ModelLocation};
use crate::{Error, Result};

/// Storage type of the weight matrices of a merged GGUF.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgufQuant {
    F32,
    F16,
    Q8_0,
    Q4_0,
    Q4_1,
    Q4K,
    Q6K,
}

impl FromStr for GgufQuant {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "f32" => Self::F32,
            "f16" => Self::F16,
            "q8_0" => Self::Q8_0,
            "q4_0" => Self::Q4_0,
            "q4_1" => Self::Q4_1,
            "q4_k" | "q4_k_m" => Self::Q4K,
            "q6_k" => Self::Q6K,
            other => {
                return Err(Error::InvalidArgument(format!(
                    "unknown GGUF quantization `{other}` (f32, f16, q8_0, q4_0, q4_1, q4_k, q6_k)"
                )))
            }
        })
    }
}

impl GgufQuant {
    pub fn ggml(self) -> GgmlDType {
        match self {
            Self::F32 => GgmlDType::F32,
            Self::F16 => GgmlDType::F16,
            Self::Q8_0 => GgmlDType::Q8_0,
            Self::Q4_0 => GgmlDType::Q4_0,
            Self::Q4_1 => GgmlDType::Q4_1,
            Self::Q4K => GgmlDType::Q4K,
            Self::Q6K => GgmlDType::Q6K,
        }
    }

    /// llama.cpp's `general.file_type` (LLAMA_FTYPE_*).
    fn file_type(self) -> u32 {
        match self {
            Self::F32 => 0,
            Self::F16 => 1,
            Self::Q4_0 => 2,
            Self::Q4_1 => 3,
            Self::Q8_0 => 7,
            Self::Q4K => 15,
            Self::Q6K => 18,
        }
    }
}

/// The `general.architecture` llama.cpp uses: mistral checkpoints run as `llama`.
fn gguf_arch(config: &ModelConfig) -> &'static str {
    match config.architecture {
        Architecture::Llama | Architecture::Mistral => "llama",
        Architecture::Qwen2 => "qwen2",
    }
}

/// llama-arch GGUFs store q/k rows interleaved for rope; qwen2 keeps the HF order.
fn permutes_qk(config: &ModelConfig) -> bool {
    config.architecture != Architecture::Qwen2
}

/// HF row `(h, j, i)` goes to GGUF row `(h, i, j)` with `[heads, 2, head_dim/2]` row indices:
/// llama.cpp's `permute`, the inverse of the loader's `unpermute_rows_dense`.
pub fn permute_rows(t: &Tensor, heads: usize) -> Result<Tensor> {
    let dims = t.dims().to_vec();
    let rows = dims[0];
    if heads == 0 || !rows.is_multiple_of(2 * heads) {
        return Err(Error::InvalidArgument(format!(
            "cannot permute {rows} rows into {heads} rope heads"
        )));
    }
    let mut shape = vec![heads, 2, rows / heads / 2];
    shape.extend(&dims[1..]);
    Ok(t.reshape(shape)?
        .transpose(1, 2)?
        .contiguous()?
        .reshape(dims)?)
}

/// The head count whose rows are permuted for projection `p` (q or k), if any.
fn qk_heads(config: &ModelConfig, p: usize) -> Option<usize> {
    if !permutes_qk(config) {
        return None;
    }
    match p {
        0 => Some(config.num_attention_heads),
        1 => Some(config.num_key_value_heads),
        _ => None,
    }
}

/// The storage type of one tensor: norms and 1-D tensors in F32; quantized types need rows that
/// are a whole number of blocks, otherwise the tensor falls back to F16.
fn tensor_dtype(slot: Slot, shape: &[usize], quant: GgufQuant) -> GgmlDType {
    if slot.is_norm() || shape.len() < 2 {
        return GgmlDType::F32;
    }
    let target = quant.ggml();
    let row = shape[shape.len() - 1];
    if row.is_multiple_of(target.block_size()) {
        target
    } else {
        GgmlDType::F16
    }
}

/// The numbers llama.cpp reads as `<arch>.*` hyper-parameters.
fn arch_metadata(config: &ModelConfig) -> Result<Vec<(String, Value)>> {
    if config.rope_scaling.is_some() {
        // llama.cpp stores llama3 rope scaling as a `rope_freqs` tensor, which peft-wit's own
        // GGUF reader does not apply yet; a file it cannot read back correctly is not written.
        return Err(Error::InvalidArgument(
            "GGUF export of a model with llama3 rope scaling is not supported yet; export --format hf instead".into(),
        ));
    }
    let a = gguf_arch(config);
    let u = |v: usize| Value::U32(v as u32);
    let mut md = vec![
        (format!("{a}.block_count"), u(config.num_hidden_layers)),
        (
            format!("{a}.context_length"),
            u(config.max_position_embeddings),
        ),
        (format!("{a}.embedding_length"), u(config.hidden_size)),
        (
            format!("{a}.feed_forward_length"),
            u(config.intermediate_size),
        ),
        (
            format!("{a}.attention.head_count"),
            u(config.num_attention_heads),
        ),
        (
            format!("{a}.attention.head_count_kv"),
            u(config.num_key_value_heads),
        ),
        (
            format!("{a}.rope.freq_base"),
            Value::F32(config.rope_theta as f32),
        ),
        (
            format!("{a}.attention.layer_norm_rms_epsilon"),
            Value::F32(config.rms_norm_eps as f32),
        ),
        (format!("{a}.rope.dimension_count"), u(config.head_dim)),
        (format!("{a}.vocab_size"), u(config.vocab_size)),
    ];
    if config.head_dim * config.num_attention_heads != config.hidden_size {
        md.push((format!("{a}.attention.key_length"), u(config.head_dim)));
        md.push((format!("{a}.attention.value_length"), u(config.head_dim)));
    }
    Ok(md)
}

/// `tokenizer.*` keys of the source GGUF, copied as they are (tokens, merges, token types,
/// special ids, model, pre-tokenizer, chat template), so llama.cpp tokenizes identically.
fn tokenizer_metadata(base: &BaseModel) -> Result<Vec<(String, Value)>> {
    let mut md = Vec::new();
    match &base.location {
        ModelLocation::Gguf(path) => {
            let mut file = File::open(path).map_err(|e| Error::io(path, e))?;
            let content = gguf_file::Content::read(&mut file)
                .map_err(|e| Error::invalid_file(path, format!("not a readable GGUF file: {e}")))?;
            let mut keys: Vec<&String> = content
                .metadata
                .keys()
                .filter(|k| k.starts_with("tokenizer."))
                .collect();
            keys.sort();
            for k in keys {
                md.push((k.clone(), content.metadata[k].clone()));
            }
        }
        ModelLocation::HfDir(_) => {
            if let Some(tokenizer) = &base.tokenizer {
                md.extend(gpt2_vocab_metadata(
                    tokenizer,
                    base.decoder.config.vocab_size,
                )?);
            }
            let c = &base.decoder.config;
            if let Some(id) = c.bos_token_id {
                md.push(("tokenizer.ggml.bos_token_id".into(), Value::U32(id)));
            }
            if let Some(id) = c.eos_token_id {
                md.push(("tokenizer.ggml.eos_token_id".into(), Value::U32(id)));
            }
            if let Some(t) = &base.chat_template {
                md.push(("tokenizer.chat_template".into(), Value::String(t.clone())));
            }
        }
    }
    Ok(md)
}

/// llama.cpp's `gpt2` vocabulary (tokens by id, token types, merges) from a byte-level BPE
/// `tokenizer.json`, as `convert_hf_to_gguf.py` writes it. Other tokenizer kinds (SentencePiece
/// with byte fallback, unigram) give no vocabulary keys: llama.cpp then needs the original GGUF.
fn gpt2_vocab_metadata(
    tokenizer: &tokenizers::Tokenizer,
    vocab_size: usize,
) -> Result<Vec<(String, Value)>> {
    let text = tokenizer
        .to_string(false)
        .map_err(|e| Error::Tokenizer(format!("cannot serialise the tokenizer: {e}")))?;
    let json: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::Tokenizer(format!("tokenizer JSON: {e}")))?;
    let model = &json["model"];
    let byte_level = text.contains("\"ByteLevel\"");
    let byte_fallback = model["byte_fallback"].as_bool().unwrap_or(false);
    if model["type"] != "BPE" || !byte_level || byte_fallback {
        return Ok(Vec::new());
    }
    let (Some(vocab), Some(merges)) = (model["vocab"].as_object(), model["merges"].as_array())
    else {
        return Ok(Vec::new());
    };
    let mut entries: Vec<(usize, String, i32)> = vocab
        .iter()
        .filter_map(|(tok, id)| Some((id.as_u64()? as usize, tok.clone(), 1)))
        .collect();
    for added in json["added_tokens"].as_array().into_iter().flatten() {
        let (Some(id), Some(content)) = (added["id"].as_u64(), added["content"].as_str()) else {
            continue;
        };
        // CONTROL for special tokens, USER_DEFINED for other added ones.
        let kind = if added["special"].as_bool().unwrap_or(false) {
            3
        } else {
            4
        };
        entries.retain(|(i, _, _)| *i != id as usize);
        entries.push((id as usize, content.to_string(), kind));
    }
    let len = entries
        .iter()
        .map(|(i, _, _)| i + 1)
        .max()
        .unwrap_or(0)
        .max(vocab_size);
    let mut tokens: Vec<Value> = (0..len)
        .map(|i| Value::String(format!("[PAD{i}]")))
        .collect();
    // UNUSED until a real token claims the id.
    let mut types: Vec<Value> = vec![Value::I32(5); len];
    for (id, tok, kind) in entries {
        tokens[id] = Value::String(tok);
        types[id] = Value::I32(kind);
    }
    let merges: Vec<Value> = merges
        .iter()
        .filter_map(|m| match m {
            serde_json::Value::String(s) => Some(Value::String(s.clone())),
            serde_json::Value::Array(pair) => Some(Value::String(format!(
                "{} {}",
                pair.first()?.as_str()?,
                pair.get(1)?.as_str()?
            ))),
            _ => None,
        })
        .collect();
    Ok(vec![
        ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
        ("tokenizer.ggml.pre".into(), Value::String("default".into())),
        ("tokenizer.ggml.tokens".into(), Value::Array(tokens)),
        ("tokenizer.ggml.token_type".into(), Value::Array(types)),
        ("tokenizer.ggml.merges".into(), Value::Array(merges)),
    ])
}

/// Writes `md` and `tensors` to `out` through a sibling temp file.
fn write_gguf_file(
    out: &Path,
    md: &[(String, Value)],
    tensors: &[(String, QTensor)],
    force: bool,
) -> Result<()> {
    if out.exists() && !force {
        return Err(Error::AlreadyExists {
            path: out.to_path_buf(),
        });
    }
    let staged = staging_path(out, "tmp");
    let write = || -> Result<()> {
        let file = File::create(&staged).map_err(|e| Error::io(&staged, e))?;
        let mut w = BufWriter::new(file);
        let md_refs: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let t_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
        gguf_file::write(&mut w, &md_refs, &t_refs)?;
        w.flush().map_err(|e| Error::io(&staged, e))?;
        let file = w
            .into_inner()
            .map_err(|e| Error::io(&staged, e.into_error()))?;
        file.sync_all().map_err(|e| Error::io(&staged, e))
    };
    if let Err(e) = write() {
        let _ = remove_any(&staged);
        return Err(e);
    }
    publish(&staged, out, force)
}

/// Writes `base` with `adapter` merged in as a GGUF model file llama.cpp loads.
pub fn write_merged_gguf(
    base: &BaseModel,
    adapter: Option<&LoraAdapter>,
    out: &Path,
    quant: GgufQuant,
    force: bool,
) -> Result<()> {
    let config = &base.decoder.config;
    let merged = MergedTensors::new(&base.decoder, adapter)?;
    let mut md: Vec<(String, Value)> = vec![
        (
            "general.architecture".into(),
            Value::String(gguf_arch(config).into()),
        ),
        ("general.name".into(), Value::String(base.name.clone())),
        ("general.file_type".into(), Value::U32(quant.file_type())),
        ("general.quantization_version".into(), Value::U32(2)),
    ];
    md.extend(arch_metadata(config)?);
    md.extend(tokenizer_metadata(base)?);

    let mut tensors = Vec::new();
    for slot in merged.slots() {
        let mut t = merged.tensor(slot)?;
        if let Slot::Weight(_, p) | Slot::Bias(_, p) = slot {
            if let Some(heads) = qk_heads(config, p) {
                t = permute_rows(&t, heads)?;
            }
        }
        let dtype = tensor_dtype(slot, t.dims(), quant);
        let q = QTensor::quantize(&t, dtype).map_err(|e| {
            Error::InvalidArgument(format!(
                "cannot store `{}` as {dtype:?}: {e}",
                slot.gguf_name()
            ))
        })?;
        tensors.push((slot.gguf_name(), q));
    }
    write_gguf_file(out, &md, &tensors, force)
}

/// Writes `adapter` as llama.cpp's LoRA GGUF (`llama-cli --lora FILE`), following
/// `convert_lora_to_gguf.py`: `<base tensor>.lora_a` is PEFT's A `[r, in]` (GGUF ne `[in, r]`),
/// `.lora_b` is B `[out, r]` with llama-arch q/k rows permuted like the base rows, and
/// `adapter.lora.alpha` such that llama.cpp's `alpha / r` equals our scale.
pub fn write_gguf_lora(
    adapter: &LoraAdapter,
    config: &ModelConfig,
    out: &Path,
    f16: bool,
    force: bool,
) -> Result<()> {
    let r = adapter.config.r as f64;
    // llama.cpp knows only alpha / r; rsLoRA's alpha / sqrt(r) is alpha·sqrt(r) / r.
    let alpha = if adapter.config.use_rslora {
        adapter.config.lora_alpha * r.sqrt()
    } else {
        adapter.config.lora_alpha
    };
    let md: Vec<(String, Value)> = vec![
        (
            "general.architecture".into(),
            Value::String(gguf_arch(config).into()),
        ),
        ("general.type".into(), Value::String("adapter".into())),
        ("adapter.type".into(), Value::String("lora".into())),
        ("adapter.lora.alpha".into(), Value::F32(alpha as f32)),
        (
            "general.file_type".into(),
            Value::U32(if f16 { 1 } else { 0 }),
        ),
    ];
    let dtype = if f16 { GgmlDType::F16 } else { GgmlDType::F32 };
    let mut tensors = Vec::new();
    for layer in 0..adapter.num_layers() {
        for p in 0..PROJECTIONS.len() {
            let Some(pair) = adapter.pair(layer, p) else {
                continue;
            };
            let name = Slot::Weight(layer, p).gguf_name();
            let a = pair
                .a
                .as_tensor()
                .to_device(&Device::Cpu)?
                .to_dtype(DType::F32)?;
            let mut b = pair
                .b
                .as_tensor()
                .to_device(&Device::Cpu)?
                .to_dtype(DType::F32)?;
            if let Some(heads) = qk_heads(config, p) {
                b = permute_rows(&b, heads)?;
            }
            super::check_finite(&format!("{name}.lora_a"), &a)?;
            super::check_finite(&format!("{name}.lora_b"), &b)?;
            tensors.push((
                format!("{name}.lora_a"),
                QTensor::quantize(&a.contiguous()?, dtype)?,
            ));
            tensors.push((
                format!("{name}.lora_b"),
                QTensor::quantize(&b.contiguous()?, dtype)?,
            ));
        }
    }
    if tensors.is_empty() {
        return Err(Error::InvalidArgument(
            "the adapter has no LoRA tensors".into(),
        ));
    }
    write_gguf_file(out, &md, &tensors, force)
}
