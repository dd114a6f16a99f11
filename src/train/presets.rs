//! Ready-made training settings: the three loss settings `peft-wit quickstart` compares on the
//! built-in tasks, its short-run configuration, and the held-out scores of the untouched base
//! that its table starts with.

use super::config::{LossPreset, TrainConfig};
use super::prepare::PreparedData;
use crate::data::LossWeights;
use crate::device::DeviceSpec;
use crate::model::{BaseDType, BaseModel};
use crate::Result;

/// One loss setting: the adapter it trains and its prompt/response weights (λp, λr).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LossSetting {
    /// Registry name of the adapter.
    pub name: &'static str,
    pub preset: LossPreset,
    pub prompt_weight: f32,
    pub response_weight: f32,
}

impl LossSetting {
    /// `cfg` with this setting's loss, weights and adapter name.
    pub fn apply(&self, cfg: &TrainConfig) -> TrainConfig {
        TrainConfig {
            loss: self.preset,
            prompt_weight: self.prompt_weight,
            response_weight: self.response_weight,
            name: Some(self.name.to_string()),
            ..cfg.clone()
        }
    }
}

/// The quickstart's settings: the standard response-only loss, instruction modelling (prompt
/// and response weighted alike) and a weighted instruction-tuning loss between them.
pub const QUICKSTART_SETTINGS: [LossSetting; 3] = [
    LossSetting {
        name: "qs-standard",
        preset: LossPreset::Standard,
        prompt_weight: 0.0,
        response_weight: 1.0,
    },
    LossSetting {
        name: "qs-im",
        preset: LossPreset::Im,
        prompt_weight: 1.0,
        response_weight: 1.0,
    },
    LossSetting {
        name: "qs-wit-p0.2-r0.8",
        preset: LossPreset::Wit,
        prompt_weight: 0.2,
        response_weight: 0.8,
    },
];

/// What the quickstart varies; everything else is [`TrainConfig::default`].
#[derive(Debug, Clone, Copy)]
pub struct QuickstartOptions {
    pub base_dtype: BaseDType,
    pub device: DeviceSpec,
    /// Built-in examples to generate (10% are held out).
    pub examples: usize,
    /// Optimizer steps per setting.
    pub steps: usize,
    /// Held-out examples answered by greedy generation for exact match.
    pub generate: usize,
}

/// The quickstart's short runs on the built-in tasks: a fixed number of steps, a high learning
/// rate, no dropout, and no evaluations or checkpoints along the way. Combine with a
/// [`LossSetting`].
pub fn quickstart_config(opts: &QuickstartOptions) -> TrainConfig {
    TrainConfig {
        base_dtype: opts.base_dtype,
        device: opts.device,
        builtin_examples: opts.examples,
        max_steps: Some(opts.steps),
        batch_size: 4,
        lr: 1e-3,
        warmup_steps: Some(2),
        eval_every: 0,
        checkpoint_every: 0,
        eval_generate: opts.generate,
        lora_dropout: 0.0,
        ..TrainConfig::default()
    }
}

/// Held-out scores of a model, as the trainer reports them for its adapters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HeldOutScores {
    /// Response-token loss under the standard weights (None without held-out tokens).
    pub response_loss: Option<f64>,
    /// Greedy exact match on the first `generate` held-out examples (None when none).
    pub exact_match: Option<f64>,
}

/// The untouched base on the held-out part of `data`, under `cfg`'s normalization and batch
/// size: the reference row for the adapters trained on it.
pub fn base_scores(
    base: &BaseModel,
    data: &PreparedData,
    cfg: &TrainConfig,
    generate: usize,
) -> Result<HeldOutScores> {
    let weights = LossWeights::new(0.0, 1.0);
    let losses = crate::eval::evaluate_losses(
        base,
        None,
        &data.eval,
        &weights,
        cfg.normalization,
        cfg.batch_size,
    )?;
    let generation =
        crate::eval::generation_scores(base, None, &data.template, &data.eval_examples, generate)?;
    Ok(HeldOutScores {
        response_loss: losses.map(|m| m.response_loss),
        exact_match: generation.get("exact_match").copied(),
    })
}
