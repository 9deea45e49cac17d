#!/usr/bin/env python3
"""Turns the JSON of bench/train_step.sh (bench/results/train/) into bench/TRAINING.md
(standard library only, so it runs where torch is missing too)."""

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import cpu_flags, cpu_model, crate_version, mem_gib, ratio, secs, sh  # noqa: E402

# "big": the mid model at a higher resolution (train_step.sh BIG_RES).
MODELS = ("tiny", "mid", "big")
MODES = ("lora", "full")
METHODS = ("dspo", "diffusion_dpo", "sft")
# Paper (DSPO, SD1.5 on an A100): minutes per optimiser step.
PAPER_DSPO_MIN, PAPER_DPO_MIN = 4.18, 4.15
# Parts of a step, as both probes name them.
PHASES = (("forward_s", "policy forward"), ("reference_s", "reference forward"),
          ("backward_s", "loss + backward"), ("optimizer_s", "clip + AdamW"))


def load_one(res, stem):
    p = res / f"{stem}.json"
    if not p.exists():
        return None
    lines = [json.loads(x) for x in p.read_text().splitlines() if x.strip().startswith("{")]
    if not lines:
        return None
    d = lines[-1]
    lp = res / f"{stem}.load"
    if lp.exists():
        d.update(json.loads(lp.read_text()))
    return d


def load(res, name):
    """One configuration and side over its rounds (NAME.json, NAME.r2.json, ...): the median of the
    per-process medians (and of per-part times), the smallest min, the largest peak and load."""
    stems = [name] + sorted(p.stem for p in res.glob(f"{name}.r*.json"))
    runs = [d for d in (load_one(res, s) for s in stems) if d]
    if not runs:
        return None
    d = dict(runs[0])
    for k, v in runs[0].items():
        vals = [r[k] for r in runs if isinstance(r.get(k), float)]
        if len(vals) != len(runs):
            continue
        if k.endswith("_min"):
            d[k] = min(vals)
        elif k.startswith("peak_") or k == "other_cores":
            d[k] = max(vals)
        else:
            d[k] = statistics.median(vals)
    d["rounds"] = len(runs)
    return d


def shown(model, d):
    """A model's name in the tables: "big" is the mid model at another resolution."""
    name = "mid" if model == "big" else model
    return f"{name} {d['resolution']}px" if d and "resolution" in d else name


def mib(x):
    return "-" if x is None else f"{x:,.0f} MiB"


