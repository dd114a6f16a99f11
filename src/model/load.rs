//! Loading a frozen base model from a GGUF file or a Hugging Face directory.
//!
//! GGUF stores llama q/k projection rows permuted for interleaved rotary embeddings; they are
//! un-permuted here (on the raw blocks when kept quantized), so everything above this module, and
//! every adapter read or written, is in the Hugging Face layout.

use std::borrow::Cow;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use candle_core::quantized::{gguf_file, GgmlDType, QStorage, QTensor};
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};
use sha2::{Digest, Sha256};

use super::config::{Architecture, ModelConfig, PROJECTIONS};
use super::decoder::{Block, Decoder, Projection};
use super::frozen::FrozenWeight;
use crate::{Error, Result};

/// How the frozen base weights are held in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BaseDType {
    #[serde(alias = "float32")]
    F32,
    #[serde(alias = "float16")]
    F16,
    #[serde(alias = "bfloat16")]
    Bf16,
    /// Kept as GGUF blocks (from a GGUF file), or quantized to Q8_0 on load (from safetensors).
    #[serde(alias = "q")]
    Quantized,
}

impl FromStr for BaseDType {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "float32" => Ok(Self::F32),
            "f16" | "float16" => Ok(Self::F16),
            "bf16" | "bfloat16" => Ok(Self::Bf16),
            "quantized" | "q" => Ok(Self::Quantized),
            other => Err(Error::InvalidArgument(format!(
                "unknown base dtype `{other}` (f32, f16, bf16, quantized)"
            ))),
        }
    }
}

impl BaseDType {
    fn dense_dtype(self) -> DType {
        match self {
            Self::F16 => DType::F16,
            Self::Bf16 => DType::BF16,
            Self::F32 | Self::Quantized => DType::F32,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::Bf16 => "bf16",
            Self::Quantized => "quantized",
        }
    }
}

/// Where a model's files are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelLocation {
    Gguf(PathBuf),
    HfDir(PathBuf),
}

/// A loaded base model: decoder, tokenizer, chat template and identity.
pub struct BaseModel {
    pub decoder: Decoder,
    pub tokenizer: Option<tokenizers::Tokenizer>,
    pub chat_template: Option<String>,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    /// What adapters record as `base_model_name_or_path`.
    pub name: String,
    /// A cheap content hash of the weight files (size + first and last MiB of each).
    pub fingerprint: String,
    pub location: ModelLocation,
    pub base_dtype: BaseDType,
}

impl BaseModel {
    pub fn load(location: &ModelLocation, base_dtype: BaseDType, device: &Device) -> Result<Self> {
        match location {
            ModelLocation::Gguf(path) => load_gguf(path, base_dtype, device),
            ModelLocation::HfDir(dir) => load_hf_dir(dir, base_dtype, device),
        }
    }

    /// The template named by `spec` (`chat`, `alpaca`, `raw` or a Jinja file) for this model.
    pub fn template(&self, spec: &str) -> Result<crate::data::Template> {
        crate::data::Template::from_spec(
            spec,
            crate::data::ModelTokens {
                model_name: &self.name,
                chat_template: self.chat_template.as_deref(),
                bos: self.bos_token.as_deref().unwrap_or(""),
                eos: self.eos_token.as_deref().unwrap_or(""),
            },
        )
    }

    /// Padding id: the configured eos (padding never enters the loss or attention).
    pub fn pad_id(&self) -> u32 {
        self.decoder.config.eos_token_id.unwrap_or(0)
    }

    /// The tokenizer, or an error naming the model when it has none.
    pub fn tokenizer(&self) -> Result<&tokenizers::Tokenizer> {
        self.tokenizer
            .as_ref()
            .ok_or_else(|| Error::Tokenizer(format!("model `{}` has no tokenizer", self.name)))
    }
}

