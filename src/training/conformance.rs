//! Training kinds of the conformance suite.

use crate::conformance::Case;
use anyhow::{anyhow, bail, Result};
use candle_core::{Device, Tensor, Var};
use std::collections::HashMap;

use super::losses::{self, Method};
use super::noise::NoiseSchedule;

pub fn run(
    kind: &str,
    case: &Case,
    cache: &mut crate::conformance::ModelCache,
    device: &Device,
) -> Result<HashMap<String, Tensor>> {
    let mut out = HashMap::new();
    match kind {
        "add_noise" => {
            let dir = case.model.clone().ok_or_else(|| anyhow!("case names no model"))?;
            let _ = cache;
            let sched = NoiseSchedule::from_model_dir(&dir)?;
            let x0 = case.input("x0")?.to_device(device)?;
            let noise = case.input("noise")?.to_device(device)?;
            let t: Vec<i64> = case.input("timesteps")?.to_vec1()?;
            let t: Vec<usize> = t.iter().map(|&v| v as usize).collect();
            out.insert("noisy".into(), sched.add_noise(&x0, &noise, &t)?);
            out.insert("velocity".into(), sched.velocity(&x0, &noise, &t)?);
        }
        "dspo_loss" | "diffusion_dpo_loss" | "dspo_e_loss" | "sft_loss" => {
            let pred = Var::from_tensor(&case.input("model_pred")?.to_device(device)?)?;
            let target = case.input("target")?.to_device(device)?;
            let loss = if kind == "sft_loss" {
                losses::sft(pred.as_tensor(), &target)?
            } else {
                let refp = case.input("ref_pred")?.to_device(device)?;
                let beta = case.param_f64("beta")?;
                let method = match kind {
                    "dspo_loss" => Method::Dspo,
                    "diffusion_dpo_loss" => Method::DiffusionDpo,
                    _ => Method::DspoE,
                };
                let gamma = case.params.get("gamma").and_then(|v| v.as_f64()).unwrap_or(1.0);
                losses::preference(method, pred.as_tensor(), &refp, &target, beta, gamma)?.loss
            };
            let grads = loss.backward()?;
            let g = grads.get(pred.as_tensor()).ok_or_else(|| anyhow!("no gradient reached model_pred"))?;
            out.insert("grad_model_pred".into(), g.clone());
            out.insert("loss".into(), loss.reshape(1)?);
        }
        other => bail!("case kind '{other}' is not implemented"),
    }
    Ok(out)
}
