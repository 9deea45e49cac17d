//! Per-model defaults shipped inside a model directory (`dspo_server.json`), so a model built
//! for a special purpose (the 64x64 `shapes` demo: few steps, its own guidance, minutes-long
//! fine-tuning) works well without every client knowing its settings. Request fields win over
//! this file, and this file wins over the server's `[defaults]` / `[finetune]` config.
//!
//! ```json
//! { "generate": { "steps": 25, "guidance_scale": 4.0, "scheduler": "ddim" },
//!   "finetune": { "method": "dspo", "hyperparameters": { "max_steps": 300, "batch_size": 16 },
//!                 "by_method": { "dspo": { "beta": 1.75, "learning_rate": 3e-4 } },
//!                 "lora": { "rank": 8, "alpha": 8.0 } } }
//! ```

use serde::{Deserialize, Serialize};
use std::path::Path;

pub const FILE_NAME: &str = "dspo_server.json";

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct GenerateDefaults {
    pub steps: Option<usize>,
    pub guidance_scale: Option<f64>,
    pub scheduler: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelDefaults {
    #[serde(default)]
    pub generate: GenerateDefaults,
    /// `method`, `hyperparameters` (any subset), `by_method` (method -> any subset of
    /// hyperparameters, for that method's jobs only; `beta_by_method` is its β-only shorthand)
    /// and `lora` (any subset), merged over the server's `[finetune]` defaults by the job
    /// manager (`jobs::FinetuneDefaults::merged`).
    #[serde(default)]
    pub finetune: Option<serde_json::Value>,
    /// What the model knows to draw, in any JSON its author writes (the demo lists its shapes,
    /// colours and backgrounds); GET /models shows it, so clients need not guess.
    #[serde(default)]
    pub vocabulary: Option<serde_json::Value>,
}

impl ModelDefaults {
    /// The file's contents; no file means no defaults, a malformed one is an error naming it.
    pub fn load(dir: &Path) -> super::Result<Self> {
        let path = dir.join(FILE_NAME);
        match std::fs::read_to_string(&path) {
            Ok(text) => serde_json::from_str(&text)
                .map_err(|e| super::ModelError::Corrupt(path.display().to_string(), e.to_string())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(super::ModelError::Io(path, e.to_string())),
        }
    }
}
