//! The library's error type. Every fallible public function returns [`Result`]; the binary alone
//! turns these into `anyhow` reports.

use std::path::PathBuf;

/// Errors raised by the `peft_wit` library.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    // The cause is part of the message and deliberately not a `source()`, so the binary, which
    // prints the chain of causes, shows it once.
    #[error("{path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },

    #[error("{path}: invalid JSON: {error}")]
    Json {
        path: PathBuf,
        error: serde_json::Error,
    },

    #[error("{path} already exists (use --force to replace it)")]
    AlreadyExists { path: PathBuf },

    #[error("adapter `{name}` already exists in {registry} (use --force to overwrite)")]
    AdapterExists { name: String, registry: PathBuf },

    /// A lock file held by a live owner (another process, maybe on another host).
    #[error("{path} is locked by {owner}")]
    Locked { path: PathBuf, owner: String },

    #[error("{path}: {message}")]
    InvalidFile { path: PathBuf, message: String },

    #[error("unsupported architecture `{0}` (supported: llama, mistral, qwen2)")]
    UnsupportedArchitecture(String),

    #[error("invalid model config: {0}")]
    InvalidConfig(String),

    #[error("tensor `{name}` is missing from {source_name}")]
    MissingTensor { name: String, source_name: String },

    #[error("tensor `{name}` has shape {actual:?}, expected {expected:?}")]
    ShapeMismatch {
        name: String,
        expected: Vec<usize>,
        actual: Vec<usize>,
    },

    #[error("adapter {path}: {message}")]
    AdapterMismatch { path: PathBuf, message: String },

    /// An adapter that failed to load, with the directory it was loaded from.
    #[error("loading adapter {}", path.display())]
    LoadAdapter {
        path: PathBuf,
        #[source]
        source: Box<Error>,
    },

    #[error("unsupported adapter {path}: {message}")]
    UnsupportedAdapter { path: PathBuf, message: String },

    #[error("tokenizer: {0}")]
    Tokenizer(String),

    #[error("chat template: {0}")]
    Template(String),

    #[error("model `{0}` not found: give a GGUF file, a Hugging Face directory or a Hub id (run scripts/fetch-model.sh for the default model)")]
    ModelNotFound(String),

    #[error("hub: {0}")]
    Hub(String),

    #[error("invalid argument: {0}")]
    InvalidArgument(String),

    #[error(
        "merged weight `{name}` is not finite (NaN or infinity); the adapter or the base is broken"
    )]
    NonFiniteWeight { name: String },

    #[error("non-finite loss ({value}) at step {step}")]
    NonFiniteLoss { step: usize, value: f32 },

    #[error(transparent)]
    Data(#[from] crate::data::DataError),

    #[error(transparent)]
    Task(#[from] crate::tasks::TaskError),

    #[error(transparent)]
    Tracking(#[from] crate::tracking::TrackingError),

    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            error: source,
        }
    }

    pub(crate) fn invalid_file(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Error::InvalidFile {
            path: path.into(),
            message: message.into(),
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
