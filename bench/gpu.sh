#!/usr/bin/env bash
# GPU benchmark and parity check in one run, for a GPU machine that may have no network access
# (everything it needs travels in one bundle), rehearsed on the CPU.
#
#   bench/gpu.sh pack        # build machine: CUDA binary (scripts/build-cuda.sh) + conformance
#                            # suite + configs + the diffusers wheel -> .device/bundle.tar.xz
#   bench/gpu.sh run         # GPU machine, in a copy of this repository with .device/ beside it
#   bench/gpu.sh report DIR  # anywhere: results.jsonl -> the side-by-side table (markdown)
#
# CPU rehearsal of every phase with the tiny conformance models (minutes, no GPU):
#   PACK_BIN=target/release/dspo-server bench/gpu.sh pack && DEVICE=cpu SCALE=tiny bench/gpu.sh run
#
# A/B of two builds in the same run (e.g. with and without cuDNN convolutions): set PACK_BIN_B
# to the second binary when packing; the `ab ...` tasks then run it under the label suffix -B.
# The `composed ...` tasks rerun a case with the composed attention instead of the fused kernel
# (DSPO_ATTENTION_KERNEL=composed), labelled -composed.
#
# What `run` does, most important first (each task gets what is left of BUDGET, at most its own
# limit, so one slow task cannot starve the rest; the table is printed with whatever finished):
#   0. the fused kernels against the composed form (check-kernels: values and gradients)
#   1. conformance suite on $DEVICE in f32 (parity with the float64 reference holds on the GPU)
#   2. full-size random-weight SD1.5 / SDXL in f16 from the real configs (make-random-model)
#   3. txt2img latency, ours then diffusers on the same files: SD1.5 512² 50 DDIM steps and
#      SDXL 1024² 30 steps, batch 1 and 4, f16 (and bf16 for SD1.5)
#   4. DSPO optimiser steps on SD1.5 at 512², ours vs PyTorch with the same loss and the same
#      gradient-checkpointing setting: LoRA with 1 and 4 pairs (the paper's per-GPU batch),
#      LoRA without checkpointing (its memory A/B), full fine-tuning
#   5. peak GPU memory of every process (nvidia-smi, 50 ms samples, minus the idle baseline)
# Everything lands in $OUT (results.jsonl, table.md, gpu.log); OUT defaults to target/gpu-out.
#
# Knobs: DEVICE [cuda:0], SCALE [full | tiny], REPEATS [3], BUDGET [540 s for everything],
# TASKS (a quoted task list, default at the end of run()), PYTHON [python3],
# OUT [target/gpu-out], MAX_BUNDLE_MIB [64: pack refuses a larger bundle plus tree, for
# machines that take the repository and bundle through a size-limited copy; 0 = no limit].
set -uo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
PY=${PYTHON:-python3}
DIFFUSERS_VERSION=0.39.0

