//! The base model: configuration, loading (GGUF or Hugging Face layout), the decoder.

mod block_op;
mod block_plan;
pub mod config;
pub mod decoder;
pub mod dropout;
pub mod frozen;
pub mod linear;
pub mod load;
pub mod random;
pub mod resolve;
pub mod rope;

pub use config::{Architecture, ModelConfig, PROJECTIONS};
pub use decoder::{Decoder, ForwardContext, KvCache, LowRankBranches};
pub use dropout::DropoutMask;
pub use frozen::FrozenWeight;
pub use linear::{lora_linear, LoraPair};
pub use load::{read_model_config, BaseDType, BaseModel, ModelLocation};
pub use resolve::resolve_model;