/// The HF tensor names of a block, mapped to GGUF names.
fn gguf_name(hf: &str) -> String {
    if hf == "model.embed_tokens.weight" {
        return "token_embd.weight".into();
    }
    if hf == "model.norm.weight" {
        return "output_norm.weight".into();
    }
    if hf == "lm_head.weight" {
        return "output.weight".into();
    }
    let Some(rest) = hf.strip_prefix("model.layers.") else {
        return hf.into();
    };
    let (layer, rest) = rest.split_once('.').unwrap_or((rest, ""));
    let mapped = match rest {
        "input_layernorm.weight" => "attn_norm.weight",
        "post_attention_layernorm.weight" => "ffn_norm.weight",
        "self_attn.q_proj.weight" => "attn_q.weight",
        "self_attn.k_proj.weight" => "attn_k.weight",
        "self_attn.v_proj.weight" => "attn_v.weight",
        "self_attn.o_proj.weight" => "attn_output.weight",
        "self_attn.q_proj.bias" => "attn_q.bias",
        "self_attn.k_proj.bias" => "attn_k.bias",
        "self_attn.v_proj.bias" => "attn_v.bias",
        "mlp.gate_proj.weight" => "ffn_gate.weight",
        "mlp.up_proj.weight" => "ffn_up.weight",
        "mlp.down_proj.weight" => "ffn_down.weight",
        other => other,
    };
    format!("blk.{layer}.{mapped}")
}

/// Reads tensors by their HF name from either format.
enum TensorSource {
    Gguf {
        content: gguf_file::Content,
        file: std::cell::RefCell<File>,
        path: PathBuf,
        /// llama-arch GGUFs store q/k rows permuted for interleaved rope.
        permuted_qk: bool,
    },
    Safetensors {
        tensors: MmapedSafetensors,
        names: std::collections::HashSet<String>,
        dir: PathBuf,
    },
}

impl TensorSource {
    fn describe(&self) -> String {
        match self {
            Self::Gguf { path, .. } => path.display().to_string(),
            Self::Safetensors { dir, .. } => dir.display().to_string(),
        }
    }

    fn contains(&self, hf: &str) -> bool {
        match self {
            Self::Gguf { content, .. } => content.tensor_infos.contains_key(&gguf_name(hf)),
            Self::Safetensors { names, .. } => names.contains(hf),
        }
    }

    fn missing(&self, hf: &str) -> Error {
        let name = match self {
            Self::Gguf { .. } => format!("{} ({hf})", gguf_name(hf)),
            Self::Safetensors { .. } => hf.to_string(),
        };
        Error::MissingTensor {
            name,
            source_name: self.describe(),
        }
    }

    /// Row permutation (head count) for GGUF q/k tensors, `None` otherwise.
    fn qk_heads(&self, hf: &str, config: &ModelConfig) -> Option<usize> {
        let Self::Gguf { permuted_qk, .. } = self else {
            return None;
        };
        if !*permuted_qk {
            return None;
        }
        if hf.contains("self_attn.q_proj.") {
            Some(config.num_attention_heads)
        } else if hf.contains("self_attn.k_proj.") {
            Some(config.num_key_value_heads)
        } else {
            None
        }
    }

    /// A tensor as stored (GGUF blocks or a dense safetensors tensor).
    fn raw(&self, hf: &str, device: &Device) -> Result<RawTensor> {
        if !self.contains(hf) {
            return Err(self.missing(hf));
        }
        let bad = |e: candle_core::Error| {
            Error::invalid_file(self.describe(), format!("cannot read tensor `{hf}`: {e}"))
        };
        match self {
            Self::Gguf { content, file, .. } => {
                let mut file = file.borrow_mut();
                let q = content
                    .tensor(&mut *file, &gguf_name(hf), device)
                    .map_err(bad)?;
                Ok(RawTensor::Quantized(q))
            }
            Self::Safetensors { tensors, .. } => {
                Ok(RawTensor::Dense(tensors.load(hf, device).map_err(bad)?))
            }
        }
    }

