//! LoRA adapters in diffusers' file format (`save_lora_weights`): loading, attaching to a
//! UNet without merging, and saving.
//!
//! Accepted key layouts (UNet keys under an optional `unet.` prefix, text encoders' under
//! `text_encoder.` / `text_encoder_2.`):
//! * diffusers: `<module>.lora.down.weight` / `<module>.lora.up.weight`
//! * PEFT:      `<module>.lora_A.weight` / `<module>.lora_B.weight`
//! * old attention-processor files: `<attn>.processor.to_q_lora.down.weight`, ...
//! * kohya / AUTOMATIC1111: `lora_unet_<module>.lora_down.weight`, `.lora_up.weight` and a
//!   scalar `.alpha`, with `lora_te_` (`lora_te1_`, `lora_te2_` for SDXL) for the text
//!   encoders; module paths are flattened with `_` and 1x1-convolution factors have shape
//!   `[r, in, 1, 1]`.
//!
//! alpha comes from kohya's alpha tensors, else the header's `lora_adapter_metadata` (a JSON
//! string of PEFT's LoraConfig with keys prefixed by the network); without either alpha = rank,
//! as diffusers assumes.

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
    /// The UNet's modules.
    pub modules: BTreeMap<String, LoraModule>,
    /// The first and second text encoders' modules (`text_model.encoder.layers.0.self_attn.q_proj`).
    pub text_encoder: BTreeMap<String, LoraModule>,
    pub text_encoder_2: BTreeMap<String, LoraModule>,
    pub use_rslora: bool,
    /// The PEFT config as read from (or to be written to) the file, without `unet.` prefixes.
    pub peft_config: serde_json::Map<String, serde_json::Value>,
}

fn lerr(s: impl Into<String>) -> ModelError {
    ModelError::Lora(s.into())
}

/// Which network a LoRA matrix adapts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Target {
    Unet,
    TextEncoder,
    TextEncoder2,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Part {
    Down,
    Up,
    /// kohya's per-module alpha, a scalar tensor.
    Alpha,
}

/// Splits a key into (network, module path, part) when it is a LoRA tensor. kohya module
/// paths come back flat (`down_blocks_0_attentions_0_proj_in`) and are matched to layers at
/// attach time.
fn parse_key(key: &str) -> Option<(Target, String, Part)> {
    for (prefix, target) in [
        ("lora_unet_", Target::Unet),
        ("lora_te1_", Target::TextEncoder),
        ("lora_te2_", Target::TextEncoder2),
        ("lora_te_", Target::TextEncoder),
    ] {
        if let Some(rest) = key.strip_prefix(prefix) {
            for (suffix, part) in [
                (".lora_down.weight", Part::Down),
                (".lora_up.weight", Part::Up),
                (".alpha", Part::Alpha),
            ] {
                if let Some(m) = rest.strip_suffix(suffix) {
                    return Some((target, m.to_string(), part));
                }
            }
            return None;
        }
    }
    let (target, k) = if let Some(k) = key.strip_prefix("text_encoder_2.") {
        (Target::TextEncoder2, k)
    } else if let Some(k) = key.strip_prefix("text_encoder.") {
        (Target::TextEncoder, k)
    } else {
        (Target::Unet, key.strip_prefix("unet.").unwrap_or(key))
    };
    for (suffix, part) in [
        (".lora.down.weight", Part::Down),
        (".lora.up.weight", Part::Up),
        (".lora_A.weight", Part::Down),
        (".lora_B.weight", Part::Up),
        (".lora_A.default.weight", Part::Down),
        (".lora_B.default.weight", Part::Up),
        (".lora_linear_layer.down.weight", Part::Down),
        (".lora_linear_layer.up.weight", Part::Up),
    ] {
        if let Some(m) = k.strip_suffix(suffix) {
            return Some((target, m.to_string(), part));
        }
    }
    // Attention-processor layout: `attn1.processor.to_q_lora.down.weight`.
    for (proc_name, module) in [
        ("to_q_lora", "to_q"),
        ("to_k_lora", "to_k"),
        ("to_v_lora", "to_v"),
        ("to_out_lora", "to_out.0"),
    ] {
        for (suffix, part) in [(".down.weight", Part::Down), (".up.weight", Part::Up)] {
            let pat = format!(".processor.{proc_name}{suffix}");
            if let Some(m) = k.strip_suffix(&pat) {
                return Some((target, format!("{m}.{module}"), part));
            }
        }
    }
    None
}

