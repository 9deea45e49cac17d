"""Probe: is the autoencoder's decoder fragile to small errors in a latent?

Encodes held-out training images (pretrain.parquet rows [100, 196)), adds Gaussian noise of
sigma x the latents' std to the posterior means, decodes, and reads shape and colour with
score.py. If shape accuracy collapses at small sigma, a UNet's small errors would erase corners
and a decoder fine-tuned on noisy latents would help; if it holds, the UNet's samples are
wrong in themselves.

    python decoder_noise_probe.py MODEL_DIR SHAPES_DIR

Finding (2026-11-27, 16x16-latent autoencoder): shape 94 / 94 / 94 / 93 / 94 / 93 of 96 at
sigma 0 / 0.05 / 0.1 / 0.2 / 0.3 / 0.5, colour 96 at every sigma: the decoder is robust.
"""
import io
import sys

import numpy as np
import pyarrow.parquet as pq
import torch
from diffusers import AutoencoderKL
from PIL import Image

model, shapes = sys.argv[1], sys.argv[2]
sys.path.insert(0, shapes)
import score  # noqa: E402

vae = AutoencoderKL.from_pretrained(model, subfolder="vae").eval()
rows = pq.read_table(f"{shapes}/pretrain.parquet").slice(100, 96).to_pylist()
x = torch.stack([
    torch.tensor(np.array(Image.open(io.BytesIO(r["image"])).convert("RGB")), dtype=torch.float32).permute(2, 0, 1) / 127.5 - 1
    for r in rows
])
with torch.no_grad():
    z = vae.encode(x).latent_dist.mean
    g = torch.Generator().manual_seed(0)
    for sigma in [0, 0.05, 0.1, 0.2, 0.3, 0.5]:
        zn = z + sigma * z.std() * torch.randn(z.shape, generator=g)
        y = ((vae.decode(zn).sample.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
        reads = [score.analyse(y[i]) for i in range(len(rows))]
        shape = sum(m["shape"] == r["shape"] for m, r in zip(reads, rows))
        colour = sum(m["color"] == r["color"] for m, r in zip(reads, rows))
        print(f"sigma {sigma}: shape {shape}/{len(rows)} colour {colour}/{len(rows)}", flush=True)
