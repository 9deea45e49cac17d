"""PyTorch probe: stage 1 of the shapes recipe (the autoencoder) in diffusers, with
the same loss as `mode = "autoencoder"` (L1 + L2 in an opponent colour basis, chroma x4, the
posterior mean decoded, 1e-4 * mean(z^2)), then a pipeline directory for t2i_probe.py (scaling
factor 1/std, deterministic posterior, a fresh UNet with matching channels) and reconstructions
of the last 200 images for score.py.

    python vae_probe.py STEPS LR OUT LATENT_CHANNELS INIT_MODEL

Finding (2026-11-26): 4 channels, 1,500 steps, lr 5e-4: reconstructions colour 0.65,
shape 0.685, background 0.825 (misses: yellow/red -> orange, black -> dark green).
"""
import io, sys, os, json, shutil, torch, numpy as np, pyarrow.parquet as pq, math
from PIL import Image
from diffusers import AutoencoderKL
torch.manual_seed(0); torch.set_num_threads(1)
steps, lr, out, lc, init = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3], int(sys.argv[4]), sys.argv[5]
SHARED = os.environ.get('SHARED', '../shared')
imgs = pq.read_table(SHARED + '/shapes/pretrain.parquet', columns=['image']).to_pydict()['image']
cfg = json.load(open(f'{init}/vae/config.json')); cfg['latent_channels'] = lc
cfg = {k: v for k, v in cfg.items() if not k.startswith('_')}
vae = AutoencoderKL(**cfg)
opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
def load(i):
    return torch.from_numpy(np.asarray(Image.open(io.BytesIO(imgs[i])).convert('RGB')).astype(np.float32)/127.5-1).permute(2,0,1)
s3,s2,s6,k = math.sqrt(3),math.sqrt(2),math.sqrt(6),4.0
M = torch.tensor([[1/s3,1/s3,1/s3],[k/s2,0,-k/s2],[k/s6,-2*k/s6,k/s6]])
rng = np.random.default_rng(0)
for step in range(steps):
    x = torch.stack([load(i) for i in rng.integers(0, 19800, 8)])
    c = 0.5*(1+math.cos(math.pi*step/steps))
    for g in opt.param_groups: g['lr'] = lr*min(1,(step+1)/20)*c
    post = vae.encode(x).latent_dist
    d = torch.einsum('ij,bjhw->bihw', M, vae.decode(post.mean).sample - x)
    loss = d.abs().mean() + (d**2).mean() + 1e-4*(post.mean**2).mean()
    opt.zero_grad(); loss.backward(); torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0); opt.step()
    if step % 100 == 0: print(step, round(loss.item(),4), flush=True)
with torch.no_grad():
    z = torch.cat([vae.encode(torch.stack([load(i) for i in range(j, j+64)])).latent_dist.mean for j in range(0, 1024, 64)])
    vae.config.scaling_factor = float(1/z.std())
    print("scaling", vae.config.scaling_factor)
    # deterministic posterior
    q = vae.quant_conv
    q.weight[lc:] = 0; q.bias[lc:] = -30
vae.register_to_config(scaling_factor=float(1/z.std()))
os.makedirs(out, exist_ok=True)
for d in ['scheduler','tokenizer','text_encoder','model_index.json']:
    src = f'{init}/{d}'
    (shutil.copytree if os.path.isdir(src) else shutil.copy)(src, f'{out}/{d}')
vae.save_pretrained(f'{out}/vae')
ucfg = json.load(open(f'{init}/unet/config.json')); ucfg['in_channels'] = lc; ucfg['out_channels'] = lc
os.makedirs(f'{out}/unet', exist_ok=True); json.dump(ucfg, open(f'{out}/unet/config.json','w'), indent=1)
from diffusers import UNet2DConditionModel
torch.manual_seed(1)
UNet2DConditionModel.from_config({k:v for k,v in ucfg.items() if not k.startswith('_')}).save_pretrained(f'{out}/unet')
# reconstructions of the last 200 for score.py
os.makedirs(f'{out}-recon', exist_ok=True)
caps = pq.read_table(SHARED + '/shapes/pretrain.parquet', columns=['caption']).to_pydict()['caption']
with torch.no_grad(), open(f'{out}-recon/captions.tsv','w') as f:
    for j in range(19800, 20000, 50):
        x = torch.stack([load(i) for i in range(j, j+50)])
        r = vae.decode(vae.encode(x).latent_dist.mean).sample
        for n, im in enumerate(r):
            Image.fromarray(((im.clamp(-1,1)+1)*127.5).round().byte().permute(1,2,0).numpy()).save(f'{out}-recon/{j+n}.png')
            f.write(f'{j+n}.png\t{caps[j+n]}\n')
