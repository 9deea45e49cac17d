//! LoRA adapters in diffusers' file format (`save_lora_weights`): loading, attaching to a
//! UNet without merging, and saving.
//!
//! Accepted key layouts (all under an optional `unet.` prefix):
//! * diffusers: `<module>.lora.down.weight` / `<module>.lora.up.weight`
//! * PEFT:      `<module>.lora_A.weight` / `<module>.lora_B.weight`
//! * old attention-processor files: `<attn>.processor.to_q_lora.down.weight`, ...
//!
//! alpha comes from the header's `lora_adapter_metadata` (a JSON string of PEFT's LoraConfig
//! with keys prefixed `unet.`); without it alpha = rank, as diffusers assumes.

use super::nn::{LinearRegistry, LoraDelta};
use super::{ModelError, Result};
use candle_core::{DType, Device, Tensor};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

#[derive(Clone, Debug)]
pub struct LoraModule {
    /// `[r, in]`
    pub down: Tensor,
    /// `[out, r]`
    pub up: Tensor,
    pub alpha: f64,
    /// The keys the matrices had in their file (kept so a trained adapter is written back
    /// under the same names).
    pub down_key: String,
    pub up_key: String,
}

impl LoraModule {
    pub fn rank(&self) -> usize {
        self.up.dims()[1]
    }
}

#[derive(Clone, Debug, Default)]
pub struct LoraAdapter {
    pub modules: BTreeMap<String, LoraModule>,
    pub use_rslora: bool,
    /// The PEFT config as read from (or to be written to) the file, without `unet.` prefixes.
    pub peft_config: serde_json::Map<String, serde_json::Value>,
}

fn lerr(s: impl Into<String>) -> ModelError {
    ModelError::Lora(s.into())
}

/// Splits a key into (module path, is_down) when it is a LoRA matrix.
fn parse_key(key: &str) -> Option<(String, bool)> {
    let k = key.strip_prefix("unet.").unwrap_or(key);
    for (suffix, down) in [
        (".lora.down.weight", true),
        (".lora.up.weight", false),
        (".lora_A.weight", true),
        (".lora_B.weight", false),
        (".lora_A.default.weight", true),
        (".lora_B.default.weight", false),
    ] {
        if let Some(m) = k.strip_suffix(suffix) {
            return Some((m.to_string(), down));
        }
    }
    // Attention-processor layout: `attn1.processor.to_q_lora.down.weight`.
    for (proc_name, module) in [
        ("to_q_lora", "to_q"),
        ("to_k_lora", "to_k"),
        ("to_v_lora", "to_v"),
        ("to_out_lora", "to_out.0"),
    ] {
        for (suffix, down) in [(".down.weight", true), (".up.weight", false)] {
            let pat = format!(".processor.{proc_name}{suffix}");
            if let Some(m) = k.strip_suffix(&pat) {
                return Some((format!("{m}.{module}"), down));
            }
        }
    }
    None
}

