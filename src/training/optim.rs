//! AdamW (decoupled weight decay, as `torch.optim.AdamW`) and global-norm gradient clipping.

use candle_core::{backprop::GradStore, DType, Result, Tensor, Var};

#[derive(Debug, Clone, Copy)]
pub struct AdamWConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            lr: 1e-5,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 1e-2,
        }
    }
}

/// Per-parameter moments. `step` counts updates done (torch's `state['step']`).
pub struct AdamW {
    pub config: AdamWConfig,
    pub params: Vec<(String, Var)>,
    pub exp_avg: Vec<Tensor>,
    pub exp_avg_sq: Vec<Tensor>,
    pub step: usize,
}

impl AdamW {
    pub fn new(params: Vec<(String, Var)>, config: AdamWConfig) -> Result<Self> {
        let exp_avg = params
            .iter()
            .map(|(_, v)| v.as_tensor().zeros_like())
            .collect::<Result<Vec<_>>>()?;
        let exp_avg_sq = params
            .iter()
            .map(|(_, v)| v.as_tensor().zeros_like())
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            config,
            params,
            exp_avg,
            exp_avg_sq,
            step: 0,
        })
    }

    /// Applies one update with the given (already clipped) gradients, in parameter order.
    /// Moments are kept in f32 whatever the parameter dtype.
    pub fn update(&mut self, grads: &[Tensor], lr: f64) -> Result<()> {
        let c = self.config;
        self.step += 1;
        let t = self.step as i32;
        let bc1 = 1.0 - c.beta1.powi(t);
        let bc2 = 1.0 - c.beta2.powi(t);
        for (i, (_, var)) in self.params.iter().enumerate() {
            let g = grads[i].detach().to_dtype(DType::F32)?;
            let theta = var.as_tensor().detach().to_dtype(DType::F32)?;
            let theta = (theta * (1.0 - lr * c.weight_decay))?;
            let m = ((&self.exp_avg[i] * c.beta1)? + (&g * (1.0 - c.beta1))?)?;
            let v = ((&self.exp_avg_sq[i] * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
            let denom = ((&v / bc2)?.sqrt()? + c.eps)?;
            let theta = (theta - ((&m / bc1)? / denom)?.affine(lr, 0.0)?)?;
            var.set(&theta.to_dtype(var.dtype())?)?;
            self.exp_avg[i] = m;
            self.exp_avg_sq[i] = v;
        }
        Ok(())
    }
}

/// The gradients of `params` (zeros for a parameter the loss does not reach), their global L2
/// norm before clipping, and the clipped gradients (`clip_grad_norm_` semantics).
pub struct ClippedGrads {
    pub raw: Vec<Tensor>,
    pub clipped: Vec<Tensor>,
    pub norm: f64,
    pub clip_coef: f64,
}

pub fn collect_and_clip(
    params: &[(String, Var)],
    grads: &GradStore,
    max_norm: Option<f64>,
) -> Result<ClippedGrads> {
    clip(collect(params, grads)?, max_norm)
}

/// The f32 gradient of each parameter (zeros where the loss does not reach it).
pub fn collect(params: &[(String, Var)], grads: &GradStore) -> Result<Vec<Tensor>> {
    params
        .iter()
        .map(|(_, v)| match grads.get(v.as_tensor()) {
            // candle returns gradients still attached to the step's graph; AdamW keeps its
            // moments across steps, so an attached gradient would keep every step's graph alive.
            Some(g) => Ok(g.detach().to_dtype(DType::F32)?.detach()),
            None => v.as_tensor().detach().zeros_like()?.to_dtype(DType::F32),
        })
        .collect()
}

pub fn clip(raw: Vec<Tensor>, max_norm: Option<f64>) -> Result<ClippedGrads> {
    let mut sq = 0f64;
    for g in &raw {
        sq += g
            .sqr()?
            .sum_all()?
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()?;
    }
    let norm = sq.sqrt();
    let clip_coef = match max_norm {
        Some(m) => (m / (norm + 1e-6)).min(1.0),
        None => 1.0,
    };
    let clipped = if clip_coef < 1.0 {
        raw.iter()
            .map(|g| g * clip_coef)
            .collect::<Result<Vec<_>>>()?
    } else {
        raw.clone()
    };
    Ok(ClippedGrads {
        raw,
        clipped,
        norm,
        clip_coef,
    })
}
