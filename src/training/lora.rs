//! Trainable LoRA adapters on a frozen UNet (PEFT semantics: `y = W x + b + (alpha/r) B A x`).

use super::TrainError;
use crate::models::lora::{LoraAdapter, LoraModule};
use crate::models::nn::{LinearRegistry, LoraDelta, LoraSlot};
use crate::rng::NoiseRng;
use candle_core::{DType, Tensor, Var};

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct LoraSpec {
    pub rank: usize,
    pub alpha: f64,
    pub target_modules: Vec<String>,
}

impl Default for LoraSpec {
    fn default() -> Self {
        Self {
            rank: 4,
            alpha: 4.0,
            target_modules: ["to_q", "to_k", "to_v", "to_out.0"]
                .map(String::from)
                .to_vec(),
        }
    }
}

/// PEFT's rule: a target matches a module whose name equals it or ends with `.<target>`.
pub fn matches_target(module: &str, target: &str) -> bool {
    module == target || module.ends_with(&format!(".{target}"))
}

/// The targets that match none of `modules`.
pub fn unmatched_targets<'a, S: AsRef<str>>(modules: &[S], targets: &'a [String]) -> Vec<&'a str> {
    targets
        .iter()
        .filter(|t| !modules.iter().any(|m| matches_target(m.as_ref(), t)))
        .map(String::as_str)
        .collect()
}

impl LoraSpec {
    /// What any adapter needs, whatever model it goes on (the job API checks it at submission,
    /// the trainer again before it builds the adapter).
    pub fn validate(&self) -> Result<(), String> {
        if self.rank == 0 {
            return Err("lora rank must be at least 1".into());
        }
        if !(self.alpha > 0.0 && self.alpha.is_finite()) {
            return Err(format!(
                "lora alpha must be a positive number, got {}",
                self.alpha
            ));
        }
        if self.target_modules.is_empty() {
            return Err("lora target_modules is empty".into());
        }
        Ok(())
    }
}

struct Module {
    name: String,
    slot: LoraSlot,
    down: Var,
    up: Var,
    down_key: String,
    up_key: String,
}

pub struct TrainableLora {
    pub spec: LoraSpec,
    modules: Vec<Module>,
}

impl TrainableLora {
    /// Fresh adapter: `down` ~ N(0, 1/r) (PEFT's "gaussian" init, as the diffusers DPO script
    /// uses), `up` = 0, so training starts exactly at the base model.
    pub fn new(
        linears: &LinearRegistry,
        spec: &LoraSpec,
        rng: &mut NoiseRng,
        dev: &candle_core::Device,
        dtype: DType,
    ) -> Result<Self, TrainError> {
        spec.validate().map_err(TrainError::Config)?;
        let all = linears.all();
        let names: Vec<&str> = all.iter().map(|(n, ..)| n.as_str()).collect();
        if let Some(t) = unmatched_targets(&names, &spec.target_modules).first() {
            return Err(TrainError::Config(format!(
                "lora target module '{t}' matches no Linear layer of this UNet"
            )));
        }
        let mut modules = Vec::new();
        for (name, slot, in_dim, out_dim) in all {
            if !spec.target_modules.iter().any(|t| matches_target(&name, t)) {
                continue;
            }
            let down = (rng.randn((spec.rank, in_dim), dev, DType::F32)?
                * (1.0 / spec.rank as f64))?
                .to_dtype(dtype)?;
            let up = Tensor::zeros((out_dim, spec.rank), dtype, dev)?;
            let (down_key, up_key) = LoraAdapter::diffusers_keys(&name);
            modules.push(Module {
                name,
                slot,
                down: Var::from_tensor(&down)?,
                up: Var::from_tensor(&up)?,
                down_key,
                up_key,
            });
        }
        let l = Self {
            spec: spec.clone(),
            modules,
        };
        l.attach();
        Ok(l)
    }

    /// Continues training an existing adapter (resume, or a file given by the user).
    pub fn from_adapter(
        linears: &LinearRegistry,
        adapter: &LoraAdapter,
        dtype: DType,
    ) -> Result<Self, TrainError> {
        let mut modules = Vec::new();
        let mut rank = 0;
        let mut alpha = 0.0;
        for (name, m) in &adapter.modules {
            let (slot, _, _) = linears.get(name).ok_or_else(|| {
                TrainError::Config(format!("adapter module {name} does not exist in this UNet"))
            })?;
            rank = m.rank();
            alpha = m.alpha;
            modules.push(Module {
                name: name.clone(),
                slot,
                down: Var::from_tensor(&m.down.to_dtype(dtype)?)?,
                up: Var::from_tensor(&m.up.to_dtype(dtype)?)?,
                down_key: m.down_key.clone(),
                up_key: m.up_key.clone(),
            });
        }
        let targets = adapter
            .peft_config
            .get("target_modules")
            .and_then(|v| v.as_array())
            .map(|a| {
                a.iter()
                    .filter_map(|x| x.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_else(|| LoraSpec::default().target_modules);
        let l = Self {
            spec: LoraSpec {
                rank,
                alpha,
                target_modules: targets,
            },
            modules,
        };
        l.attach();
        Ok(l)
    }

    pub fn scale(&self) -> f64 {
        self.spec.alpha / self.spec.rank as f64
    }

    /// (Re)connects the trainable matrices to the UNet's Linear slots.
    pub fn attach(&self) {
        let s = self.scale();
        for m in &self.modules {
            m.slot.set(Some(LoraDelta {
                down: m.down.as_tensor().clone(),
                up: m.up.as_tensor().clone(),
                scale: s,
            }));
        }
    }

    pub fn detach(&self) {
        for m in &self.modules {
            m.slot.set(None);
        }
    }

    /// Trainable parameters named by their file keys, in a fixed order.
    pub fn params(&self) -> Vec<(String, Var)> {
        self.modules
            .iter()
            .flat_map(|m| {
                [
                    (m.down_key.clone(), m.down.clone()),
                    (m.up_key.clone(), m.up.clone()),
                ]
            })
            .collect()
    }

    /// A snapshot in the file format (diffusers names + PEFT metadata with alpha).
    pub fn to_adapter(&self) -> Result<LoraAdapter, TrainError> {
        let mut a = LoraAdapter {
            peft_config: LoraAdapter::peft_config_for(
                self.spec.rank,
                self.spec.alpha,
                &self.spec.target_modules,
            ),
            ..Default::default()
        };
        for m in &self.modules {
            a.modules.insert(
                m.name.clone(),
                LoraModule {
                    down: m.down.as_tensor().detach().to_dtype(DType::F32)?,
                    up: m.up.as_tensor().detach().to_dtype(DType::F32)?,
                    alpha: self.spec.alpha,
                    down_key: m.down_key.clone(),
                    up_key: m.up_key.clone(),
                },
            );
        }
        Ok(a)
    }
}
