//! Training: configuration, data preparation, the loop, optimizer, checkpoints.

pub mod checkpoint;
pub mod config;
pub mod optim;
pub mod prepare;
pub mod presets;
pub mod trainer;
pub mod weight_schedule;

pub use config::{LossPreset, TrainConfig};
pub use prepare::{prepare_data, PreparedData};
pub use trainer::{train, RunOptions, TrainOutcome};
pub use weight_schedule::WeightSchedule;