/// A LoRA matrix as a 2-D tensor: 1x1-convolution factors (`[r, in, 1, 1]`, kohya's for SD
/// 1.x's `proj_in`/`proj_out`) are the same matrix; larger kernels (LoCon) are refused.
fn as_matrix(name: &str, t: Tensor) -> Result<Tensor> {
    match t.dims() {
        [_, _] => Ok(t),
        [a, b, 1, 1] => Ok(t.reshape((*a, *b))?),
        d => Err(lerr(format!(
            "{name}: shape {d:?} is a convolution LoRA with a kernel larger than 1x1 (LoCon), which is not supported"
        ))),
    }
}

/// Per-module factors of one network, paired from their down/up (and alpha) tensors.
fn pair_modules(
    downs: HashMap<String, (Tensor, String)>,
    mut ups: HashMap<String, (Tensor, String)>,
    alphas: &HashMap<String, f64>,
    config: &serde_json::Map<String, serde_json::Value>,
) -> Result<BTreeMap<String, LoraModule>> {
    let default_alpha = config.get("lora_alpha").and_then(|v| v.as_f64());
    let alpha_pattern = config
        .get("alpha_pattern")
        .and_then(|v| v.as_object())
        .cloned()
        .unwrap_or_default();
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
        let alpha = alphas
            .get(&module)
            .copied()
            .or(pattern_alpha)
            .or(default_alpha)
            .unwrap_or(r as f64);
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
    Ok(modules)
}

/// A model's layers indexed for resolving module names: dotted names, kohya's flat spellings
/// (`down_blocks_0_attentions_0_proj_in`), and the UNet's layers per block for kohya SDXL names
/// in the original layout. Built once per check or attach, so every module resolves by lookup.
struct LayerIndex<'a> {
    shapes: &'a BTreeMap<String, (usize, usize)>,
    /// Flat spelling -> dotted name; diffusers' dotted names map to flat ones one to one.
    flat: HashMap<String, &'a str>,
    /// The most attention places a down level has (None: no attention layers).
    layers_per_block: Option<usize>,
}

impl<'a> LayerIndex<'a> {
    fn new(shapes: &'a BTreeMap<String, (usize, usize)>) -> Self {
        let flat = shapes
            .keys()
            .map(|k| (k.replace('.', "_"), k.as_str()))
            .collect();
        let layers_per_block = shapes
            .keys()
            .filter_map(|k| {
                let p: Vec<&str> = k.split('.').collect();
                match p.as_slice() {
                    ["down_blocks", _, "attentions", j, ..] => j.parse::<usize>().ok(),
                    _ => None,
                }
            })
            .max()
            .map(|j| j + 1);
        Self {
            shapes,
            flat,
            layers_per_block,
        }
    }

    /// The dotted name and shape of the layer `name` denotes.
    fn resolve(&self, name: &str) -> Option<(&'a str, (usize, usize))> {
        let dotted = match self.shapes.get_key_value(name) {
            Some((k, _)) => k.as_str(),
            None => match self.flat.get(name) {
                Some(k) => *k,
                None => *self.flat.get(&self.original_to_diffusers_flat(name)?)?,
            },
        };
        Some((dotted, self.shapes[dotted]))
    }

