//! The base model: configuration, loading (GGUF or Hugging Face layout), the decoder.

mod block_op;
pub mod config;
pub mod decoder;
pub mod load;
pub mod random;
pub mod resolve;
pub mod rope;

pub use config::{Architecture, ModelConfig, PROJECTIONS};
pub use decoder::{Decoder, ForwardContext, KvCache};
pub use load::{BaseDType, BaseModel, ModelLocation};
pub use resolve::resolve_model;
