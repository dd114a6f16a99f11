//! The training configuration: a serde mirror of `configs/*.toml`, every field overridable from
//! the command line, validated once into a plan.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::optim::Schedule;
use super::weight_schedule::WeightSchedule;
use crate::config_value::with_key_hint;
use crate::data::{DataFormat, OnBadRow, Truncation};
use crate::device::DeviceSpec;
use crate::lora::{LoraConfig, LoraInit, TargetModules};
use crate::loss::Normalization;
use crate::model::BaseDType;
use crate::tracking::ReportTo;
use crate::{Error, Result};

/// Named loss weightings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LossPreset {
    /// Response tokens only (λp = 0, λr = 1).
    Standard,
    /// Instruction Modelling: prompt and response alike (λp = λr = 1).
    Im,
    /// Explicit `prompt_weight` / `response_weight`.
    Wit,
}

impl std::str::FromStr for LossPreset {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "standard" => Ok(Self::Standard),
            "im" => Ok(Self::Im),
            "wit" => Ok(Self::Wit),
            other => Err(Error::InvalidArgument(format!(
                "unknown loss `{other}` (standard, im, wit)"
            ))),
        }
    }
}

/// Everything a training run needs. Defaults suit SmolLM2-135M on a CPU.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    // Model.
    /// GGUF file, HF directory or Hub id; `None` = the default model under `models/`.
    pub model: Option<String>,
    pub base_dtype: BaseDType,
    pub device: DeviceSpec,

    // Data.
    /// Training file; `None` = the built-in generated dataset.
    pub data: Option<PathBuf>,
    pub eval_data: Option<PathBuf>,
    /// Held-out share of `data` when no `eval_data` is given.
    pub eval_fraction: f64,
    /// Examples generated for the built-in dataset.
    pub builtin_examples: usize,
    /// `auto`, `alpaca`, `prompt-response`, `chat`.
    pub format: DataFormat,
    /// `chat` (the model's own), `alpaca`, `raw`, or a path to a Jinja file.
    pub template: String,
    pub prompt_field: Option<String>,
    pub response_field: Option<String>,
    pub max_seq_len: usize,
    /// `error` or `skip`.
    pub on_bad_row: OnBadRow,
    pub last_turn_only: bool,
    /// Cut over-long prompts from the `left` (default) or `right`.
    pub truncate_prompt: Truncation,

    // Loss.
    pub loss: LossPreset,
    pub prompt_weight: f32,
    pub response_weight: f32,
    /// λp over training (`linear:1->0`, ...); `constant` keeps `prompt_weight`. Needs `wit`.
    #[serde(skip_serializing_if = "WeightSchedule::is_constant")]
    pub prompt_weight_schedule: WeightSchedule,
    #[serde(skip_serializing_if = "WeightSchedule::is_constant")]
    pub response_weight_schedule: WeightSchedule,
    pub system_weight: Option<f32>,
    pub user_weight: Option<f32>,
    pub normalization: Normalization,

    // LoRA, with PEFT's field names (the older peft-wit names are accepted as aliases).
    #[serde(alias = "rank")]
    pub r: usize,
    #[serde(alias = "alpha")]
    pub lora_alpha: f64,
    pub lora_dropout: f32,
    /// Comma-separated names, `all-linear`, or `re:<regex>`.
    #[serde(alias = "targets")]
    pub target_modules: String,
    #[serde(alias = "rslora")]
    pub use_rslora: bool,
    pub lora_init: LoraInit,
    pub layers_to_transform: Option<Vec<usize>>,

    // Optimisation.
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub adam_eps: f64,
    pub weight_decay: f64,
    pub schedule: Schedule,
    pub warmup_steps: Option<usize>,
    pub warmup_ratio: f64,
    pub max_grad_norm: Option<f64>,
    pub batch_size: usize,
    pub grad_accum: usize,
    pub epochs: usize,
    pub max_steps: Option<usize>,
    pub seed: u64,

    // Run.
    pub name: Option<String>,
    pub registry: Option<PathBuf>,
    pub eval_every: usize,
    pub checkpoint_every: usize,
    pub log_every: usize,
    /// Examples whose generations are scored (exact match) at the end; 0 disables.
    pub eval_generate: usize,

    // Tracking: where metrics go besides metrics.jsonl (they do not change the adapter).
    /// `tensorboard`, `mlflow`.
    pub report_to: Vec<ReportTo>,
    /// Event files go to `<tensorboard_dir>/<name>/`; default `<registry>/<name>/tb/`.
    pub tensorboard_dir: Option<PathBuf>,
    /// MLflow experiment; default: the sweep's name, or `peft-wit`.
    pub mlflow_experiment: Option<String>,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            model: None,
            base_dtype: BaseDType::F32,
            device: DeviceSpec::Cpu,
            data: None,
            eval_data: None,
            eval_fraction: 0.1,
            builtin_examples: 240,
            format: DataFormat::Auto,
            template: "chat".into(),
            prompt_field: None,
            response_field: None,
            max_seq_len: 512,
            on_bad_row: OnBadRow::Error,
            last_turn_only: false,
            truncate_prompt: Truncation::Left,
            loss: LossPreset::Standard,
            prompt_weight: 0.0,
            response_weight: 1.0,
            prompt_weight_schedule: WeightSchedule::Constant,
            response_weight_schedule: WeightSchedule::Constant,
            system_weight: None,
            user_weight: None,
            normalization: Normalization::TokenCount,
            r: 16,
            lora_alpha: 32.0,
            lora_dropout: 0.05,
            target_modules: "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj".into(),
            use_rslora: false,
            lora_init: LoraInit::Kaiming,
            layers_to_transform: None,
            lr: 2e-4,
            beta1: 0.9,
            beta2: 0.999,
            adam_eps: 1e-8,
            weight_decay: 0.0,
            schedule: Schedule::Linear,
            warmup_steps: None,
            warmup_ratio: 0.03,
            max_grad_norm: Some(1.0),
            batch_size: 4,
            grad_accum: 1,
            epochs: 1,
            max_steps: None,
            seed: 42,
            name: None,
            registry: None,
            eval_every: 50,
            checkpoint_every: 50,
            log_every: 1,
            eval_generate: 0,
            report_to: Vec::new(),
            tensorboard_dir: None,
            mlflow_experiment: None,
        }
    }
}

