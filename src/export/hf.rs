//! A merged model as a Hugging Face directory that `transformers` (and peft-wit's own
//! `load_hf_dir`) loads: config.json, tokenizer files, generation_config.json and safetensors,
//! sharded with an index above a size threshold.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{DType, Tensor};
use serde_json::json;

use super::merge::{MergedTensors, Slot};
use super::{publish, remove_any, staging_path};
use crate::lora::LoraAdapter;
use crate::model::config::{Architecture, ModelConfig};
use crate::model::BaseModel;
use crate::{Error, Result};

/// How a merged directory is written.
#[derive(Debug, Clone)]
pub struct HfExportOptions {
    /// bf16, f16 or f32 (every tensor, norms included, as transformers saves them).
    pub dtype: DType,
    /// Shards start once the weights exceed this many bytes.
    pub max_shard_size: u64,
    /// Replace an existing output.
    pub force: bool,
}

impl Default for HfExportOptions {
    fn default() -> Self {
        Self {
            dtype: DType::BF16,
            max_shard_size: 2_000_000_000,
            force: false,
        }
    }
}

/// `2GB`, `500MB`, `1.5GiB`, `4096` (bytes). Decimal units as transformers reads them.
pub fn parse_size(spec: &str) -> Result<u64> {
    let s = spec.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let bad = || Error::InvalidArgument(format!("invalid size `{spec}` (e.g. 2GB, 500MB, 1GiB)"));
    let value: f64 = num.parse().map_err(|_| bad())?;
    let mult: f64 = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 1.0,
        "KB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        "KIB" => 1024.0,
        "MIB" => 1024.0 * 1024.0,
        "GIB" => 1024.0 * 1024.0 * 1024.0,
        _ => return Err(bad()),
    };
    let bytes = value * mult;
    if !bytes.is_finite() || bytes < 1.0 {
        return Err(bad());
    }
    Ok(bytes as u64)
}

/// `bf16` / `f16` / `f32`.
pub fn parse_dtype(spec: &str) -> Result<DType> {
    match spec.to_ascii_lowercase().as_str() {
        "bf16" | "bfloat16" => Ok(DType::BF16),
        "f16" | "float16" => Ok(DType::F16),
        "f32" | "float32" => Ok(DType::F32),
        other => Err(Error::InvalidArgument(format!(
            "unknown dtype `{other}` (bf16, f16, f32)"
        ))),
    }
}

fn torch_dtype(dtype: DType) -> &'static str {
    match dtype {
        DType::BF16 => "bfloat16",
        DType::F16 => "float16",
        _ => "float32",
    }
}

/// config.json in transformers' field names.
pub fn hf_config_json(config: &ModelConfig, dtype: DType) -> serde_json::Value {
    let class = match config.architecture {
        Architecture::Llama => "LlamaForCausalLM",
        Architecture::Mistral => "MistralForCausalLM",
        Architecture::Qwen2 => "Qwen2ForCausalLM",
    };
    let rope_scaling = config.rope_scaling.as_ref().map(|r| {
        json!({
            "rope_type": "llama3",
            "factor": r.factor,
            "low_freq_factor": r.low_freq_factor,
            "high_freq_factor": r.high_freq_factor,
            "original_max_position_embeddings": r.original_max_position_embeddings,
        })
    });
    json!({
        "architectures": [class],
        "model_type": config.architecture.name(),
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_position_embeddings,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta,
        "rope_scaling": rope_scaling,
        "tie_word_embeddings": config.tie_word_embeddings,
        "attention_bias": config.qkv_bias,
        "attention_dropout": 0.0,
        "mlp_bias": false,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "torch_dtype": torch_dtype(dtype),
        "use_cache": true,
    })
}

fn write_json(path: &Path, value: &serde_json::Value) -> Result<()> {
    let mut text = serde_json::to_string_pretty(value).map_err(|error| Error::Json {
        path: path.to_path_buf(),
        error,
    })?;
    text.push('\n');
    std::fs::write(path, text).map_err(|e| Error::io(path, e))
}

