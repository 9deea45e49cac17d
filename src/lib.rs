//! dspo-server: Stable Diffusion serving and DSPO preference fine-tuning in one binary.

pub mod adapters;
pub mod api;
pub mod cli;
pub mod config;
pub mod conformance;
pub mod evaluation;
pub mod jobs;
pub mod models;
pub mod pipelines;
pub mod rng;
pub mod schedulers;
pub mod server;
pub mod training;
pub mod util;
