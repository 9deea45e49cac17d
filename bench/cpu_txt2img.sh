#!/usr/bin/env bash
# CPU txt2img latency: dspo-server vs diffusers, side by side on the same weight files.
# Writes the raw JSON lines to bench/results/ and the table to bench/RESULTS.md.
#
#   bench/cpu_txt2img.sh                                # diffusers column if $PYTHON has torch
#   PYTHON=.venv/bin/python bench/cpu_txt2img.sh        # after bench/setup_python.sh
#
# Models: "tiny" is the conformance suite's tiny-sd15 as it is; "mid" is SD1.5's real config
# at MID_SCALE width with random weights written by `dspo-server make-random-model`.
#
# Knobs (environment, default in brackets): PYTHON [python3], THREADS [nproc], REPEATS [3],
# TINY_SIZE [64], TINY_STEPS [20], MID_SCALE [0.25], MID_SIZE [256], MID_STEPS [10],
# SCHEDULER [ddim], BATCH [1], QUIET_WAIT [300] (seconds to wait for other processes to
# leave the CPUs before each measurement), MAX_OTHER [0.25] and RETRIES [2] (a measurement
# during which other processes used more than MAX_OTHER cores is taken again, up to RETRIES
# times), WORK [target/bench], SHARED [../shared], SKIP_BUILD [0].
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
PYTHON=${PYTHON:-python3}
THREADS=${THREADS:-$(nproc)}
REPEATS=${REPEATS:-3}
TINY_SIZE=${TINY_SIZE:-64}
TINY_STEPS=${TINY_STEPS:-20}
MID_SCALE=${MID_SCALE:-0.25}
MID_SIZE=${MID_SIZE:-256}
MID_STEPS=${MID_STEPS:-10}
SCHEDULER=${SCHEDULER:-ddim}
BATCH=${BATCH:-1}
QUIET_WAIT=${QUIET_WAIT:-300}
MAX_OTHER=${MAX_OTHER:-0.25}
RETRIES=${RETRIES:-2}
WORK=${WORK:-$ROOT/target/bench}
SHARED=${SHARED:-$ROOT/../shared}
RAW=$ROOT/bench/results
BIN=$ROOT/target/release/dspo-server
COMMAND="PYTHON=$PYTHON THREADS=$THREADS REPEATS=$REPEATS TINY_SIZE=$TINY_SIZE TINY_STEPS=$TINY_STEPS MID_SCALE=$MID_SCALE MID_SIZE=$MID_SIZE MID_STEPS=$MID_STEPS SCHEDULER=$SCHEDULER BATCH=$BATCH bench/cpu_txt2img.sh"

log() { echo "[cpu_txt2img] $*" >&2; }

# Busy cores over a 2 s window, from /proc/stat (all time but idle and iowait).
busy_cores() {
    local a b
    a=$(awk '/^cpu /{print $2+$3+$4+$7+$8+$9, $2+$3+$4+$5+$6+$7+$8+$9}' /proc/stat)
    sleep 2
    b=$(awk '/^cpu /{print $2+$3+$4+$7+$8+$9, $2+$3+$4+$5+$6+$7+$8+$9}' /proc/stat)
    awk -v a="$a" -v b="$b" -v n="$(nproc)" 'BEGIN{split(a,x," ");split(b,y," ");
        t=y[2]-x[2]; if (t<=0) {print 0; exit} printf "%.2f", n*(y[1]-x[1])/t}'
}

# Other processes (builds, tests) on a 2-core machine distort a CPU benchmark badly, and
# OpenMP's spinning threads suffer most: wait for the CPUs to be idle, up to QUIET_WAIT s.
wait_quiet() {
    local deadline=$((SECONDS + QUIET_WAIT)) busy
    while :; do
        busy=$(busy_cores)
        if awk -v b="$busy" 'BEGIN{exit !(b < 0.3)}'; then return 0; fi
        if ((SECONDS >= deadline)); then
            log "machine still busy ($busy cores in use by others): measuring anyway; see other_cores in the results"
            return 0
        fi
        log "waiting for an idle machine ($busy cores busy)"
        sleep 5
    done
}

