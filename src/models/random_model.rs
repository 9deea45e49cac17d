//! Random-weight pipelines in the exact diffusers/transformers layout, for speed and memory
//! benchmarks of architectures whose real weights we do not have (or do not want to download).
//!
//! The weights are drawn by building our own `UNet2DConditionModel`, `AutoencoderKL` and
//! `ClipTextModel` on `Weights::random`: whatever a model asks for is what gets written, so the
//! files hold exactly the parameter names and shapes our loaders (and therefore diffusers,
//! which our names match) read, with nothing kept in a second hand-written list.
//!
//! Width scaling keeps the layer structure of the real config (block count, layers per
//! block, heads, transformer depth, cross-attention width) and only narrows the convolution
//! channels, so a scaled SD1.5 has SD1.5's op mix at a fraction of its cost.

use super::clip::{ClipTextConfig, ClipTextModel};
use super::unet::{UNet2DConditionModel, UNetConfig};
use super::vae::{AutoencoderKL, VaeConfig};
use super::weights::{seed_for, Weights};
use super::{ModelError, Result};
use candle_core::{DType, Device, Tensor};
use serde_json::Value;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone)]
pub struct RandomModelOptions {
    /// Multiplies `block_out_channels` of the UNet and the VAE (1.0 keeps the config as is).
    pub width_scale: f64,
    pub seed: u64,
    /// dtype of the written safetensors files.
    pub dtype: DType,
    /// Standard deviation of the non-norm, non-bias weights.
    pub std: f64,
    /// PyTorch's default layer initialisation (for training from scratch) instead of small
    /// normals (for benchmarks: finite activations through any depth).
    pub torch_init: bool,
}

impl RandomModelOptions {
    fn weights(&self, seed: u64) -> Weights {
        if self.torch_init {
            Weights::random_torch(seed, self.std, &Device::Cpu, self.dtype)
        } else {
            Weights::random(seed, self.std, &Device::Cpu, self.dtype)
        }
    }
}

impl Default for RandomModelOptions {
    fn default() -> Self {
        Self {
            width_scale: 1.0,
            seed: 0,
            dtype: DType::F32,
            std: 0.02,
            torch_init: false,
        }
    }
}

/// What was written for one component of `model_index.json`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ComponentReport {
    pub component: String,
    pub class: String,
    /// `weights` (random parameters written), `copied` (files copied), or `skipped` (named
    /// in model_index.json but absent from the config dir, e.g. SD1.5's safety checker;
    /// the written model_index.json marks it `[null, null]`).
    pub action: &'static str,
    pub parameters: usize,
    /// The config values that differ from the source config (width scaling).
    pub changed: Vec<String>,
}

