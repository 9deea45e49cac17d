#!/usr/bin/env bash
# Training-step cost: dspo-server `bench-train` vs a PyTorch step (bench/torch_train_step.py)
# on the same weight files, for dspo / diffusion_dpo / sft, LoRA and full fine-tuning, on the
# tiny and the mid model. Each configuration runs in its own process (peak RSS is per process).
# Writes the raw JSON to bench/results/train/ and the tables to bench/TRAINING.md.
#
#   PYTHON=.venv/bin/python bench/train_step.sh      # ~9 min on 2 idle cores
#
# Knobs (environment, default in brackets): PYTHON [python3], THREADS [nproc], STEPS [3] timed
# steps after one warm-up, ROUNDS [1] processes per configuration and side, AB_STEPS [6] timed
# steps of each method when dspo and diffusion_dpo alternate in one process, LORA_RANK [4],
# TINY_PAIRS [2], TINY_RES [128], MID_SCALE [0.25], MID_PAIRS [1], MID_RES [128], BIG_RES [256]
# (the mid model again at this resolution, where attention's share of time and memory is larger;
# methods BIG_METHODS ["dspo"]; empty BIG_RES skips it), METHODS ["dspo diffusion_dpo sft"], MODES ["lora full"], PHASES [1] (also split our step into
# forward / reference / backward / optimiser with the bench/train_phases probe, and check peak
# RSS over a longer run), QUIET_WAIT [120] (seconds to wait for other processes to leave the
# CPUs before each run), QUIET_BUDGET [600] (all such waits together), RETRY_LOAD [0.3] (run
# again once when other processes took more cores than this), WORK [target/bench-train],
# SHARED [../shared], SKIP_BUILD [0].
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
PYTHON=${PYTHON:-python3}
THREADS=${THREADS:-$(nproc)}
STEPS=${STEPS:-3}
ROUNDS=${ROUNDS:-1}
AB_STEPS=${AB_STEPS:-6}
LORA_RANK=${LORA_RANK:-4}
TINY_PAIRS=${TINY_PAIRS:-2}
TINY_RES=${TINY_RES:-128}
MID_SCALE=${MID_SCALE:-0.25}
MID_PAIRS=${MID_PAIRS:-1}
MID_RES=${MID_RES:-128}
BIG_RES=${BIG_RES-256}
BIG_METHODS=${BIG_METHODS:-dspo}
METHODS=${METHODS:-dspo diffusion_dpo sft}
MODES=${MODES:-lora full}
PHASES=${PHASES:-1}
QUIET_WAIT=${QUIET_WAIT:-120}
QUIET_BUDGET=${QUIET_BUDGET:-600}
RETRY_LOAD=${RETRY_LOAD:-0.3}
WAITED=0
# A separate directory from cpu_txt2img.sh's, which deletes and rewrites its mid model.
WORK=${WORK:-$ROOT/target/bench-train}
SHARED=${SHARED:-$ROOT/../shared}
RAW=$ROOT/bench/results/train
BIN=$ROOT/target/release/dspo-server
PROBE=$ROOT/target/release/train-phases
COMMAND="PYTHON=$PYTHON THREADS=$THREADS STEPS=$STEPS ROUNDS=$ROUNDS AB_STEPS=$AB_STEPS LORA_RANK=$LORA_RANK TINY_PAIRS=$TINY_PAIRS TINY_RES=$TINY_RES MID_SCALE=$MID_SCALE MID_PAIRS=$MID_PAIRS MID_RES=$MID_RES BIG_RES=$BIG_RES PHASES=$PHASES bench/train_step.sh"

log() { echo "[train_step] $*" >&2; }

# Busy CPU seconds (all but idle and iowait) summed over all cores, from /proc/stat.
busy_ticks() { awk '/^cpu /{print $2+$3+$4+$7+$8+$9}' /proc/stat; }
HZ=$(getconf CLK_TCK)

busy_cores() {
    local a b
    a=$(busy_ticks)
    sleep 2
    b=$(busy_ticks)
    awk -v a="$a" -v b="$b" -v hz="$HZ" 'BEGIN{printf "%.2f", (b-a)/hz/2}'
}

