#!/usr/bin/env python3
"""The PyTorch side of `dspo-server bench-train`: same flags, same JSON line.

One optimiser step, as src/cli/bench_train.rs times it: synthetic latents x0 [2P, C, R/8, R/8]
(winners then losers), one noise draw and one timestep per pair shared by both rows, random
encoder_hidden_states [P, 77, D] shared by the pair; DDPMScheduler.add_noise; the policy UNet on
the 2P rows (sft: the winner half only); the frozen reference on the same rows without grad
(LoRA: the same UNet with the adapters disabled, full: a frozen deepcopy); the loss; backward;
clip_grad_norm_ at 1.0; AdamW (lr 1e-5, weight decay 1e-2). One untimed warm-up step, then
`--steps` timed steps; median and min. The batch is drawn before the clock starts, as ours is.

Loss formulas (beta 1.0 in the benchmark), m/r = per-row mean over C,H,W of the squared error
of the policy/reference prediction:
  u = -0.5 * beta * ((m_w - m_l) - (r_w - r_l))
  dspo:          mean(((eps_w - target) - beta * (1 - sigmoid(u)) * (eps_w - ref_w))^2)
  dspo_e:        mean(((eps_w - target) - beta * (eps_w - ref_w))^2)
  diffusion_dpo: mean(-logsigmoid(u))
  sft:           mean((eps - target)^2) on the winners

`--method dspo,diffusion_dpo` alternates the methods step by step in one process (one warm-up step
each, then `--steps` timed steps each) and reports each under `by_method`: a comparison of their
costs free of process-to-process drift.

`--phases` additionally reports the median seconds of each part of the step over the timed steps:
add_noise + policy forward (sft: with its loss), reference forward, pair loss + backward,
clip + AdamW.

Needs torch, diffusers and peft (bench/requirements.txt). CPU, float32.
"""

import argparse
import copy
import json
import os
import resource
import statistics
import sys
import time

