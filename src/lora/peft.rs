//! Reading and writing adapters in PEFT's own on-disk format: `adapter_config.json` plus
//! `adapter_model.safetensors` with keys `base_model.model.<module>.lora_{A,B}.weight`.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use serde::{Deserialize, Serialize};

use super::adapter::{peft_key, LoraAdapter};
use super::config::{LoraConfig, LoraInit, TargetModules};
use crate::fsutil::{atomic_write, atomic_write_json, read_json};
use crate::model::config::{module_path, ModelConfig, PROJECTIONS};
use crate::model::linear::LoraPair;
use crate::{Error, Result};

pub const CONFIG_FILE: &str = "adapter_config.json";
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";

/// `adapter_config.json`, with the fields peft-wit reads or must refuse. Unknown fields are kept
/// in `extra` and ignored.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PeftAdapterConfig {
    pub peft_type: String,
    #[serde(default)]
    pub task_type: Option<String>,
    pub r: usize,
    pub lora_alpha: f64,
    #[serde(default)]
    pub lora_dropout: f32,
    pub target_modules: TargetModules,
    #[serde(default)]
    pub use_rslora: bool,
    #[serde(default = "default_bias")]
    pub bias: String,
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    #[serde(default)]
    pub use_dora: Option<bool>,
    #[serde(default)]
    pub fan_in_fan_out: Option<bool>,
    #[serde(default)]
    pub layers_to_transform: Option<serde_json::Value>,
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    #[serde(default)]
    pub init_lora_weights: Option<serde_json::Value>,
    #[serde(default)]
    pub rank_pattern: Option<serde_json::Map<String, serde_json::Value>>,
    #[serde(default)]
    pub alpha_pattern: Option<serde_json::Map<String, serde_json::Value>>,
    #[serde(default)]
    pub inference_mode: Option<bool>,
}

fn default_bias() -> String {
    "none".into()
}

impl PeftAdapterConfig {
    /// The config peft-wit writes: every field a PEFT reader needs, nothing of ours.
    pub fn from_lora(config: &LoraConfig, targets: Vec<String>, base_model: &str) -> Self {
        Self {
            peft_type: "LORA".into(),
            task_type: Some("CAUSAL_LM".into()),
            r: config.r,
            lora_alpha: config.lora_alpha,
            lora_dropout: config.lora_dropout,
            target_modules: TargetModules::Names(targets),
            use_rslora: config.use_rslora,
            bias: "none".into(),
            base_model_name_or_path: Some(base_model.to_string()),
            use_dora: Some(false),
            fan_in_fan_out: Some(false),
            layers_to_transform: config
                .layers_to_transform
                .as_ref()
                .map(|l| serde_json::json!(l)),
            modules_to_save: None,
            init_lora_weights: Some(serde_json::Value::Bool(true)),
            rank_pattern: Some(Default::default()),
            alpha_pattern: Some(Default::default()),
            inference_mode: Some(true),
        }
    }

    /// Refuses PEFT variants whose weights mean something other than plain `W + s·B·A`.
    fn check_supported(&self, dir: &Path) -> Result<()> {
        let refuse = |message: String| {
            Err(Error::UnsupportedAdapter {
                path: dir.to_path_buf(),
                message,
            })
        };
        if self.peft_type != "LORA" {
            return refuse(format!("peft_type `{}` (only LORA)", self.peft_type));
        }
        if self.use_dora == Some(true) {
            return refuse("DoRA adapters (use_dora: true) are not supported".into());
        }
        if let Some(serde_json::Value::String(init)) = &self.init_lora_weights {
            let lower = init.to_ascii_lowercase();
            if ["pissa", "olora", "corda", "eva", "loftq"]
                .iter()
                .any(|m| lower.starts_with(m))
            {
                return refuse(format!(
                    "init_lora_weights `{init}` modifies the base weights; such adapters only work with their own modified base"
                ));
            }
        }
        if self.fan_in_fan_out == Some(true) {
            return refuse("fan_in_fan_out: true (Conv1D bases) is not supported".into());
        }
        if self.bias != "none" {
            return refuse(format!("bias `{}` (only \"none\")", self.bias));
        }
        if self.modules_to_save.as_ref().is_some_and(|m| !m.is_empty()) {
            return refuse("modules_to_save (fully trained extra modules) is not supported".into());
        }
        let non_empty = |m: &Option<serde_json::Map<String, serde_json::Value>>| {
            m.as_ref().is_some_and(|m| !m.is_empty())
        };
        if non_empty(&self.rank_pattern) || non_empty(&self.alpha_pattern) {
            return refuse("per-module rank_pattern / alpha_pattern is not supported".into());
        }
        if self.r == 0 || !self.lora_alpha.is_finite() {
            return refuse(format!(
                "invalid r = {} / lora_alpha = {}",
                self.r, self.lora_alpha
            ));
        }
        Ok(())
    }