    /// A dense tensor of `dtype` (dequantized if stored quantized), HF row order.
    fn dense(
        &self,
        hf: &str,
        config: &ModelConfig,
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        let t = match self.raw(hf, device)? {
            RawTensor::Quantized(q) => q.dequantize(device)?,
            RawTensor::Dense(t) => t,
        };
        let t = match self.qk_heads(hf, config) {
            Some(heads) => unpermute_rows_dense(&t, heads)?,
            None => t,
        };
        Ok(t.to_dtype(dtype)?)
    }

    /// A frozen projection weight in the requested representation.
    fn frozen(
        &self,
        hf: &str,
        config: &ModelConfig,
        base_dtype: BaseDType,
        device: &Device,
    ) -> Result<FrozenWeight> {
        if base_dtype != BaseDType::Quantized {
            return Ok(FrozenWeight::dense(self.dense(
                hf,
                config,
                base_dtype.dense_dtype(),
                device,
            )?));
        }
        let q = match self.raw(hf, device)? {
            RawTensor::Quantized(q)
                if q.dtype() == GgmlDType::F32 || q.dtype() == GgmlDType::F16 =>
            {
                // Float tensors in a GGUF gain nothing from the quantized path.
                return Ok(FrozenWeight::dense(self.dense(
                    hf,
                    config,
                    DType::F32,
                    device,
                )?));
            }
            RawTensor::Quantized(q) => q,
            RawTensor::Dense(t) => QTensor::quantize(&t.to_dtype(DType::F32)?, GgmlDType::Q8_0)
                .map_err(|e| {
                    Error::InvalidArgument(format!("cannot quantize `{hf}` to Q8_0: {e}"))
                })?,
        };
        let q = match self.qk_heads(hf, config) {
            Some(heads) => unpermute_rows_quantized(&q, heads, device)?,
            None => q,
        };
        Ok(FrozenWeight::Quantized(Arc::new(q)))
    }
}

enum RawTensor {
    Quantized(QTensor),
    Dense(Tensor),
}

/// GGUF row `(h, i, j)` holds HF row `(h, j, i)` (`[heads, head_dim/2, 2]` vs `[heads, 2, head_dim/2]`).
fn unpermute_rows_dense(t: &Tensor, heads: usize) -> Result<Tensor> {
    let dims = t.dims().to_vec();
    let rows = dims[0];
    let rest: Vec<usize> = dims[1..].to_vec();
    let half = rows / heads / 2;
    let mut shape = vec![heads, half, 2];
    shape.extend(&rest);
    Ok(t.reshape(shape)?
        .transpose(1, 2)?
        .contiguous()?
        .reshape(dims)?)
}

fn unpermute_rows_quantized(q: &QTensor, heads: usize, device: &Device) -> Result<QTensor> {
    let (rows, cols) = q.shape().dims2()?;
    let dtype = q.dtype();
    let row_bytes = cols / dtype.block_size() * dtype.type_size();
    let data = q.data()?;
    let half = rows / heads / 2;
    let mut out = vec![0u8; data.len()];
    for h in 0..heads {
        for j in 0..2 {
            for i in 0..half {
                let hf_row = h * 2 * half + j * half + i;
                let gguf_row = h * 2 * half + i * 2 + j;
                out[hf_row * row_bytes..(hf_row + 1) * row_bytes]
                    .copy_from_slice(&data[gguf_row * row_bytes..(gguf_row + 1) * row_bytes]);
            }
        }
    }
    let storage = QStorage::from_data(Cow::Owned(out), device, dtype)?;
    Ok(QTensor::new(storage, (rows, cols))?)
}

