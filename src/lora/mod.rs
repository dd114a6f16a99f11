//! LoRA: the frozen base weight, trainable low-rank pairs, PEFT-format adapters.

pub mod adapter;
pub mod config;
pub mod frozen;
pub mod linear;
pub mod load;
pub mod peft;

pub use adapter::{LoraAdapter, LoraPair};
pub use config::{LoraConfig, LoraInit, TargetModules};
pub use frozen::FrozenWeight;
pub(crate) use linear::Branch;
pub use linear::{lora_linear, DropoutMask};