pack() {
    set -e
    local bin=${PACK_BIN:-target/cuda/release/dspo-server} shared=${SHARED:-../shared}
    if [ -z "${PACK_BIN:-}" ] && [ ! -x "$bin" ]; then scripts/build-cuda.sh; fi
    rm -rf .device/stage && mkdir -p .device/stage/shared .device/stage/wheels
    cp "$bin" .device/stage/dspo-server
    [ -n "${PACK_BIN_B:-}" ] && cp "$PACK_BIN_B" .device/stage/dspo-server-b
    [ -d "$(dirname "$bin")/cuda-libs" ] && cp -r "$(dirname "$bin")/cuda-libs" .device/stage/
    # ip2p's tiny model is left out: the bundle must stay under MAX_BUNDLE_MIB, and its
    # UNet/pipeline path is the SD1.5 one with 8 input channels, covered by the CPU suite.
    # So are full-UNet training cases resumed from a saved optimiser state (several MiB of
    # incompressible moments each): resuming is host-side file handling, covered on the CPU,
    # and the un-resumed full and resumed LoRA steps still run on the GPU.
    mkdir -p .device/stage/shared/conformance/cases .device/stage/shared/conformance/models .device/stage/shared/configs
    cp -r "$shared/conformance/models/tiny-sd15" "$shared/conformance/models/tiny-sdxl" .device/stage/shared/conformance/models/
    for f in "$shared"/conformance/cases/*.json; do
        grep -q 'tiny-ip2p' "$f" && continue
        case $(basename "$f") in train_step_sd15_*_resumed.json) continue ;; esac
        cp "${f%.json}".* .device/stage/shared/conformance/cases/
    done
    cp -r "$shared/configs/stable-diffusion-v1-5" "$shared/configs/stable-diffusion-xl-base-1.0" .device/stage/shared/configs/
    # The GPU machine is expected to have torch, transformers and peft; diffusers travels here.
    "$PY" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
        -d .device/stage/wheels "diffusers==$DIFFUSERS_VERSION"
    cp bench/gpu_diffusers.py bench/torch_train_step.py .device/stage/
    (cd .device/stage && XZ_OPT='-9 -T2' tar -cJf ../bundle.tar.xz .)
    rm -rf .device/stage
    grep -qx '/.device/' .gitignore || echo '/.device/' >> .gitignore
    # What goes to the GPU machine: tracked and untracked-not-ignored files, plus the bundle.
    local tree bundle max=${MAX_BUNDLE_MIB:-64}
    tree=$( (git ls-files -z; git ls-files -z --others --exclude-standard) | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
    bundle=$(stat -c %s .device/bundle.tar.xz)
    echo "[gpu] .device/bundle.tar.xz $((bundle >> 20)) MiB + working tree $((tree >> 20)) MiB = $(((bundle + tree) >> 20)) MiB (limit $max MiB)" >&2
    (( max == 0 || bundle + tree < max << 20 )) || { echo "[gpu] bundle and tree exceed MAX_BUNDLE_MIB=$max" >&2; return 1; }
}

run() {
    local dev=${DEVICE:-cuda:0} scale=${SCALE:-full} reps=${REPEATS:-3}
    BUDGET=${BUDGET:-540}
    OUT=${OUT:-$ROOT/target/gpu-out}; mkdir -p "$OUT"
    local W=${WORK:-/tmp/dspo-gpu}; rm -rf "$W"; mkdir -p "$W"
    local RES=$OUT/results.jsonl LOG=$OUT/gpu.log; : > "$RES"; : > "$LOG"
    log() { echo "[gpu $(date +%T)] $*" | tee -a "$LOG" >&2; }
    "$PY" -c 'import sys,tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])' .device/bundle.tar.xz "$W/b" || { log "no bundle: run 'bench/gpu.sh pack' first"; return 1; }
    local BIN=$W/b/dspo-server S=$W/b/shared
    chmod +x "$BIN"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$W/site" "$W"/b/wheels/*.whl >>"$LOG" 2>&1 || log "diffusers wheel did not install"
    export PYTHONPATH=$W/site${PYTHONPATH:+:$PYTHONPATH}
    # cuBLAS, cuRAND and NVRTC from PyTorch's nvidia-* wheels (the binary's rpath covers cudart).
    local nvlibs
    nvlibs=$("$PY" -c 'import glob,os,nvidia; print(":".join(sorted({os.path.dirname(p) for d in nvidia.__path__ for p in glob.glob(os.path.join(d,"**","lib*.so*"), recursive=True)})))' 2>/dev/null || true)
    local drv; for drv in /usr/local/nvidia/lib64 /usr/local/nvidia/lib; do [ -d $drv ] && nvlibs=$nvlibs:$drv; done
    export LD_LIBRARY_PATH=$W/b/cuda-libs${nvlibs:+:${nvlibs#:}}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
    # Anything still missing (another CUDA layout there): look for it under /usr and /opt.
    local miss lib
    for miss in $(ldd "$BIN" 2>/dev/null | awk '/not found/ {print $1}'); do
        lib=$(find /usr /opt -name "$miss" 2>/dev/null | head -1)
        [ -n "$lib" ] && export LD_LIBRARY_PATH=$LD_LIBRARY_PATH:$(dirname "$lib") || log "missing library $miss"
    done
    local gpu=0; case $dev in cuda*) gpu=1 ;; esac
    {
        echo "commit $(git rev-parse --short HEAD 2>/dev/null || echo '?') device $dev scale $scale"
        [ $gpu = 1 ] && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
        "$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'
        ldd "$BIN" | grep -E 'cuda|cublas|curand|nvrtc'
    } >>"$LOG" 2>&1
    if ! "$BIN" --help >/dev/null 2>>"$LOG"; then
        log "the binary does not start here (libraries above): nothing to run"; return 1
    fi
    local base_mem=0
    [ $gpu = 1 ] && base_mem=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits | head -1)

    # measure PHASE LABEL TIMEOUT cmd...: runs cmd, appends its JSON lines tagged with the
    # phase and label, plus its peak GPU memory (MiB over the idle baseline).
    measure() {
        local phase=$1 label=$2 t=$3; shift 3
        local mem=$W/mem.$$ poller="" rc
        if [ $gpu = 1 ]; then
            nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 50 > "$mem" 2>/dev/null & poller=$!
        fi
        log "$phase/$label: $*"
        timeout "$t" "$@" > "$W/out.json" 2>>"$LOG"; rc=$?
        [ -n "$poller" ] && kill "$poller" 2>/dev/null && wait "$poller" 2>/dev/null
        local peak=null
        [ -s "$mem" ] && peak=$(sort -n "$mem" | tail -1 | awk -v b="$base_mem" '{print $1-b}')
        "$PY" - "$W/out.json" "$phase" "$label" "$rc" "$peak" >> "$RES" <<'EOF'
import json, sys
path, phase, label, rc, peak = sys.argv[1:]
lines = [l for l in open(path).read().splitlines() if l.startswith("{")]
summary = [json.loads(l) for l in lines if json.loads(l).get("event") in ("summary", None)]
rec = summary[-1] if summary else {}
rec.update(phase=phase, label=label, rc=int(rc), peak_gpu_mib=None if peak == "null" else float(peak))
print(json.dumps(rec))
EOF
        [ "$rc" = 0 ] || log "$phase/$label: exit $rc"
        rm -f "$mem"
    }

    local sd15 sdxl size=512 steps=50 xsize=1024 xsteps=30 tres=512
    if [ "$scale" = tiny ]; then
        sd15=$S/conformance/models/tiny-sd15; sdxl=$S/conformance/models/tiny-sdxl
        size=64; steps=3; xsize=64; xsteps=3; tres=64
    else
        sd15=$W/sd15; sdxl=$W/sdxl
    fi

    # Time left of the call's budget, for the next task's limit (a task that would get less
    # than a minute is skipped, and the table still comes out).
    left() { echo $(( BUDGET - SECONDS )); }
    limit() { local l; l=$(left); (( l > $1 )) && echo "$1" || echo "$l"; }
    ok_to_start() { (( $(left) >= 60 )) || { log "skipped $1: budget spent"; return 1; }; }

    conformance() {
        ok_to_start conformance || return
        log "conformance on $dev"
        timeout "$(limit 150)" "$BIN" conformance "$S/conformance" --device "$dev" > "$OUT/conformance.txt" 2>>"$LOG"
        local rc=$?
        tail -1 "$OUT/conformance.txt" | tee -a "$LOG" >&2
        "$PY" - "$OUT/conformance.txt" "$rc" >> "$RES" <<'EOF'
import json, re, sys
text = open(sys.argv[1]).read()
m = re.search(r"(\d+) passed, (\d+) failed", text)
fails = [l.split()[1] if len(l.split()) > 1 else l for l in text.splitlines() if l.startswith("FAIL")]
print(json.dumps({"phase": "conformance", "label": "suite", "rc": int(sys.argv[2]),
                  "passed": int(m.group(1)) if m else None, "failed": int(m.group(2)) if m else None,
                  "failures": fails}))
EOF
    }
    model() {  # model sd15|sdxl: full-size random weights in f16 from the real configs
        [ "$scale" = tiny ] && return
        local cfg=stable-diffusion-v1-5 dir=$sd15
        [ "$1" = sdxl ] && { cfg=stable-diffusion-xl-base-1.0; dir=$sdxl; }
        [ -f "$dir/model_index.json" ] && return
        ok_to_start "model $1" || return
        log "random full-size $1 (f16)"
        timeout "$(limit 200)" "$BIN" make-random-model --config-dir "$S/configs/$cfg" --out "$dir" --dtype f16 >>"$LOG" 2>&1 \
            || { log "$1 model failed"; rm -rf "$dir"; }
    }
    gen() {  # gen MODEL DTYPE BATCH: ours then diffusers, same files and settings
        local m=$1 dt=$2 b=$3 dir=$sd15 sz=$size st=$steps rp=$reps
        [ "$m" = sdxl ] && { dir=$sdxl; sz=$xsize; st=$xsteps; }
        [ "$m" = sdxl ] || (( b > 1 )) && rp=$(( reps > 2 ? 2 : reps ))
        [ -f "$dir/model_index.json" ] || { log "$m: no model"; return; }
        local dtu=$dt; [ $gpu = 0 ] && dtu=f32
        # SD1.5 also times each stage alone (text encoder, one UNet call, VAE decode): a few
        # seconds that say where our time goes; SDXL's bench times only the whole pipeline.
        local stage=pipeline; [ "$m" = sd15 ] && stage=all
        ok_to_start "ours $m-$dt-b$b" && measure ours "$m-$dt-b$b" "$(limit 180)" "$BIN" bench txt2img --model "$dir" --size "$sz" \
            --steps "$st" --batch "$b" --repeats "$rp" --scheduler ddim --device "$dev" --dtype "$dtu" --stage "$stage" --label "$m-$dt-b$b"
        ok_to_start "diffusers $m-$dt-b$b" && measure diffusers "$m-$dt-b$b" "$(limit 180)" "$PY" "$W/b/gpu_diffusers.py" --model "$dir" \
            --size "$sz" --steps "$st" --batch "$b" --repeats "$rp" --scheduler ddim --device "${dev%%:*}" --dtype "$dtu" --label "$m-$dt-b$b"
    }
    train() {  # train lora|full PAIRS CHECKPOINTING: one DSPO optimiser step, ours then PyTorch
        local mode=$1 pairs=${2:-1} ck=${3:-true} flag=""
        [ "$mode" = full ] && flag=--full
        local label=dspo-$mode-p$pairs; [ "$ck" = true ] || label=$label-nockpt
        [ -f "$sd15/model_index.json" ] || { log "train: no model"; return; }
        ok_to_start "train ours $label" && measure train "ours-$label" "$(limit 150)" "$BIN" bench-train --model "$sd15" --method dspo $flag \
            --pairs "$pairs" --resolution "$tres" --steps 3 --device "$dev" --gradient-checkpointing "$ck"
        ok_to_start "train torch $label" && measure train "torch-$label" "$(limit 150)" "$PY" "$W/b/torch_train_step.py" --model "$sd15" \
            --method dspo $flag --pairs "$pairs" --resolution "$tres" --steps 3 --device "${dev%%:*}" --gradient-checkpointing "$ck"
    }
    # variant B|composed gen|train ARGS...: a gen or train task again with the second packed
    # binary (B) or with this binary's composed attention instead of the fused kernel
    # (composed); the labels get the suffix -B or -composed and are compared with the same
    # diffusers or PyTorch run.
    variant() {
        local v=$1 what=$2; shift 2
        local bin=$BIN
        if [ "$v" = B ]; then
            [ -x "$W/b/dspo-server-b" ] || { log "ab $what $*: no second binary packed (PACK_BIN_B)"; return; }
            bin=$W/b/dspo-server-b
        fi
        local run=(env "DSPO_ATTENTION_KERNEL=$([ "$v" = composed ] && echo composed || echo fused)" "$bin")
        if [ "$what" = gen ]; then
            local m=$1 dt=$2 b=$3 dir=$sd15 sz=$size st=$steps
            [ "$m" = sdxl ] && { dir=$sdxl; sz=$xsize; st=$xsteps; }
            local dtu=$dt; [ $gpu = 0 ] && dtu=f32
            ok_to_start "$v $m-$dt-b$b" && measure ours "$m-$dt-b$b-$v" "$(limit 180)" "${run[@]}" bench txt2img --model "$dir" \
                --size "$sz" --steps "$st" --batch "$b" --repeats 2 --scheduler ddim --device "$dev" --dtype "$dtu" --label "$m-$dt-b$b-$v"
        else
            local mode=$1 pairs=${2:-1} flag=""; [ "$mode" = full ] && flag=--full
            ok_to_start "$v train $mode" && measure train "ours-dspo-$mode-p$pairs-$v" "$(limit 150)" "${run[@]}" bench-train \
                --model "$sd15" --method dspo $flag --pairs "$pairs" --resolution "$tres" --steps 3 --device "$dev"
        fi
    }
    ab() { variant B "$@"; }
    composed() { variant composed "$@"; }
    kernels() {  # the fused kernels against the composed form they replace, values and gradients
        ok_to_start kernels || return
        local dts=f32,f16,bf16; [ $gpu = 0 ] && dts=f32
        log "kernel check on $dev ($dts)"
        # The first use of each kernel variant is JIT-compiled by the driver (then cached).
        timeout "$(limit 240)" "$BIN" check-kernels --device "$dev" --dtypes "$dts" > "$OUT/kernels.jsonl" 2>>"$LOG"
        local rc=$?
        "$PY" - "$OUT/kernels.jsonl" "$rc" >> "$RES" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
bad = [f'{r["kernel"]} {r["case"]} {r["dtype"]}: output {r["output_error"]:.1e}, gradients {r["gradient_error"]:.1e}'
       for r in rows if not r["passed"]]
print(json.dumps({"phase": "kernels", "label": "check", "rc": int(sys.argv[2]),
                  "passed": len(rows) - len(bad), "failed": len(bad), "failures": bad}))
EOF
    }

    # Most important first: parity, the headline SD1.5 comparison, training, SDXL, the rest.
    local tasks=${TASKS:-'kernels conformance "model sd15" "gen sd15 f16 1" "composed gen sd15 f16 1" "ab gen sd15 f16 1" "train lora 1 true" "composed train lora 1" "train lora 4 true" "ab train lora 1" "gen sd15 f16 4" "model sdxl" "gen sdxl f16 1" "train lora 1 false" "train full 1 true" "gen sdxl f16 4" "gen sd15 bf16 1" "gen sd15 bf16 4"'}
    eval "set -- $tasks"
    local task
    for task in "$@"; do $task; done
    report "$OUT" | tee "$OUT/table.md"
}

report() {
    "$PY" - "${1:-${OUT:-target/gpu-out}}/results.jsonl" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
def f(x, d=2):
    return "—" if x is None else f"{x:.{d}f}"
for c in (r for r in rows if r["phase"] == "kernels"):
    print(f"fused kernels vs composed: {c.get('passed')} passed, {c.get('failed')} failed {c.get('failures') or ''}")
conf = [r for r in rows if r["phase"] == "conformance"]
for c in conf:
    print(f"conformance: {c.get('passed')} passed, {c.get('failed')} failed {c.get('failures') or ''}")
gen = {}
for r in rows:
    if r["phase"] in ("ours", "diffusers"):
        gen.setdefault(r["label"], {})[r["phase"]] = r
if gen:
    print("\n| run | ours s (median) | diffusers s (median) | ours / diffusers | ours peak MiB | diffusers peak MiB | finite |")
    print("|---|---|---|---|---|---|---|")
    for label, d in gen.items():
        # A variant row (-B, -composed) is compared with diffusers' run of the same case.
        base = label.removesuffix("-B").removesuffix("-composed")
        o, p = d.get("ours", {}), d.get("diffusers") or gen.get(base, {}).get("diffusers", {})
        ratio = o["median_s"] / p["median_s"] if o.get("median_s") and p.get("median_s") else None
        print(f"| {label} | {f(o.get('median_s'), 3)} | {f(p.get('median_s'), 3)} | {f(ratio)} | {f(o.get('peak_gpu_mib'), 0)} | {f(p.get('peak_gpu_mib'), 0)} | {o.get('finite')}/{p.get('finite')} |")
tr = {r["label"]: r for r in rows if r["phase"] == "train"}
if tr:
    print("\n| training step (SD1.5, DSPO) | ours s | PyTorch s | ours / PyTorch | ours peak MiB | PyTorch peak MiB | ours / PyTorch memory |")
    print("|---|---|---|---|---|---|---|")
    for label in sorted({k.split("-", 1)[1] for k in tr}):
        base = label.removesuffix("-B").removesuffix("-composed")
        o, p = tr.get(f"ours-{label}", {}), tr.get(f"torch-{base}", {})
        os_, ps = o.get("step_s_median"), p.get("step_s_median")
        om, pm = o.get("peak_gpu_mib"), p.get("peak_gpu_mib")
        print(f"| {label} | {f(os_, 3)} | {f(ps, 3)} | {f(os_ / ps if os_ and ps else None)} | {f(om, 0)} | {f(pm, 0)} | "
              f"{f(om / pm if om and pm else None)} |")
bad = [r for r in rows if r.get("rc")]
for r in bad:
    print(f"\n{r['phase']}/{r['label']}: exit {r['rc']} (see gpu.log)")
EOF
}

case "${1:-}" in
    pack) pack ;;
    run) run ;;
    report) report "${2:-}" ;;
    *) sed -n '2,20p' "$0"; exit 2 ;;
esac