fn build_decoder(
    source: &TensorSource,
    config: ModelConfig,
    base_dtype: BaseDType,
    device: &Device,
) -> Result<Decoder> {
    let dense_dtype = base_dtype.dense_dtype();
    let embed = source.dense("model.embed_tokens.weight", &config, dense_dtype, device)?;
    let expect = |name: &str, t: &Tensor, shape: &[usize]| -> Result<()> {
        if t.dims() != shape {
            return Err(Error::ShapeMismatch {
                name: name.into(),
                expected: shape.to_vec(),
                actual: t.dims().to_vec(),
            });
        }
        Ok(())
    };
    expect(
        "model.embed_tokens.weight",
        &embed,
        &[config.vocab_size, config.hidden_size],
    )?;
    let mut blocks = Vec::with_capacity(config.num_hidden_layers);
    for layer in 0..config.num_hidden_layers {
        let prefix = format!("model.layers.{layer}");
        let norm = |n: &str| -> Result<Tensor> {
            let name = format!("{prefix}.{n}.weight");
            let t = source.dense(&name, &config, DType::F32, device)?;
            expect(&name, &t, &[config.hidden_size])?;
            Ok(t)
        };
        let mut projections = Vec::with_capacity(PROJECTIONS.len());
        for proj in PROJECTIONS {
            let module = super::config::module_path(layer, proj);
            let name = format!("{module}.weight");
            let weight = source.frozen(&name, &config, base_dtype, device)?;
            let (inp, out) = config.projection_shape(proj).unwrap_or((0, 0));
            let (wo, wi) = weight.dims()?;
            if (wo, wi) != (out, inp) {
                return Err(Error::ShapeMismatch {
                    name,
                    expected: vec![out, inp],
                    actual: vec![wo, wi],
                });
            }
            let bias_name = format!("{module}.bias");
            let bias = if source.contains(&bias_name) {
                Some(source.dense(&bias_name, &config, DType::F32, device)?)
            } else if config.qkv_bias && ["q_proj", "k_proj", "v_proj"].contains(&proj) {
                return Err(source.missing(&bias_name));
            } else {
                None
            };
            projections.push(Projection { weight, bias });
        }
        blocks.push(Block {
            input_layernorm: norm("input_layernorm")?,
            post_attention_layernorm: norm("post_attention_layernorm")?,
            projections,
        });
    }
    let norm = source.dense("model.norm.weight", &config, DType::F32, device)?;
    let lm_head = if source.contains("lm_head.weight") && !config.tie_word_embeddings {
        source.frozen("lm_head.weight", &config, base_dtype, device)?
    } else {
        // Tied: the same storage as the embedding, no second copy.
        FrozenWeight::dense(embed.clone())
    };
    Decoder::new(config, embed, blocks, norm, lm_head, DType::F32, device)
}

/// Loads a GGUF model file.
pub fn load_gguf(path: &Path, base_dtype: BaseDType, device: &Device) -> Result<BaseModel> {
    let mut file = File::open(path).map_err(|e| Error::io(path, e))?;
    let content = gguf_file::Content::read(&mut file)
        .map_err(|e| Error::invalid_file(path, format!("not a readable GGUF file: {e}")))?;
    let config = ModelConfig::from_gguf(&content).map_err(|e| match e {
        Error::UnsupportedArchitecture(_) => e,
        other => Error::invalid_file(path, other.to_string()),
    })?;
    check_gguf_size(&content, &mut file, path)?;
    let tokenizer = Some(crate::tokenizer::tokenizer_from_gguf(&content)?);
    let chat_template = crate::tokenizer::chat_template_from_gguf(&content);
    let token_text = |key: &str| -> Option<String> {
        let id = content.metadata.get(key)?.to_u32().ok()? as usize;
        let tokens = content
            .metadata
            .get("tokenizer.ggml.tokens")?
            .to_vec()
            .ok()?;
        tokens.get(id)?.to_string().ok().cloned()
    };
    let bos_token = token_text("tokenizer.ggml.bos_token_id");
    let eos_token = token_text("tokenizer.ggml.eos_token_id");
    let is_default =
        path.file_name().and_then(|n| n.to_str()) == Some(super::resolve::DEFAULT_MODEL_FILE);
    let name = if is_default {
        // The default model's Hub id, which PEFT and transformers users load it by.
        super::resolve::DEFAULT_HUB_ID.to_string()
    } else {
        content
            .metadata
            .get("general.name")
            .and_then(|v| v.to_string().ok().cloned())
            .unwrap_or_else(|| file_stem(path))
    };
    let permuted_qk = config.architecture != Architecture::Qwen2;
    let source = TensorSource::Gguf {
        content,
        file: std::cell::RefCell::new(file),
        path: path.to_path_buf(),
        permuted_qk,
    };
    let decoder = build_decoder(&source, config, base_dtype, device)?;
    Ok(BaseModel {
        decoder,
        tokenizer,
        chat_template,
        bos_token,
        eos_token,
        name,
        fingerprint: fingerprint_files(&[path.to_path_buf()])?,
        location: ModelLocation::Gguf(path.to_path_buf()),
        base_dtype,
    })
}