impl TrainConfig {
    /// Reads a TOML config file; an unknown key is an error naming the file, the key and the
    /// nearest valid one.
    pub fn from_toml_file(path: &std::path::Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_toml_str(&text).map_err(|message| Error::invalid_file(path, message))
    }

    /// Parses TOML text; the error message names an unknown key's nearest valid one.
    pub fn from_toml_str(text: &str) -> std::result::Result<Self, String> {
        toml::from_str(text).map_err(|e| with_key_hint(&e.to_string(), &Self::KEYS))
    }

    /// Every key a TOML config may hold (with the older aliases), for "did you mean".
    pub const KEYS: [&'static str; 57] = [
        "model",
        "base_dtype",
        "device",
        "data",
        "eval_data",
        "eval_fraction",
        "builtin_examples",
        "format",
        "template",
        "prompt_field",
        "response_field",
        "max_seq_len",
        "on_bad_row",
        "last_turn_only",
        "truncate_prompt",
        "loss",
        "prompt_weight",
        "response_weight",
        "prompt_weight_schedule",
        "response_weight_schedule",
        "system_weight",
        "user_weight",
        "normalization",
        "r",
        "lora_alpha",
        "lora_dropout",
        "target_modules",
        "use_rslora",
        "lora_init",
        "layers_to_transform",
        "lr",
        "beta1",
        "beta2",
        "adam_eps",
        "weight_decay",
        "schedule",
        "warmup_steps",
        "warmup_ratio",
        "max_grad_norm",
        "batch_size",
        "grad_accum",
        "epochs",
        "max_steps",
        "seed",
        "name",
        "registry",
        "eval_every",
        "checkpoint_every",
        "log_every",
        "eval_generate",
        "report_to",
        "tensorboard_dir",
        "mlflow_experiment",
        "rank",
        "alpha",
        "targets",
        "rslora",
    ];

    /// `(λp, λr)` after applying the preset.
    pub fn loss_weights(&self) -> (f32, f32) {
        match self.loss {
            LossPreset::Standard => (0.0, 1.0),
            LossPreset::Im => (1.0, 1.0),
            LossPreset::Wit => (self.prompt_weight, self.response_weight),
        }
    }

    /// `(λp, λr)` at optimizer step `step` (0-based) of `total`, schedules applied.
    pub fn loss_weights_at(&self, step: usize, total: usize) -> (f32, f32) {
        let (p, r) = self.loss_weights();
        (
            self.prompt_weight_schedule.weight(p, step, total),
            self.response_weight_schedule.weight(r, step, total),
        )
    }

    /// Whether a weight changes during training.
    pub fn has_weight_schedule(&self) -> bool {
        !self.prompt_weight_schedule.is_constant() || !self.response_weight_schedule.is_constant()
    }

    /// The registry name derived from the weights, e.g. `wit-p0.2-r0.8` (`wit-plin1to0-r1`
    /// with a schedule).
    pub fn default_name(&self) -> String {
        let (p, r) = self.loss_weights();
        match self.loss {
            LossPreset::Standard => "standard".into(),
            LossPreset::Im => "im".into(),
            LossPreset::Wit => format!(
                "wit-p{}-r{}",
                self.prompt_weight_schedule.name_part(p),
                self.response_weight_schedule.name_part(r)
            ),
        }
    }

    pub fn lora_config(&self) -> Result<LoraConfig> {
        let config = LoraConfig {
            r: self.r,
            lora_alpha: self.lora_alpha,
            lora_dropout: self.lora_dropout,
            target_modules: TargetModules::parse(&self.target_modules)?,
            use_rslora: self.use_rslora,
            layers_to_transform: self.layers_to_transform.clone(),
            init: self.lora_init,
        };
        config.validate()?;
        Ok(config)
    }

