//! transformers' `CLIPModel`: the text tower (`clip::ClipTextModel`), the vision tower
//! (`CLIPVisionModelWithProjection`: patch embedding, class token, position embeddings,
//! pre-norm, encoder, post-norm of the class token, projection) and `logit_scale`. Read from
//! transformers' layout (`config.json` with `text_config`/`vision_config`, `model.safetensors`)
//! or open_clip's (`open_clip_config.json`, `open_clip_model.safetensors`, see `open_clip`).

use super::clip::{Activation, ClipTextConfig, ClipTextModel, EncoderLayer, LayerSpec};
use super::nn::{AttentionMask, LayerNorm};
use super::weights::Weights;
use super::{ModelError, Result};
use candle_core::{DType, Device, Module, Tensor};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::Path;

#[derive(Debug, Clone)]
pub struct ClipVisionConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub image_size: usize,
    pub patch_size: usize,
    pub num_channels: usize,
    pub layer_norm_eps: f64,
    pub hidden_act: Activation,
}

impl ClipVisionConfig {
    pub fn from_json(v: &Value) -> Result<Self> {
        let f = |k: &str| v.get(k).filter(|x| !x.is_null());
        let req = |k: &str| -> Result<usize> {
            f(k).and_then(|x| x.as_u64()).map(|x| x as usize).ok_or_else(|| {
                ModelError::Config(format!("vision config: missing or invalid {k}"))
            })
        };
        let cfg = Self {
            hidden_size: req("hidden_size")?,
            intermediate_size: req("intermediate_size")?,
            num_hidden_layers: req("num_hidden_layers")?,
            num_attention_heads: req("num_attention_heads")?,
            image_size: req("image_size")?,
            patch_size: req("patch_size")?,
            num_channels: f("num_channels").and_then(|x| x.as_u64()).unwrap_or(3) as usize,
            layer_norm_eps: f("layer_norm_eps").and_then(|x| x.as_f64()).unwrap_or(1e-5),
            hidden_act: Activation::parse(f("hidden_act").and_then(|x| x.as_str()), "vision")?,
        };
        if cfg.hidden_size % cfg.num_attention_heads != 0 || cfg.image_size % cfg.patch_size != 0 {
            return Err(ModelError::Config(format!(
                "vision config: hidden_size {} must divide into {} heads and image_size {} into \
                 patches of {}",
                cfg.hidden_size, cfg.num_attention_heads, cfg.image_size, cfg.patch_size
            )));
        }
        Ok(cfg)
    }

    fn patches_per_side(&self) -> usize {
        self.image_size / self.patch_size
    }
}

pub struct ClipVisionModel {
    pub config: ClipVisionConfig,
    /// `[hidden, channels * patch * patch]`: the patch convolution as a matrix.
    patch_embedding: Tensor,
    class_embedding: Tensor,
    position_embedding: Tensor,
    pre_layrnorm: LayerNorm,
    layers: Vec<EncoderLayer>,
    post_layernorm: LayerNorm,
    /// `[projection_dim, hidden]`.
    visual_projection: Tensor,
}