/// Catches truncated files early with one clear message instead of a failed read per tensor.
fn check_gguf_size(content: &gguf_file::Content, file: &mut File, path: &Path) -> Result<()> {
    let len = file
        .seek(SeekFrom::End(0))
        .map_err(|e| Error::io(path, e))?;
    for (name, info) in &content.tensor_infos {
        let elems = info.shape.elem_count();
        let bytes = elems / info.ggml_dtype.block_size() * info.ggml_dtype.type_size();
        let end = content.tensor_data_offset + info.offset + bytes as u64;
        if end > len {
            return Err(Error::invalid_file(
                path,
                format!("truncated GGUF: tensor `{name}` ends at byte {end}, the file has {len}"),
            ));
        }
    }
    Ok(())
}

#[derive(serde::Deserialize, Default)]
struct TokenizerConfig {
    chat_template: Option<serde_json::Value>,
    bos_token: Option<serde_json::Value>,
    eos_token: Option<serde_json::Value>,
}

/// `"<s>"` or `{"content": "<s>", ...}`.
fn token_string(v: &Option<serde_json::Value>) -> Option<String> {
    match v.as_ref()? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

/// `chat_template` is a string, or a list of `{name, template}` (the "default" one is used).
fn chat_template_string(v: &Option<serde_json::Value>) -> Option<String> {
    match v.as_ref()? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Array(items) => items
            .iter()
            .find(|i| i.get("name").and_then(|n| n.as_str()) == Some("default"))
            .or(items.first())
            .and_then(|i| i.get("template")?.as_str().map(str::to_string)),
        _ => None,
    }
}

/// Loads a Hugging Face model directory (config.json, safetensors, tokenizer files).
pub fn load_hf_dir(dir: &Path, base_dtype: BaseDType, device: &Device) -> Result<BaseModel> {
    let config = ModelConfig::from_hf_file(&dir.join("config.json"))?;
    let files = safetensors_files(dir)?;
    // SAFETY: the files are mapped read-only; peft-wit never writes into a base model directory.
    let tensors = unsafe { MmapedSafetensors::multi(&files) }
        .map_err(|e| Error::invalid_file(dir, format!("unreadable safetensors: {e}")))?;
    let names = tensors.tensors().into_iter().map(|(n, _)| n).collect();
    let tokenizer_path = dir.join("tokenizer.json");
    let tokenizer = if tokenizer_path.exists() {
        Some(
            tokenizers::Tokenizer::from_file(&tokenizer_path)
                .map_err(|e| Error::Tokenizer(format!("{}: {e}", tokenizer_path.display())))?,
        )
    } else {
        None
    };
    let tc_path = dir.join("tokenizer_config.json");
    let tc: TokenizerConfig = if tc_path.exists() {
        crate::fsutil::read_json(&tc_path)?
    } else {
        TokenizerConfig::default()
    };
    let source = TensorSource::Safetensors {
        tensors,
        names,
        dir: dir.to_path_buf(),
    };
    let decoder = build_decoder(&source, config, base_dtype, device)?;
    Ok(BaseModel {
        decoder,
        tokenizer,
        chat_template: chat_template_string(&tc.chat_template),
        bos_token: token_string(&tc.bos_token),
        eos_token: token_string(&tc.eos_token),
        name: hub_name_of(dir).unwrap_or_else(|| dir.display().to_string()),
        fingerprint: fingerprint_files(&files)?,
        location: ModelLocation::HfDir(dir.to_path_buf()),
        base_dtype,
    })
}