/// Writes a full pipeline directory at `out` from the configs in `config_dir`.
pub fn make_random_model(
    config_dir: &Path,
    out: &Path,
    opts: &RandomModelOptions,
) -> Result<Vec<ComponentReport>> {
    if !(opts.width_scale.is_finite() && opts.width_scale > 0.0) {
        return Err(ModelError::Config(format!(
            "width scale must be positive, got {}",
            opts.width_scale
        )));
    }
    if !matches!(opts.dtype, DType::F32 | DType::F16 | DType::BF16) {
        return Err(ModelError::Config(format!(
            "random weights can be written as f32, f16 or bf16, not {:?}",
            opts.dtype
        )));
    }
    let index_path = config_dir.join("model_index.json");
    let index = read_json(&index_path)?;
    let components = index.as_object().ok_or_else(|| {
        ModelError::Corrupt(index_path.display().to_string(), "not a JSON object".into())
    })?;
    create_dir(out)?;
    let mut out_index = index.clone();

    let mut reports = Vec::new();
    for (name, spec) in components {
        if name.starts_with('_') {
            continue;
        }
        // model_index.json entries are `[library, class]`; `[null, null]` means "not used".
        let class = spec
            .as_array()
            .and_then(|a| a.get(1))
            .and_then(|c| c.as_str());
        let Some(class) = class else { continue };
        let src = config_dir.join(name);
        let dst = out.join(name);
        if !src.is_dir() {
            // diffusers' from_pretrained fails on a component the index names but the
            // directory lacks (SD1.5's safety checker), so the written index marks it unused.
            out_index[name.as_str()] = serde_json::json!([null, null]);
            if name == "safety_checker" {
                out_index["requires_safety_checker"] = Value::Bool(false);
            }
            reports.push(ComponentReport {
                component: name.clone(),
                class: class.to_string(),
                action: "skipped",
                parameters: 0,
                changed: vec![],
            });
            continue;
        }
        let seed = seed_for(opts.seed, name);
        let report = match class {
            "UNet2DConditionModel" => {
                let (config, changed) =
                    scale_unet_config(&read_json(&src.join("config.json"))?, opts.width_scale)?;
                create_dir(&dst)?;
                write_json(&dst.join("config.json"), &config)?;
                let w = opts.weights(seed);
                UNet2DConditionModel::new(UNetConfig::from_json(&config)?, &w)?;
                let parameters = save_drawn(&w, &dst.join("diffusion_pytorch_model.safetensors"))?;
                ComponentReport {
                    component: name.clone(),
                    class: class.into(),
                    action: "weights",
                    parameters,
                    changed,
                }
            }
            "AutoencoderKL" => {
                let (config, changed) =
                    scale_vae_config(&read_json(&src.join("config.json"))?, opts.width_scale)?;
                create_dir(&dst)?;
                write_json(&dst.join("config.json"), &config)?;
                let w = opts.weights(seed);
                AutoencoderKL::new(VaeConfig::from_json(&config)?, &w)?;
                let parameters = save_drawn(&w, &dst.join("diffusion_pytorch_model.safetensors"))?;
                ComponentReport {
                    component: name.clone(),
                    class: class.into(),
                    action: "weights",
                    parameters,
                    changed,
                }
            }
            "CLIPTextModel" | "CLIPTextModelWithProjection" => {
                // The text encoder keeps its width: the UNet's cross-attention reads its hidden
                // size, and it runs once per image, so narrowing it would not shift the profile.
                let config = read_json(&src.join("config.json"))?;
                create_dir(&dst)?;
                write_json(&dst.join("config.json"), &config)?;
                let w = opts.weights(seed);
                ClipTextModel::new(ClipTextConfig::from_json(&config)?, &w)?;
                let parameters = save_drawn(&w, &dst.join("model.safetensors"))?;
                ComponentReport {
                    component: name.clone(),
                    class: class.into(),
                    action: "weights",
                    parameters,
                    changed: vec![],
                }
            }
            _ => {
                copy_dir_files(&src, &dst)?;
                ComponentReport {
                    component: name.clone(),
                    class: class.into(),
                    action: "copied",
                    parameters: 0,
                    changed: vec![],
                }
            }
        };
        reports.push(report);
    }
    write_json(&out.join("model_index.json"), &out_index)?;
    Ok(reports)
}

/// Heads of each down block, read the way diffusers does (`num_attention_heads`, else the
/// legacy `attention_head_dim`, which counts heads; an int applies to every block).
fn unet_heads(v: &Value, n: usize) -> Vec<usize> {
    let pick = |k: &str| v.get(k).filter(|x| !x.is_null()).cloned();
    match pick("num_attention_heads").or_else(|| pick("attention_head_dim")) {
        Some(Value::Number(h)) => vec![h.as_u64().unwrap_or(8) as usize; n],
        Some(Value::Array(a)) => a.iter().map(|h| h.as_u64().unwrap_or(8) as usize).collect(),
        _ => vec![8; n],
    }
}

/// Narrows `block_out_channels` by `scale` and, where needed, `norm_num_groups`.
/// Returns the new config and a description of each changed value.
pub fn scale_unet_config(v: &Value, scale: f64) -> Result<(Value, Vec<String>)> {
    let widths = block_widths(v, "unet")?;
    let heads = unet_heads(v, widths.len());
    scale_config(v, &widths, &heads, scale)
}

