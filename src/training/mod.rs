//! Preference fine-tuning: losses (DSPO, Diffusion-DPO, SFT, DSPO-E), LoRA and full
//! fine-tuning, optimiser, checkpoints, the trainer loop.

pub mod checkpoint;
pub mod config;
pub mod dataset;
pub mod lora;
pub mod losses;
pub mod noise;
pub mod optim;
pub mod parallel;
pub mod pretrain;
pub mod step;
pub mod trainer;

pub use losses::Method;
pub use config::{
    load_config, Hyperparameters, PretrainOptions, StepMetrics, TrainConfig, TrainMode, TrainOutcome,
};

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("invalid training config: {0}")]
    Config(String),
    #[error("dataset: {0}")]
    Dataset(String),
    #[error("cancelled")]
    Cancelled,
    #[error("checkpoint: {0}")]
    Checkpoint(String),
    #[error(transparent)]
    Model(#[from] crate::models::ModelError),
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
    #[error("io: {0}")]
    Io(String),
    /// The drift guard: the tuned model moved further from its base than the job allows.
    #[error("{0}")]
    Drift(String),
    /// Another rank of a data-parallel run failed.
    #[error("data-parallel training: {0}")]
    Parallel(String),
}