    /// The LoRA settings this config describes (`dir` names the adapter in errors).
    pub(crate) fn lora_config(&self, dir: &Path) -> Result<LoraConfig> {
        Ok(LoraConfig {
            r: self.r,
            lora_alpha: self.lora_alpha,
            lora_dropout: self.lora_dropout,
            target_modules: self.target_modules.clone(),
            use_rslora: self.use_rslora,
            layers_to_transform: self.layers_to_transform(dir)?,
            init: LoraInit::Kaiming,
        })
    }

    pub(crate) fn layers_to_transform(&self, dir: &Path) -> Result<Option<Vec<usize>>> {
        let bad = || Error::AdapterMismatch {
            path: dir.to_path_buf(),
            message: "layers_to_transform must be an integer or a list of integers".into(),
        };
        match &self.layers_to_transform {
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(serde_json::Value::Number(n)) => {
                Ok(Some(vec![n.as_u64().ok_or_else(bad)? as usize]))
            }
            Some(serde_json::Value::Array(items)) => items
                .iter()
                .map(|v| v.as_u64().map(|n| n as usize).ok_or_else(bad))
                .collect::<Result<Vec<_>>>()
                .map(Some),
            Some(_) => Err(bad()),
        }
    }
}

/// Writes `adapter` as a PEFT directory (each file atomically).
pub fn save_peft(adapter: &LoraAdapter, dir: &Path, base_model: &str) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let config = PeftAdapterConfig::from_lora(&adapter.config, adapter.target_names(), base_model);
    let tensors: Vec<(String, Tensor)> = adapter
        .named_vars()
        .into_iter()
        .map(|(k, v)| (k, v.as_tensor().clone()))
        .collect();
    let weights = dir.join(WEIGHTS_FILE);
    let bytes = serialize_safetensors(&tensors, &weights)?;
    atomic_write(&weights, &bytes)?;
    atomic_write_json(&dir.join(CONFIG_FILE), &config)
}

/// Serialises tensors (made contiguous, on CPU) to safetensors bytes with PEFT's metadata.
pub(crate) fn serialize_safetensors(tensors: &[(String, Tensor)], path: &Path) -> Result<Vec<u8>> {
    let cpu: Vec<(String, Tensor)> = tensors
        .iter()
        .map(|(k, t)| Ok((k.clone(), t.to_device(&Device::Cpu)?.contiguous()?)))
        .collect::<Result<_>>()?;
    let metadata = Some(HashMap::from([("format".to_string(), "pt".to_string())]));
    safetensors::serialize(cpu.iter().map(|(k, t)| (k.as_str(), t)), metadata)
        .map_err(|e| Error::invalid_file(path, format!("cannot serialise safetensors: {e}")))
}

/// Newer PEFT fields that change what the weights mean; any non-empty value is refused.
const UNSUPPORTED_FIELDS: [(&str, &str); 6] = [
    ("lora_bias", "a trained bias on lora_B"),
    ("use_qalora", "QA-LoRA"),
    ("target_parameters", "LoRA on raw parameters"),
    ("trainable_token_indices", "trainable token embeddings"),
    ("layer_replication", "replicated layers"),
    ("alora_invocation_tokens", "activated LoRA (aLoRA)"),
];