impl ClipVisionModel {
    pub fn new(config: ClipVisionConfig, projection_dim: usize, w: &Weights) -> Result<Self> {
        let c = &config;
        let (h, p) = (c.hidden_size, c.patch_size);
        let e = w.pp("vision_model.embeddings");
        let patch_embedding = e
            .get((h, c.num_channels, p, p), "patch_embedding.weight")?
            .reshape((h, c.num_channels * p * p))?;
        let n = c.patches_per_side() * c.patches_per_side() + 1;
        let spec = LayerSpec {
            hidden: h,
            intermediate: c.intermediate_size,
            heads: c.num_attention_heads,
            eps: c.layer_norm_eps,
            act: c.hidden_act,
        };
        let layers = (0..c.num_hidden_layers)
            .map(|i| EncoderLayer::new(&w.pp(format!("vision_model.encoder.layers.{i}")), spec, None))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            patch_embedding,
            class_embedding: e.get(h, "class_embedding")?,
            position_embedding: e.get((n, h), "position_embedding.weight")?,
            pre_layrnorm: LayerNorm::new(&w.pp("vision_model.pre_layrnorm"), h, c.layer_norm_eps)?,
            layers,
            post_layernorm: LayerNorm::new(&w.pp("vision_model.post_layernorm"), h, c.layer_norm_eps)?,
            visual_projection: w.get((projection_dim, h), "visual_projection.weight")?,
            config,
        })
    }

    /// `pixel_values [B, C, S, S]` (preprocessed) -> image embeddings `[B, projection_dim]`,
    /// unnormalised (`get_image_features`).
    pub fn forward(&self, pixel_values: &Tensor) -> candle_core::Result<Tensor> {
        let c = &self.config;
        let (b, ch, s, s2) = pixel_values.dims4()?;
        let (p, g) = (c.patch_size, c.patches_per_side());
        if ch != c.num_channels || s != c.image_size || s2 != c.image_size {
            candle_core::bail!(
                "pixel_values {:?}: the vision tower takes [B, {}, {}, {}]",
                pixel_values.dims(),
                c.num_channels,
                c.image_size,
                c.image_size
            );
        }
        // Non-overlapping patches, each flattened in (channel, row, column) order: the
        // convolution's weight order, so the stride-p convolution is one matmul.
        let patches = pixel_values
            .reshape((b, ch, g, p, g, p))?
            .permute((0, 2, 4, 1, 3, 5))?
            .reshape((b * g * g, ch * p * p))?;
        let tokens = patches
            .matmul(&self.patch_embedding.t()?)?
            .reshape((b, g * g, c.hidden_size))?;
        let cls = self
            .class_embedding
            .reshape((1, 1, c.hidden_size))?
            .broadcast_as((b, 1, c.hidden_size))?;
        let x = Tensor::cat(&[&cls, &tokens], 1)?.broadcast_add(&self.position_embedding)?;
        let mut x = self.pre_layrnorm.forward(&x)?;
        for layer in &self.layers {
            x = layer.forward(&x, AttentionMask::None)?;
        }
        let pooled = self.post_layernorm.forward(&x.narrow(1, 0, 1)?.squeeze(1)?)?;
        pooled.matmul(&self.visual_projection.t()?)
    }
}

/// Both towers and the learned temperature.
pub struct ClipModel {
    pub text: ClipTextModel,
    pub vision: ClipVisionModel,
    /// The raw parameter; similarities are scaled by its exponential.
    pub logit_scale: f64,
}

fn read_json(path: &Path) -> Result<Value> {
    let text =
        std::fs::read_to_string(path).map_err(|e| ModelError::Io(path.to_path_buf(), e.to_string()))?;
    serde_json::from_str(&text).map_err(|e| ModelError::Corrupt(path.display().to_string(), e.to_string()))
}

impl ClipModel {
    /// A directory in transformers' layout, or open_clip's (`open_clip_config.json`).
    pub fn load(dir: &Path, device: &Device, dtype: DType) -> Result<Self> {
        if dir.join("open_clip_config.json").exists() {
            return Self::load_open_clip(dir, device, dtype);
        }
        let config = read_json(&dir.join("config.json"))?;
        let files = Weights::resolve_files(dir, "model", None)?;
        Self::new(&config, &Weights::from_files(&files, device, dtype)?)
    }

    fn new(config: &Value, w: &Weights) -> Result<Self> {
        let projection_dim = config
            .get("projection_dim")
            .and_then(|v| v.as_u64())
            .ok_or_else(|| ModelError::Config("CLIP config: missing projection_dim".into()))?
            as usize;
        let mut text_json = config.get("text_config").cloned().unwrap_or(json!({}));
        text_json["projection_dim"] = json!(projection_dim);
        text_json["architectures"] = json!(["CLIPTextModelWithProjection"]);
        let text = ClipTextModel::new(ClipTextConfig::from_json(&text_json)?, w)?;
        let vision_json = config.get("vision_config").cloned().unwrap_or(json!({}));
        let vision = ClipVisionModel::new(ClipVisionConfig::from_json(&vision_json)?, projection_dim, w)?;
        let logit_scale = w
            .get((), "logit_scale")?
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()?;
        Ok(Self {
            text,
            vision,
            logit_scale,
        })
    }