    /// Checks values that would otherwise fail deep inside a run.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::InvalidArgument(m));
        let (p, r) = self.loss_weights();
        for (name, w) in [("prompt_weight", p), ("response_weight", r)] {
            if !w.is_finite() || w < 0.0 {
                return bad(format!(
                    "{name} must be a finite non-negative number, got {w}"
                ));
            }
        }
        if p == 0.0 && r == 0.0 && !self.has_weight_schedule() {
            return bad("prompt_weight and response_weight are both 0: nothing to learn".into());
        }
        if self.has_weight_schedule() {
            if self.loss != LossPreset::Wit {
                return bad(
                    "prompt_weight_schedule / response_weight_schedule need loss = \"wit\"".into(),
                );
            }
            let (p0, p1) = self.prompt_weight_schedule.ends(p);
            let (r0, r1) = self.response_weight_schedule.ends(r);
            if (p0 == 0.0 && r0 == 0.0) || (p1 == 0.0 && r1 == 0.0) {
                return bad(format!(
                    "the weight schedules ({} for the prompt, {} for the response) leave no token with a non-zero weight at the {} of training",
                    self.prompt_weight_schedule,
                    self.response_weight_schedule,
                    if p0 == 0.0 && r0 == 0.0 { "start" } else { "end" }
                ));
            }
        }
        if self.batch_size == 0 || self.grad_accum == 0 {
            return bad("batch_size and grad_accum must be positive".into());
        }
        if self.max_seq_len < 8 {
            return bad(format!("max_seq_len {} is too small", self.max_seq_len));
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            return bad(format!("lr must be positive, got {}", self.lr));
        }
        if !(0.0..1.0).contains(&self.eval_fraction) {
            return bad(format!(
                "eval_fraction {} must be in [0, 1)",
                self.eval_fraction
            ));
        }
        if self.max_steps == Some(0) || (self.max_steps.is_none() && self.epochs == 0) {
            return bad("need max_steps > 0 or epochs > 0".into());
        }
        self.lora_config()?;
        Ok(())
    }
}

/// `0.2` → `0.2`, `1.0` → `1`: short, stable names.
pub fn fmt_weight(w: f32) -> String {
    let s = format!("{:.3}", w);
    let s = s.trim_end_matches('0').trim_end_matches('.');
    if s.is_empty() {
        "0".into()
    } else {
        s.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_and_names() {
        let mut c = TrainConfig::default();
        assert_eq!(c.loss_weights(), (0.0, 1.0));
        assert_eq!(c.default_name(), "standard");
        c.loss = LossPreset::Wit;
        c.prompt_weight = 0.2;
        c.response_weight = 0.8;
        assert_eq!(c.default_name(), "wit-p0.2-r0.8");
        c.prompt_weight = 0.0;
        c.response_weight = 0.0;
        assert!(c.validate().is_err());
    }

    #[test]
    fn shipped_configs_parse() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("configs");
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                let c = TrainConfig::from_toml_file(&path).unwrap_or_else(|e| panic!("{e}"));
                c.validate()
                    .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                n += 1;
            }
        }
        assert!(n >= 2, "no configs found in {}", dir.display());
    }

    #[test]
    fn toml_round_trip_and_unknown_keys() {
        let c = TrainConfig::default();
        let text = toml::to_string(&c).unwrap();
        let back: TrainConfig = toml::from_str(&text).unwrap();
        assert_eq!(back, c);
        let err = TrainConfig::from_toml_str("rnak = 4").unwrap_err();
        assert!(
            err.contains("unknown key `rnak` (did you mean `rank`?)"),
            "{err}"
        );
        let err = TrainConfig::from_toml_str("lora_alhpa = 4.0").unwrap_err();
        assert!(err.contains("did you mean `lora_alpha`?"), "{err}");
        // The older peft-wit names still parse, into PEFT's names.
        let old = TrainConfig::from_toml_str(
            "rank = 8\nalpha = 16.0\ntargets = \"q_proj\"\nrslora = true",
        )
        .unwrap();
        assert_eq!((old.r, old.lora_alpha, old.use_rslora), (8, 16.0, true));
        assert_eq!(old.target_modules, "q_proj");
        // Enumerated values are checked when the config is read, not after the model loads.
        let err = TrainConfig::from_toml_str("format = \"jsonl\"").unwrap_err();
        assert!(
            err.contains("jsonl") && err.contains("prompt-response"),
            "{err}"
        );
        let err = TrainConfig::from_toml_str("device = \"tpu\"").unwrap_err();
        assert!(err.contains("tpu"), "{err}");
        let c = TrainConfig::from_toml_str(
            "base_dtype = \"bf16\"\ndevice = \"cuda:1\"\nformat = \"messages\"",
        )
        .unwrap();
        assert_eq!(
            (c.base_dtype, c.device, c.format),
            (BaseDType::Bf16, DeviceSpec::Cuda(1), DataFormat::Chat)
        );
    }
}
