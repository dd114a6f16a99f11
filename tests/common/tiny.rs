//! A tiny random base model and a learnable synthetic task, for trainer and registry tests.

use std::path::PathBuf;

use candle_core::{DType, Device};
use peft_wit::data::{Template, TokenKind, TokenizedExample};
use peft_wit::model::random::{random_decoder, tiny_config};
use peft_wit::model::{BaseDType, BaseModel, ModelLocation};
use peft_wit::train::{LossPreset, PreparedData, TrainConfig};

pub fn tiny_base() -> BaseModel {
    let config = tiny_config(false);
    BaseModel {
        decoder: random_decoder(&config, 11, DType::F32, None, &Device::Cpu).unwrap(),
        tokenizer: None,
        chat_template: None,
        bos_token: None,
        eos_token: None,
        name: "tiny-random".into(),
        fingerprint: "tiny".into(),
        location: ModelLocation::HfDir(PathBuf::from("/nonexistent")),
        base_dtype: BaseDType::F32,
    }
}

/// The response repeats the prompt's tokens in reverse.
pub fn example(i: usize) -> TokenizedExample {
    let prompt: Vec<u32> = (0..4 + i % 3)
        .map(|k| 3 + ((i * 7 + k * 5) % 40) as u32)
        .collect();
    let mut ids = vec![1];
    ids.extend(&prompt);
    ids.push(47);
    ids.extend(prompt.iter().rev());
    ids.push(2);
    let n_prompt = prompt.len() + 2;
    let kinds = (0..ids.len())
        .map(|t| {
            if t < n_prompt {
                TokenKind::User
            } else {
                TokenKind::Response
            }
        })
        .collect();
    TokenizedExample { ids, kinds }
}

/// `n_train` training and `n_eval` held-out examples of the reversal task.
pub fn tiny_data(n_train: usize, n_eval: usize) -> PreparedData {
    let train: Vec<TokenizedExample> = (0..n_train).map(example).collect();
    let eval: Vec<TokenizedExample> = (100..100 + n_eval).map(example).collect();
    let mut all = train.clone();
    all.extend(eval.iter().cloned());
    PreparedData {
        fingerprint: peft_wit::data::fingerprint(&all),
        train,
        eval,
        eval_examples: Vec::new(),
        template: Template::raw("</s>"),
        template_name: "raw".into(),
        source: "synthetic".into(),
        report: Vec::new(),
    }
}

/// The files of a registry entry that a finished training run wrote.
pub const TRAINED_ENTRY_FILES: [&str; 6] = [
    "adapter_config.json",
    "adapter_model.safetensors",
    "peft_wit.json",
    "metrics.jsonl",
    "loss.svg",
    "train_config.toml",
];

/// A short WIT run on the tiny model: λp = 0.2, λr = 0.8, rank 4 (α = 8, no dropout), lr 5e-3,
/// batch size 4 without accumulation, one warm-up step, `steps` steps, no evaluation or
/// checkpoints during the run, named `name`.
pub fn tiny_train_config(name: &str, steps: usize) -> TrainConfig {
    TrainConfig {
        loss: LossPreset::Wit,
        prompt_weight: 0.2,
        response_weight: 0.8,
        r: 4,
        lora_alpha: 8.0,
        lora_dropout: 0.0,
        lr: 5e-3,
        batch_size: 4,
        grad_accum: 1,
        max_steps: Some(steps),
        warmup_steps: Some(1),
        eval_every: 0,
        checkpoint_every: 0,
        name: Some(name.into()),
        ..TrainConfig::default()
    }
}
