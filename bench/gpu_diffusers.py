#!/usr/bin/env python3
"""The diffusers side of bench/gpu.sh: text-to-image latency of an SD 1.x or SDXL pipeline on a
GPU, the protocol of `dspo-server bench txt2img` (one untimed warm-up generation, then
`--repeats` timed ones; median and min wall-clock seconds, the device synchronised before the
clock is read), plus peak GPU memory as PyTorch's allocator saw it.

Settings are diffusers' defaults for a fair "eager" baseline: the weights in --dtype, the
default attention processor (PyTorch's scaled_dot_product_attention), no torch.compile, the
scheduler chosen by name from the model's own scheduler config. Also runs on the CPU
(--device cpu) for rehearsals with tiny models. One JSON line per event on stdout.
"""

import argparse
import json
import os
import statistics
import sys
import time


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="diffusers pipeline directory (SD 1.x/2.x or SDXL)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--size", type=int, default=512, help="image side in pixels (square)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--scheduler", default="ddim", choices=["ddim", "euler", "euler_a", "dpmpp_2m"])
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--prompt", default="a photograph of an astronaut riding a horse")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="f16", choices=["f32", "f16", "bf16"])
    p.add_argument("--label", default="")
    return p.parse_args()


def main():
    a = parse_args()
    import numpy as np
    import torch
    import diffusers

    dtype = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[a.dtype]
    dev = torch.device(a.device)
    cuda = dev.type == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize(dev)

    with open(os.path.join(a.model, "model_index.json")) as f:
        cls_name = json.load(f)["_class_name"]
    sdxl = "XL" in cls_name
    cls = diffusers.StableDiffusionXLPipeline if sdxl else diffusers.StableDiffusionPipeline
    extra = {} if sdxl else {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}

    common = {
        "impl": "diffusers", "label": a.label, "model": a.model, "pipeline": cls.__name__,
        "size": a.size, "steps": a.steps, "batch": a.batch, "guidance": a.guidance,
        "scheduler": a.scheduler, "device": a.device, "dtype": a.dtype,
        "torch": torch.__version__, "diffusers": diffusers.__version__,
        "gpu": torch.cuda.get_device_name(dev) if cuda else None,
    }

    def emit(**kw):
        print(json.dumps({**common, **kw}), flush=True)

    t0 = time.perf_counter()
    pipe = cls.from_pretrained(a.model, torch_dtype=dtype, **extra)
    sched = {
        "ddim": diffusers.DDIMScheduler,
        "euler": diffusers.EulerDiscreteScheduler,
        "euler_a": diffusers.EulerAncestralDiscreteScheduler,
        "dpmpp_2m": diffusers.DPMSolverMultistepScheduler,
    }[a.scheduler]
    pipe.scheduler = sched.from_config(pipe.scheduler.config)
    pipe = pipe.to(dev)
    pipe.set_progress_bar_config(disable=True)
    sync()
    load_s = time.perf_counter() - t0
    emit(event="load", seconds=load_s, attention=type(pipe.unet.attn_processors[next(iter(pipe.unet.attn_processors))]).__name__)

    prompts = [a.prompt] * a.batch

    def generate():
        gens = [torch.Generator("cpu").manual_seed(i) for i in range(a.batch)]
        out = pipe(prompt=prompts, num_inference_steps=a.steps, guidance_scale=a.guidance,
                   height=a.size, width=a.size, generator=gens, output_type="np").images
        sync()
        return out

    if cuda:
        torch.cuda.reset_peak_memory_stats(dev)
    images = generate()
    finite = bool(np.isfinite(images).all())
    runs = []
    for i in range(a.repeats):
        t = time.perf_counter()
        generate()
        s = time.perf_counter() - t
        emit(event="run", repeat=i, seconds=s)
        runs.append(s)
    peak = torch.cuda.max_memory_allocated(dev) / 2**20 if cuda else None
    reserved = torch.cuda.max_memory_reserved(dev) / 2**20 if cuda else None
    emit(event="summary", load_s=load_s, repeats=a.repeats, median_s=statistics.median(runs), min_s=min(runs),
         finite=finite, peak_allocated_mib=peak, peak_reserved_mib=reserved)
    if not finite:
        sys.exit("non-finite image")


if __name__ == "__main__":
    main()