if [[ "${SKIP_BUILD:-0}" != 1 ]]; then
    log "cargo build --release"
    cargo build --release >&2
fi

TINY=$SHARED/conformance/models/tiny-sd15
MID=$WORK/sd15-w$MID_SCALE
mkdir -p "$WORK"
log "writing the mid model: SD1.5 config at width x$MID_SCALE -> $MID"
rm -rf "$MID"
"$BIN" make-random-model --config-dir "$SHARED/configs/stable-diffusion-v1-5" --out "$MID" \
    --width-scale "$MID_SCALE" --seed 0 --dtype f32 > "$WORK/mid-model.jsonl"

if "$PYTHON" -c 'import torch, diffusers, transformers' 2> "$WORK/python-check.log"; then
    DIFFUSERS=1
else
    DIFFUSERS=0
    log "diffusers side skipped: $PYTHON cannot import torch/diffusers/transformers ($(tail -1 "$WORK/python-check.log"))"
fi

mkdir -p "$RAW"
# Only this script's files: bench/results/ also holds other benchmarks' output.
rm -f "$RAW"/tiny-*.jsonl "$RAW"/mid-*.jsonl
cp "$WORK/mid-model.jsonl" "$RAW/mid-model.jsonl"

# Cores other processes took during the timed runs of one result file (0 when unknown).
other_load() {
    python3 -c 'import json,sys
v=[json.loads(l).get("other_cores_max") for l in open(sys.argv[1]) if "\"summary\"" in l]
print(v[0] if v and v[0] is not None else 0)' "$1" 2>/dev/null || echo 0
}

# Runs one side ("$1": dspo-server or diffusers) on one case, again while other processes
# intruded on the timed runs.
measure() {
    local impl=$1 label=$2 out=$RAW/$2-$1.jsonl attempt=0 load
    shift 2
    while :; do
        wait_quiet
        log "$label: $impl $*"
        if [[ $impl == dspo-server ]]; then
            RAYON_NUM_THREADS=$THREADS "$BIN" bench txt2img "$@" > "$out"
        else
            "$PYTHON" "$ROOT/bench/diffusers_txt2img.py" "$@" --threads "$THREADS" > "$out" 2> "$WORK/$label-diffusers.log" ||
                { log "diffusers failed on $label:"; tail -5 "$WORK/$label-diffusers.log" >&2; return 0; }
        fi
        load=$(other_load "$out")
        if awk -v l="$load" -v m="$MAX_OTHER" 'BEGIN{exit !(l <= m)}' || ((attempt >= RETRIES)); then
            return 0
        fi
        attempt=$((attempt + 1))
        log "$label: $impl measured while others used $load cores; measuring again ($attempt/$RETRIES)"
    done
}

run_case() {
    local label=$1 model=$2 size=$3 steps=$4
    local args=(--model "$model" --steps "$steps" --size "$size" --batch "$BATCH" --repeats "$REPEATS"
        --scheduler "$SCHEDULER" --label "$label")
    measure dspo-server "$label" "${args[@]}"
    if [[ $DIFFUSERS == 1 ]]; then
        measure diffusers "$label" "${args[@]}"
    fi
}

START=$(date -u +%Y-%m-%dT%H:%M:%SZ)
run_case tiny "$TINY" "$TINY_SIZE" "$TINY_STEPS"
run_case mid "$MID" "$MID_SIZE" "$MID_STEPS"

END=$(date -u +%Y-%m-%dT%H:%M:%SZ)
# Kept results name files relative to the repository, not by this machine's paths.
sed -i "s#$ROOT/##g" "$RAW"/tiny-*.jsonl "$RAW"/mid-*.jsonl
python3 "$ROOT/bench/report.py" --results "$RAW" --out "$ROOT/bench/RESULTS.md" --command "$COMMAND" \
    --started "$START" --finished "$END" --diffusers "$DIFFUSERS" --python "$PYTHON"
log "wrote bench/RESULTS.md"
