//! `dspo-server bench-serve`: images per second through the real HTTP server at several
//! client concurrencies, with batching off (max_batch = 1) and on, for each model given.
//!
//! Each configuration starts a fresh in-process server on loopback, sends one untimed warm-up
//! request, then for each concurrency C runs C client threads that send `requests` requests in
//! all (distinct prompts and seeds, same size/steps so they can batch) and measures the wall
//! time until the last response. The mean batch size comes from the server's own counters.

use crate::api::running::RunningServer;
use crate::config::{Config, ModelSpec};
use anyhow::{bail, Context};
use serde_json::{json, Value};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(clap::Args, Debug, Clone)]
pub struct BenchServeArgs {
    /// NAME=DIR, repeatable: every model is measured
    #[arg(long = "model", required = true)]
    pub models: Vec<String>,
    /// Client concurrencies
    #[arg(long, value_delimiter = ',', default_value = "1,4,8")]
    pub concurrency: Vec<usize>,
    /// Requests per concurrency level (at least the concurrency)
    #[arg(long, default_value_t = 16)]
    pub requests: usize,
    #[arg(long, default_value_t = 8)]
    pub steps: u32,
    /// Image side in pixels (default: the model's native size)
    #[arg(long)]
    pub size: Option<u32>,
    #[arg(long, default_value_t = 7.5)]
    pub guidance_scale: f64,
    /// max_batch when batching is on
    #[arg(long, default_value_t = 8)]
    pub max_batch: usize,
    #[arg(long, default_value_t = 10)]
    pub wait_ms: u64,
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Print one JSON object per measurement instead of a table
    #[arg(long)]
    pub json: bool,
}

struct Measurement {
    model: String,
    batching: bool,
    concurrency: usize,
    requests: usize,
    seconds: f64,
    mean_batch: f64,
    p50_ms: f64,
}

fn post_generate(agent: &ureq::Agent, url: &str, body: &Value) -> anyhow::Result<()> {
    match agent.post(url).send_json(body.clone()) {
        Ok(r) => {
            let v: Value = r.into_json()?;
            if v["images"].as_array().map(|a| a.len()) != Some(1) {
                bail!("unexpected response: {v}");
            }
            Ok(())
        }
        Err(ureq::Error::Status(code, r)) => {
            bail!("HTTP {code}: {}", r.into_string().unwrap_or_default())
        }
        Err(e) => bail!("{e}"),
    }
}

fn health_totals(agent: &ureq::Agent, server: &RunningServer) -> anyhow::Result<(u64, u64)> {
    let v: Value = agent.get(&server.url("/health")).call()?.into_json()?;
    let m = &v["models"][0];
    Ok((
        m["batches"].as_u64().unwrap_or(0),
        m["images_computed"].as_u64().unwrap_or(0),
    ))
}