impl LoraAdapter {
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => ModelError::MissingFile(path.to_path_buf()),
            _ => ModelError::Io(path.to_path_buf(), e.to_string()),
        })?;
        Self::from_bytes(&bytes, device).map_err(|e| match e {
            ModelError::Lora(m) => ModelError::Lora(format!("{}: {m}", path.display())),
            o => o,
        })
    }

    pub fn from_bytes(bytes: &[u8], device: &Device) -> Result<Self> {
        let (_, meta) = safetensors::SafeTensors::read_metadata(bytes)
            .map_err(|e| lerr(format!("not a safetensors file: {e}")))?;
        let st = safetensors::SafeTensors::deserialize(bytes)
            .map_err(|e| lerr(format!("not a safetensors file: {e}")))?;
        let mut peft_config = serde_json::Map::new();
        if let Some(m) = meta.metadata() {
            if let Some(s) = m.get("lora_adapter_metadata") {
                let v: serde_json::Value = serde_json::from_str(s)
                    .map_err(|e| lerr(format!("lora_adapter_metadata: {e}")))?;
                if let Some(obj) = v.as_object() {
                    for (k, val) in obj {
                        peft_config.insert(
                            k.strip_prefix("unet.").unwrap_or(k).to_string(),
                            val.clone(),
                        );
                    }
                }
            }
        }
        let mut downs: HashMap<String, (Tensor, String)> = HashMap::new();
        let mut ups: HashMap<String, (Tensor, String)> = HashMap::new();
        for (name, view) in st.tensors() {
            if name.starts_with("text_encoder") {
                continue; // text-encoder LoRA is not applied (SD LoRAs trained here target the UNet)
            }
            let Some((module, is_down)) = parse_key(&name) else {
                continue;
            };
            let t = candle_core::safetensors::Load::load(&view, device)?.to_dtype(DType::F32)?;
            if t.rank() != 2 {
                return Err(lerr(format!(
                    "{name}: expected a matrix, got shape {:?} (conv LoRA is not supported)",
                    t.dims()
                )));
            }
            if is_down {
                downs.insert(module, (t, name.to_string()));
            } else {
                ups.insert(module, (t, name.to_string()));
            }
        }
        if downs.is_empty() {
            return Err(lerr(
                "no UNet LoRA tensors found (expected keys like unet.<module>.lora.down.weight)",
            ));
        }
        let default_alpha = peft_config.get("lora_alpha").and_then(|v| v.as_f64());
        let alpha_pattern = peft_config
            .get("alpha_pattern")
            .and_then(|v| v.as_object())
            .cloned()
            .unwrap_or_default();
        let use_rslora = peft_config
            .get("use_rslora")
            .and_then(|v| v.as_bool())
            .unwrap_or(false);
        let mut modules = BTreeMap::new();
        for (module, (down, down_key)) in downs {
            let (up, up_key) = ups
                .remove(&module)
                .ok_or_else(|| lerr(format!("{module}: down matrix without up matrix")))?;
            let r = down.dims()[0];
            if up.dims()[1] != r {
                return Err(lerr(format!(
                    "{module}: down {:?} and up {:?} ranks differ",
                    down.dims(),
                    up.dims()
                )));
            }
            let pattern_alpha = alpha_pattern
                .iter()
                .find(|(k, _)| module == **k || module.ends_with(&format!(".{k}")))
                .and_then(|(_, v)| v.as_f64());
            let alpha = pattern_alpha.or(default_alpha).unwrap_or(r as f64);
            modules.insert(
                module,
                LoraModule {
                    down,
                    up,
                    alpha,
                    down_key,
                    up_key,
                },
            );
        }
        if let Some(m) = ups.keys().next() {
            return Err(lerr(format!("{m}: up matrix without down matrix")));
        }
        Ok(Self {
            modules,
            use_rslora,
            peft_config,
        })
    }

    /// The per-module factor `alpha / r` (or `alpha / sqrt(r)` with rsLoRA).
    pub fn module_scale(&self, m: &LoraModule) -> f64 {
        let r = m.rank() as f64;
        if self.use_rslora {
            m.alpha / r.sqrt()
        } else {
            m.alpha / r
        }
    }

    /// diffusers key names for a module we create.
    pub fn diffusers_keys(module: &str) -> (String, String) {
        (
            format!("unet.{module}.lora.down.weight"),
            format!("unet.{module}.lora.up.weight"),
        )
    }

    /// Attaches the adapter to `registry` with user scale `scale`; every other Linear is
    /// cleared. Fails before touching anything if a module is missing or mis-shaped.
    pub fn attach(&self, registry: &LinearRegistry, scale: f64, dtype: DType) -> Result<()> {
        let mut plan = Vec::new();
        for (name, m) in &self.modules {
            let (slot, in_dim, out_dim) = registry
                .get(name)
                .ok_or_else(|| lerr(format!("module {name} does not exist in this UNet")))?;
            if m.down.dims()[1] != in_dim || m.up.dims()[0] != out_dim {
                return Err(lerr(format!(
                    "{name}: adapter shapes down {:?} up {:?} do not fit a {in_dim}->{out_dim} layer",
                    m.down.dims(),
                    m.up.dims()
                )));
            }
            plan.push((slot, m));
        }
        registry.clear_all();
        for (slot, m) in plan {
            slot.set(Some(LoraDelta {
                down: m.down.to_dtype(dtype)?,
                up: m.up.to_dtype(dtype)?,
                scale: self.module_scale(m) * scale,
            }));
        }
        Ok(())
    }

    /// Writes the adapter (new adapters use diffusers key names, `unet.<module>.lora.down.weight`) and the
    /// PEFT config in `lora_adapter_metadata`, so `pipe.load_lora_weights` restores alpha.
    /// The file appears atomically (temporary file, then rename).
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut data: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
        for m in self.modules.values() {
            for (key, t) in [(&m.down_key, &m.down), (&m.up_key, &m.up)] {
                let t = t.to_dtype(DType::F32)?.to_device(&Device::Cpu)?;
                let v: Vec<f32> = t.flatten_all()?.to_vec1()?;
                let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                data.push((key.clone(), t.dims().to_vec(), bytes));
            }
        }
        let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = data
            .iter()
            .map(|(n, s, b)| {
                Ok((
                    n.clone(),
                    safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                        .map_err(|e| lerr(e.to_string()))?,
                ))
            })
            .collect::<Result<_>>()?;
        let mut cfg = serde_json::Map::new();
        for (k, v) in &self.peft_config {
            cfg.insert(format!("unet.{k}"), v.clone());
        }
        let mut meta = HashMap::new();
        meta.insert("format".to_string(), "pt".to_string());
        meta.insert(
            "lora_adapter_metadata".to_string(),
            serde_json::Value::Object(cfg).to_string(),
        );
        let tmp = path.with_extension("safetensors.tmp");
        safetensors::serialize_to_file(views, Some(meta), &tmp)
            .map_err(|e| ModelError::Io(tmp.clone(), e.to_string()))?;
        std::fs::rename(&tmp, path)
            .map_err(|e| ModelError::Io(path.to_path_buf(), e.to_string()))?;
        Ok(())
    }

    /// A PEFT `LoraConfig` dict for an adapter we create.
    pub fn peft_config_for(
        rank: usize,
        alpha: f64,
        target_modules: &[String],
    ) -> serde_json::Map<String, serde_json::Value> {
        let v = serde_json::json!({
            "r": rank,
            "lora_alpha": alpha,
            "target_modules": target_modules,
            "lora_dropout": 0.0,
            "bias": "none",
            "use_rslora": false,
            "use_dora": false,
            "init_lora_weights": "gaussian",
            "rank_pattern": {},
            "alpha_pattern": {},
            "peft_type": "LORA",
            "task_type": null,
            "fan_in_fan_out": false,
            "modules_to_save": null,
            "layers_to_transform": null,
            "layers_pattern": null,
            "megatron_config": null,
            "megatron_core": "megatron.core",
            "loftq_config": {},
            "layer_replication": null,
            "inference_mode": false,
        });
        v.as_object().cloned().unwrap_or_default()
    }
}
