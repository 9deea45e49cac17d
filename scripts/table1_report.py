#!/usr/bin/env python3
"""Turns scripts/table1.sh's results into docs/table1/table.md, results.json and table1.png.

Usage: table1_report.py WORK_DIR OUT_DIR   (needs matplotlib for the plot; the table without)
"""
import json
import sys
from pathlib import Path

work, out = Path(sys.argv[1]), Path(sys.argv[2])
out.mkdir(parents=True, exist_ok=True)


def load(path):
    return json.loads(path.read_text()) if path.exists() else None


def make_row(name, r, job, metrics, adapter=None):
    if isinstance(metrics, dict):
        metrics = metrics.get("metrics", [])
    metrics = metrics or []
    spec = (job or {}).get("spec", {})
    # What the run used (request over the model's defaults) where table1.sh recorded it; the
    # request alone otherwise (then unset fields mean "the model's defaults at the time").
    hp = (adapter or {}).get("hyperparameters") or (spec.get("hyperparameters") or {})
    res_ = r["result"]
    return {
        "run": name,
        "method": spec.get("method", name.split("_")[1] if "_" in name else name),
        # Which preference file (table1.sh's PAIRS): the world's rotated pairs, or the same pairs
        # turned upright by scripts/shapes/upright_prefs.py.
        "pairs": "upright" if "upright" in spec.get("dataset_url", "") else "world",
        "beta": hp.get("beta"),
        # Only larger-budget rows override the model's learning rate.
        "lr": hp.get("learning_rate"),
        "batch": hp.get("batch_size"),
        "seed": hp.get("seed"),
        # The UNet modules the LoRA adapted, where the request chose them (None: the model's
        # default, every attention projection).
        "lora_targets": (spec.get("lora") or {}).get("target_modules"),
        "noise_offset": hp.get("noise_offset") or None,
        "anchor_weight": hp.get("anchor_weight") or None,
        "n": res_["n"],
        "seeds": r.get("seeds", 1),
        "winrate": res_["winrate"],
        "ci95": res_["ci95"],
        # Present when the run was evaluated with 2+ seeds (dspo-server eval: A's seed k
        # against B's seed k+1 of the same prompt, i.e. independent draws).
        "unpaired_winrate": (res_.get("unpaired") or {}).get("winrate"),
        "unpaired_ci95": (res_.get("unpaired") or {}).get("ci95"),
        "mean_reward_tuned": res_["a"]["mean_reward"],
        "mean_reward_base": res_["b"]["mean_reward"],
        "color_tuned": res_["a"].get("color_ok"), "color_base": res_["b"].get("color_ok"),
        "shape_tuned": res_["a"].get("shape_ok"), "shape_base": res_["b"].get("shape_ok"),
        "background_tuned": res_["a"].get("background_ok"), "background_base": res_["b"].get("background_ok"),
        "steps": len(metrics),
        "train_seconds": sum(m.get("seconds", 0) for m in metrics),
        "final_implicit_accuracy": (sum(m["implicit_accuracy"] for m in metrics[-20:] if m.get("implicit_accuracy") is not None)
                                    / max(1, sum(1 for m in metrics[-20:] if m.get("implicit_accuracy") is not None)))
                                   if any(m.get("implicit_accuracy") is not None for m in metrics) else None,
        "metrics": metrics,
    }


# Rows come from, in order of precedence: this WORK's evaluations; the raw files table1.sh
# copies into OUT/runs/<run>/ (so the table regenerates from the repository alone); and rows of
# an earlier OUT/results.json whose raw files were not kept (no loss curves for those).
rows, seen = [], set()
for res in sorted((work / "eval").glob("*/result.json")):
    name = res.parent.name
    rows.append(make_row(name, load(res), load(work / f"{name}.job.json"), load(work / f"{name}.metrics.json"),
                         load(work / f"{name}.adapter.json")))
    seen.add(name)
