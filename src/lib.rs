//! peft-wit: LoRA fine-tuning of Llama-family causal language models under the weighted
//! instruction-tuning (WIT) loss, on candle.

pub mod data;
pub mod error;
pub mod ops;

pub use error::{Error, Result};
