//! Instruction data: formats, templates, token-level loss weights, batches.

/// Errors in user data, always naming the file and line.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{path}:{line}: {message}")]
    BadRow {
        path: std::path::PathBuf,
        line: usize,
        message: String,
    },
}