def num(x, fmt="{:.2f}"):
    return "-" if x is None else fmt.format(x)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--results", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--command", required=True)
    ap.add_argument("--started", default="")
    ap.add_argument("--torch", default="1")
    ap.add_argument("--python", default="python3")
    ap.add_argument("--threads", default="?")
    ap.add_argument("--lora-rank", default="?")
    a = ap.parse_args()
    res = a.results

    rows = {}
    for model in MODELS:
        for mode in MODES:
            for method in METHODS:
                key = f"{model}-{method}-{mode}"
                r = {impl: load(res, f"{key}-{impl}") for impl in ("dspo-server", "torch", "phases")}
                if any(r.values()):
                    rows[(model, method, mode)] = r
    any_torch = next((r["torch"] for r in rows.values() if r["torch"]), None)

    commit = sh("git", "rev-parse", "--short", "HEAD") or "unknown"
    dirty = sh("git", "status", "--porcelain", "--untracked-files=no")
    # The end of the measurements (train_step.sh writes uptime-end.txt then), not of this report.
    end = res / "uptime-end.txt"
    finished = (datetime.datetime.fromtimestamp(end.stat().st_mtime, datetime.timezone.utc) if end.exists()
                else datetime.datetime.now(datetime.timezone.utc)).strftime("%Y-%m-%dT%H:%M:%SZ")
    up = [(res / f).read_text().strip() if (res / f).exists() else "?" for f in ("uptime-start.txt", "uptime-end.txt")]
    loads = [r[i]["other_cores"] for r in rows.values() for i in ("dspo-server", "torch")
             if r[i] and "other_cores" in r[i]]

    out = []
    w = out.append
    w("# Training step: dspo-server vs PyTorch\n")
    w("Written by `bench/train_report.py` from the raw JSON in `bench/results/train/` "
      "(regenerate with `bench/train_step.sh`, do not edit).\n")
    w("## Reproduce\n")
    w("```sh")
    w("bench/setup_python.sh            # once: torch, diffusers, peft (bench/requirements.txt)")
    w(a.command)
    w("```\n")
    w("One optimiser step on synthetic latents, the same on both sides (`src/cli/bench_train.rs`, "
      "`bench/torch_train_step.py`): x0 `[2P, 4, R/8, R/8]` (winners, losers), one noise draw, timestep "
      "and random text embedding `[77, D]` per pair shared by its two rows; `add_noise`; the policy UNet "
      "on the 2P rows (sft: the P winner rows); the frozen reference on the same rows without grad (LoRA: "
      "the same UNet with the adapters off, PEFT `disable_adapter()` on the PyTorch side; full: a frozen "
      "second UNet); the loss with beta 1; backward; clipping at global norm 1; AdamW (lr 1e-5, weight decay "
      f"1e-2). LoRA: rank = alpha = {a.lora_rank} on "
      "`to_q, to_k, to_v, to_out.0`, Gaussian A, zero B. float32 on the CPU with the same number of threads; "
      "each process loads the UNet, runs one untimed warm-up step, then the timed steps (median and min "
      "wall-clock); the batch is drawn before the clock starts. With several rounds each figure is the median "
      "over that many processes (min: the smallest; peak RSS: the largest). Peak memory is the process's peak RSS "
      "(VmHWM / `ru_maxrss`), one process per configuration. `ratio` = dspo-server / PyTorch.\n")

    w("## Machine\n")
    w(f"- CPU: {cpu_model()}, `nproc` = {os.cpu_count()}, {mem_gib()} RAM; flags: {cpu_flags()}")
    w(f"- OS: {platform.system()} {platform.release()}")
    w(f"- run: {a.started or '?'} to {finished} (UTC)")
    w(f"- load (`uptime`) at start: `{up[0]}`; at end: `{up[1]}`")
    if loads:
        w(f"- other processes during the runs: {sum(loads) / len(loads):.2f} cores on average, "
          f"{max(loads):.2f} at most (column `other load`; near 0 means clean numbers)")
    w(f"- git commit: `{commit}`" + (" plus uncommitted changes in the working tree" if dirty else ""))
    w(f"- dspo-server: candle-core {crate_version('candle-core')}, {sh('rustc', '--version') or 'rustc ?'}, "
      f"release profile, RAYON_NUM_THREADS={a.threads}")
    if any_torch:
        w(f"- PyTorch side: torch {any_torch.get('torch')}, diffusers, peft per bench/requirements.txt, "
          f"{any_torch.get('threads')} threads; `import torch` alone holds {mib(any_torch.get('import_rss_mib'))} "
          "of RSS (CUDA build of the wheel), included in its peak")
    elif a.torch != "1":
        w(f"- PyTorch side: **not run**: `{a.python}` cannot import torch/diffusers/peft (see bench/setup_python.sh)")
    w("")

    w("## Time per optimiser step and peak memory\n")
    w("| model | method | mode | trainable params | dspo-server median (min) | PyTorch median (min) | time ratio | "
      "dspo-server peak RSS | PyTorch peak RSS (above import) | RSS ratio | other load |")
    w("|---|---|---|---|---|---|---|---|---|---|---|")
    for (model, method, mode), r in rows.items():
        o, t = r["dspo-server"], r["torch"]
        if o is None:
            continue
        tcol = f"{secs(t['step_s_median'])} ({secs(t['step_s_min'])})" if t else "not run"
        trss = f"{mib(t['peak_rss_mib'])} ({mib(t['peak_rss_mib'] - t['import_rss_mib'])})" if t else "-"
        rr = num(o["peak_rss_mib"] / t["peak_rss_mib"]) if t else "-"
        ld = max((x.get("other_cores", 0.0) for x in (o, t) if x), default=0.0)
        params_note = "" if not t or t["trainable_params"] == o["trainable_params"] else \
            f" (PyTorch {t['trainable_params']:,})"
        w(f"| {'mid' if model == 'big' else model} {o['pairs']} pair(s) {o['resolution']}px | {method} | {mode} | {o['trainable_params']:,}{params_note} | "
          f"{secs(o['step_s_median'])} ({secs(o['step_s_min'])}) | {tcol} | "
          f"{ratio(o['step_s_median'], t['step_s_median'] if t else None)} | {mib(o['peak_rss_mib'])} | {trss} | "
          f"{rr} | {ld:.2f} |")
    w("")

    w("## Does DSPO cost the same as Diffusion-DPO?\n")
    w(f"The paper: {PAPER_DSPO_MIN} vs {PAPER_DPO_MIN} min per step on an A100, "
      f"ratio {PAPER_DSPO_MIN / PAPER_DPO_MIN:.3f}.\n")
    ab_rows = []
    for model in MODELS:
        for mode in MODES:
            cells = []
            for impl in ("dspo-server", "torch"):
                d = load(res, f"ab-{model}-{mode}-{impl}")
                bm = d.get("by_method", {}) if d else {}
                x, y = bm.get("dspo"), bm.get("diffusion_dpo")
                if x and y:
                    cells += [f"{secs(x['step_s_median'])} / {secs(y['step_s_median'])}",
                              f"**{x['step_s_median'] / y['step_s_median']:.3f}** "
                              f"({x['step_s_min'] / y['step_s_min']:.3f})"]
                else:
                    cells += ["-", "-"]
            ours = load(res, f"ab-{model}-{mode}-dspo-server")
            label = f"{mode} (ours: gradients detached)" if ours and ours.get("detach_grads") else mode
            if any(c != "-" for c in cells):
                ab_rows.append(f"| {model} | {label} | " + " | ".join(cells) + " |")
    if ab_rows:
        w("Both methods alternating step by step in one process (one warm-up step each, then the timed steps "
          "of each; dspo-server: the `train_phases` probe running `bench-train`'s calls, PyTorch: "
          "`torch_train_step.py --method dspo,diffusion_dpo`). Time per step, median; the ratio is "
          "dspo / diffusion_dpo on medians (on mins in brackets). With full fine-tuning our side hands AdamW detached "
          "gradients here (the probe's `--detach-grads`), for both methods alike: as `bench-train` runs it, memory "
          "grows with every step (next section) and this many steps of the mid model do not fit in 24 GiB.\n")
        w("| model | mode | dspo-server dspo / diffusion_dpo | dspo-server ratio | PyTorch dspo / diffusion_dpo | "
          "PyTorch ratio |")
        w("|---|---|---|---|---|---|")
        for line in ab_rows:
            w(line)
        w("")
    w("From the main table (separate processes, so process-to-process drift is included), dspo / diffusion_dpo:\n")
    w("| model | mode | dspo-server time ratio | dspo-server RSS ratio | PyTorch time ratio | PyTorch RSS ratio |")
    w("|---|---|---|---|---|---|")
    for model in MODELS:
        for mode in MODES:
            d, p = rows.get((model, "dspo", mode)), rows.get((model, "diffusion_dpo", mode))
            if not d or not p:
                continue
            cells = []
            for impl in ("dspo-server", "torch"):
                x, y = d[impl], p[impl]
                if x and y:
                    cells.append(f"{x['step_s_median'] / y['step_s_median']:.3f} "
                                 f"({x['step_s_min'] / y['step_s_min']:.3f})")
                    cells.append(f"{x['peak_rss_mib'] / y['peak_rss_mib']:.3f}")
                else:
                    cells += ["-", "-"]
            w(f"| {model} | {mode} | " + " | ".join(cells) + " |")
    w("\nBoth methods run the same two UNet passes (policy with grad, reference without) on the same 2P rows and "
      "differ only in the loss, a few element-wise operations on the output and their gradient: "
      "the expected ratio is 1 plus a small fraction.\n")

    if any(r["phases"] for r in rows.values()):
        w("## Where the time goes\n")
        w("Median seconds per step for each part. PyTorch: `torch_train_step.py --phases` (the timed steps above). dspo-server: "
          "the `bench/train_phases` probe, which runs the same calls as `bench-train` (`batch_loss`, "
          "`backward`, `clip`, `AdamW::update`) in a separate process and times the reference pass again on "
          "its own (policy forward = `batch_loss` minus that); `add_noise` and the pair loss are counted in "
          "the forward. Each cell: dspo-server / PyTorch (ratio). RSS: after loading the UNet(s) and creating "
          "AdamW, then after the first step's forward, backward and clip + AdamW update (later readings "
          "include buffers the allocator keeps after a step).\n")
        w("| model | method | mode | " + " | ".join(n for _, n in PHASES) + " | probe step | "
          "dspo-server RSS: loaded / after 1st forward / after 1st backward / after 1st update / peak | other load |")
        w("|---|---|---|" + "---|" * len(PHASES) + "---|---|---|")
        for (model, method, mode), r in rows.items():
            ph, t = r["phases"], r["torch"]
            if not ph:
                continue
            cells = []
            for k, _ in PHASES:
                ov = ph.get(k)
                tv = t.get(k) if t else None
                if method == "sft" and k == "reference_s":
                    cells.append("-")
                elif tv:
                    cells.append(f"{secs(ov)} / {secs(tv)} ({ov / tv:.1f}x)")
                else:
                    cells.append(secs(ov))
            w(f"| {shown(model, ph)} | {method} | {mode} | " + " | ".join(cells) + f" | {secs(ph['step_s_median'])} | "
              f"{mib(ph['rss_loaded_mib'])} / {mib(ph['rss_first_forward_mib'])} / {mib(ph['rss_first_backward_mib'])} / "
              f"{mib(ph['rss_first_update_mib'])} / "
              f"{mib(ph['peak_rss_mib'])} | {max(ph.get('other_cores', 0.0), t.get('other_cores', 0.0) if t else 0.0):.2f} |")
        w("")
        worst = []
        for (model, method, mode), r in rows.items():
            ph, t = r["phases"], r["torch"]
            if not ph or not t:
                continue
            excess = {n: ph[k] - t[k] for k, n in PHASES if k in ph and k in t}
            if excess:
                name = max(excess, key=excess.get)
                total = sum(v for v in excess.values() if v > 0)
                if total > 0:
                    worst.append(f"{shown(model, ph)} {method} {mode}: {name} "
                                 f"({excess[name] / total * 100:.0f}% of the excess)")
        if worst:
            w("Largest part of our excess over PyTorch, per configuration: " + "; ".join(worst) + ".\n")

    growth = sorted((int(f.stem.split("-")[1][1:]), f.stem.split("-", 2)[2])
                    for f in res.glob("growth-s*-*.json"))
    if growth:
        counts = sorted({n for n, _ in growth})
        kinds = (("dspo-server", "`bench-train`"), ("detached", "probe, gradients detached before clip + AdamW"),
                 ("torch", "PyTorch"))
        w("## Memory over a run (mid, sft, full fine-tuning)\n")
        w("Peak RSS after 1 warm-up step plus N timed steps, each in its own process.\n")
        w("| steps (warm-up + timed) | " + " | ".join(n for _, n in kinds) + " |")
        w("|---|" + "---|" * len(kinds))
        peaks = {}
        for n in counts:
            cells = []
            for k, _ in kinds:
                d = load(res, f"growth-s{n}-{k}")
                peaks[(n, k)] = d["peak_rss_mib"] if d else None
                cells.append(mib(peaks[(n, k)]))
            w(f"| 1 + {n} | " + " | ".join(cells) + " |")
        if len(counts) >= 2:
            lo, hi = counts[0], counts[-1]
            per = []
            for k, name in kinds:
                if peaks.get((lo, k)) is not None and peaks.get((hi, k)) is not None:
                    per.append(f"{name}: {(peaks[(hi, k)] - peaks[(lo, k)]) / (hi - lo):+,.0f} MiB")
            w("\nGrowth per additional step: " + "; ".join(per) + ".\n")

    w("## Reading the numbers\n")
    w("- PyTorch's peak RSS includes what `import torch` maps (the CUDA build of the wheel), given in brackets "
      "as \"above import\"; for small models that baseline dominates.")
    w("- Our peak RSS with full fine-tuning depends on how many steps the process ran (see \"Memory over a "
      "run\"): the main table's figure is after its warm-up plus timed steps.")
    w("- sft with full fine-tuning: the PyTorch step builds no reference (SFT needs none); ours keeps the frozen "
      "base UNet loaded in that case too (`bench.rs` as `trainer.rs`), one extra copy of the weights.")
    w("- Gradient checkpointing: `bench-train` uses the trainer's default, off on the CPU (our fused kernels "
      "already keep less than PyTorch does without it, and the recompute costs time), on for GPUs; the PyTorch "
      "side does not checkpoint. `--gradient-checkpointing true` measures the other setting.")
    w("- Memory over a run: the section above compares `bench-train` with the same steps given detached "
      "gradients (the probe's `--detach-grads`); equal figures mean AdamW keeps nothing of the graph.")
    w("- Few timed steps on a shared 2-core machine: between separate processes, ratios within about 20% are noise "
      "(compare median and min); runs with `other load` well above 0 are not clean.\n")
    w("## Models\n")
    w("- **tiny**: `shared/conformance/models/tiny-sd15` as it is (UNet 16/16/32/32, cross-attention 32).")
    for line in (res / "mid-model.jsonl").read_text().splitlines() if (res / "mid-model.jsonl").exists() else []:
        c = json.loads(line)
        if c.get("component") == "unet" and c.get("action") == "weights":
            w(f"- **mid**: `shared/configs/stable-diffusion-v1-5` UNet with random weights from `dspo-server "
              f"make-random-model`: {c['parameters']:,} parameters ({'; '.join(c['changed'])}).")
    w("")
    a.out.write_text("\n".join(out) + "\n")


if __name__ == "__main__":
    main()
