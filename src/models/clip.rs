//! transformers' `CLIPTextModel` / `CLIPTextModelWithProjection`.

use super::nn::{attention, quick_gelu, AttentionMask, LayerNorm, Linear, LinearRegistry};
use super::weights::Weights;
use super::{ModelError, Result};
use candle_core::{DType, Device, Module, Tensor};
use serde_json::Value;
use std::path::Path;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    QuickGelu,
    Gelu,
}

impl Activation {
    /// transformers' `hidden_act` (default quick_gelu, OpenAI's CLIP).
    pub fn parse(name: Option<&str>, what: &str) -> Result<Self> {
        match name.unwrap_or("quick_gelu") {
            "quick_gelu" => Ok(Activation::QuickGelu),
            "gelu" => Ok(Activation::Gelu),
            o => Err(ModelError::Config(format!(
                "{what} config: hidden_act = {o} is not supported"
            ))),
        }
    }
}

#[derive(Debug, Clone)]
pub struct ClipTextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub max_position_embeddings: usize,
    pub layer_norm_eps: f64,
    pub hidden_act: Activation,
    pub eos_token_id: i64,
    pub projection_dim: Option<usize>,
    pub with_projection: bool,
}

impl ClipTextConfig {
    pub fn from_json(v: &Value) -> Result<Self> {
        let f = |k: &str| v.get(k).filter(|x| !x.is_null());
        let req = |k: &str| -> Result<usize> {
            f(k).and_then(|x| x.as_u64())
                .map(|x| x as usize)
                .ok_or_else(|| {
                    ModelError::Config(format!("text encoder config: missing or invalid {k}"))
                })
        };
        let hidden_act = Activation::parse(f("hidden_act").and_then(|x| x.as_str()), "text encoder")?;
        let with_projection = f("architectures")
            .and_then(|x| x.as_array())
            .map(|a| {
                a.iter()
                    .any(|e| e.as_str() == Some("CLIPTextModelWithProjection"))
            })
            .unwrap_or(false);
        let cfg = Self {
            vocab_size: req("vocab_size")?,
            hidden_size: req("hidden_size")?,
            intermediate_size: req("intermediate_size")?,
            num_hidden_layers: req("num_hidden_layers")?,
            num_attention_heads: req("num_attention_heads")?,
            max_position_embeddings: f("max_position_embeddings")
                .and_then(|x| x.as_u64())
                .unwrap_or(77) as usize,
            layer_norm_eps: f("layer_norm_eps").and_then(|x| x.as_f64()).unwrap_or(1e-5),
            hidden_act,
            eos_token_id: f("eos_token_id").and_then(|x| x.as_i64()).unwrap_or(2),
            projection_dim: f("projection_dim")
                .and_then(|x| x.as_u64())
                .map(|x| x as usize),
            with_projection,
        };
        if cfg.hidden_size % cfg.num_attention_heads != 0 {
            return Err(ModelError::Config(format!(
                "text encoder config: hidden_size {} is not divisible by num_attention_heads {}",
                cfg.hidden_size, cfg.num_attention_heads
            )));
        }
        Ok(cfg)
    }
}

/// The sizes of one pre-norm transformer layer, the same in CLIP's text and vision towers.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LayerSpec {
    pub hidden: usize,
    pub intermediate: usize,
    pub heads: usize,
    pub eps: f64,
    pub act: Activation,
}

pub(crate) struct EncoderLayer {
    layer_norm1: LayerNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    layer_norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    heads: usize,
    act: Activation,
}

impl EncoderLayer {
    pub(crate) fn new(w: &Weights, c: LayerSpec, reg: Option<&LinearRegistry>) -> Result<Self> {
        let h = c.hidden;
        let a = w.pp("self_attn");
        Ok(Self {
            layer_norm1: LayerNorm::new(&w.pp("layer_norm1"), h, c.eps)?,
            q: Linear::new(&a.pp("q_proj"), h, h, true, reg)?,
            k: Linear::new(&a.pp("k_proj"), h, h, true, reg)?,
            v: Linear::new(&a.pp("v_proj"), h, h, true, reg)?,
            out: Linear::new(&a.pp("out_proj"), h, h, true, reg)?,
            layer_norm2: LayerNorm::new(&w.pp("layer_norm2"), h, c.eps)?,
            fc1: Linear::new(&w.pp("mlp.fc1"), h, c.intermediate, true, reg)?,
            fc2: Linear::new(&w.pp("mlp.fc2"), c.intermediate, h, true, reg)?,
            heads: c.heads,
            act: c.act,
        })
    }

    pub(crate) fn forward(&self, x: &Tensor, mask: AttentionMask) -> candle_core::Result<Tensor> {
        let h = self.layer_norm1.forward(x)?;
        let a = attention(
            &self.q.forward(&h)?,
            &self.k.forward(&h)?,
            &self.v.forward(&h)?,
            self.heads,
            mask,
        )?;
        let x = (x + self.out.forward(&a)?)?;
        let h = self.fc1.forward(&self.layer_norm2.forward(&x)?)?;
        let h = match self.act {
            Activation::QuickGelu => quick_gelu(&h)?,
            Activation::Gelu => h.gelu_erf()?,
        };
        x + self.fc2.forward(&h)?
    }
}

