"""Probe: does a text-to-image model take the background from the caption or from x_T's mean?

Samples a few "... on a <colour> background" prompts with diffusers' StableDiffusionPipeline
(our model directory as is, DDIM, 25 steps, guidance 4) twice from the same x_T: as drawn, and
with each latent channel's mean shifted to the encoded background's, scaled to x_T's units
(sqrt(abar_T / (1 - abar_T))). If the second run gets the background right and the first does
not, the UNet reads the background off x_T (the signal offset noise exists to remove).

    python xt_mean_probe.py MODEL_DIR

Finding (2026-11-27, 16x16-latent model at step 3,000 with offset 0.05): corners of "... on a
white background" RGB 181/193/200 as drawn vs 249/249/251 shifted; black 115/86/65 vs 17/8/10.
"""
import sys
import numpy as np
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from PIL import Image

pipe = StableDiffusionPipeline.from_pretrained(sys.argv[1], safety_checker=None, torch_dtype=torch.float32)
pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
sf = pipe.vae.config.scaling_factor
abar_T = float(pipe.scheduler.alphas_cumprod[-1])
to_xt_units = (abar_T / (1 - abar_T)) ** 0.5
size = pipe.unet.config.sample_size
down = 2 ** (len(pipe.vae.config.block_out_channels) - 1)


def encoded_mean(rgb):
    img = np.array(Image.new("RGB", (size * down, size * down), rgb), dtype=np.float32)
    x = torch.tensor(img).permute(2, 0, 1)[None] / 127.5 - 1
    with torch.no_grad():
        z = pipe.vae.encode(x).latent_dist.mean * sf
    return z.mean(dim=(2, 3), keepdim=True)


cases = [("a red circle on a white background", (255, 255, 255)),
         ("a blue square on a black background", (0, 0, 0)),
         ("a green triangle on a yellow background", (255, 255, 0))]
for prompt, bg in cases:
    for shifted in (False, True):
        x_T = torch.randn((1, 4, size, size), generator=torch.Generator().manual_seed(1))
        if shifted:
            x_T = x_T + encoded_mean(bg) * to_xt_units
        image = pipe(prompt, num_inference_steps=25, guidance_scale=4.0, latents=x_T,
                     height=size * down, width=size * down).images[0]
        corner = np.array(image)[:6, :6].reshape(-1, 3).mean(0).round().astype(int)
        print(f"{prompt!r:45} {'shifted' if shifted else 'as drawn':8} corner RGB {corner.tolist()}")