    /// kohya's flat name of a UNet layer in the original layout (`input_blocks_4_1_<rest>`,
    /// `middle_block_1_<rest>`, `output_blocks_3_1_<rest>`) as the flat name of the diffusers
    /// layer.
    fn original_to_diffusers_flat(&self, name: &str) -> Option<String> {
        let block_and_rest = |kind: &str| -> Option<(String, String)> {
            let t = name.strip_prefix(kind)?.strip_prefix('_')?;
            if kind == "middle_block" {
                let (i, rest) = t.split_once('_')?;
                return Some((format!("{kind}.{i}"), rest.to_string()));
            }
            let mut it = t.splitn(3, '_');
            let (i, j, rest) = (it.next()?, it.next()?, it.next()?);
            Some((format!("{kind}.{i}.{j}"), rest.to_string()))
        };
        let (block, rest) = block_and_rest("input_blocks")
            .or_else(|| block_and_rest("output_blocks"))
            .or_else(|| block_and_rest("middle_block"))?;
        let dotted = super::single_file::unet_name(&format!("{block}.x"), self.layers_per_block?)?;
        Some(format!("{}_{rest}", dotted.strip_suffix(".x")?.replace('.', "_")))
    }
}

/// Every module names a layer of `shapes` and has that layer's shape: each module with the
/// dotted name of its layer.
fn check_modules<'m, 's>(
    modules: &'m BTreeMap<String, LoraModule>,
    shapes: &'s BTreeMap<String, (usize, usize)>,
    what: &str,
) -> Result<Vec<(&'s str, &'m LoraModule)>> {
    let index = LayerIndex::new(shapes);
    modules
        .iter()
        .map(|(name, m)| {
            let (dotted, (in_dim, out_dim)) = index
                .resolve(name)
                .ok_or_else(|| lerr(format!("module {name} does not exist in this {what}")))?;
            if m.down.dims()[1] != in_dim || m.up.dims()[0] != out_dim {
                return Err(lerr(format!(
                    "{name}: adapter shapes down {:?} up {:?} do not fit a {in_dim}->{out_dim} layer",
                    m.down.dims(),
                    m.up.dims()
                )));
            }
            Ok((dotted, m))
        })
        .collect()
}

/// Attaches `modules` to the layers of `registry`, clearing every other layer. Checks every
/// module before it changes anything.
fn attach_to(
    modules: &BTreeMap<String, LoraModule>,
    registry: &LinearRegistry,
    what: &str,
    factor: &dyn Fn(&LoraModule) -> f64,
    dtype: DType,
) -> Result<()> {
    let shapes = registry.shapes();
    let plan = check_modules(modules, &shapes, what)?;
    registry.clear_all();
    for (dotted, m) in plan {
        let (slot, _, _) = registry
            .get(dotted)
            .ok_or_else(|| lerr(format!("module {dotted} does not exist in this {what}")))?;
        slot.set(Some(LoraDelta {
            down: m.down.to_dtype(dtype)?,
            up: m.up.to_dtype(dtype)?,
            scale: factor(m),
        }));
    }
    Ok(())
}

