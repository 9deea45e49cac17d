"""Probe: at which noise level does a text-to-image model lose a shape it was given?

Takes real training images of the shapes world (pretrain.parquet rows [0, N)), noises each to
strength s (diffusers' StableDiffusionImg2ImgPipeline: DDIM, 25 steps over the whole schedule,
so the run starts at t ~ s * 1000) and denoises it with its own caption; score.py then reads
the shape type. Strength 1.0 is plain text-to-image. If the shape survives low strengths and
is lost at mid ones, the UNet is weak where the layout is decided, not at fine detail; if it
survives every strength, the shortfall is in committing to a layout from pure noise.

    python strength_probe.py MODEL_DIR SHAPES_DIR [GUIDANCE=4] [STRENGTHS=0.3,0.5,0.65,0.8,0.9,1.0] [N=48]

Finding (2026-11-27, 16x16-latent model at step 7,000, guidance 4, 48 images): shape right
44 / 39 / 28 / 24 / 20 / 16 at strength 0.3 / 0.5 / 0.65 / 0.8 / 0.9 / 1.0; guidance 1: 25 / 16
/ 18 at 0.65 / 0.8 / 1.0 (guidance is not the cause).
"""
import io
import sys

import numpy as np
import pyarrow.parquet as pq
import torch
from diffusers import DDIMScheduler, StableDiffusionImg2ImgPipeline
from PIL import Image

model, shapes = sys.argv[1], sys.argv[2]
guidance = float(sys.argv[3]) if len(sys.argv) > 3 else 4.0
strengths = [float(x) for x in (sys.argv[4] if len(sys.argv) > 4 else "0.3,0.5,0.65,0.8,0.9,1.0").split(",")]
n = int(sys.argv[5]) if len(sys.argv) > 5 else 48
sys.path.insert(0, shapes)
import score  # noqa: E402  (the shapes world's scorer, by path)

pipe = StableDiffusionImg2ImgPipeline.from_pretrained(model, safety_checker=None, requires_safety_checker=False)
pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
pipe.set_progress_bar_config(disable=True)
rows = pq.read_table(f"{shapes}/pretrain.parquet").slice(0, n).to_pylist()
for s in strengths:
    right = 0
    for i, r in enumerate(rows):
        image = Image.open(io.BytesIO(r["image"])).convert("RGB")
        out = pipe(r["caption"], image=image, strength=s, num_inference_steps=25,
                   guidance_scale=guidance, generator=torch.Generator().manual_seed(i)).images[0]
        right += score.analyse(np.array(out))["shape"] == r["shape"]
    print(f"strength {s}: shape right {right}/{len(rows)}", flush=True)
