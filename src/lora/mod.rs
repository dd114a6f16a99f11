//! LoRA adapters: their configuration, the set of trainable low-rank pairs of one adapter, and
//! the one reader and writer of PEFT's adapter format. The adapted linear op itself is part of
//! the model (`model::linear`), which sees an adapter only as [`LowRankBranches`].

pub mod adapter;
pub mod config;
pub mod peft;

pub use crate::model::linear::LoraPair;
pub use crate::model::LowRankBranches;
pub use adapter::LoraAdapter;
pub use config::{LoraConfig, LoraInit, TargetModules};
