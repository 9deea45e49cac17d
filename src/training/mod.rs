//! Preference fine-tuning: losses (DSPO, Diffusion-DPO, SFT, DSPO-E), optimiser, trainer.

pub mod conformance;
pub mod losses;
pub mod noise;
pub mod optim;
pub mod step;
