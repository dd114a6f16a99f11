//! peft-wit: LoRA fine-tuning of Llama-family causal language models under the weighted
//! instruction-tuning (WIT) loss, on candle.
//!
//! - [`model`]: the frozen base (GGUF or Hugging Face layout; dense or kept quantized).
//! - [`lora`]: trainable low-rank adapters in PEFT's format.
//! - [`loss`]: the weighted prompt/response loss.
//! - [`suggest`]: a data-driven starting point for λp and λr, and a grid to sweep around it.
//! - [`dpo`]: preference tuning (DPO) that continues any registry adapter.
//! - [`tasks`]: standard benchmarks (MMLU, BBH, GSM8K, IFEval) scored as lm-evaluation-harness does.

pub mod bench;
pub mod config_value;
pub mod data;
pub mod device;
pub mod dpo;
pub mod error;
pub mod eval;
pub mod export;
pub mod fsutil;
pub mod generate;
pub mod lanes;
pub mod lora;
pub mod loss;
pub mod model;
pub mod ops;
pub mod plot;
pub mod registry;
pub mod suggest;
pub mod sweep;
pub mod tasks;
pub mod tokenizer;
pub mod tracking;
pub mod train;

pub use error::{Error, Result};
