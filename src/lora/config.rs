//! LoRA hyper-parameters under PEFT's own field names, so `adapter_config.json` is a serde mirror.

use regex::Regex;
use serde::{Deserialize, Serialize};

use crate::model::config::{module_path, PROJECTIONS};
use crate::{Error, Result};

/// Which projections get an adapter: PEFT's `target_modules` (a list of module names matched as
/// a suffix, or a single regex string matched against the full module path), or `all-linear`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TargetModules {
    Names(Vec<String>),
    Pattern(String),
}

impl Default for TargetModules {
    fn default() -> Self {
        Self::Names(PROJECTIONS.iter().map(|s| s.to_string()).collect())
    }
}

impl TargetModules {
    /// Parses the CLI form: `all-linear`, a comma-separated list of names, or `re:<regex>`.
    pub fn parse(spec: &str) -> Result<Self> {
        let spec = spec.trim();
        if spec == "all-linear" {
            return Ok(Self::Pattern("all-linear".into()));
        }
        if let Some(re) = spec.strip_prefix("re:") {
            Regex::new(re).map_err(|e| Error::InvalidArgument(format!("target regex: {e}")))?;
            return Ok(Self::Pattern(re.to_string()));
        }
        let names: Vec<String> = spec
            .split(',')
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect();
        for name in &names {
            if !PROJECTIONS.contains(&name.as_str()) {
                return Err(Error::InvalidArgument(format!(
                    "unknown target module `{name}` (known: {})",
                    PROJECTIONS.join(", ")
                )));
            }
        }
        if names.is_empty() {
            return Err(Error::InvalidArgument("empty target module list".into()));
        }
        Ok(Self::Names(names))
    }

    /// The projection names (in PEFT parameter order) of `layer` this spec selects.
    pub fn select(&self, layer: usize) -> Result<Vec<&'static str>> {
        match self {
            Self::Names(names) => Ok(PROJECTIONS
                .iter()
                .copied()
                .filter(|p| {
                    let path = module_path(layer, p);
                    names
                        .iter()
                        .any(|n| n == p || n == &path || path.ends_with(&format!(".{n}")))
                })
                .collect()),
            Self::Pattern(p) if p == "all-linear" => Ok(PROJECTIONS.to_vec()),
            Self::Pattern(p) => {
                let re = Regex::new(&format!("^(?:{p})$"))
                    .map_err(|e| Error::InvalidArgument(format!("target_modules regex: {e}")))?;
                Ok(PROJECTIONS
                    .iter()
                    .copied()
                    .filter(|proj| re.is_match(&module_path(layer, proj)))
                    .collect())
            }
        }
    }

    /// The full list written to `adapter_config.json` (PEFT readers expect concrete names).
    pub fn resolved_names(&self, num_layers: usize) -> Result<Vec<String>> {
        let mut names: Vec<String> = Vec::new();
        for layer in 0..num_layers {
            for p in self.select(layer)? {
                if !names.iter().any(|n| n == p) {
                    names.push(p.to_string());
                }
            }
        }
        Ok(names)
    }
}

/// How A is initialised (B always starts at zero, so a fresh adapter is the identity).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LoraInit {
    /// PEFT's default: kaiming-uniform with a = sqrt(5), i.e. U(-1/sqrt(in), 1/sqrt(in)).
    #[default]
    Kaiming,
    /// N(0, 1/r), PEFT's `init_lora_weights="gaussian"`.
    Gaussian,
}

/// The LoRA settings of one adapter.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraConfig {
    pub r: usize,
    pub lora_alpha: f64,
    #[serde(default)]
    pub lora_dropout: f32,
    #[serde(default)]
    pub target_modules: TargetModules,
    #[serde(default)]
    pub use_rslora: bool,
    #[serde(default)]
    pub layers_to_transform: Option<Vec<usize>>,
    #[serde(default)]
    pub init: LoraInit,
}

impl Default for LoraConfig {
    fn default() -> Self {
        Self {
            r: 16,
            lora_alpha: 32.0,
            lora_dropout: 0.05,
            target_modules: TargetModules::default(),
            use_rslora: false,
            layers_to_transform: None,
            init: LoraInit::Kaiming,
        }
    }
}

impl LoraConfig {
    /// `alpha / r`, or `alpha / sqrt(r)` with rsLoRA.
    pub fn scale(&self) -> f64 {
        if self.use_rslora {
            self.lora_alpha / (self.r as f64).sqrt()
        } else {
            self.lora_alpha / self.r as f64
        }
    }

    pub fn validate(&self) -> Result<()> {
        if self.r == 0 {
            return Err(Error::InvalidArgument(
                "LoRA rank r must be positive".into(),
            ));
        }
        if !(0.0..1.0).contains(&self.lora_dropout) {
            return Err(Error::InvalidArgument(format!(
                "lora_dropout {} must be in [0, 1)",
                self.lora_dropout
            )));
        }
        if !self.lora_alpha.is_finite() || self.lora_alpha <= 0.0 {
            return Err(Error::InvalidArgument("lora_alpha must be positive".into()));
        }
        Ok(())
    }

    /// Whether `layer` gets adapters at all.
    pub fn includes_layer(&self, layer: usize) -> bool {
        self.layers_to_transform
            .as_ref()
            .is_none_or(|layers| layers.contains(&layer))
    }
}
