//! dspo-server: Stable Diffusion serving and DSPO preference fine-tuning in one binary.

pub mod conformance;
pub mod models;
pub mod pipelines;
pub mod rng;
pub mod schedulers;
pub mod training;
pub mod util;
