//! Training kinds of the conformance suite: noise, losses, one optimiser step, LoRA and
//! full fine-tuning, each against the float64 reference of the Python trainer.

use super::{Case, ModelCache};
use anyhow::{anyhow, bail, Result};
use candle_core::{Device, Tensor, Var};
use std::collections::HashMap;

use crate::training::losses::{self, Method};
use crate::training::noise::NoiseSchedule;
use crate::training::optim::{collect_and_clip, AdamW, AdamWConfig};
use crate::training::step::{batch_loss, Batch, Reference};
use crate::models::lora::LoraAdapter;
use crate::models::nn::LoraDelta;
use crate::models::unet::UNet2DConditionModel;
use crate::models::weights::{VarRegistry, Weights};
use candle_core::DType;

pub fn run(
    kind: &str,
    case: &Case,
    cache: &mut ModelCache,
    device: &Device,
) -> Result<HashMap<String, Tensor>> {
    let mut out = HashMap::new();
    match kind {
        "add_noise" => {
            let dir = case
                .model
                .clone()
                .ok_or_else(|| anyhow!("case names no model"))?;
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
                let gamma = case
                    .params
                    .get("gamma")
                    .and_then(|v| v.as_f64())
                    .unwrap_or(1.0);
                losses::preference(method, pred.as_tensor(), &refp, &target, beta, gamma)?.loss
            };
            let grads = loss.backward()?;
            let g = grads
                .get(pred.as_tensor())
                .ok_or_else(|| anyhow!("no gradient reached model_pred"))?;
            out.insert("grad_model_pred".into(), g.clone());
            out.insert("loss".into(), loss.reshape(1)?);
        }
        "train_step" | "train_step_lora" => {
            return train_step(kind == "train_step_lora", case, device)
        }
        other => bail!("case kind '{other}' is not implemented"),
    }
    Ok(out)
}

/// One optimiser step (sections 11.5 / 11.6 of the suite's README).
fn train_step(lora: bool, case: &Case, device: &Device) -> Result<HashMap<String, Tensor>> {
    let dir = case
        .model
        .clone()
        .ok_or_else(|| anyhow!("case names no model"))?;
    let unet_dir = dir.join("unet");
    let schedule = NoiseSchedule::from_model_dir(&dir)?;
    let method: Method = case
        .param_str("method")
        .unwrap_or_default()
        .parse()
        .map_err(|e: String| anyhow!(e))?;
    let beta = case
        .params
        .get("beta")
        .and_then(|v| v.as_f64())
        .unwrap_or(0.0);
    let betas = case
        .params
        .get("adam_betas")
        .and_then(|v| v.as_array())
        .cloned()
        .unwrap_or_default();
    let cfg = AdamWConfig {
        lr: case.param_f64("lr")?,
        beta1: betas.first().and_then(|v| v.as_f64()).unwrap_or(0.9),
        beta2: betas.get(1).and_then(|v| v.as_f64()).unwrap_or(0.999),
        eps: case.param_f64("adam_eps")?,
        weight_decay: case.param_f64("weight_decay")?,
    };
    let max_norm = case.params.get("max_grad_norm").and_then(|v| v.as_f64());
    let ts: Vec<i64> = case.input("timesteps")?.to_vec1()?;
    let batch = Batch {
        x0: case.input("x0")?.to_device(device)?,
        noise: case.input("noise")?.to_device(device)?,
        timesteps: ts.iter().map(|&t| t as usize).collect(),
        encoder_hidden_states: case.input("encoder_hidden_states")?.to_device(device)?,
        added: None,
        image_latents: None,
        labels: None,
    };
    let config = UNet2DConditionModel::load_config(&unet_dir)?;
    let files = UNet2DConditionModel::weight_files(&unet_dir, None)?;
    let mut out = HashMap::new();

    // Parameters, the model they drive, and the names the case uses for them.
    // The trainer's default path: blocks checkpointed, their gradients recomputed.
    let _checkpointing = crate::models::checkpoint::enable(device)?;
    let (params, roles, loss_out) = if lora {
        let unet =
            UNet2DConditionModel::new(config, &Weights::from_files(&files, device, DType::F32)?)?;
        let adapter = LoraAdapter::load(&case.file("input_files", "lora")?, device)?;
        let mut params = Vec::new();
        let mut roles = Vec::new();
        for (module, m) in &adapter.modules {
            let (slot, _, _) = unet
                .linears()
                .get(module)
                .ok_or_else(|| anyhow!("module {module} not in the UNet"))?;
            let down = Var::from_tensor(&m.down)?;
            let up = Var::from_tensor(&m.up)?;
            slot.set(Some(LoraDelta {
                down: down.as_tensor().clone(),
                up: up.as_tensor().clone(),
                scale: adapter.module_scale(m),
            }));
            params.push((m.down_key.clone(), down));
            params.push((m.up_key.clone(), up));
            roles.push(m.down_key.clone());
            roles.push(m.up_key.clone());
        }
        let l = batch_loss(
            &unet,
            Reference::AdaptersOff,
            &schedule,
            &batch,
            method,
            beta,
            0.0,
        )?;
        (params, roles, l)
    } else {
        let reference = UNet2DConditionModel::new(
            config.clone(),
            &Weights::from_files(&files, device, DType::F32)?,
        )?;
        let theta0 = case.inputs_with_prefix("theta0.")?;
        let reg = VarRegistry::default();
        let w = Weights::from_map(theta0.into_iter().collect(), device, DType::F32)
            .trainable(reg.clone());
        let policy = UNet2DConditionModel::new(config, &w)?;
        let l = batch_loss(
            &policy,
            Reference::Model(&reference),
            &schedule,
            &batch,
            method,
            beta,
            0.0,
        )?;
        let params = reg.all();
        let roles = params.iter().map(|(n, _)| n.clone()).collect();
        (params, roles, l)
    };
    let grads = crate::models::checkpoint::backward(&loss_out.loss)?;
    let clipped = collect_and_clip(&params, &grads, max_norm)?;
    let mut opt = AdamW::new(params.clone(), cfg)?;
    if let Some(state) = case.params.get("adam_state").filter(|v| !v.is_null()) {
        opt.step = state["step"].as_u64().unwrap_or(0) as usize;
        let m = state["exp_avg"].as_f64().unwrap_or(0.0);
        let v = state["exp_avg_sq"].as_f64().unwrap_or(0.0);
        for i in 0..params.len() {
            opt.exp_avg[i] = (opt.exp_avg[i].ones_like()? * m)?;
            opt.exp_avg_sq[i] = (opt.exp_avg_sq[i].ones_like()? * v)?;
        }
    }
    opt.update(&clipped.clipped, cfg.lr)?;
    let (gprefix, tprefix) = if lora {
        ("grad.", "lora1.")
    } else {
        ("grad.", "theta1.")
    };
    for (i, role) in roles.iter().enumerate() {
        out.insert(format!("{gprefix}{role}"), clipped.raw[i].clone());
        out.insert(format!("{tprefix}{role}"), params[i].1.as_tensor().detach());
    }
    out.insert(
        "loss".into(),
        loss_out.loss.to_dtype(DType::F32)?.reshape(1)?,
    );
    out.insert(
        "grad_norm".into(),
        Tensor::new(&[clipped.norm as f32], device)?,
    );
    Ok(out)
}
