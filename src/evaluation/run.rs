//! One evaluation: every prompt drawn with the same seeds by side A and side B (two adapters of
//! one served model, or an adapter and the base model), every image scored by each reward
//! model against its prompt, then win rates per reward. Images come from a caller-supplied
//! generator (the server passes its model worker, so evaluations run the same pipeline as
//! requests), which keeps this module free of any serving concern.

use super::{cross_seed, win_rate, Scores};
use crate::models::rewards::RewardModel;
use crate::server::{AdapterChoice, GenerationTask};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// What to compare. `template` is a validated task (size, steps, guidance, scheduler, mode);
/// each prompt of each side runs as a copy with its prompt, seeds and adapter.
pub struct Plan {
    pub template: GenerationTask,
    pub prompts: Vec<String>,
    /// Edits: one input image per prompt, at the task's size.
    pub images: Option<Vec<std::sync::Arc<image::RgbImage>>>,
    pub seeds: usize,
    pub a: Option<AdapterChoice>,
    pub b: Option<AdapterChoice>,
    /// |score difference| at or below this is a tie.
    pub tie_eps: f64,
}

impl Plan {
    /// Prompt `i`, seed index `k`: seed `i * 1000 + k`, as `dspo-server eval` draws them.
    pub fn seed(i: usize, k: usize) -> u64 {
        (i * 1000 + k) as u64
    }

    pub fn total_images(&self) -> usize {
        2 * self.prompts.len() * self.seeds
    }
}

/// One scored image pair of the same prompt and seed.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Row {
    pub prompt_index: usize,
    pub prompt: String,
    pub seed: u64,
    /// reward -> [A's score, B's score]
    pub scores: BTreeMap<String, [f64; 2]>,
}

/// Win rates of A over B under one reward.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RewardResult {
    pub n: usize,
    pub wins: usize,
    pub ties: usize,
    pub losses: usize,
    pub winrate: f64,
    /// Half-width of the 95% interval (normal approximation); null for n < 2.
    pub ci95: Option<f64>,
    pub mean_a: f64,
    pub mean_b: f64,
    /// A's image of seed k against B's of seed k + 1 (independent draws); with two or more
    /// seeds.
    pub unpaired: Option<Box<RewardResult>>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Outcome {
    pub rewards: BTreeMap<String, RewardResult>,
    pub rows: Vec<Row>,
}

fn result_of(v: &serde_json::Value) -> RewardResult {
    let u = |k: &str| v[k].as_u64().unwrap_or(0) as usize;
    let f = |k: &str| v[k].as_f64();
    RewardResult {
        n: u("n"),
        wins: u("wins"),
        ties: u("ties"),
        losses: u("losses"),
        winrate: f("winrate").unwrap_or(f64::NAN),
        ci95: f("ci95").filter(|c| c.is_finite()),
        mean_a: v["a"]["mean_reward"].as_f64().unwrap_or(f64::NAN),
        mean_b: v["b"]["mean_reward"].as_f64().unwrap_or(f64::NAN),
        unpaired: None,
    }
}

/// Runs `plan`. `generate` computes one task's images (in seed order); `progress(done, total)`
/// is called after every task and scoring pass, and returning false stops the evaluation.
pub fn run(
    plan: &Plan,
    generate: &dyn Fn(GenerationTask) -> Result<Vec<image::RgbImage>, String>,
    rewards: &[(String, &RewardModel)],
    progress: &mut dyn FnMut(usize, usize) -> bool,
) -> Result<Option<Outcome>, String> {
    let total = plan.total_images();
    let mut done = 0;
    // side -> prompt -> images in seed order
    let mut images: [Vec<Vec<image::RgbImage>>; 2] = [Vec::new(), Vec::new()];
    for (side, adapter) in [&plan.a, &plan.b].into_iter().enumerate() {
        for (i, prompt) in plan.prompts.iter().enumerate() {
            let mut task = plan.template.clone();
            task.prompt.prompt = prompt.clone();
            task.seeds = (0..plan.seeds).map(|k| Plan::seed(i, k)).collect();
            task.adapter = adapter.clone();
            task.image = plan.images.as_ref().map(|imgs| imgs[i].clone());
            let out = generate(task)?;
            if out.len() != plan.seeds {
                return Err(format!("{} images for {} seeds", out.len(), plan.seeds));
            }
            images[side].push(out);
            done += plan.seeds;
            if !progress(done, total) {
                return Ok(None);
            }
        }
    }
    let mut rows: Vec<Row> = (0..plan.prompts.len())
        .flat_map(|i| {
            (0..plan.seeds).map(move |k| (i, k))
        })
        .map(|(i, k)| Row {
            prompt_index: i,
            prompt: plan.prompts[i].clone(),
            seed: Plan::seed(i, k),
            scores: BTreeMap::new(),
        })
        .collect();
    let mut results = BTreeMap::new();
    for (name, model) in rewards {
        let mut sides: [Scores; 2] = [Scores::new(), Scores::new()];
        for (side, scores) in sides.iter_mut().enumerate() {
            for (i, per_prompt) in images[side].iter().enumerate() {
                let prompts: Vec<&str> = vec![plan.prompts[i].as_str(); per_prompt.len()];
                let s = model.score(per_prompt, &prompts).map_err(|e| format!("{name}: {e}"))?;
                for (k, v) in s.into_iter().enumerate() {
                    scores.insert(format!("{i:04}_{k}"), (v, BTreeMap::new()));
                    rows[i * plan.seeds + k]
                        .scores
                        .entry(name.clone())
                        .or_insert([f64::NAN; 2])[side] = v;
                }
            }
            if !progress(done, total) {
                return Ok(None);
            }
        }
        let mut r = result_of(&win_rate(&sides[0], &sides[1], plan.tie_eps));
        if plan.seeds >= 2 {
            let u = result_of(&win_rate(&sides[0], &cross_seed(&sides[1], plan.seeds), plan.tie_eps));
            r.unpaired = Some(Box::new(u));
        }
        results.insert(name.clone(), r);
    }
    Ok(Some(Outcome {
        rewards: results,
        rows,
    }))
}