fn measure(
    args: &BenchServeArgs,
    spec: &ModelSpec,
    batching: bool,
) -> anyhow::Result<Vec<Measurement>> {
    let mut config = Config::default();
    config.server.listen = "127.0.0.1:0".into();
    config.models.serve = vec![format!("{}={}", spec.name, spec.source)];
    config.models.device = args.device.clone();
    config.batching.max_batch = if batching { args.max_batch } else { 1 };
    config.batching.wait_ms = args.wait_ms;
    config.batching.queue_size = args.requests.max(64);
    config.limits.max_steps = config.limits.max_steps.max(args.steps);
    let server = RunningServer::start(config, None).context("starting the server")?;
    let agent = ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(3600))
        .build();
    let url = server.url("/generate");
    let body = |i: usize| {
        let mut b = json!({
            "prompt": format!("a shape number {i}"),
            "steps": args.steps,
            "guidance_scale": args.guidance_scale,
            "seed": i,
        });
        if let Some(s) = args.size {
            b["width"] = json!(s);
            b["height"] = json!(s);
        }
        b
    };
    post_generate(&agent, &url, &body(usize::MAX / 2)).context("warm-up request")?;
    let mut out = Vec::new();
    for &c in &args.concurrency {
        let total = args.requests.max(c);
        let (b0, i0) = health_totals(&agent, &server)?;
        let next = Arc::new(AtomicUsize::new(0));
        let start = Instant::now();
        let latencies: Vec<Vec<f64>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..c)
                .map(|_| {
                    let (next, agent, url) = (next.clone(), agent.clone(), url.clone());
                    let body = &body;
                    s.spawn(move || -> anyhow::Result<Vec<f64>> {
                        let mut lat = Vec::new();
                        loop {
                            let i = next.fetch_add(1, Ordering::SeqCst);
                            if i >= total {
                                return Ok(lat);
                            }
                            let t = Instant::now();
                            post_generate(&agent, &url, &body(i))?;
                            lat.push(t.elapsed().as_secs_f64() * 1e3);
                        }
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("client thread"))
                .collect::<anyhow::Result<Vec<_>>>()
        })?;
        let seconds = start.elapsed().as_secs_f64();
        let (b1, i1) = health_totals(&agent, &server)?;
        let mut all: Vec<f64> = latencies.into_iter().flatten().collect();
        all.sort_by(|a, b| a.total_cmp(b));
        let m = Measurement {
            model: spec.name.clone(),
            batching,
            concurrency: c,
            requests: total,
            seconds,
            mean_batch: (i1 - i0) as f64 / (b1 - b0).max(1) as f64,
            p50_ms: all[all.len() / 2],
        };
        if args.json {
            println!(
                "{}",
                json!({"model": m.model, "batching": m.batching, "max_batch": if batching { args.max_batch } else { 1 },
                       "concurrency": c, "requests": total, "seconds": seconds, "images_per_s": total as f64 / seconds,
                       "mean_batch": m.mean_batch, "p50_latency_ms": m.p50_ms})
            );
        } else {
            eprintln!(
                "{} batching={} c={c}: {:.2} images/s (mean batch {:.2})",
                m.model,
                if batching { "on" } else { "off" },
                total as f64 / seconds,
                m.mean_batch
            );
        }
        out.push(m);
    }
    server.stop()?;
    Ok(out)
}

pub fn run(args: &BenchServeArgs) -> anyhow::Result<()> {
    let specs: Vec<ModelSpec> = args
        .models
        .iter()
        .map(|m| ModelSpec::parse(m))
        .collect::<Result<_, _>>()?;
    let mut rows = Vec::new();
    for spec in &specs {
        for batching in [false, true] {
            rows.extend(measure(args, spec, batching)?);
        }
    }
    if args.json {
        return Ok(());
    }
    println!(
        "steps={}, guidance_scale={}, {} requests per level, max_batch={} wait_ms={} when batching is on, device={}\n",
        args.steps, args.guidance_scale, args.requests, args.max_batch, args.wait_ms, args.device
    );
    println!("| model | concurrency | batching off (images/s) | batching on (images/s) | gain | mean batch (on) | p50 latency off / on (ms) |");
    println!("|---|---|---|---|---|---|---|");
    for spec in &specs {
        for &c in &args.concurrency {
            let find = |b: bool| {
                rows.iter()
                    .find(|m| m.model == spec.name && m.batching == b && m.concurrency == c)
            };
            if let (Some(off), Some(on)) = (find(false), find(true)) {
                let (r_off, r_on) = (
                    off.requests as f64 / off.seconds,
                    on.requests as f64 / on.seconds,
                );
                println!(
                    "| {} | {c} | {r_off:.2} | {r_on:.2} | {:.2}x | {:.2} | {:.0} / {:.0} |",
                    spec.name,
                    r_on / r_off,
                    on.mean_batch,
                    off.p50_ms,
                    on.p50_ms
                );
            }
        }
    }
    Ok(())
}
