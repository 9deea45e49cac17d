//! Training losses, each a pure function of tensors (as the official DSPO / Diffusion-DPO code
//! computes them). A preference batch holds `2B` rows: winners `0..B`, losers `B..2B`.

use crate::models::nn::sigmoid;
use candle_core::{Result, Tensor};

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Method {
    /// Official DSPO (SD1.5 branch): score matching toward the preference-tilted score.
    Dspo,
    /// Diffusion-DPO: `-log sigmoid(u)`.
    DiffusionDpo,
    /// Plain denoising loss on the winners.
    Sft,
    /// The paper's energy-based variant (Eq. 45), constant weight, losers unused.
    DspoE,
    /// Diffusion-KTO (Li et al. 2024, its official sigmoid utility): each image on its own,
    /// winners desirable and losers undesirable; `1 - sigmoid(±beta * (g - z0))` with
    /// `g = reference error - model error` and the reference point `z0 = max(mean(g), 0)`.
    DiffusionKto,
    /// Official DSPO's SDXL branch (`--sdxl`): no denoising target; while the winners' policy
    /// and reference predictions differ by a mean square of at least 0.1 it pulls the policy
    /// toward the reference weighted by `1 - sigmoid(u)`, below that it minimises
    /// `(1 - sigmoid(u))^2` alone. Its launcher's beta is 5000.
    DspoSdxl,
}

/// The official SDXL branch switches form where the winners' mean squared policy-reference
/// difference reaches this.
const DSPO_SDXL_SWITCH: f64 = 0.1;

impl Method {
    pub fn needs_reference(&self) -> bool {
        !matches!(self, Method::Sft)
    }
    pub fn name(&self) -> &'static str {
        match self {
            Method::Dspo => "dspo",
            Method::DiffusionDpo => "diffusion_dpo",
            Method::Sft => "sft",
            Method::DspoE => "dspo_e",
            Method::DiffusionKto => "diffusion_kto",
            Method::DspoSdxl => "dspo_sdxl",
        }
    }
}

impl std::str::FromStr for Method {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "dspo" => Ok(Method::Dspo),
            "diffusion_dpo" | "dpo" => Ok(Method::DiffusionDpo),
            "sft" => Ok(Method::Sft),
            "dspo_e" => Ok(Method::DspoE),
            "diffusion_kto" | "kto" => Ok(Method::DiffusionKto),
            "dspo_sdxl" => Ok(Method::DspoSdxl),
            o => Err(format!(
                "unknown method '{o}' (known: dspo, diffusion_dpo, sft, dspo_e, diffusion_kto, \
                 dspo_sdxl)"
            )),
        }
    }
}

/// Mean over every dimension but the first: `[N, ...] -> [N]`.
pub fn mean_chw(x: &Tensor) -> Result<Tensor> {
    x.flatten_from(1)?.mean(1)
}

/// `softplus(x) = max(x, 0) + log(1 + exp(-|x|))`, stable for large |x|.
pub fn softplus(x: &Tensor) -> Result<Tensor> {
    x.relu()? + (x.abs()?.neg()?.exp()? + 1.0)?.log()?
}

pub struct PreferenceLoss {
    pub loss: Tensor,
    /// `u = -0.5 * beta * ((m_w - m_l) - (r_w - r_l))`, `[B]`, with gradient.
    pub u: Tensor,
}

impl PreferenceLoss {
    /// Share of pairs with `u > 0`: the model prefers the winner more than the reference does.
    pub fn implicit_accuracy(&self) -> Result<f64> {
        let u: Vec<f32> = self.u.to_dtype(candle_core::DType::F32)?.to_vec1()?;
        Ok(u.iter().filter(|&&x| x > 0.0).count() as f64 / u.len().max(1) as f64)
    }
}

/// Pair losses (`Dspo`, `DiffusionDpo`, `DspoE`, and `DiffusionKto` on the pair's two images
/// as one desirable and one undesirable sample). `gamma` scales the DSPO-E outer coefficient.
pub fn preference(
    method: Method,
    model_pred: &Tensor,
    ref_pred: &Tensor,
    target: &Tensor,
    beta: f64,
    gamma: f64,
) -> Result<PreferenceLoss> {
    let n = model_pred.dim(0)?;
    if n % 2 != 0 {
        candle_core::bail!("a preference batch needs an even number of rows, got {n}");
    }
    let b = n / 2;
    let d = (model_pred - target)?;
    let m = mean_chw(&d.sqr()?)?;
    let r = mean_chw(&(ref_pred - target)?.sqr()?)?.detach();
    let (m_w, m_l) = (m.narrow(0, 0, b)?, m.narrow(0, b, b)?);
    let (r_w, r_l) = (r.narrow(0, 0, b)?, r.narrow(0, b, b)?);
    let u = (((m_w - m_l)? - (r_w - r_l)?)? * (-0.5 * beta))?;
    let d_w = d.narrow(0, 0, b)?;
    let p = (model_pred.narrow(0, 0, b)? - ref_pred.narrow(0, 0, b)?.detach())?;
    let mut wshape = vec![1usize; model_pred.rank()];
    wshape[0] = b;
    let loss = match method {
        Method::Dspo => {
            let w = ((sigmoid(&u)?.neg()? + 1.0)? * beta)?.reshape(wshape.as_slice())?;
            (d_w - p.broadcast_mul(&w)?)?.sqr()?.mean_all()?
        }
        Method::DspoE => (d_w - (p * (gamma * beta))?)?.sqr()?.mean_all()?,
        Method::DspoSdxl => {
            let w = (sigmoid(&u)?.neg()? + 1.0)?;
            let spread = p.sqr()?.mean_all()?.detach();
            let spread = spread.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
            if spread >= DSPO_SDXL_SWITCH {
                p.broadcast_mul(&w.reshape(wshape.as_slice())?)?.sqr()?.mean_all()?
            } else {
                w.sqr()?.mean_all()?
            }
        }
        Method::DiffusionDpo => softplus(&u.neg()?)?.mean_all()?,
        Method::DiffusionKto => {
            let desirable: Vec<bool> = (0..n).map(|i| i < b).collect();
            kto(model_pred, ref_pred, target, beta, &desirable)?.loss
        }
        Method::Sft => candle_core::bail!("sft is not a pair loss; use losses::sft"),
    };
    Ok(PreferenceLoss { loss, u })
}