for res in sorted((out / "runs").glob("*/result.json")):
    name = res.parent.name
    if name not in seen:
        d = res.parent
        rows.append(make_row(name, load(res), load(d / "job.json"), load(d / "metrics.json"), load(d / "adapter.json")))
        seen.add(name)
# Rows run before table1.sh recorded the hyperparameters used (the oldest rows of results.json)
# left unset fields at what models/shapes shipped then: 8 pairs per step, lr 1e-4.
THEN = {"lr": 1e-4, "batch": 8}
for old in load(out / "results.json") or []:
    if old["run"] not in seen:
        row = {**old, "metrics": [], "pairs": old.get("pairs", "world"), "seed": old.get("seed"), "lora_targets": old.get("lora_targets"),
               "noise_offset": old.get("noise_offset"), "anchor_weight": old.get("anchor_weight")}
        for k, v in THEN.items():
            row[k] = v if row.get(k) is None else row[k]
        rows.append(row)
        seen.add(old["run"])
# An unset β is the trainer's built-in one for the method (TrainConfig::beta).
BUILTIN_BETA = {"dspo": 0.001, "dspo_e": 0.001, "diffusion_dpo": 5000.0, "diffusion_kto": 1000.0,
                "dspo_sdxl": 5000.0}
for row in rows:
    if row.get("beta") is None:
        row["beta"] = BUILTIN_BETA.get(row["method"])
# SFT first (the baseline the others must beat), then DSPO by β, DSPO-E, Diffusion-DPO, KTO.
ORDER = ["sft", "dspo", "dspo_e", "diffusion_dpo", "diffusion_kto"]
rows.sort(key=lambda r: (ORDER.index(r["method"]) if r["method"] in ORDER else len(ORDER),
                         r["beta"] if r["beta"] is not None else -1.0,
                         r["lr"] if r["lr"] is not None else -1.0,
                         r["batch"] if r["batch"] is not None else -1,
                         r["steps"], r["seed"] or 0, ",".join(r["lora_targets"] or []), r["noise_offset"] or 0, r["anchor_weight"] or 0))
(out / "results.json").write_text(json.dumps([{k: v for k, v in r.items() if k != "metrics"} for r in rows], indent=2))


def pct(v):
    return "—" if v is None else f"{100 * v:.1f}"


def targets(t):
    """Short form of a LoRA target list: `attn1.to_q,attn1.to_k` -> `attn1.q,k`."""
    if not t:
        return "all attention"
    groups = {}
    for m in t:
        head, _, tail = m.rpartition(".to_")
        groups.setdefault(head or "*", []).append(tail.replace("out.0", "out") if head else m)
    return "; ".join(f"{h}.{','.join(v)}" if h != "*" else ",".join(v) for h, v in groups.items())


def wr(v, ci):
    return "—" if v is None else f"{v:.3f} ± {ci:.3f}"


