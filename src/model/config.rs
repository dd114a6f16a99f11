//! The decoder's hyper-parameters, read from a Hugging Face `config.json` or from GGUF metadata.
//! One struct covers llama (incl. llama3 rope scaling), mistral and qwen2: the differences are
//! flags (`qkv_bias`, `tie_word_embeddings`, rope scaling), not separate models.

use std::path::Path;

use candle_core::quantized::gguf_file;
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Architecture family, as named by `model_type` / `general.architecture`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Architecture {
    Llama,
    Mistral,
    Qwen2,
}

impl Architecture {
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "llama" => Ok(Self::Llama),
            "mistral" => Ok(Self::Mistral),
            "qwen2" => Ok(Self::Qwen2),
            other => Err(Error::UnsupportedArchitecture(other.to_string())),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Llama => "llama",
            Self::Mistral => "mistral",
            Self::Qwen2 => "qwen2",
        }
    }
}

/// Llama 3 frequency-dependent rope scaling (`rope_type: "llama3"`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Llama3RopeScaling {
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_position_embeddings: usize,
}

/// Validated model configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub architecture: Architecture,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rope_theta: f64,
    pub rope_scaling: Option<Llama3RopeScaling>,
    pub rms_norm_eps: f64,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// q/k/v projections carry a bias (qwen2).
    pub qkv_bias: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
}

/// `config.json` as Hugging Face writes it, in both the older (`rope_theta` + `rope_scaling`) and
/// newer (`rope_parameters`) styles.
#[derive(Debug, Deserialize)]
struct HfConfig {
    model_type: Option<String>,
    architectures: Option<Vec<String>>,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    rope_theta: Option<f64>,
    rope_scaling: Option<HfRopeParameters>,
    rope_parameters: Option<HfRopeParameters>,
    rms_norm_eps: f64,
    max_position_embeddings: Option<usize>,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
    bos_token_id: Option<serde_json::Value>,
    eos_token_id: Option<serde_json::Value>,
    hidden_act: Option<String>,
}

#[derive(Debug, Deserialize)]
struct HfRopeParameters {
    rope_type: Option<String>,
    #[serde(rename = "type")]
    legacy_type: Option<String>,
    rope_theta: Option<f64>,
    factor: Option<f64>,
    low_freq_factor: Option<f64>,
    high_freq_factor: Option<f64>,
    original_max_position_embeddings: Option<usize>,
}

/// `eos_token_id` may be an int or a list of ints; the first one is used.
fn first_token_id(value: &Option<serde_json::Value>) -> Option<u32> {
    match value.as_ref()? {
        serde_json::Value::Number(n) => n.as_u64().map(|v| v as u32),
        serde_json::Value::Array(items) => items.first()?.as_u64().map(|v| v as u32),
        _ => None,
    }
}