/// Diffusion-KTO on images judged one by one: row `i` is desirable or not. Per image, the
/// implicit reward `g = reference error - model error` is shifted by the batch's reference
/// point `z0 = max(mean g, 0)` (not differentiated, as the official trainer does), and the loss
/// is `mean(1 - sigmoid(±beta (g - z0)))`. `u` is `±beta (g - z0)` per row: positive where
/// the model already treats the image as its label says.
pub fn kto(
    model_pred: &Tensor,
    ref_pred: &Tensor,
    target: &Tensor,
    beta: f64,
    desirable: &[bool],
) -> Result<PreferenceLoss> {
    let n = model_pred.dim(0)?;
    if desirable.len() != n {
        candle_core::bail!("{} labels for {n} rows", desirable.len());
    }
    let m = mean_chw(&(model_pred - target)?.sqr()?)?;
    let r = mean_chw(&(ref_pred - target)?.sqr()?)?.detach();
    let g = (r - &m)?;
    let z0 = g
        .mean_all()?
        .detach()
        .to_dtype(candle_core::DType::F64)?
        .to_scalar::<f64>()?
        .max(0.0);
    let sign: Vec<f32> = desirable.iter().map(|&d| if d { 1.0 } else { -1.0 }).collect();
    let sign = Tensor::from_vec(sign, n, g.device())?.to_dtype(g.dtype())?;
    let u = ((g - z0)? * sign)?.affine(beta, 0.0)?;
    let loss = (sigmoid(&u)?.neg()? + 1.0)?.mean_all()?;
    Ok(PreferenceLoss { loss, u })
}

/// `mean((model_pred - target)^2)` over all elements.
pub fn sft(model_pred: &Tensor, target: &Tensor) -> Result<Tensor> {
    (model_pred - target)?.sqr()?.mean_all()
}

/// Per-sample MSE (mean over all but the batch dimension) times `weights` (one per sample),
/// averaged over the batch: diffusers' Min-SNR-γ loss. Equal weights of 1 give `sft`.
pub fn weighted_mse(model_pred: &Tensor, target: &Tensor, weights: &Tensor) -> Result<Tensor> {
    let b = model_pred.dim(0)?;
    let per_sample = (model_pred - target)?.sqr()?.reshape((b, ()))?.mean(1)?;
    (per_sample * weights)?.mean_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn weighted_mse_is_the_batch_mean_of_weighted_per_sample_mses() {
        let pred: Vec<f32> = vec![0.5, -1.0, 2.0, 0.0, 1.5, -0.5, 3.0, 1.0];
        let target: Vec<f32> = vec![0.0, 1.0, 1.0, 1.0, -0.5, 0.5, 2.0, 2.0];
        let w = [0.25f32, 3.0];
        let mut expected = 0.0f64;
        for (i, wi) in w.iter().enumerate() {
            let se: f64 = (0..4)
                .map(|j| (pred[i * 4 + j] as f64 - target[i * 4 + j] as f64).powi(2))
                .sum();
            expected += *wi as f64 * se / 4.0;
        }
        expected /= 2.0;
        let d = Device::Cpu;
        let p = Tensor::from_vec(pred, (2, 1, 2, 2), &d).unwrap();
        let t = Tensor::from_vec(target, (2, 1, 2, 2), &d).unwrap();
        let got = weighted_mse(&p, &t, &Tensor::new(&w, &d).unwrap())
            .unwrap()
            .to_scalar::<f32>()
            .unwrap() as f64;
        assert!((got - expected).abs() < 1e-6, "{got} vs {expected}");
        let ones = weighted_mse(&p, &t, &Tensor::new(&[1f32, 1.0], &d).unwrap())
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let plain = sft(&p, &t).unwrap().to_scalar::<f32>().unwrap();
        assert!((ones - plain).abs() < 1e-6);
    }
}