/// A PEFT adapter directory as read from disk: its config and its pairs (f32, on the CPU).
#[derive(Debug, Clone)]
pub struct PeftAdapter {
    pub config: PeftAdapterConfig,
    pub adapter: LoraAdapter,
}

/// Reads and checks `adapter_config.json` alone: every PEFT variant whose weights mean something
/// other than plain `W + s·B·A` is refused here, so no command can compute something else.
pub fn read_peft_config(dir: &Path) -> Result<PeftAdapterConfig> {
    let config_path = dir.join(CONFIG_FILE);
    if !config_path.is_file() {
        return Err(Error::invalid_file(
            &config_path,
            "not found: not a PEFT adapter directory",
        ));
    }
    let raw: serde_json::Value = read_json(&config_path)?;
    let peft: PeftAdapterConfig =
        serde_json::from_value(raw.clone()).map_err(|error| Error::Json {
            path: config_path.clone(),
            error,
        })?;
    peft.check_supported(dir)?;
    for (field, what) in UNSUPPORTED_FIELDS {
        if raw.get(field).is_some_and(is_set) {
            return Err(Error::UnsupportedAdapter {
                path: dir.to_path_buf(),
                message: format!("`{field}` ({what}) is not supported"),
            });
        }
    }
    Ok(peft)
}

fn is_set(v: &serde_json::Value) -> bool {
    match v {
        serde_json::Value::Null | serde_json::Value::Bool(false) => false,
        serde_json::Value::Array(a) => !a.is_empty(),
        serde_json::Value::Object(o) => !o.is_empty(),
        _ => true,
    }
}