lines = ["| run | method | pairs | β | lr | pairs/step | LoRA on | noise offset | anchor | seeds | win rate vs base (centred), paired | unpaired | mean centred tuned / base | colour tuned / base | shape tuned / base | background tuned / base | steps | train s | implicit acc. (last 20) |",
         "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
for r in rows:
    lines.append(f"| {r['run']} | {r['method']} | {r['pairs']} | {r['beta'] if r['beta'] is not None else ('—' if r['method'] == 'sft' else 'default')} | {r['lr'] if r['lr'] is not None else 'default'} | {r['batch'] if r['batch'] is not None else 'default'} | {targets(r['lora_targets'])} | {r['noise_offset'] or '—'} | {r['anchor_weight'] or '—'} | {r['seeds']} | {wr(r['winrate'], r['ci95'])} | {wr(r['unpaired_winrate'], r['unpaired_ci95'])} | "
                 f"{r['mean_reward_tuned']:.4f} / {r['mean_reward_base']:.4f} | {pct(r['color_tuned'])} / {pct(r['color_base'])} | "
                 f"{pct(r['shape_tuned'])} / {pct(r['shape_base'])} | {pct(r['background_tuned'])} / {pct(r['background_base'])} | "
                 f"{r['steps']} | {r['train_seconds']:.0f} | {'—' if r['final_implicit_accuracy'] is None else format(r['final_implicit_accuracy'], '.2f')} |")
(out / "table.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))

try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
except ImportError:
    print("matplotlib not installed: no plot", file=sys.stderr)
    sys.exit(0)
# One label line per run, rotated: with 15+ rows stacked labels overlap.
fig, ax = plt.subplots(1, 3, figsize=(22, 10), gridspec_kw={"width_ratios": [1.6, 1, 1]})
# Runs at the usual step count are not labelled with it; longer or shorter ones are.
usual_steps = max({r["steps"] for r in rows}, key=[r["steps"] for r in rows].count)
# Likewise only runs on the less usual preference file are labelled with it.
usual_pairs = max({r["pairs"] for r in rows}, key=[r["pairs"] for r in rows].count)
labels = [r["method"] + (f" β={r['beta']}" if r["beta"] is not None else "")
          + (f" lr={r['lr']}" if r["lr"] is not None else "")
          + (f" batch={r['batch']}" if r["batch"] is not None else "")
          + (f" seed={r['seed']}" if r["seed"] else "")
          + (f" LoRA {targets(r['lora_targets'])}" if r["lora_targets"] else "")
          + (f" offset={r['noise_offset']}" if r["noise_offset"] else "")
          + (f" anchor={r['anchor_weight']}" if r["anchor_weight"] else "")
          + (f" {r['steps']} steps" if r["steps"] != usual_steps else "")
          + (f" {r['pairs']} pairs" if r["pairs"] != usual_pairs else "") for r in rows]
x = range(len(rows))
ax[0].bar([i - 0.2 for i in x], [r["winrate"] for r in rows], width=0.4, yerr=[r["ci95"] for r in rows],
          capsize=3, color="#4c72b0", label="paired (same seed)")
up = [(i, r) for i, r in enumerate(rows) if r["unpaired_winrate"] is not None]
if up:
    ax[0].bar([i + 0.2 for i, _ in up], [r["unpaired_winrate"] for _, r in up], width=0.4,
              yerr=[r["unpaired_ci95"] for _, r in up], capsize=3, color="#dd8452",
              label="unpaired (independent seeds)")
ax[0].legend(fontsize=8, loc="upper left")
ax[0].axhline(0.5, color="gray", ls="--", lw=1)
ax[0].set_xticks(range(len(rows)), labels, fontsize=8, rotation=60, ha="right")
ax[0].set_ylabel("win rate vs base (centred reward)")
ax[0].set_ylim(0, 1)
ax[0].set_title("Win rate against the base model (±95%)")
ax[0].axhline(0.75, color="#c44e52", ls=":", lw=1)


def smooth(v, k=10):
    out, acc = [], []
    for x in v:
        acc.append(x)
        acc = acc[-k:]
        out.append(sum(acc) / len(acc))
    return out


for r, lab in zip(rows, labels):
    ms = r["metrics"]
    if not ms:
        continue
    ax[1].plot([m["step"] for m in ms], smooth([m["loss"] for m in ms]), label=lab.replace("\n", " "))
    acc = [(m["step"], m["implicit_accuracy"]) for m in ms if m.get("implicit_accuracy") is not None]
    if acc:
        ax[2].plot([a for a, _ in acc], smooth([b for _, b in acc], 20), label=lab.replace("\n", " "))
ax[1].set_title("training loss (moving mean of 10)")
ax[1].set_xlabel("optimiser step")
ax[1].set_yscale("symlog", linthresh=1e-3)
ax[1].legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12))
ax[2].set_title("implicit accuracy (moving mean of 20)")
ax[2].set_xlabel("optimiser step")
ax[2].axhline(0.5, color="gray", ls="--", lw=1)
ax[2].legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12))
fig.tight_layout()
fig.savefig(out / "table1.png", dpi=110)
print(f"wrote {out / 'table1.png'}")
