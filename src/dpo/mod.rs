//! Direct preference optimisation (DPO, Rafailov et al. 2023) from any registry adapter.
//!
//! - [`data`]: preference pairs in TRL's layouts (strings, conversations, Anthropic HH
//!   dialogues), rendered with the model's chat template and tokenized with response tokens
//!   marked; bad rows are errors naming `file:line`, useless ones are skipped and counted.
//! - [`loss`]: summed response log-probs from one forward pass over chosen and rejected answers,
//!   the DPO loss, its implicit rewards, and the optional WIT term on the chosen answers.
//! - [`trainer`]: the loop (reference log-probs once, AdamW, clipping and schedule from
//!   [`crate::train`]) and the new registry entry that names its parent.
//!
//! Depends on `train`, `loss`, `data`, `model`, `lora` and `registry`; nothing there depends on
//! it.

pub mod data;
pub mod loss;
pub mod trainer;

pub use data::{
    load_pairs, prepare_pairs, PairOptions, PairReport, PairTokens, PreferencePair, PreparedPairs,
};
pub use loss::{DpoMetrics, DpoStats, PairBatch, RefLogps};
pub use trainer::{train_dpo, DpoConfig, DpoOptions, DpoOutcome, Parent};