/// The layers adapters can attach to in one model, by network: what an uploaded file is
/// checked against without touching the model itself.
#[derive(Clone, Debug, Default)]
pub struct LoraLayout {
    pub unet: BTreeMap<String, (usize, usize)>,
    /// One entry per text encoder the model has.
    pub text_encoders: Vec<BTreeMap<String, (usize, usize)>>,
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
        // diffusers writes one PEFT config per network, its keys prefixed by the network.
        let mut configs: [serde_json::Map<String, serde_json::Value>; 3] = Default::default();
        if let Some(m) = meta.metadata() {
            if let Some(s) = m.get("lora_adapter_metadata") {
                let v: serde_json::Value = serde_json::from_str(s)
                    .map_err(|e| lerr(format!("lora_adapter_metadata: {e}")))?;
                for (k, val) in v.as_object().into_iter().flatten() {
                    let (i, key) = if let Some(k) = k.strip_prefix("text_encoder_2.") {
                        (2, k)
                    } else if let Some(k) = k.strip_prefix("text_encoder.") {
                        (1, k)
                    } else {
                        (0, k.strip_prefix("unet.").unwrap_or(k))
                    };
                    configs[i].insert(key.to_string(), val.clone());
                }
            }
        }
        type Matrices = HashMap<String, (Tensor, String)>;
        let mut parts: [(Matrices, Matrices, HashMap<String, f64>); 3] = Default::default();
        for (name, view) in st.tensors() {
            let Some((target, module, part)) = parse_key(&name) else {
                continue;
            };
            let (downs, ups, alphas) = &mut parts[target as usize];
            let t = candle_core::safetensors::Load::load(&view, device)?.to_dtype(DType::F32)?;
            match part {
                Part::Alpha => {
                    let a = t.flatten_all()?.to_vec1::<f32>()?;
                    let [a] = a[..] else {
                        return Err(lerr(format!("{name}: alpha must be a single number")));
                    };
                    alphas.insert(module, a as f64);
                }
                Part::Down => {
                    downs.insert(module, (as_matrix(&name, t)?, name.to_string()));
                }
                Part::Up => {
                    ups.insert(module, (as_matrix(&name, t)?, name.to_string()));
                }
            }
        }
        if parts.iter().all(|(d, u, _)| d.is_empty() && u.is_empty()) {
            return Err(lerr(
                "no LoRA tensors found (expected keys like unet.<module>.lora.down.weight, \
                 <module>.lora_A.weight, or kohya's lora_unet_<module>.lora_down.weight)",
            ));
        }
        let [(d0, u0, a0), (d1, u1, a1), (d2, u2, a2)] = parts;
        let [c0, c1, c2] = configs;
        let modules = pair_modules(d0, u0, &a0, &c0)?;
        let text_encoder = pair_modules(d1, u1, &a1, &c1)?;
        let text_encoder_2 = pair_modules(d2, u2, &a2, &c2)?;
        let use_rslora = c0
            .get("use_rslora")
            .and_then(|v| v.as_bool())
            .unwrap_or(false);
        Ok(Self {
            modules,
            text_encoder,
            text_encoder_2,
            use_rslora,
            peft_config: c0,
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

    /// Attaches the UNet part of the adapter to `registry` with user scale `scale`; every
    /// other Linear is cleared. Fails before touching anything if a module is missing or
    /// mis-shaped.
    pub fn attach(&self, registry: &LinearRegistry, scale: f64, dtype: DType) -> Result<()> {
        attach_to(&self.modules, registry, "UNet", &|m| self.module_scale(m) * scale, dtype)
    }

    /// Attaches the text-encoder parts (`text_encoders[i]` is the model's i-th encoder's
    /// registry; None where the model has no such encoder), clearing the encoders' other
    /// layers. The text encoders' alpha is their own (kohya's alpha tensors, diffusers'
    /// per-network config), never rsLoRA-scaled.
    pub fn attach_text(
        &self,
        text_encoders: [Option<&LinearRegistry>; 2],
        scale: f64,
        dtype: DType,
    ) -> Result<()> {
        let factor = |m: &LoraModule| m.alpha / m.rank() as f64 * scale;
        for (i, (modules, registry)) in [&self.text_encoder, &self.text_encoder_2]
            .into_iter()
            .zip(text_encoders)
            .enumerate()
        {
            match registry {
                Some(reg) => attach_to(modules, reg, "text encoder", &factor, dtype)?,
                None if !modules.is_empty() => {
                    return Err(lerr(format!(
                        "the adapter has LoRA for text encoder {} but the model has none",
                        i + 1
                    )))
                }
                None => {}
            }
        }
        Ok(())
    }

    /// Whether every module of the adapter fits a layer of a model with `layout`.
    pub fn check_fits(&self, layout: &LoraLayout) -> Result<()> {
        check_modules(&self.modules, &layout.unet, "UNet")?;
        for (i, modules) in [&self.text_encoder, &self.text_encoder_2].into_iter().enumerate() {
            match layout.text_encoders.get(i) {
                Some(shapes) => {
                    check_modules(modules, shapes, "text encoder")?;
                }
                None if !modules.is_empty() => {
                    return Err(lerr(format!(
                        "the adapter has LoRA for text encoder {} but the model has none",
                        i + 1
                    )))
                }
                None => {}
            }
        }
        Ok(())
    }

    /// Whether the adapter changes a text encoder.
    pub fn has_text_encoder_lora(&self) -> bool {
        !self.text_encoder.is_empty() || !self.text_encoder_2.is_empty()
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
