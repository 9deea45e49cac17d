"""PyTorch probe: trains diffusers' AutoencoderKL from the same initial weights as
scripts/train_shapes.sh (same loss without chroma weighting, batch 8, AdamW) and prints the
reconstructed background colours, to tell a bug in our trainer from the recipe's own dynamics.

    python vae_colour_probe.py INIT_MODEL/vae PRETRAIN_PARQUET STEPS LR

Finding (2026-11-26): after 150 steps PyTorch also reconstructs white, light blue and beige
as one colour (and black = dark green); by 1000 steps the six backgrounds are distinct.
"""
import io, sys, torch, numpy as np, pyarrow.parquet as pq
from PIL import Image
from diffusers import AutoencoderKL
torch.manual_seed(0); torch.set_num_threads(1)
LR=float(sys.argv[4])
t = pq.read_table(sys.argv[2], columns=['image','caption']).to_pydict()
imgs = t['image']
vae = AutoencoderKL.from_pretrained(sys.argv[1], torch_dtype=torch.float32)
opt = torch.optim.AdamW(vae.parameters(), lr=LR, weight_decay=0.0)
def load(i):
    a = np.asarray(Image.open(io.BytesIO(imgs[i])).convert('RGB')).astype(np.float32)/127.5-1
    return torch.from_numpy(a).permute(2,0,1)
rng = np.random.default_rng(0)
for step in range(int(sys.argv[3])):
    idx = rng.integers(0, 19800, 8)
    x = torch.stack([load(i) for i in idx])
    lr = LR*min(1,(step+1)/20)
    for g in opt.param_groups: g['lr']=lr
    post = vae.encode(x).latent_dist
    rec = vae.decode(post.mean).sample
    d = rec - x
    loss = d.abs().mean() + (d**2).mean() + 1e-4*(post.mean**2).mean()
    opt.zero_grad(); loss.backward(); torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0); opt.step()
    if step % 10 == 0: print(step, round(loss.item(),4), flush=True)
# bg colours
caps = t['caption']
res = {}
with torch.no_grad():
    for i in range(19800, 20000):
        c = caps[i]
        for bg in ['light blue','dark green','white','black','gray','beige']:
            if bg+' background' in c or c.endswith('on '+bg):
                r = vae.decode(vae.encode(load(i)[None]).latent_dist.mean).sample[0]
                r = ((r.clamp(-1,1)+1)*127.5).permute(1,2,0).numpy()
                ring = np.concatenate([r[:2].reshape(-1,3), r[-2:].reshape(-1,3)])
                res.setdefault(bg, []).append(np.median(ring,0)); break
for k,v in res.items(): print(k, np.mean(v,0).round())