    /// open_clip's checkpoint: its config turned into transformers' one, its tensors renamed.
    fn load_open_clip(dir: &Path, device: &Device, dtype: DType) -> Result<Self> {
        let file = read_json(&dir.join("open_clip_config.json"))?;
        // open_clip's `local-dir:` layout nests the model's config under model_cfg.
        let oc = file.get("model_cfg").cloned().unwrap_or(file);
        let get = |v: &Value, k: &str| v.get(k).and_then(|x| x.as_u64()).map(|x| x as usize);
        let missing = |k: &str| ModelError::Config(format!("open_clip_config.json: missing {k}"));
        let (vc, tc) = (&oc["vision_cfg"], &oc["text_cfg"]);
        let embed = get(&oc, "embed_dim").ok_or_else(|| missing("embed_dim"))?;
        let act = if oc.get("quick_gelu").and_then(|q| q.as_bool()).unwrap_or(false) {
            "quick_gelu"
        } else {
            "gelu"
        };
        let vw = get(vc, "width").ok_or_else(|| missing("vision_cfg.width"))?;
        let vheads = get(vc, "heads").unwrap_or(vw / get(vc, "head_width").unwrap_or(64));
        let mlp = |cfg: &Value, width: usize| {
            (cfg.get("mlp_ratio").and_then(|m| m.as_f64()).unwrap_or(4.0) * width as f64) as usize
        };
        let tw = get(tc, "width").ok_or_else(|| missing("text_cfg.width"))?;
        let config = json!({
            "projection_dim": embed,
            "text_config": {
                "vocab_size": get(tc, "vocab_size").unwrap_or(49408),
                "hidden_size": tw,
                "intermediate_size": mlp(tc, tw),
                "num_hidden_layers": get(tc, "layers").ok_or_else(|| missing("text_cfg.layers"))?,
                "num_attention_heads": get(tc, "heads").unwrap_or(tw / 64),
                "max_position_embeddings": get(tc, "context_length").unwrap_or(77),
                "hidden_act": act,
                // The end-of-text position is the largest id, as open_clip's argmax pooling.
                "eos_token_id": 2,
            },
            "vision_config": {
                "hidden_size": vw,
                "intermediate_size": mlp(vc, vw),
                "num_hidden_layers": get(vc, "layers").ok_or_else(|| missing("vision_cfg.layers"))?,
                "num_attention_heads": vheads,
                "image_size": get(vc, "image_size").ok_or_else(|| missing("vision_cfg.image_size"))?,
                "patch_size": get(vc, "patch_size").ok_or_else(|| missing("vision_cfg.patch_size"))?,
                "hidden_act": act,
            },
        });
        let file = dir.join("open_clip_model.safetensors");
        let raw = candle_core::safetensors::load(&file, device)
            .map_err(|e| ModelError::Corrupt(file.display().to_string(), e.to_string()))?;
        let mut renamed: HashMap<String, Tensor> = HashMap::new();
        for (k, t) in raw {
            if let Some(v) = k.strip_prefix("visual.") {
                super::open_clip::vision_tower(v, t, &mut renamed)?;
            } else if k == "logit_scale" {
                renamed.insert(k, t);
            } else {
                super::open_clip::text_tower(&k, t, &mut renamed)?;
            }
        }
        Self::new(&config, &Weights::from_map(renamed, device, dtype))
    }

    /// Image embeddings of preprocessed pixels, unnormalised.
    pub fn image_embeds(&self, pixel_values: &Tensor) -> candle_core::Result<Tensor> {
        self.vision.forward(pixel_values)
    }

    /// Text embeddings of token ids `[B, L]`, unnormalised (`get_text_features`).
    pub fn text_embeds(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        Ok(self.text.forward(ids)?.pooled)
    }
}
