#!/usr/bin/env bash
# /generate latency while the server is idle vs while a fine-tuning job trains on the same
# machine (training must not starve inference; target p50 during training <= 2x idle).
# Writes bench/CONTENTION.md. Usage: bench/finetune_contention.sh [N_REQUESTS] [MODEL_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
N="${1:-20}"
MODEL="${2:-../shared/conformance/models/tiny-sd15}"
STEPS="${STEPS:-8}"
SIZE="${SIZE:-64}"
cargo build --release --quiet
BIN=./target/release/dspo-server
WORK="$(mktemp -d)"
trap 'kill $SERVER_PID $WWW_PID 2>/dev/null || true; rm -rf "$WORK"' EXIT
cp ../shared/shapes/prefs_centered.parquet "$WORK/prefs.parquet"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
WWW_PORT=$(free_port); PORT=$(free_port)
(cd "$WORK" && exec python3 -m http.server "$WWW_PORT" --bind 127.0.0.1 >/dev/null 2>&1) & WWW_PID=$!
$BIN serve --listen "127.0.0.1:$PORT" --model "m=$MODEL" --data-dir "$WORK/data" --allow-private-dataset-urls \
  >"$WORK/server.log" 2>&1 & SERVER_PID=$!
until curl -sf "127.0.0.1:$PORT/ready" >/dev/null; do sleep 0.2; done
BODY="{\"prompt\": \"a red circle on a white background\", \"steps\": $STEPS, \"width\": $SIZE, \"height\": $SIZE, \"seed\": 1}"
measure() {  # $1 = label; prints one latency (s) per line into $WORK/$1
  : > "$WORK/$1"
  for _ in $(seq "$N"); do
    curl -s -o /dev/null -w '%{time_total}\n' "127.0.0.1:$PORT/generate" -H 'content-type: application/json' -d "$BODY" >> "$WORK/$1"
  done
}
N_SAVE=$N; N=3; measure warmup; N=$N_SAVE
LOAD_IDLE=$(cut -d' ' -f1 /proc/loadavg)
measure idle
JOB=$(curl -s "127.0.0.1:$PORT/finetune" -H 'content-type: application/json' -d "{
  \"dataset_url\": \"http://127.0.0.1:$WWW_PORT/prefs.parquet\", \"method\": \"dspo\", \"adapter_name\": \"contention\",
  \"hyperparameters\": {\"max_steps\": 100000, \"batch_size\": 4, \"checkpoint_every\": 0}}" | python3 -c 'import json,sys; print(json.load(sys.stdin)["job_id"])')
until curl -s "127.0.0.1:$PORT/finetune/$JOB" | grep -q '"status":"training"'; do sleep 0.2; done
sleep 2
STEP0=$(curl -s "127.0.0.1:$PORT/finetune/$JOB" | python3 -c 'import json,sys; print((json.load(sys.stdin).get("progress") or {}).get("step",0))')
T0=$(date +%s.%N)
measure training
T1=$(date +%s.%N)
STEP1=$(curl -s "127.0.0.1:$PORT/finetune/$JOB" | python3 -c 'import json,sys; print((json.load(sys.stdin).get("progress") or {}).get("step",0))')
LOAD_TRAIN=$(cut -d' ' -f1 /proc/loadavg)
curl -s -X DELETE "127.0.0.1:$PORT/finetune/$JOB" >/dev/null
python3 - "$WORK" "$N" "$MODEL" "$STEPS" "$SIZE" "$STEP0" "$STEP1" "$T0" "$T1" "$LOAD_IDLE" "$LOAD_TRAIN" <<'PY'
import statistics, sys, subprocess, datetime, os
work, n, model, steps, size, s0, s1, t0, t1, li, lt = sys.argv[1:]
def read(name):
    return sorted(float(x) for x in open(os.path.join(work, name)) if x.strip())
idle, train = read("idle"), read("training")
def q(v, p): return v[min(len(v) - 1, int(p * len(v)))]
p50i, p50t = statistics.median(idle), statistics.median(train)
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
rate = (int(s1) - int(s0)) / max(float(t1) - float(t0), 1e-9)
out = f"""# /generate latency: idle vs during a fine-tuning job

Written by `bench/finetune_contention.sh` (regenerate, do not edit).

```sh
bench/finetune_contention.sh {n} {model}    # STEPS={steps} SIZE={size}
```

One server, one model (`{model}`), {n} sequential /generate requests ({size}x{size}, {steps} steps) while idle, then {n} while a
DSPO LoRA job (batch 4) trains on the same CPU. The trainer pauses between optimiser steps while any inference request is
queued, so a request waits for at most the optimiser step in progress.

| | p50 | p90 | max |
|---|---|---|---|
| idle | {p50i*1000:.1f} ms | {q(idle,.9)*1000:.1f} ms | {idle[-1]*1000:.1f} ms |
| during training | {p50t*1000:.1f} ms | {q(train,.9)*1000:.1f} ms | {train[-1]*1000:.1f} ms |
| ratio | **{p50t/p50i:.2f}x** (target <= 2x) | {q(train,.9)/q(idle,.9):.2f}x | |

Training kept going meanwhile: {int(s1)-int(s0)} optimiser steps during the {float(t1)-float(t0):.1f} s of measurement ({rate:.2f} steps/s).

Machine: {cpu}, `nproc` = {os.cpu_count()}; load average (1 min) {li} before, {lt} during; {datetime.datetime.utcnow().strftime('%Y-%m-%dT%H:%MZ')}; commit `{commit}`.
"""
open("bench/CONTENTION.md", "w").write(out)
print(out)
PY
