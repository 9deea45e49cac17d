"""PyTorch probe: stage 2 of the shapes recipe (UNet + text encoder from random
weights, the autoencoder frozen) in diffusers, to tell our trainer's problems from the recipe's.
Same loss as `mode = "text_to_image"`: epsilon MSE, noise offset 0.05, caption dropout 0.1,
AdamW, 100 warmup steps then cosine decay, global-norm clipping at 1.

    THREADS=1 SAVE=500 OUT=/tmp/probe python t2i_probe.py INIT_MODEL VAE_MODEL STEPS BATCH LR

INIT_MODEL gives unet/, text_encoder/, tokenizer/, scheduler/; VAE_MODEL gives vae/. Writes
OUT/step-N/ (a full pipeline directory) every SAVE steps; sample with
scripts/shapes/probes/sample_eval.py and score with ../shared/shapes/score.py.

Findings (2026-11-26, docs/SHAPES.md): with 8x8x16 latents still at chance after 2,000 steps
(batch 32, lr 1e-3); with 8x8x4 latents colour 0.68 / shape 0.47 / background 0.69 at 3,000.
"""
import sys, io, time, math, torch, numpy as np, pyarrow.parquet as pq, os
from PIL import Image
from diffusers import UNet2DConditionModel, AutoencoderKL, DDPMScheduler
from transformers import CLIPTextModel, CLIPTokenizer
torch.set_num_threads(int(os.environ.get("THREADS", "1")))
init, vaedir, steps, bs, lr = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
nrows = int(os.environ.get("ROWS", "20000"))
torch.manual_seed(0)
unet = UNet2DConditionModel.from_pretrained(init, subfolder="unet").float()
te = CLIPTextModel.from_pretrained(init, subfolder="text_encoder").float()
vae = AutoencoderKL.from_pretrained(vaedir, subfolder="vae").float().eval()
tok = CLIPTokenizer.from_pretrained(init, subfolder="tokenizer")
sch = DDPMScheduler.from_pretrained(init, subfolder="scheduler")
tb = pq.read_table(os.environ.get('SHARED', '../shared') + '/shapes/pretrain.parquet').slice(0, nrows).to_pylist()
def img(r):
    b = r['image']['bytes'] if isinstance(r['image'], dict) else r['image']
    return torch.from_numpy(np.asarray(Image.open(io.BytesIO(b)).convert('RGB')).copy()).permute(2,0,1).float()/127.5-1
caps = [r['caption'] for r in tb]
lats = []
with torch.no_grad():
    for i in range(0, len(tb), 256):
        x = torch.stack([img(r) for r in tb[i:i+256]])
        lats.append(vae.encode(x).latent_dist.mean * vae.config.scaling_factor)
lat = torch.cat(lats); print("latents", lat.shape, lat.std().item(), flush=True)
ids = tok(caps, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
empty = tok([""], padding="max_length", max_length=77, return_tensors="pt").input_ids
params = list(unet.parameters()) + list(te.parameters())
opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
g = torch.Generator().manual_seed(1)
t0 = time.time(); ema = None
for step in range(1, steps+1):
    w = min(1.0, step/100); c = 0.5*(1+math.cos(math.pi*min(1.0,(step-100)/max(1,steps-100)))) if step>100 else 1.0
    for pg in opt.param_groups: pg['lr'] = lr*w*c
    idx = torch.randint(0, len(tb), (bs,), generator=g)
    x0 = lat[idx]; ii = ids[idx].clone()
    drop = torch.rand(bs, generator=g) < 0.1
    ii[drop] = empty
    noise = torch.randn(x0.shape, generator=g) + 0.05*torch.randn(x0.shape[0], x0.shape[1], 1, 1, generator=g)
    t = torch.randint(0, 1000, (bs,), generator=g)
    xt = sch.add_noise(x0, noise, t)
    enc = te(ii)[0]
    loss = ((unet(xt, t, enc).sample - noise)**2).mean()
    opt.zero_grad(); loss.backward(); torch.nn.utils.clip_grad_norm_(params, 1.0); opt.step()
    ema = loss.item() if ema is None else 0.98*ema + 0.02*loss.item()
    if step % 50 == 0: print(f"step {step} loss {ema:.4f} {time.time()-t0:.1f}s", flush=True)
    out = os.environ.get("OUT")
    if out and (step % int(os.environ.get("SAVE", "1000000")) == 0 or step == steps):
        import shutil
        d = f"{out}/step-{step}"
        shutil.copytree(vaedir, d, dirs_exist_ok=True)
        unet.save_pretrained(f"{d}/unet"); te.save_pretrained(f"{d}/text_encoder")
