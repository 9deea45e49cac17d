"""Samples a diffusers pipeline directory on the shapes eval prompts like `dspo-server eval
--single --seeds 1` (seed i*1000, 25 steps, guidance G, 64x64) for score.py --prompts.

    G=4 python sample_eval.py MODEL OUT N
"""
import sys, torch, os
from diffusers import StableDiffusionPipeline
torch.set_num_threads(1)
m, out, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
pipe = StableDiffusionPipeline.from_pretrained(m, safety_checker=None, requires_safety_checker=False, torch_dtype=torch.float32)
pipe.set_progress_bar_config(disable=True)
caps = open(os.environ.get('SHARED', '../shared') + '/shapes/eval_prompts.txt').read().splitlines()[:n]
os.makedirs(out, exist_ok=True)
for i,c in enumerate(caps):
    g = torch.Generator().manual_seed(i*1000)
    pipe(c, height=64, width=64, num_inference_steps=25, guidance_scale=float(os.environ.get("G","4")), generator=g).images[0].save(f"{out}/{i:04}_0.png")
