//! Evaluation: loss metrics, generation scores, side-by-side comparison of adapters, reports.

pub mod all;
pub mod compare;
pub mod generation;
pub mod metrics;
pub mod report;
pub mod scoring;

pub use all::{evaluate_all, evaluate_each, EvalResults, EvalRun};
pub use compare::{evaluate_adapter, AdapterResult, EvalData, EvalSpec};
pub use generation::{generate_answers, generation_scores, ScoredGeneration};
pub use metrics::{evaluate_losses, higher_is_better, loss_metrics, LossMetrics, TokenLosses};
pub use report::EvalReport;