# A build or test run of another engineer on a 2-core machine would be timed with us, and
# PyTorch's spinning OpenMP threads suffer most: wait for idle CPUs, up to QUIET_WAIT s.
wait_quiet() {
    local start=$SECONDS busy
    local deadline=$((SECONDS + QUIET_WAIT))
    ((deadline > SECONDS + QUIET_BUDGET - WAITED)) && deadline=$((SECONDS + QUIET_BUDGET - WAITED))
    while :; do
        busy=$(busy_cores)
        if awk -v b="$busy" 'BEGIN{exit !(b < 0.3)}'; then WAITED=$((WAITED + SECONDS - start)); return 0; fi
        if ((SECONDS >= deadline)); then
            WAITED=$((WAITED + SECONDS - start))
            log "machine still busy ($busy cores in use by others): measuring anyway (see other_cores)"
            return 0
        fi
        log "waiting for an idle machine ($busy cores busy)"
        sleep 5
    done
}

# measure NAME CMD...: runs CMD, keeps its JSON line in $RAW/NAME.json and, in NAME.load,
# how many cores other processes used on average while it ran (machine busy time minus the
# command's own user+sys time, over its wall time). A run that shared the CPUs with more than
# RETRY_LOAD cores of other work is run once more, and the second result kept.
measure() {
    run_once "$@"
    if awk -v l="$(sed 's/.*"other_cores": \([0-9.]*\).*/\1/' "$RAW/$1.load" 2>/dev/null || echo 0)" \
        -v m="$RETRY_LOAD" 'BEGIN{exit !(l > m)}'; then
        log "$1 shared the CPUs with other processes: running it again"
        run_once "$@"
    fi
}

run_once() {
    local name=$1
    shift
    wait_quiet
    log "$name: $*"
    local before after
    before=$(busy_ticks)
    if ! /usr/bin/time -f "%e %U %S" -o "$WORK/$name.time" "$@" > "$RAW/$name.json" 2> "$WORK/$name.log"; then
        log "$name failed:"
        tail -5 "$WORK/$name.log" >&2
        rm -f "$RAW/$name.json"
        return 0
    fi
    after=$(busy_ticks)
    read -r wall user sys < <(tail -1 "$WORK/$name.time")
    awk -v a="$before" -v b="$after" -v hz="$HZ" -v w="$wall" -v u="$user" -v s="$sys" \
        'BEGIN{o=((b-a)/hz-u-s)/w; if (o<0) o=0; printf "{\"other_cores\": %.2f, \"wall_s\": %s, \"cpu_s\": %.2f}\n", o, w, u+s}' \
        > "$RAW/$name.load"
}

if [[ "${SKIP_BUILD:-0}" != 1 ]]; then
    log "cargo build --release"
    cargo build --release >&2
    if [[ $PHASES == 1 ]]; then
        # The probe's own lock file starts from ours so that no dependency is re-resolved,
        # and its target dir is ours so that the already-built dependencies are reused.
        cp Cargo.lock bench/train_phases/Cargo.lock
        CARGO_TARGET_DIR=$ROOT/target cargo build --release --manifest-path bench/train_phases/Cargo.toml >&2
    fi
fi