/// The one reader of PEFT adapter directories, without a base model. Every command reads
/// adapters through here (or through [`load_peft`], which adds the base's checks), so every
/// refusal applies everywhere.
///
/// Without a base the checks are internal: keys name known projections and appear once, every
/// pair is covered by the config's `target_modules` / `layers_to_transform`, every A is
/// `[r, in]` and every B `[out, r]` with the config's r, a projection has one shape in every
/// layer, and the hidden size agrees across projections.
pub fn read_peft(dir: &Path) -> Result<PeftAdapter> {
    let config = read_peft_config(dir)?;
    let lora = config.lora_config(dir)?;
    let weights_path = dir.join(WEIGHTS_FILE);
    if !weights_path.is_file() {
        let why = if dir.join("adapter_model.bin").is_file() {
            "not found (only adapter_model.bin, a pickle, which peft-wit does not read: convert it to safetensors)"
        } else {
            "not found"
        };
        return Err(Error::invalid_file(&weights_path, why));
    }
    let tensors = candle_core::safetensors::load(&weights_path, &Device::Cpu)
        .map_err(|e| Error::invalid_file(&weights_path, format!("unreadable safetensors: {e}")))?;
    let mismatch = |message: String| Error::AdapterMismatch {
        path: dir.to_path_buf(),
        message,
    };

    // (layer, projection) -> [A, B]
    let mut slots: BTreeMap<(usize, usize), [Option<Tensor>; 2]> = BTreeMap::new();
    for (key, tensor) in tensors {
        let (layer, proj, factor) = parse_peft_key(&key).ok_or_else(|| {
            mismatch(format!(
                "tensor `{key}` is not a LoRA factor of a known projection ({})",
                PROJECTIONS.join(", ")
            ))
        })?;
        let slot = slots.entry((layer, proj)).or_default();
        if slot[factor].is_some() {
            return Err(mismatch(format!("tensor `{key}` appears twice")));
        }
        slot[factor] = Some(tensor);
    }
    if slots.is_empty() {
        return Err(mismatch("no LoRA tensors found".into()));
    }

    let num_layers = slots.keys().map(|(l, _)| l + 1).max().unwrap_or(0);
    let mut layers: Vec<Vec<Option<LoraPair>>> = (0..num_layers)
        .map(|_| (0..PROJECTIONS.len()).map(|_| None).collect())
        .collect();
    // One (in, out) per projection, and one hidden size for the model.
    let mut shapes: [Option<(usize, usize)>; 7] = [None; 7];
    let mut hidden: Option<(usize, String)> = None;
    let scale = lora.scale();
    for ((layer, p), [a, b]) in slots {
        let name = PROJECTIONS[p];
        let key_a = peft_key(layer, name, 'A');
        let key_b = peft_key(layer, name, 'B');
        let (a, b) = match (a, b) {
            (Some(a), Some(b)) => (a, b),
            (Some(_), None) => return Err(mismatch(format!("`{key_a}` has no lora_B"))),
            (None, Some(_)) => return Err(mismatch(format!("`{key_b}` has no lora_A"))),
            (None, None) => continue,
        };
        let selected =
            lora.includes_layer(layer) && lora.target_modules.select(layer)?.contains(&name);
        if !selected {
            return Err(mismatch(format!(
                "`{key_a}` is not covered by the config's target_modules / layers_to_transform"
            )));
        }
        let (a_dims, b_dims) = (a.dims().to_vec(), b.dims().to_vec());
        if a_dims.len() != 2 || a_dims[0] != lora.r {
            return Err(mismatch(format!(
                "`{key_a}` has shape {a_dims:?}, expected [r = {}, in]",
                lora.r
            )));
        }
        if b_dims.len() != 2 || b_dims[1] != lora.r {
            return Err(mismatch(format!(
                "`{key_b}` has shape {b_dims:?}, expected [out, r = {}]",
                lora.r
            )));
        }
        let io = (a_dims[1], b_dims[0]);
        match shapes[p] {
            Some(prev) if prev != io => {
                return Err(mismatch(format!(
                    "{name} maps {} -> {} in layer {layer} but {} -> {} elsewhere",
                    io.0, io.1, prev.0, prev.1
                )))
            }
            _ => shapes[p] = Some(io),
        }
        let h = hidden_side(p, io);
        match &hidden {
            Some((prev, from)) if *prev != h => {
                return Err(mismatch(format!(
                    "{name} implies hidden size {h}, {from} implies {prev}"
                )))
            }
            Some(_) => {}
            None => hidden = Some((h, name.to_string())),
        }
        layers[layer][p] = Some(LoraPair {
            a: Var::from_tensor(&a.to_dtype(DType::F32)?)?,
            b: Var::from_tensor(&b.to_dtype(DType::F32)?)?,
            scale,
        });
    }
    Ok(PeftAdapter {
        config,
        adapter: LoraAdapter::from_layers(lora, layers),
    })
}

/// The hidden-size side of a projection: the input of q/k/v/gate/up, the output of o/down.
fn hidden_side(projection: usize, (inp, out): (usize, usize)) -> usize {
    match PROJECTIONS[projection] {
        "o_proj" | "down_proj" => out,
        _ => inp,
    }
}

/// The hidden size an adapter implies (from any adapted projection).
pub fn hidden_size(adapter: &LoraAdapter) -> Option<usize> {
    (0..adapter.num_layers()).find_map(|l| {
        (0..PROJECTIONS.len()).find_map(|p| {
            let pair = adapter.pair(l, p)?;
            let io = (pair.a.dim(1).ok()?, pair.b.dim(0).ok()?);
            Some(hidden_side(p, io))
        })
    })
}

