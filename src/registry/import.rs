//! Reading PEFT adapters without their base model, and registering adapters trained elsewhere.
//!
//! Without a base the checks are internal: keys name known projections, every A is `[r, in]` and
//! every B `[out, r]` with the config's r, a projection has one shape in every layer, and the
//! hidden size agrees across projections. Variants whose weights are not plain `W + s·B·A` are
//! refused up front, as `load_peft` does.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var};

use super::{AdapterMeta, BaseInfo, DataInfo, LossInfo, Registry};
use crate::fsutil::read_json;
use crate::lora::adapter::peft_key;
use crate::lora::peft::{parse_peft_key, PeftAdapterConfig, CONFIG_FILE, WEIGHTS_FILE};
use crate::lora::{LoraAdapter, LoraPair};
use crate::model::config::PROJECTIONS;
use crate::{Error, Result};

/// Newer PEFT fields that change what the weights mean; any non-empty value is refused.
const UNSUPPORTED_FIELDS: [(&str, &str); 6] = [
    ("lora_bias", "a trained bias on lora_B"),
    ("use_qalora", "QA-LoRA"),
    ("target_parameters", "LoRA on raw parameters"),
    ("trainable_token_indices", "trainable token embeddings"),
    ("layer_replication", "replicated layers"),
    ("alora_invocation_tokens", "activated LoRA (aLoRA)"),
];

/// Reads a PEFT adapter directory into f32 CPU tensors, checking it for internal consistency only.
pub fn read_adapter(dir: &Path) -> Result<LoraAdapter> {
    let config_path = dir.join(CONFIG_FILE);
    if !config_path.is_file() {
        return Err(Error::invalid_file(
            &config_path,
            "not found: not a PEFT adapter directory",
        ));
    }
    let raw: serde_json::Value = read_json(&config_path)?;
    let peft: PeftAdapterConfig =
        serde_json::from_value(raw.clone()).map_err(|source| Error::Json {
            path: config_path.clone(),
            source,
        })?;
    peft.check_supported(dir)?;
    let unsupported = |message: String| Error::UnsupportedAdapter {
        path: dir.to_path_buf(),
        message,
    };
    for (field, what) in UNSUPPORTED_FIELDS {
        if raw.get(field).is_some_and(is_set) {
            return Err(unsupported(format!("`{field}` ({what}) is not supported")));
        }
    }
    let lora = peft.lora_config(dir)?;

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
    Ok(LoraAdapter::from_layers(lora, layers))
}

/// The hidden-size side of a projection: the input of q/k/v/gate/up, the output of o/down.
fn hidden_side(projection: usize, (inp, out): (usize, usize)) -> usize {
    match PROJECTIONS[projection] {
        "o_proj" | "down_proj" => out,
        _ => inp,
    }
}

/// The hidden size an adapter implies (from any adapted projection).
fn hidden_size(adapter: &LoraAdapter) -> Option<usize> {
    (0..adapter.num_layers()).find_map(|l| {
        (0..PROJECTIONS.len()).find_map(|p| {
            let pair = adapter.pair(l, p)?;
            let io = (pair.a.dim(1).ok()?, pair.b.dim(0).ok()?);
            Some(hidden_side(p, io))
        })
    })
}

fn is_set(v: &serde_json::Value) -> bool {
    match v {
        serde_json::Value::Null | serde_json::Value::Bool(false) => false,
        serde_json::Value::Array(a) => !a.is_empty(),
        serde_json::Value::Object(o) => !o.is_empty(),
        _ => true,
    }
}

/// Registers the PEFT adapter in `dir` as `name` (default: the folder's name). The files are
/// copied into a hidden staging folder and committed under the registry lock, so a failed import
/// leaves nothing behind.
pub fn import(
    registry: &Registry,
    dir: &Path,
    name: Option<&str>,
    force: bool,
) -> Result<(PathBuf, AdapterMeta)> {
    let name = match name {
        Some(n) => n.to_string(),
        None => dir
            .canonicalize()
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "cannot derive a name from {}: use --name",
                    dir.display()
                ))
            })?,
    };
    super::validate_name(&name)?;
    let adapter = read_adapter(dir)?;
    if registry.contains(&name) && !force {
        return Err(Error::InvalidArgument(format!(
            "adapter `{name}` already exists in {} (use --force to overwrite)",
            registry.root().display()
        )));
    }
    let peft: PeftAdapterConfig = read_json(&dir.join(CONFIG_FILE))?;
    let source = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    let meta = AdapterMeta {
        format_version: 1,
        name: name.clone(),
        base: BaseInfo {
            name: peft
                .base_model_name_or_path
                .clone()
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| "unknown".into()),
            fingerprint: None,
            architecture: "unknown".into(),
            base_dtype: "unknown".into(),
            num_layers: adapter.num_layers(),
            hidden_size: hidden_size(&adapter).unwrap_or(0),
        },
        loss: LossInfo::unknown(),
        data: DataInfo {
            fingerprint: None,
            source: format!("imported from {}", source.display()),
            template: "unknown".into(),
            train_examples: 0,
            eval_examples: 0,
        },
        lora: adapter.config.clone(),
        train_config: None,
        seed: None,
        metrics: BTreeMap::new(),
        steps: 0,
        tokens_seen: 0,
        wall_time_s: 0.0,
        created_unix: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
    };

    let staged = registry.trash_path(&format!("import-{name}"));
    let result = (|| {
        std::fs::create_dir_all(&staged).map_err(|e| Error::io(&staged, e))?;
        for file in [CONFIG_FILE, WEIGHTS_FILE] {
            let (from, to) = (dir.join(file), staged.join(file));
            std::fs::copy(&from, &to).map_err(|e| Error::io(&from, e))?;
        }
        meta.write(&staged)?;
        registry.commit(&name, &staged, force)
    })();
    match result {
        Ok(path) => Ok((path, meta)),
        Err(e) => {
            let _ = std::fs::remove_dir_all(&staged);
            Err(e)
        }
    }
}
