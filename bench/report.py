#!/usr/bin/env python3
"""Turns the JSON lines of bench/cpu_txt2img.sh into bench/RESULTS.md (standard library only,
so it runs where torch is missing too)."""

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
IMPLS = ("dspo-server", "diffusers")
STAGES = (("text_encoder_s", "text encoder (negative + positive prompt)"),
          ("unet_s", "one UNet call (CFG batch)"),
          ("vae_decode_s", "VAE decode"))


def read_lines(path):
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip().startswith("{")]


def summary(results, label, impl):
    for line in read_lines(results / f"{label}-{impl}.jsonl"):
        if line.get("event") == "summary":
            return line
    return None


def sh(*cmd):
    try:
        return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def cpu_model():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def mem_gib():
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal"):
                return f"{int(line.split()[1]) / 2**20:.0f} GiB"
    except OSError:
        pass
    return "unknown"


def cpu_flags():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                return " ".join(f for f in ("avx2", "fma", "f16c", "avx512f", "avx512_bf16", "amx_tile") if f in flags)
    except OSError:
        pass
    return ""


def crate_version(name):
    lock = (ROOT / "Cargo.lock").read_text()
    m = re.search(r'name = "%s"\nversion = "([^"]+)"' % re.escape(name), lock)
    return m.group(1) if m else "?"


def secs(x):
    if x is None:
        return "-"
    return f"{x * 1000:.1f} ms" if x < 1 else f"{x:.2f} s"


