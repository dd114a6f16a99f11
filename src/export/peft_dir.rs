//! A clean PEFT directory for sharing: only adapter_config.json, adapter_model.safetensors and a
//! short model card (peft-wit's sidecar, checkpoints and logs stay behind).

use std::path::Path;

use candle_core::Device;

use super::{load_adapter, publish, remove_any, staging_path};
use crate::lora::peft::{read_peft_config, save_peft};
use crate::model::config::ModelConfig;
use crate::registry::AdapterMeta;
use crate::{Error, Result};

/// Re-writes the adapter in `adapter_dir` as a fresh PEFT directory at `out`.
pub fn export_peft_dir(
    adapter_dir: &Path,
    model: &ModelConfig,
    out: &Path,
    force: bool,
) -> Result<()> {
    let adapter = load_adapter(adapter_dir, model, &Device::Cpu)?;
    let meta = if adapter_dir.join(crate::registry::SIDECAR_FILE).is_file() {
        Some(AdapterMeta::read(adapter_dir)?)
    } else {
        None
    };
    let original = read_peft_config(adapter_dir)?;
    let base_name = meta
        .as_ref()
        .map(|m| m.base.name.clone())
        .or(original.base_model_name_or_path.clone())
        .unwrap_or_else(|| "unknown".into());
    super::check_target_free(out, force)?;
    let staged = staging_path(out, "tmp");
    remove_any(&staged)?;
    let write = || -> Result<()> {
        save_peft(&adapter, &staged, &base_name)?;
        let card = model_card(&base_name, &adapter.config, meta.as_ref());
        let path = staged.join("README.md");
        std::fs::write(&path, card).map_err(|e| Error::io(&path, e))
    };
    if let Err(e) = write() {
        let _ = remove_any(&staged);
        return Err(e);
    }
    publish(&staged, out, force)
}

/// A Hub-style model card: YAML front matter PEFT and the Hub read, then what the adapter is.
pub fn model_card(
    base: &str,
    lora: &crate::lora::LoraConfig,
    meta: Option<&AdapterMeta>,
) -> String {
    let mut s = format!(
        "---\nbase_model: {base}\nlibrary_name: peft\ntags:\n- lora\n- peft-wit\n---\n\n# LoRA adapter for `{base}`\n\n"
    );
    s.push_str(&format!(
        "- LoRA: r = {}, lora_alpha = {}, rsLoRA = {}, dropout = {}\n",
        lora.r, lora.lora_alpha, lora.use_rslora, lora.lora_dropout
    ));
    match meta {
        Some(m) => {
            s.push_str(&format!(
                "- Loss weights (weighted instruction tuning): prompt = {}, response = {}",
                m.loss.prompt_weight, m.loss.response_weight
            ));
            if let Some(w) = m.loss.system_weight {
                s.push_str(&format!(", system = {w}"));
            }
            if let Some(w) = m.loss.user_weight {
                s.push_str(&format!(", user = {w}"));
            }
            s.push_str(&format!(", normalization = {:?}\n", m.loss.normalization));
            s.push_str(&format!(
                "- Data: {} (template `{}`, {} train / {} eval examples), fingerprint `{}`\n",
                m.data.source,
                m.data.template,
                m.data.train_examples,
                m.data.eval_examples,
                m.data.fingerprint.as_deref().unwrap_or("none")
            ));
            if let Some(fp) = &m.base.fingerprint {
                s.push_str(&format!("- Base fingerprint: `{fp}`\n"));
            }
            if m.steps > 0 {
                s.push_str(&format!(
                    "- Trained for {} steps ({} tokens)\n",
                    m.steps, m.tokens_seen
                ));
            }
        }
        None => s.push_str("- Loss weights and data: not recorded (no peft-wit sidecar)\n"),
    }
    s.push_str(&format!(
        "\nLoad with PEFT: `PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(\"{base}\"), \"<this dir>\")`.\n"
    ));
    s
}