/// Reads a PEFT adapter directory ([`read_peft`]) and checks it against `model`: every
/// `target_modules` name selects a projection peft-wit applies (PEFT itself would adapt any other
/// module, so dropping it silently would change the model), layer indices exist, and shapes are
/// the base's. Tensors are converted to `dtype` on `device`.
pub fn load_peft(
    dir: &Path,
    model: &ModelConfig,
    dtype: DType,
    device: &Device,
) -> Result<LoraAdapter> {
    let PeftAdapter { config, adapter } = read_peft(dir)?;
    check_target_modules(dir, &config, model)?;
    let mismatch = |message: String| Error::AdapterMismatch {
        path: dir.to_path_buf(),
        message,
    };
    if adapter.num_layers() > model.num_hidden_layers {
        let layer = adapter.num_layers() - 1;
        return Err(mismatch(format!(
            "the adapter has tensors for layer {layer}, the base model has {} layers",
            model.num_hidden_layers
        )));
    }
    let mut layers = Vec::with_capacity(model.num_hidden_layers);
    for layer in 0..model.num_hidden_layers {
        let mut row = Vec::with_capacity(PROJECTIONS.len());
        for (p, name) in PROJECTIONS.iter().enumerate() {
            let Some(pair) = adapter.pair(layer, p) else {
                row.push(None);
                continue;
            };
            let (inp, out) = model.projection_shape(name).unwrap_or((0, 0));
            let r = adapter.config.r;
            check_shape(
                &peft_key(layer, name, 'A'),
                pair.a.as_tensor(),
                &[r, inp],
                &mismatch,
            )?;
            check_shape(
                &peft_key(layer, name, 'B'),
                pair.b.as_tensor(),
                &[out, r],
                &mismatch,
            )?;
            row.push(Some(LoraPair {
                a: Var::from_tensor(&pair.a.as_tensor().to_device(device)?.to_dtype(dtype)?)?,
                b: Var::from_tensor(&pair.b.as_tensor().to_device(device)?.to_dtype(dtype)?)?,
                scale: pair.scale,
            }));
        }
        layers.push(row);
    }
    Ok(LoraAdapter::from_layers(adapter.config, layers))
}

/// Every name in `target_modules` must select one of the seven projections of `model`.
fn check_target_modules(dir: &Path, config: &PeftAdapterConfig, model: &ModelConfig) -> Result<()> {
    if let TargetModules::Names(names) = &config.target_modules {
        for name in names {
            let known = (0..model.num_hidden_layers).any(|layer| {
                PROJECTIONS.iter().any(|p| {
                    let full = module_path(layer, p);
                    name == p || *name == full || full.ends_with(&format!(".{name}"))
                })
            });
            if !known {
                return Err(Error::UnsupportedAdapter {
                    path: dir.to_path_buf(),
                    message: format!(
                        "target module `{name}` is not a projection peft-wit can apply ({})",
                        PROJECTIONS.join(", ")
                    ),
                });
            }
        }
    }
    Ok(())
}

fn check_shape(
    key: &str,
    tensor: &Tensor,
    expected: &[usize],
    mismatch: &impl Fn(String) -> Error,
) -> Result<()> {
    if tensor.dims() != expected {
        return Err(mismatch(format!(
            "`{key}` has shape {:?}, the base model needs {:?} (adapter made for another base model?)",
            tensor.dims(),
            expected
        )));
    }
    Ok(())
}

/// `base_model.model.model.layers.{i}.{self_attn|mlp}.{proj}.lora_{A|B}[.default].weight`
/// → (layer, projection index, 0 for A / 1 for B).
pub(crate) fn parse_peft_key(key: &str) -> Option<(usize, usize, usize)> {
    let rest = key.strip_prefix("base_model.model.model.layers.")?;
    let rest = rest.strip_suffix(".weight")?;
    let rest = rest.strip_suffix(".default").unwrap_or(rest);
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, factor) = rest.rsplit_once('.')?;
    let factor = match factor {
        "lora_A" => 0,
        "lora_B" => 1,
        _ => return None,
    };
    let (block, proj) = module.split_once('.')?;
    let p = PROJECTIONS.iter().position(|&n| n == proj)?;
    let expected_block = if p >= 4 { "mlp" } else { "self_attn" };
    (block == expected_block).then_some((layer, p, factor))
}
