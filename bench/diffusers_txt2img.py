#!/usr/bin/env python3
"""The diffusers side of `dspo-server bench txt2img`: same directory, same protocol, same JSON lines.

Protocol (mirrors src/cli/bench.rs): time the load, run one untimed warm-up generation, then
`--repeats` timed generations and report median and min wall-clock seconds; then time each
stage (text encoder on the prompt batch, one UNet call on the CFG-doubled latents, VAE
decode) the same way. Runs on the CPU in float32 with `--threads` intra-op threads.

Needs torch, diffusers and transformers (bench/requirements.txt).
"""

import argparse
import json
import os
import statistics
import sys
import time


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="diffusers pipeline directory")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--size", type=int, default=512, help="image side in pixels (square)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--scheduler", default="ddim")
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--prompt", default="a photograph of an astronaut riding a horse")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch intra-op threads")
    p.add_argument("--stage", default="all", choices=["all", "pipeline", "text_encoder", "unet", "vae_decode"],
                   help="whole pipeline then each stage alone (all), or only one of them")
    p.add_argument("--label", default="")
    return p.parse_args()


def scheduler_for(name, config):
    """Our scheduler names (src/schedulers/mod.rs) to diffusers classes, built from the model's config."""
    import diffusers

    table = {
        "ddim": (diffusers.DDIMScheduler, {}),
        "euler": (diffusers.EulerDiscreteScheduler, {}),
        "euler_a": (diffusers.EulerAncestralDiscreteScheduler, {}),
        "dpmpp_2m": (diffusers.DPMSolverMultistepScheduler, {"use_karras_sigmas": False}),
        "dpmpp_2m_karras": (diffusers.DPMSolverMultistepScheduler, {"use_karras_sigmas": True}),
        "pndm": (diffusers.PNDMScheduler, {}),
    }
    if name not in table:
        sys.exit(f"unknown scheduler {name!r} (known: {', '.join(table)})")
    cls, extra = table[name]
    return cls.from_config(config, **extra)


def median_min(xs):
    return statistics.median(xs), min(xs)


def timed(repeats, f):
    f()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        f()
        out.append(time.perf_counter() - t0)
    return out


def cpu_clocks():
    """CPU seconds of this process and busy seconds of the whole machine (Linux /proc), as
    src/cli/bench.rs reads them; None where /proc/stat is missing."""
    try:
        with open("/proc/stat") as f:
            cpu = [float(x) for x in f.readline().split()[1:9]]
    except OSError:
        return None
    t = os.times()
    # user nice system irq softirq steal, summed directly (idle can step backwards under NO_HZ)
    busy = sum(cpu[i] for i in (0, 1, 2, 5, 6, 7))
    return t.user + t.system, busy / 100.0  # /proc/stat counts USER_HZ = 100


def other_cores(before, after, wall):
    """Cores' worth of CPU that other processes used during a timed run."""
    if before is None or after is None:
        return None
    return max(0.0, ((after[1] - before[1]) - (after[0] - before[0])) / wall)


def keys_match(module, path):
    """True when the weight file holds exactly the module's parameters and persistent buffers:
    a missing or extra name would leave diffusers with silently random-initialised layers."""
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        stored = set(f.keys())
    return stored == set(module.state_dict().keys())


def time_pipeline(args, pipe, prompts, emit):
    """Warm-up plus `repeats` timed whole generations; returns the summary fields."""
    import numpy as np
    import torch

    def generate():
        # One generator per image, as the Rust side seeds one noise stream per image; the
        # latents are drawn inside the call, inside the timed region on both sides.
        gens = [torch.Generator("cpu").manual_seed(i) for i in range(len(prompts))]
        return pipe(
            prompt=prompts,
            negative_prompt=None,
            num_inference_steps=args.steps,
            guidance_scale=args.guidance,
            height=args.size,
            width=args.size,
            generator=gens,
            output_type="np",
        ).images

    finite = bool(np.isfinite(generate()).all())
    runs, others = [], []
    for i in range(args.repeats):
        c0 = cpu_clocks()
        t = time.perf_counter()
        generate()
        s = time.perf_counter() - t
        c1 = cpu_clocks()
        other = other_cores(c0, c1, s)
        if other is not None:
            others.append(other)
        cpu_s = c1[0] - c0[0] if c0 and c1 else None
        emit(event="run", repeat=i, seconds=s, cpu_s=cpu_s, other_cores=other)
        runs.append(s)
    median_s, min_s = median_min(runs)
    return dict(median_s=median_s, min_s=min_s, finite=finite, other_cores_max=max(others) if others else None)


