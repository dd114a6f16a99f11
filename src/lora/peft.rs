//! Reading and writing adapters in PEFT's own on-disk format: `adapter_config.json` plus
//! `adapter_model.safetensors` with keys `base_model.model.<module>.lora_{A,B}.weight`.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use serde::{Deserialize, Serialize};

use super::adapter::{peft_key, LoraAdapter, LoraPair};
use super::config::{LoraConfig, LoraInit, TargetModules};
use crate::fsutil::{atomic_write, atomic_write_json, read_json};
use crate::model::config::{ModelConfig, PROJECTIONS};
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
    pub(crate) fn check_supported(&self, dir: &Path) -> Result<()> {
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

/// Reads a PEFT adapter directory and checks it against `model` (module names, layer indices,
/// shapes). Tensors are converted to `dtype` on `device`.
pub fn load_peft(
    dir: &Path,
    model: &ModelConfig,
    dtype: DType,
    device: &Device,
) -> Result<LoraAdapter> {
    let config_path = dir.join(CONFIG_FILE);
    if !config_path.exists() {
        return Err(Error::invalid_file(
            &config_path,
            "not found: not a PEFT adapter directory",
        ));
    }
    let peft: PeftAdapterConfig = read_json(&config_path)?;
    peft.check_supported(dir)?;
    let lora = peft.lora_config(dir)?;
    let weights_path = dir.join(WEIGHTS_FILE);
    if !weights_path.exists() {
        return Err(Error::invalid_file(&weights_path, "not found"));
    }
    let tensors = candle_core::safetensors::load(&weights_path, device)
        .map_err(|e| Error::invalid_file(&weights_path, format!("unreadable safetensors: {e}")))?;
    let mismatch = |message: String| Error::AdapterMismatch {
        path: dir.to_path_buf(),
        message,
    };

    let mut slots: Vec<Vec<[Option<Tensor>; 2]>> = (0..model.num_hidden_layers)
        .map(|_| (0..PROJECTIONS.len()).map(|_| [None, None]).collect())
        .collect();
    for (key, tensor) in tensors {
        let (layer, proj, factor) = parse_peft_key(&key).ok_or_else(|| {
            mismatch(format!(
                "tensor `{key}` is not a LoRA factor of a known projection ({})",
                PROJECTIONS.join(", ")
            ))
        })?;
        if layer >= model.num_hidden_layers {
            return Err(mismatch(format!(
                "tensor `{key}` is for layer {layer}, the base model has {} layers",
                model.num_hidden_layers
            )));
        }
        slots[layer][proj][factor] = Some(tensor);
    }

    let scale = lora.scale();
    let mut layers = Vec::with_capacity(model.num_hidden_layers);
    let mut found = 0usize;
    for (layer, row) in slots.into_iter().enumerate() {
        let mut out_row = Vec::with_capacity(PROJECTIONS.len());
        for (p, [a, b]) in row.into_iter().enumerate() {
            let name = PROJECTIONS[p];
            let pair = match (a, b) {
                (None, None) => None,
                (Some(a), Some(b)) => {
                    let (inp, out) = model.projection_shape(name).unwrap_or((0, 0));
                    check_shape(&peft_key(layer, name, 'A'), &a, &[lora.r, inp], &mismatch)?;
                    check_shape(&peft_key(layer, name, 'B'), &b, &[out, lora.r], &mismatch)?;
                    found += 1;
                    Some(LoraPair {
                        a: Var::from_tensor(&a.to_dtype(dtype)?)?,
                        b: Var::from_tensor(&b.to_dtype(dtype)?)?,
                        scale,
                    })
                }
                (Some(_), None) => {
                    return Err(mismatch(format!(
                        "`{}` has no lora_B",
                        peft_key(layer, name, 'A')
                    )))
                }
                (None, Some(_)) => {
                    return Err(mismatch(format!(
                        "`{}` has no lora_A",
                        peft_key(layer, name, 'B')
                    )))
                }
            };
            out_row.push(pair);
        }
        layers.push(out_row);
    }
    if found == 0 {
        return Err(mismatch("no LoRA tensors found".into()));
    }
    Ok(LoraAdapter::from_layers(lora, layers))
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
