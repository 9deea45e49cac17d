//! The model stack: diffusers-layout loading, UNet, VAE, CLIP text encoders, tokenizer, LoRA.
//! Nothing here knows about HTTP or jobs.

pub mod checkpoint;
pub mod clip;
pub mod clip_model;
pub mod defaults;
pub mod device;
pub mod hub;
pub mod image_processor;
pub mod kernels;
pub mod lora;
pub mod nn;
pub mod open_clip;
pub mod pipeline_model;
pub mod random_model;
pub mod rewards;
pub mod single_file;
pub mod tokenizer;
pub mod unet;
pub mod vae;
pub mod weights;

pub use pipeline_model::{Architecture, DiffusionModel, ModelSource};

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("missing file: {0}")]
    MissingFile(PathBuf),
    #[error("{0}: {1}")]
    Io(PathBuf, String),
    #[error("corrupt or unreadable file {0}: {1}")]
    Corrupt(String, String),
    #[error("tensor {name} not found in {file}")]
    MissingTensor { name: String, file: String },
    #[error("tensor {name} has shape {found:?}, the config implies {expected:?}")]
    ShapeMismatch {
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("{0}")]
    Config(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("lora: {0}")]
    Lora(String),
    #[error("hub: {0}")]
    Hub(String),
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, ModelError>;