/// Writes `base` (with `adapter` merged in, if any) as a Hugging Face directory at `out`.
/// Files are staged in a sibling temp dir that is renamed into place at the end.
pub fn write_hf_dir(
    base: &BaseModel,
    adapter: Option<&LoraAdapter>,
    out: &Path,
    options: &HfExportOptions,
) -> Result<()> {
    if !matches!(options.dtype, DType::BF16 | DType::F16 | DType::F32) {
        return Err(Error::InvalidArgument(format!(
            "merged dtype must be bf16, f16 or f32, not {:?}",
            options.dtype
        )));
    }
    super::check_target_free(out, options.force)?;
    let merged = MergedTensors::new(&base.decoder, adapter)?;
    let staged = staging_path(out, "tmp");
    remove_any(&staged)?;
    std::fs::create_dir_all(&staged).map_err(|e| Error::io(&staged, e))?;
    let result = write_into(base, &merged, &staged, options);
    if let Err(e) = result {
        let _ = remove_any(&staged);
        return Err(e);
    }
    publish(&staged, out, options.force)
}

fn write_into(
    base: &BaseModel,
    merged: &MergedTensors<'_>,
    dir: &Path,
    options: &HfExportOptions,
) -> Result<()> {
    let config = &base.decoder.config;
    write_weights(merged, dir, options)?;
    write_json(
        &dir.join("config.json"),
        &hf_config_json(config, options.dtype),
    )?;
    let generation = json!({
        "_from_model_config": true,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
    });
    write_json(&dir.join("generation_config.json"), &generation)?;
    if let Some(tokenizer) = &base.tokenizer {
        let text = tokenizer
            .to_string(false)
            .map_err(|e| Error::Tokenizer(format!("cannot serialise the tokenizer: {e}")))?;
        let path = dir.join("tokenizer.json");
        std::fs::write(&path, text).map_err(|e| Error::io(&path, e))?;
        let mut tc = json!({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "clean_up_tokenization_spaces": false,
            "model_max_length": config.max_position_embeddings,
            "add_bos_token": false,
            "add_eos_token": false,
        });
        if let Some(t) = &base.chat_template {
            tc["chat_template"] = json!(t);
        }
        if let Some(t) = &base.bos_token {
            tc["bos_token"] = json!(t);
        }
        if let Some(t) = &base.eos_token {
            tc["eos_token"] = json!(t);
            tc["pad_token"] = json!(t);
        }
        write_json(&dir.join("tokenizer_config.json"), &tc)?;
    }
    Ok(())
}

/// Greedy sharding in checkpoint order: a new shard starts when the next tensor would push the
/// current one past the limit (a single larger tensor gets a shard of its own).
fn write_weights(merged: &MergedTensors<'_>, dir: &Path, options: &HfExportOptions) -> Result<()> {
    let slots = merged.slots();
    let elem = options.dtype.size_in_bytes() as u64;
    let mut sizes = Vec::with_capacity(slots.len());
    for &slot in &slots {
        sizes.push(merged.shape(slot)?.iter().product::<usize>() as u64 * elem);
    }
    let total: u64 = sizes.iter().sum();
    let mut shards: Vec<Vec<Slot>> = vec![Vec::new()];
    let mut current = 0u64;
    for (&slot, &size) in slots.iter().zip(&sizes) {
        let last = shards.last_mut().expect("shards starts non-empty");
        if !last.is_empty() && current + size > options.max_shard_size {
            shards.push(Vec::new());
            current = 0;
        }
        shards.last_mut().expect("just pushed").push(slot);
        current += size;
    }
    let n = shards.len();
    let mut weight_map = BTreeMap::new();
    for (i, shard) in shards.iter().enumerate() {
        let file = if n == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{n:05}.safetensors", i + 1)
        };
        let mut tensors: Vec<(String, Tensor)> = Vec::with_capacity(shard.len());
        for &slot in shard {
            let t = merged.tensor(slot)?.to_dtype(options.dtype)?;
            weight_map.insert(slot.hf_name(), file.clone());
            tensors.push((slot.hf_name(), t));
        }
        let path = dir.join(&file);
        let metadata = Some(HashMap::from([("format".to_string(), "pt".to_string())]));
        safetensors::serialize_to_file(
            tensors.iter().map(|(k, t)| (k.as_str(), t)),
            metadata,
            &path,
        )
        .map_err(|e| Error::invalid_file(&path, format!("cannot write safetensors: {e}")))?;
    }
    if n > 1 {
        let index = json!({ "metadata": { "total_size": total }, "weight_map": weight_map });
        write_json(&dir.join("model.safetensors.index.json"), &index)?;
    }
    Ok(())
}