def ratio(a, b):
    if a is None or b is None or b == 0:
        return "-"
    r = a / b
    return f"{r:.2f}" + (" (ours faster)" if r < 1 else " (ours slower)")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--results", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--command", required=True)
    ap.add_argument("--started", default="")
    ap.add_argument("--finished", default="")
    ap.add_argument("--diffusers", default="1")
    ap.add_argument("--python", default="python3")
    args = ap.parse_args()
    res = args.results
    labels = [label for label in ("tiny", "mid") if (res / f"{label}-dspo-server.jsonl").exists()]
    ours = {label: summary(res, label, "dspo-server") for label in labels}
    theirs = {label: summary(res, label, "diffusers") for label in labels}
    any_theirs = next((t for t in theirs.values() if t), None)

    commit = sh("git", "rev-parse", "--short", "HEAD") or "unknown"
    dirty = sh("git", "status", "--porcelain", "--untracked-files=no")
    finished = args.finished or datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    first = next(iter(ours.values()), None) or {}

    out = []
    w = out.append
    w("# CPU txt2img latency: dspo-server vs diffusers\n")
    w("Written by `bench/report.py` from the raw JSON lines in `bench/results/` (regenerate, do not edit).\n")
    w("## Reproduce\n")
    w("```sh")
    w("bench/setup_python.sh            # once: .venv with torch, diffusers, transformers (bench/requirements.txt)")
    w(args.command)
    w("```\n")
    w(f"(`PYTHON` was a virtualenv with `bench/requirements.txt` installed; `.venv/bin/python` after "
      "`bench/setup_python.sh`.)\n")
    w("Both sides load the same directory, run txt2img with the "
      f"{first.get('scheduler', 'ddim').upper()} scheduler, guidance {first.get('guidance', '?')}, the same prompt, "
      "float32 on the CPU with the same thread count; each does one untimed warm-up generation, "
      f"then {first.get('repeats', '?')} timed (median and min wall-clock). "
      "Stage timings use the same protocol on each stage alone. "
      "`ratio` = dspo-server time / diffusers time.\n")
    w("## Machine\n")
    w(f"- CPU: {cpu_model()}, `nproc` = {os.cpu_count()}, {mem_gib()} RAM; flags: {cpu_flags()}")
    w(f"- OS: {platform.system()} {platform.release()}")
    w(f"- run: {args.started or '?'} to {finished} (UTC)")
    w(f"- git commit: `{commit}`" + (" plus uncommitted changes in the working tree" if dirty else ""))
    w(f"- dspo-server: candle-core {crate_version('candle-core')}, {sh('rustc', '--version') or 'rustc ?'}, "
      f"release profile, {first.get('threads', '?')} threads")
    if any_theirs:
        w(f"- diffusers side: torch {any_theirs.get('torch')}, diffusers {any_theirs.get('diffusers')}, "
          f"transformers {any_theirs.get('transformers')}, {any_theirs.get('threads')} threads")
    elif args.diffusers != "1":
        w(f"- diffusers side: **not run**: `{args.python}` cannot import torch/diffusers/transformers "
          "(see bench/setup_python.sh)")
    else:
        w("- diffusers side: **failed** (see target/bench/*-diffusers.log)")
    w("")

    w("## Whole pipeline\n")
    w("| model | image | steps | batch | dspo-server median (min) | diffusers median (min) | ratio | other load (cores) |")
    w("|---|---|---|---|---|---|---|---|")
    for label in labels:
        o, t = ours[label], theirs[label]
        if o is None:
            continue
        load = max((x.get("other_cores_max") or 0.0) for x in (o, t) if x)
        tcol = f"{secs(t['median_s'])} ({secs(t['min_s'])})" if t else "not run"
        w(f"| {label} | {o['size']}x{o['size']} | {o['steps']} | {o['batch']} | "
          f"{secs(o['median_s'])} ({secs(o['min_s'])}) | {tcol} | "
          f"{ratio(o['median_s'], t['median_s'] if t else None)} | {load:.2f} |")
    w("\n`other load`: the most CPU (in cores) other processes used during any timed run of either side "
      "(from /proc/stat, approximate); near 0 means the numbers are clean. The script re-measures a side "
      "whose runs exceeded `MAX_OTHER`.\n")

    w("## Where the time goes\n")
    w("| model | stage | dspo-server | diffusers | ratio | share of a dspo-server generation |")
    w("|---|---|---|---|---|---|")
    for label in labels:
        o, t = ours[label], theirs[label]
        if o is None or "unet_s" not in o:
            continue
        for key, name in STAGES:
            a = o.get(key)
            b = t.get(key) if t else None
            calls = o["steps"] if key == "unet_s" else 1
            share = a * calls / o["median_s"] if a is not None and o["median_s"] else None
            what = f"{name}, {calls} per generation" if calls > 1 else name
            w(f"| {label} | {what} | {secs(a)} | {secs(b)} | {ratio(a, b)} | "
              f"{'-' if share is None else f'{share * 100:.0f}%'} |")
    w("\nShares are stage time x calls per generation / whole-generation median; the rest is scheduler "
      "arithmetic, CFG combination, noise and tokenisation.\n")

    w("## Models\n")
    if "tiny" in labels:
        w("- **tiny**: `shared/conformance/models/tiny-sd15` as it is (UNet 16/16/32/32, 2 heads; VAE 8/8/16/16; "
          "CLIP 32 wide, 2 layers), diffusers-written weights.")
    mid = read_lines(res / "mid-model.jsonl")
    if mid:
        parts = []
        for c in mid:
            if c.get("action") == "weights":
                changed = "; ".join(c["changed"]) if c["changed"] else "config unchanged"
                parts.append(f"{c['component']} {c['parameters']:,} parameters ({changed})")
        w("- **mid**: `shared/configs/stable-diffusion-v1-5` with random weights written by "
          "`dspo-server make-random-model` (same layer structure, narrower channels): " + "; ".join(parts) + ".")
    checks = [(label, t.get("keys_match")) for label, t in theirs.items() if t and "keys_match" in t]
    if checks:
        w("- Name check: the tensor names in each weight file equal the parameter names of the diffusers/transformers "
          "module that loaded it: " + ", ".join(f"{label} {'yes' if ok else '**no**'}" for label, ok in checks) + ".")
    w("")
    args.out.write_text("\n".join(out) + "\n")


if __name__ == "__main__":
    main()