impl ModelConfig {
    /// Reads and validates a Hugging Face `config.json`.
    pub fn from_hf_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let raw: HfConfig = serde_json::from_str(&text).map_err(|error| Error::Json {
            path: path.to_path_buf(),
            error,
        })?;
        Self::from_hf(raw).map_err(|e| Error::invalid_file(path, e.to_string()))
    }

    fn from_hf(raw: HfConfig) -> Result<Self> {
        let model_type = match (&raw.model_type, &raw.architectures) {
            (Some(t), _) => t.clone(),
            (None, Some(archs)) if !archs.is_empty() => archs[0]
                .trim_end_matches("ForCausalLM")
                .to_ascii_lowercase(),
            _ => return Err(Error::InvalidConfig("no `model_type`".into())),
        };
        let architecture = Architecture::parse(&model_type)?;
        if let Some(act) = &raw.hidden_act {
            if act != "silu" {
                return Err(Error::InvalidConfig(format!(
                    "hidden_act `{act}` is not supported (only silu)"
                )));
            }
        }
        let rope = raw.rope_parameters.as_ref().or(raw.rope_scaling.as_ref());
        let rope_theta = raw
            .rope_theta
            .or_else(|| raw.rope_parameters.as_ref().and_then(|p| p.rope_theta))
            .unwrap_or(10_000.0);
        let rope_scaling = match rope {
            None => None,
            Some(p) => match p.rope_type.as_deref().or(p.legacy_type.as_deref()) {
                None | Some("default") => None,
                Some("llama3") => Some(Llama3RopeScaling {
                    factor: p.factor.ok_or_else(|| missing("rope_scaling.factor"))?,
                    low_freq_factor: p.low_freq_factor.unwrap_or(1.0),
                    high_freq_factor: p.high_freq_factor.unwrap_or(4.0),
                    original_max_position_embeddings: p
                        .original_max_position_embeddings
                        .ok_or_else(|| missing("rope_scaling.original_max_position_embeddings"))?,
                }),
                Some(other) => {
                    return Err(Error::InvalidConfig(format!(
                        "rope type `{other}` is not supported (default, llama3)"
                    )))
                }
            },
        };
        let head_dim = raw
            .head_dim
            .unwrap_or(raw.hidden_size / raw.num_attention_heads.max(1));
        let config = ModelConfig {
            architecture,
            vocab_size: raw.vocab_size,
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            num_hidden_layers: raw.num_hidden_layers,
            num_attention_heads: raw.num_attention_heads,
            num_key_value_heads: raw.num_key_value_heads.unwrap_or(raw.num_attention_heads),
            head_dim,
            rope_theta,
            rope_scaling,
            rms_norm_eps: raw.rms_norm_eps,
            max_position_embeddings: raw.max_position_embeddings.unwrap_or(4096),
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
            qkv_bias: architecture == Architecture::Qwen2 || raw.attention_bias.unwrap_or(false),
            bos_token_id: first_token_id(&raw.bos_token_id),
            eos_token_id: first_token_id(&raw.eos_token_id),
        };
        config.validate()?;
        Ok(config)
    }

    /// Reads the configuration from GGUF metadata (`<arch>.block_count`, ...).
    pub fn from_gguf(content: &gguf_file::Content) -> Result<Self> {
        let md = &content.metadata;
        let get = |key: &str| {
            md.get(key)
                .ok_or_else(|| Error::InvalidConfig(format!("GGUF metadata `{key}` is missing")))
        };
        let arch_name = get("general.architecture")?.to_string()?.clone();
        let architecture = Architecture::parse(&arch_name)?;
        let a = arch_name.as_str();
        let u = |key: &str| -> Result<usize> { Ok(get(&format!("{a}.{key}"))?.to_u32()? as usize) };
        let hidden_size = u("embedding_length")?;
        let num_attention_heads = u("attention.head_count")?;
        let num_key_value_heads = u("attention.head_count_kv").unwrap_or(num_attention_heads);
        let head_dim = u("rope.dimension_count")
            .or_else(|_| u("attention.key_length"))
            .unwrap_or(hidden_size / num_attention_heads.max(1));
        let vocab_size = match u("vocab_size") {
            Ok(v) => v,
            Err(_) => get("tokenizer.ggml.tokens")?.to_vec()?.len(),
        };
        let rope_theta = md
            .get(&format!("{a}.rope.freq_base"))
            .map(|v| v.to_f32())
            .transpose()?
            .map(f64::from)
            .unwrap_or(10_000.0);
        let rms_norm_eps =
            f64::from(get(&format!("{a}.attention.layer_norm_rms_epsilon"))?.to_f32()?);
        let rope_scaling =
            match md.get(&format!("{a}.rope.scaling.type")) {
                Some(t) if t.to_string()? == "llama3" => return Err(Error::InvalidConfig(
                    "GGUF llama3 rope scaling is stored as a rope_freqs tensor; not supported yet"
                        .into(),
                )),
                _ => None,
            };
        let token_id = |key: &str| md.get(key).and_then(|v| v.to_u32().ok());
        let tie_word_embeddings = !content.tensor_infos.contains_key("output.weight");
        let config = ModelConfig {
            architecture,
            vocab_size,
            hidden_size,
            intermediate_size: u("feed_forward_length")?,
            num_hidden_layers: u("block_count")?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rope_theta,
            rope_scaling,
            rms_norm_eps,
            max_position_embeddings: u("context_length").unwrap_or(4096),
            tie_word_embeddings,
            qkv_bias: content.tensor_infos.contains_key("blk.0.attn_q.bias"),
            bos_token_id: token_id("tokenizer.ggml.bos_token_id"),
            eos_token_id: token_id("tokenizer.ggml.eos_token_id"),
        };
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<()> {
        let fail = |m: String| Err(Error::InvalidConfig(m));
        if self.num_attention_heads == 0 || self.num_key_value_heads == 0 {
            return fail("head counts must be positive".into());
        }
        if !self
            .num_attention_heads
            .is_multiple_of(self.num_key_value_heads)
        {
            return fail(format!(
                "num_attention_heads ({}) is not a multiple of num_key_value_heads ({})",
                self.num_attention_heads, self.num_key_value_heads
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return fail(format!(
                "head_dim {} must be even for rotary embeddings",
                self.head_dim
            ));
        }
        if self.hidden_size == 0 || self.vocab_size == 0 || self.num_hidden_layers == 0 {
            return fail("hidden_size, vocab_size and num_hidden_layers must be positive".into());
        }
        Ok(())
    }

    pub fn q_dim(&self) -> usize {
        self.num_attention_heads * self.head_dim
    }

    pub fn kv_dim(&self) -> usize {
        self.num_key_value_heads * self.head_dim
    }

    /// `(in_features, out_features)` of a projection, by its module name.
    pub fn projection_shape(&self, module: &str) -> Option<(usize, usize)> {
        let (h, i) = (self.hidden_size, self.intermediate_size);
        Some(match module {
            "q_proj" => (h, self.q_dim()),
            "k_proj" | "v_proj" => (h, self.kv_dim()),
            "o_proj" => (self.q_dim(), h),
            "gate_proj" | "up_proj" => (h, i),
            "down_proj" => (i, h),
            _ => return None,
        })
    }
}

fn missing(field: &str) -> Error {
    Error::InvalidConfig(format!("`{field}` is missing"))
}

/// The projections of one decoder layer, in the order PEFT lists their parameters.
pub const PROJECTIONS: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

/// The HF module path of a projection (`model.layers.3.self_attn.q_proj`).
pub fn module_path(layer: usize, projection: &str) -> String {
    let block = match projection {
        "gate_proj" | "up_proj" | "down_proj" => "mlp",
        _ => "self_attn",
    };
    format!("model.layers.{layer}.{block}.{projection}")
}