/// The VAE's attention has one head, so only the norm groups constrain its widths.
pub fn scale_vae_config(v: &Value, scale: f64) -> Result<(Value, Vec<String>)> {
    let widths = block_widths(v, "vae")?;
    let heads = vec![1; widths.len()];
    scale_config(v, &widths, &heads, scale)
}

fn block_widths(v: &Value, what: &str) -> Result<Vec<usize>> {
    v.get("block_out_channels")
        .and_then(|x| x.as_array())
        .and_then(|a| {
            a.iter()
                .map(|e| e.as_u64().map(|i| i as usize))
                .collect::<Option<Vec<_>>>()
        })
        .filter(|w| !w.is_empty())
        .ok_or_else(|| {
            ModelError::Config(format!(
                "{what} config: block_out_channels missing or invalid"
            ))
        })
}

/// The reduction rule: each width becomes `width * scale` rounded to the nearest multiple of
/// lcm(8, heads of that block) (at least one such multiple), so every head keeps an integral
/// size and channel counts stay SIMD-friendly; then `norm_num_groups` becomes the largest
/// divisor of the original group count that divides every new width (GroupNorm needs that).
/// SD1.5 at 0.25: UNet 320/640/1280/1280 -> 80/160/320/320 with 16 groups (80 is not a
/// multiple of 32), VAE 128/256/512/512 -> 32/64/128/128 keeping 32 groups.
fn scale_config(
    v: &Value,
    widths: &[usize],
    heads: &[usize],
    scale: f64,
) -> Result<(Value, Vec<String>)> {
    if scale == 1.0 {
        return Ok((v.clone(), vec![]));
    }
    if heads.len() != widths.len() || heads.contains(&0) {
        return Err(ModelError::Config(format!(
            "attention heads {heads:?} do not match block_out_channels {widths:?}"
        )));
    }
    let scaled: Vec<usize> = widths
        .iter()
        .zip(heads)
        .map(|(&w, &h)| {
            let q = lcm(8, h);
            let multiples = (w as f64 * scale / q as f64).round().max(1.0) as usize;
            multiples * q
        })
        .collect();
    let groups = v
        .get("norm_num_groups")
        .and_then(|x| x.as_u64())
        .unwrap_or(32) as usize;
    let new_groups = (1..=groups)
        .rev()
        .find(|&g| groups.is_multiple_of(g) && scaled.iter().all(|w| w.is_multiple_of(g)))
        .unwrap_or(1);
    let mut out = v.clone();
    let mut changed = vec![format!("block_out_channels {widths:?} -> {scaled:?}")];
    out["block_out_channels"] = Value::from(scaled);
    if new_groups != groups {
        out["norm_num_groups"] = Value::from(new_groups);
        changed.push(format!("norm_num_groups {groups} -> {new_groups}"));
    }
    Ok((out, changed))
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

fn lcm(a: usize, b: usize) -> usize {
    a / gcd(a, b) * b
}

fn save_drawn(w: &Weights, path: &Path) -> Result<usize> {
    let tensors: HashMap<String, Tensor> = w.drawn().into_iter().collect();
    let parameters = tensors.values().map(|t| t.elem_count()).sum();
    candle_core::safetensors::save(&tensors, path)
        .map_err(|e| ModelError::Io(path.to_path_buf(), e.to_string()))?;
    Ok(parameters)
}

fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => ModelError::MissingFile(path.to_path_buf()),
        _ => ModelError::Io(path.to_path_buf(), e.to_string()),
    })?;
    serde_json::from_str(&text)
        .map_err(|e| ModelError::Corrupt(path.display().to_string(), e.to_string()))
}

fn write_json(path: &Path, v: &Value) -> Result<()> {
    let text = serde_json::to_string_pretty(v)
        .map_err(|e| ModelError::Io(path.to_path_buf(), e.to_string()))?;
    std::fs::write(path, text + "\n").map_err(|e| ModelError::Io(path.to_path_buf(), e.to_string()))
}

fn create_dir(p: &Path) -> Result<()> {
    std::fs::create_dir_all(p).map_err(|e| ModelError::Io(p.to_path_buf(), e.to_string()))
}

