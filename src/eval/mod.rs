//! Evaluation: loss metrics, generation-based scores, side-by-side comparison of adapters.

pub mod generation;
pub mod metrics;
pub mod scoring;

pub use generation::{generate_answers, generation_scores, ScoredGeneration};
pub use metrics::{loss_metrics, LossMetrics};