def breakdown(args, pipe, prompts, only):
    """Median time of each stage alone, on the inputs one generation feeds it."""
    import torch

    out = {}
    cfg = args.guidance > 1.0
    b = len(prompts)
    f = pipe.vae_scale_factor
    lh, lw = args.size // f, args.size // f
    g = torch.Generator("cpu").manual_seed(0)
    with torch.no_grad():
        if only in (None, "text_encoder"):
            te = timed(args.repeats, lambda: pipe.encode_prompt(prompts, "cpu", 1, cfg, negative_prompt=None))
            out["text_encoder_s"] = median_min(te)[0]
        if only in (None, "unet"):
            pos, neg = pipe.encode_prompt(prompts, "cpu", 1, cfg, negative_prompt=None)
            embeds = torch.cat([neg, pos]) if cfg else pos
            x = torch.randn((embeds.shape[0], pipe.unet.config.in_channels, lh, lw), generator=g)
            t = torch.tensor([500.0])
            unet = timed(args.repeats, lambda: pipe.unet(x, t, encoder_hidden_states=embeds, return_dict=False)[0])
            out["unet_s"] = median_min(unet)[0]
        if only in (None, "vae_decode"):
            z = torch.randn((b, pipe.vae.config.latent_channels, lh, lw), generator=g)
            sf = pipe.vae.config.scaling_factor

            def decode():
                img = pipe.vae.decode(z / sf, return_dict=False)[0]
                return (img / 2 + 0.5).clamp(0, 1)

            out["vae_decode_s"] = median_min(timed(args.repeats, decode))[0]
    return out


def main():
    args = parse_args()
    import torch

    # Same core count as the Rust side; interop threads matter little for one pipeline call.
    torch.set_num_threads(args.threads)
    import diffusers
    import transformers
    from diffusers import StableDiffusionPipeline

    common = {
        "impl": "diffusers",
        "label": args.label,
        "model": args.model,
        "size": args.size,
        "steps": args.steps,
        "batch": args.batch,
        "guidance": args.guidance,
        "scheduler": args.scheduler,
        "device": "cpu",
        "dtype": "f32",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
    }

    def emit(**extra):
        print(json.dumps({**common, **extra}), flush=True)

    t0 = time.perf_counter()
    pipe = StableDiffusionPipeline.from_pretrained(
        args.model,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
        torch_dtype=torch.float32,
    )
    pipe.scheduler = scheduler_for(args.scheduler, pipe.scheduler.config)
    pipe = pipe.to("cpu")
    pipe.set_progress_bar_config(disable=True)
    load_s = time.perf_counter() - t0
    match = all(
        keys_match(m, os.path.join(args.model, sub, fn))
        for m, sub, fn in [
            (pipe.unet, "unet", "diffusion_pytorch_model.safetensors"),
            (pipe.vae, "vae", "diffusion_pytorch_model.safetensors"),
            (pipe.text_encoder, "text_encoder", "model.safetensors"),
        ]
        if os.path.exists(os.path.join(args.model, sub, fn))
    )
    emit(event="load", seconds=load_s, keys_match=match)

    b = args.batch
    prompts = [args.prompt] * b
    summary = dict(event="summary", load_s=load_s, repeats=args.repeats, keys_match=match)
    if args.stage in ("all", "pipeline"):
        summary.update(time_pipeline(args, pipe, prompts, emit))
    if args.stage != "pipeline":
        summary.update(breakdown(args, pipe, prompts, None if args.stage == "all" else args.stage))
    emit(**summary)


if __name__ == "__main__":
    main()