fn copy_file(src: &Path, dst: &Path) -> Result<()> {
    // Copying the bytes (not fs::copy) drops the read-only mode of shared/ inputs, so a
    // second run can overwrite its own output.
    let bytes = std::fs::read(src).map_err(|e| ModelError::Io(src.to_path_buf(), e.to_string()))?;
    std::fs::write(dst, bytes).map_err(|e| ModelError::Io(dst.to_path_buf(), e.to_string()))
}

fn copy_dir_files(src: &Path, dst: &Path) -> Result<()> {
    create_dir(dst)?;
    let entries =
        std::fs::read_dir(src).map_err(|e| ModelError::Io(src.to_path_buf(), e.to_string()))?;
    for entry in entries {
        let path: PathBuf = entry
            .map_err(|e| ModelError::Io(src.to_path_buf(), e.to_string()))?
            .path();
        if path.is_file() {
            if let Some(name) = path.file_name() {
                copy_file(&path, &dst.join(name))?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(model: &str, component: &str) -> Value {
        let p = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../shared/configs")
            .join(model)
            .join(component)
            .join("config.json");
        serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
    }

    fn widths_and_groups(v: &Value) -> (Vec<u64>, u64) {
        let w = v["block_out_channels"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap())
            .collect();
        (
            w,
            v.get("norm_num_groups")
                .and_then(|g| g.as_u64())
                .unwrap_or(32),
        )
    }

    #[test]
    fn sd15_at_a_quarter_width() {
        let (unet, changed) =
            scale_unet_config(&config("stable-diffusion-v1-5", "unet"), 0.25).unwrap();
        assert_eq!(widths_and_groups(&unet), (vec![80, 160, 320, 320], 16));
        assert_eq!(changed.len(), 2);
        UNetConfig::from_json(&unet).unwrap();
        let (vae, _) = scale_vae_config(&config("stable-diffusion-v1-5", "vae"), 0.25).unwrap();
        assert_eq!(widths_and_groups(&vae), (vec![32, 64, 128, 128], 32));
        VaeConfig::from_json(&vae).unwrap();
    }

    #[test]
    fn sdxl_heads_stay_integral() {
        // 5/10/20 heads: each width must stay a multiple of its head count and of 8.
        for scale in [0.1, 0.25, 0.3, 0.5] {
            let (unet, _) =
                scale_unet_config(&config("stable-diffusion-xl-base-1.0", "unet"), scale).unwrap();
            UNetConfig::from_json(&unet).unwrap_or_else(|e| panic!("scale {scale}: {e}"));
        }
    }

    #[test]
    fn unit_scale_is_the_identity() {
        let src = config("stable-diffusion-v1-5", "unet");
        let (same, changed) = scale_unet_config(&src, 1.0).unwrap();
        assert_eq!(same, src);
        assert!(changed.is_empty());
    }

    #[test]
    fn weights_depend_on_seed_and_name_only() {
        let cfg = scale_unet_config(&config("stable-diffusion-v1-5", "unet"), 0.05)
            .unwrap()
            .0;
        let draw = |seed| {
            let w = Weights::random(seed, 0.02, &Device::Cpu, DType::F32);
            UNet2DConditionModel::new(UNetConfig::from_json(&cfg).unwrap(), &w).unwrap();
            w.drawn()
        };
        let (a, b, c) = (draw(1), draw(1), draw(2));
        let name = "down_blocks.0.resnets.0.conv1.weight";
        let vals = |m: &std::collections::BTreeMap<String, Tensor>| {
            m[name].flatten_all().unwrap().to_vec1::<f32>().unwrap()
        };
        assert_eq!(vals(&a), vals(&b));
        assert_ne!(vals(&a), vals(&c));
        let norm = a["down_blocks.0.resnets.0.norm1.weight"]
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert!(norm.iter().all(|&x| x == 1.0));
        let bias = a["down_blocks.0.resnets.0.conv1.bias"]
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert!(bias.iter().all(|&x| x == 0.0));
    }
}