TINY=$SHARED/conformance/models/tiny-sd15
MID=$WORK/sd15-w$MID_SCALE
mkdir -p "$WORK" "$RAW"
rm -f "$RAW"/*.json "$RAW"/*.load "$RAW"/*.txt
log "writing the mid model: SD1.5 config at width x$MID_SCALE -> $MID"
rm -rf "$MID"
"$BIN" make-random-model --config-dir "$SHARED/configs/stable-diffusion-v1-5" --out "$MID" \
    --width-scale "$MID_SCALE" --seed 0 --dtype f32 > "$RAW/mid-model.jsonl"

if "$PYTHON" -c 'import torch, diffusers, peft' 2> "$WORK/python-check.log"; then
    TORCH=1
else
    TORCH=0
    log "PyTorch side skipped: $PYTHON cannot import torch/diffusers/peft ($(tail -1 "$WORK/python-check.log"))"
fi

uptime > "$RAW/uptime-start.txt"
START=$(date -u +%Y-%m-%dT%H:%M:%SZ)
# Round 1 runs every side (and the phase probe); later rounds run bench-train and PyTorch again,
# so that each figure is a median over ROUNDS processes (process-to-process drift on a shared
# machine is larger than the dspo / diffusion_dpo difference).
for round in $(seq 1 "$ROUNDS"); do
    suffix=""
    ((round > 1)) && suffix=".r$round"
    models="tiny mid"
    [[ -n $BIG_RES ]] && models+=" big"
    for model in $models; do
        methods=$METHODS
        case $model in
        tiny) dir=$TINY pairs=$TINY_PAIRS res=$TINY_RES ;;
        mid) dir=$MID pairs=$MID_PAIRS res=$MID_RES ;;
        big) dir=$MID pairs=$MID_PAIRS res=$BIG_RES methods=$BIG_METHODS ;;
        esac
        for mode in $MODES; do
            full=()
            [[ $mode == full ]] && full=(--full)
            for method in $methods; do
                args=(--model "$dir" --method "$method" "${full[@]}" --lora-rank "$LORA_RANK" --pairs "$pairs"
                    --resolution "$res" --steps "$STEPS")
                key=$model-$method-$mode
                measure "$key-dspo-server$suffix" env RAYON_NUM_THREADS="$THREADS" "$BIN" bench-train "${args[@]}"
                if [[ $TORCH == 1 ]]; then
                    measure "$key-torch$suffix" "$PYTHON" bench/torch_train_step.py "${args[@]}" --threads "$THREADS" --phases
                fi
                if [[ $PHASES == 1 && $round == 1 ]]; then
                    measure "$key-phases" env RAYON_NUM_THREADS="$THREADS" "$PROBE" "${args[@]}"
                fi
            done
        done
    done
done

# DSPO vs Diffusion-DPO: both methods alternate step by step in one process, so that the small
# difference between them is not buried under process-to-process drift.
if ((AB_STEPS > 0)) && [[ " $METHODS " == *" dspo "* && " $METHODS " == *" diffusion_dpo "* ]]; then
    for model in tiny mid; do
        if [[ $model == tiny ]]; then dir=$TINY pairs=$TINY_PAIRS res=$TINY_RES; else dir=$MID pairs=$MID_PAIRS res=$MID_RES; fi
        for mode in $MODES; do
            full=()
            [[ $mode == full ]] && full=(--full)
            args=(--model "$dir" --method dspo,diffusion_dpo "${full[@]}" --lora-rank "$LORA_RANK" --pairs "$pairs"
                --resolution "$res" --steps "$AB_STEPS")
            # Full fine-tuning as bench-train runs it grows with every step (the growth check
            # below): 2 x (AB_STEPS + 1) steps of the mid model ran out of 24 GiB, so here AdamW
            # gets detached gradients, for both methods alike.
            detach=()
            [[ $mode == full ]] && detach=(--detach-grads)
            if [[ $PHASES == 1 ]]; then
                measure "ab-$model-$mode-dspo-server" env RAYON_NUM_THREADS="$THREADS" "$PROBE" "${args[@]}" "${detach[@]}"
            fi
            if [[ $TORCH == 1 ]]; then
                measure "ab-$model-$mode-torch" "$PYTHON" bench/torch_train_step.py "${args[@]}" --threads "$THREADS"
            fi
        done
    done
fi

# Peak RSS of full fine-tuning after a different number of steps: does memory stay flat over a
# run, and does it when AdamW gets detached gradients (the probe's --detach-grads)?
if [[ $PHASES == 1 && " $MODES " == *" full "* ]]; then
    for n in 1 $((STEPS + 3)); do
        args=(--model "$MID" --method sft --full --pairs "$MID_PAIRS" --resolution "$MID_RES" --steps "$n")
        measure "growth-s$n-dspo-server" env RAYON_NUM_THREADS="$THREADS" "$BIN" bench-train "${args[@]}"
        measure "growth-s$n-detached" env RAYON_NUM_THREADS="$THREADS" "$PROBE" "${args[@]}" --detach-grads
        if [[ $TORCH == 1 ]]; then
            measure "growth-s$n-torch" "$PYTHON" bench/torch_train_step.py "${args[@]}" --threads "$THREADS"
        fi
    done
fi
uptime > "$RAW/uptime-end.txt"

# Kept results name files relative to the repository, not by this machine's paths.
sed -i "s#$ROOT/##g" "$RAW"/*.json
python3 bench/train_report.py --results "$RAW" --out bench/TRAINING.md --command "$COMMAND" \
    --started "$START" --torch "$TORCH" --python "$PYTHON" --threads "$THREADS" --lora-rank "$LORA_RANK"
log "wrote bench/TRAINING.md"