/// `model.safetensors`, or the shards listed in `model.safetensors.index.json`.
fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join("model.safetensors");
    if single.exists() {
        return Ok(vec![single]);
    }
    let index = dir.join("model.safetensors.index.json");
    if !index.exists() {
        return Err(Error::invalid_file(
            dir,
            "no model.safetensors or model.safetensors.index.json",
        ));
    }
    #[derive(serde::Deserialize)]
    struct Index {
        weight_map: std::collections::BTreeMap<String, String>,
    }
    let idx: Index = crate::fsutil::read_json(&index)?;
    let mut files: Vec<PathBuf> = idx.weight_map.values().map(|f| dir.join(f)).collect();
    files.sort();
    files.dedup();
    for f in &files {
        if !f.exists() {
            return Err(Error::invalid_file(
                f,
                "shard listed in the index is missing",
            ));
        }
    }
    Ok(files)
}

/// A Hub snapshot dir `.../models--owner--name/snapshots/<rev>` is named `owner/name`.
fn hub_name_of(dir: &Path) -> Option<String> {
    let repo = dir.parent()?.parent()?.file_name()?.to_str()?;
    let rest = repo.strip_prefix("models--")?;
    Some(rest.replacen("--", "/", 1))
}

fn file_stem(path: &Path) -> String {
    path.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string())
}

/// sha256 over each file's size and its first and last MiB: cheap on multi-GB files, and
/// different for any two checkpoints in practice.
pub fn fingerprint_files(files: &[PathBuf]) -> Result<String> {
    const CHUNK: u64 = 1 << 20;
    let mut hasher = Sha256::new();
    for path in files {
        let mut file = File::open(path).map_err(|e| Error::io(path, e))?;
        let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
        hasher.update(len.to_le_bytes());
        let mut buf = vec![0u8; CHUNK.min(len) as usize];
        file.read_exact(&mut buf).map_err(|e| Error::io(path, e))?;
        hasher.update(&buf);
        if len > CHUNK {
            let start = len.saturating_sub(CHUNK).max(CHUNK);
            file.seek(SeekFrom::Start(start))
                .map_err(|e| Error::io(path, e))?;
            let mut tail = Vec::new();
            file.read_to_end(&mut tail)
                .map_err(|e| Error::io(path, e))?;
            hasher.update(&tail);
        }
    }
    Ok(hex::encode(&hasher.finalize()[..16]))
}

/// The base's configuration alone, without reading any weights (for exports that need only
/// shapes and head counts).
pub fn read_model_config(location: &ModelLocation) -> Result<ModelConfig> {
    match location {
        ModelLocation::HfDir(dir) => ModelConfig::from_hf_file(&dir.join("config.json")),
        ModelLocation::Gguf(path) => {
            let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
            let content = candle_core::quantized::gguf_file::Content::read(&mut file)
                .map_err(|e| Error::invalid_file(path, format!("not a readable GGUF file: {e}")))?;
            ModelConfig::from_gguf(&content).map_err(|e| match e {
                Error::UnsupportedArchitecture(_) => e,
                other => Error::invalid_file(path, other.to_string()),
            })
        }
    }
}
