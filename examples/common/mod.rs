//! Setup shared by the examples (each uses what it needs of it).
#![allow(dead_code)]

use peft_wit::model::{resolve_model, BaseDType, BaseModel};
use peft_wit::train::TrainConfig;

/// Loads the base model in f32 on the CPU. `model` is a GGUF file, a Hugging Face directory or
/// Hub id; `None` is the default model, the one scripts/fetch-model.sh fetches.
pub fn load_base(model: Option<&str>) -> anyhow::Result<BaseModel> {
    Ok(BaseModel::load(
        &resolve_model(model)?,
        BaseDType::F32,
        &candle_core::Device::Cpu,
    )?)
}

/// A short training run on `builtin_examples` examples of the built-in tasks: `max_steps`
/// steps at learning rate 1e-3, LoRA rank `r` with α = 2r; the rest as `TrainConfig::default()`.
pub fn short_run(max_steps: usize, r: usize, builtin_examples: usize) -> TrainConfig {
    TrainConfig {
        max_steps: Some(max_steps),
        r,
        lora_alpha: 2.0 * r as f64,
        lr: 1e-3,
        builtin_examples,
        ..TrainConfig::default()
    }
}