PAIR_METHODS = ("dspo", "diffusion_dpo", "dspo_e")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="diffusers model directory (unet/ and scheduler/ are read)")
    p.add_argument("--method", default="dspo",
                   help="dspo, diffusion_dpo, dspo_e or sft; a comma list alternates them step by step "
                        "(one warm-up step each) and reports each one under by_method")
    p.add_argument("--full", action="store_true", help="full fine-tuning instead of LoRA")
    p.add_argument("--lora-rank", type=int, default=4)
    p.add_argument("--pairs", type=int, default=1)
    p.add_argument("--resolution", type=int, default=64, help="image side in pixels (latent side = resolution / 8)")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch intra-op threads")
    p.add_argument("--beta", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--phases", action="store_true", help="also time forward / reference / backward / optimiser")
    p.add_argument("--gradient-checkpointing", choices=("true", "false"), default="false",
                   help="diffusers' enable_gradient_checkpointing() on the policy UNet (as ours per block)")
    return p.parse_args()


def rss_mib():
    # Linux reports ru_maxrss in KiB; it is the same high-water mark as VmHWM, which ours reads.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def per_row_mse(a, b):
    return (a - b).pow(2).flatten(1).mean(1)


def pair_loss(method, pred, ref, target, beta):
    import torch
    import torch.nn.functional as F

    b = pred.shape[0] // 2
    m = per_row_mse(pred, target)
    r = per_row_mse(ref, target)
    u = -0.5 * beta * ((m[:b] - m[b:]) - (r[:b] - r[b:]))
    d_w = pred[:b] - target[:b]
    p = pred[:b] - ref[:b]
    if method == "dspo":
        w = (beta * (1.0 - torch.sigmoid(u))).view(b, *([1] * (pred.dim() - 1)))
        return (d_w - w * p).pow(2).mean()
    if method == "dspo_e":
        return (d_w - beta * p).pow(2).mean()
    return -F.logsigmoid(u).mean()


def main():
    a = parse_args()
    methods = a.method.split(",")
    for m in methods:
        if m not in PAIR_METHODS + ("sft",):
            sys.exit(f"unknown method {m!r} (known: {', '.join(PAIR_METHODS + ('sft',))})")
    if a.resolution % 8:
        sys.exit("--resolution must be a multiple of 8")
    import torch

    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    baseline_rss = rss_mib()

    from diffusers import DDPMScheduler, UNet2DConditionModel

    dev = torch.device(a.device)
    cuda = dev.type == "cuda"

    def now():
        # GPU work is asynchronous: wait for it before reading the clock.
        if cuda:
            torch.cuda.synchronize(dev)
        return time.perf_counter()

    unet = UNet2DConditionModel.from_pretrained(a.model, subfolder="unet", torch_dtype=torch.float32).to(dev)
    scheduler = DDPMScheduler.from_pretrained(a.model, subfolder="scheduler")
    cfg = unet.config
    cross = cfg.cross_attention_dim if isinstance(cfg.cross_attention_dim, int) else cfg.cross_attention_dim[0]
    num_t = scheduler.config.num_train_timesteps
    if cfg.addition_embed_type is not None:
        sys.exit("SDXL-style UNets (added conditions) are not supported by this benchmark")

    checkpointing = a.gradient_checkpointing == "true"
    if checkpointing:
        unet.enable_gradient_checkpointing()
    reference = None
    if a.full:
        unet.requires_grad_(True)
        if any(m in PAIR_METHODS for m in methods):
            reference = copy.deepcopy(unet).requires_grad_(False).eval()
        policy = unet
        params = [p for p in unet.parameters() if p.requires_grad]
    else:
        from peft import LoraConfig, get_peft_model

        unet.requires_grad_(False)
        lcfg = LoraConfig(r=a.lora_rank, lora_alpha=a.lora_rank, init_lora_weights="gaussian",
                          target_modules=["to_k", "to_q", "to_v", "to_out.0"])
        policy = get_peft_model(unet, lcfg)
        params = [p for p in policy.parameters() if p.requires_grad]
    policy.train()
    n_params = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=1e-2)

    def reference_pred(noisy, t, ehs):
        with torch.no_grad():
            if reference is not None:
                return reference(noisy, t, ehs).sample
            with policy.disable_adapter():
                return policy(noisy, t, ehs).sample

    side = a.resolution // 8
    b = a.pairs
    times = {m: [] for m in methods}
    phases = {m: {"forward_s": [], "reference_s": [], "backward_s": [], "optimizer_s": []} for m in methods}
    for step in range((a.steps + 1) * len(methods)):
        method = methods[step % len(methods)]
        x0 = torch.randn(2 * b, cfg.in_channels, side, side, device=dev)
        noise = torch.randn(b, cfg.in_channels, side, side, device=dev).repeat(2, 1, 1, 1)
        ehs = torch.randn(b, 77, cross, device=dev).repeat(2, 1, 1)
        t = torch.randint(0, num_t, (b,), device=dev).repeat(2)

        t0 = now()
        noisy = scheduler.add_noise(x0, noise, t)
        if scheduler.config.prediction_type == "v_prediction":
            target = scheduler.get_velocity(x0, noise, t)
        else:
            target = noise
        marks = [t0]
        if method == "sft":
            pred = policy(noisy[:b], t[:b], ehs[:b]).sample
            loss = (pred - target[:b]).pow(2).mean()
            marks.append(now())
            marks.append(marks[-1])
        else:
            pred = policy(noisy, t, ehs).sample
            marks.append(now())
            ref = reference_pred(noisy, t, ehs)
            marks.append(now())
            loss = pair_loss(method, pred, ref, target, a.beta)
        loss.backward()
        marks.append(now())
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        marks.append(now())
        if step >= len(methods):
            times[method].append(marks[-1] - t0)
            for k, (s, e) in zip(phases[method], zip(marks, marks[1:])):
                phases[method][k].append(e - s)

    def figures(m):
        f = {"step_s_median": statistics.median(times[m]), "step_s_min": min(times[m])}
        if a.phases:
            f.update({k: statistics.median(v) for k, v in phases[m].items()})
        return f

    line = {
        "impl": "torch",
        "model": a.model,
        "method": a.method,
        "mode": "full" if a.full else "lora",
        "pairs": b,
        "resolution": a.resolution,
        "trainable_params": n_params,
        "gradient_checkpointing": checkpointing,
        "peak_rss_mib": rss_mib(),
        "peak_gpu_allocated_mib": torch.cuda.max_memory_allocated(dev) / 2**20 if cuda else None,
        "device": a.device,
        "import_rss_mib": baseline_rss,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    line.update(figures(methods[0]))
    if len(methods) > 1:
        line["by_method"] = {m: figures(m) for m in methods}
    print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