pub struct ClipTextModel {
    pub config: ClipTextConfig,
    token_embedding: Tensor,
    position_embedding: Tensor,
    layers: Vec<EncoderLayer>,
    final_layer_norm: LayerNorm,
    text_projection: Option<Tensor>,
    /// The attention and MLP projections by name (`text_model.encoder.layers.0.self_attn.q_proj`),
    /// where a LoRA adapter's text-encoder part attaches.
    linears: LinearRegistry,
}

/// What the pipelines need from one text encoder pass.
pub struct ClipOutput {
    /// `final_layer_norm(last layer)`, `[B, 77, hidden]`
    pub last_hidden_state: Tensor,
    /// output of the second-to-last layer, no final norm (SDXL's conditioning)
    pub penultimate: Tensor,
    /// `text_projection(final_norm(last)[eos])` for WithProjection models, else the pooled
    /// hidden state at the eos token
    pub pooled: Tensor,
}

impl ClipTextModel {
    pub fn new(config: ClipTextConfig, w: &Weights) -> Result<Self> {
        let c = &config;
        let t = w.pp("text_model");
        let linears = LinearRegistry::default();
        let layers = (0..c.num_hidden_layers)
            .map(|i| {
                let spec = LayerSpec {
                    hidden: c.hidden_size,
                    intermediate: c.intermediate_size,
                    heads: c.num_attention_heads,
                    eps: c.layer_norm_eps,
                    act: c.hidden_act,
                };
                EncoderLayer::new(&t.pp(format!("encoder.layers.{i}")), spec, Some(&linears))
            })
            .collect::<Result<Vec<_>>>()?;
        let text_projection = if c.with_projection {
            let p = c.projection_dim.ok_or_else(|| {
                ModelError::Config("text encoder config: projection_dim missing".into())
            })?;
            Some(w.get((p, c.hidden_size), "text_projection.weight")?)
        } else {
            None
        };
        Ok(Self {
            token_embedding: t.get(
                (c.vocab_size, c.hidden_size),
                "embeddings.token_embedding.weight",
            )?,
            position_embedding: t.get(
                (c.max_position_embeddings, c.hidden_size),
                "embeddings.position_embedding.weight",
            )?,
            layers,
            final_layer_norm: LayerNorm::new(
                &t.pp("final_layer_norm"),
                c.hidden_size,
                c.layer_norm_eps,
            )?,
            text_projection,
            linears,
            config,
        })
    }

    pub fn linears(&self) -> &LinearRegistry {
        &self.linears
    }

    pub fn load_config(dir: &Path) -> Result<ClipTextConfig> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path)
            .map_err(|e| ModelError::Io(path.clone(), e.to_string()))?;
        let v: Value = serde_json::from_str(&text)
            .map_err(|e| ModelError::Corrupt(path.display().to_string(), e.to_string()))?;
        ClipTextConfig::from_json(&v)
    }

    pub fn load(dir: &Path, variant: Option<&str>, device: &Device, dtype: DType) -> Result<Self> {
        let config = Self::load_config(dir)?;
        let files = Weights::resolve_files(dir, "model", variant)?;
        Self::new(config, &Weights::from_files(&files, device, dtype)?)
    }

    /// `ids`: `[B, L]` u32 token ids.
    pub fn forward(&self, ids: &Tensor) -> candle_core::Result<ClipOutput> {
        let (b, l) = ids.dims2()?;
        let tok = self
            .token_embedding
            .index_select(&ids.flatten_all()?, 0)?
            .reshape((b, l, ()))?;
        let pos = self.position_embedding.narrow(0, 0, l)?;
        let mut x = tok.broadcast_add(&pos)?;
        let n = self.layers.len();
        let mut penultimate = x.clone();
        for (i, layer) in self.layers.iter().enumerate() {
            x = layer.forward(&x, AttentionMask::Causal)?;
            if i + 2 == n {
                penultimate = x.clone();
            }
        }
        if n == 1 {
            penultimate = tok.broadcast_add(&pos)?;
        }
        let last = self.final_layer_norm.forward(&x)?;
        // transformers' legacy rule when eos_token_id == 2: the eos position is argmax(ids),
        // i.e. the first 49407. Otherwise the first occurrence of eos_token_id.
        let ids_host: Vec<Vec<u32>> = ids.to_vec2()?;
        let eos: Vec<u32> = ids_host
            .iter()
            .map(|row| {
                if self.config.eos_token_id == 2 {
                    let max = *row.iter().max().unwrap_or(&0);
                    row.iter().position(|&t| t == max).unwrap_or(0) as u32
                } else {
                    row.iter()
                        .position(|&t| t as i64 == self.config.eos_token_id)
                        .unwrap_or(0) as u32
                }
            })
            .collect();
        let mut pooled_rows = Vec::with_capacity(b);
        for (i, &p) in eos.iter().enumerate() {
            pooled_rows.push(last.get(i)?.get(p as usize)?);
        }
        let mut pooled = Tensor::stack(&pooled_rows, 0)?;
        if let Some(p) = &self.text_projection {
            pooled = pooled.matmul(&p.t()?)?;
        }
        Ok(ClipOutput {
            last_hidden_state: last,
            penultimate,
            pooled,
        })
    }
}
