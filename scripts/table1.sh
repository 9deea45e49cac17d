#!/usr/bin/env bash
# Mini Table 1: preference-tunes `shapes` on prefs_centered.parquet through the real
# POST /finetune for each method (and several DSPO betas) at the model's default budget, then
# measures each adapter against the base model on the evaluation prompts with fixed seeds:
# win rate under the `centred` reward (score.py) with its 95% interval, and caption
# correctness of both sides. Writes $OUT/{results.json,table.md,table1.png} (OUT=docs/table1;
# another OUT for a partial run keeps the committed table).
#
#   scripts/table1.sh                     # all runs (several hours on 2 cores)
#   RUNS="dspo:0.001 sft:-" SEEDS=1 scripts/table1.sh
#
# A run is METHOD:BETA[:LR[:STEPS[:BATCH[:SEED[:TARGETS[:EXTRA]]]]]] ("-" = the method's default; LR,
# STEPS and BATCH (pairs per step) override the model's learning rate, step count and batch
# size, for larger-budget rows; SEED is the training seed (noise, timesteps, data order;
# default 0), for run-to-run spread; TARGETS picks the UNet modules the LoRA adapts, as
# PEFT's target_modules, at the model's rank and alpha: a comma list, or `self` (the
# self-attention projections only) or `nokv` (everything but the cross-attention keys and
# values, which read the caption); EXTRA is any further hyperparameters as KEY=NUMBER[,...]
# (e.g. noise_offset=0.05). Finished runs are skipped on a rerun (their eval results are kept under
# $WORK/eval/<run>/result.json). Each finished run's job, metrics and result are also copied
# to $OUT/runs/<run>/, so the report can be regenerated from the repository alone.
#
# PAIRS picks the preference file: `world` (default) is ../shared/shapes/prefs_centered.parquet
# as the world gives it; `upright` is the same pairs, labels and captions with both images turned
# upright (scripts/shapes/upright_prefs.py, written once to $WORK; needs pyarrow in $PYTHON). The
# upright model draws every shape upright, and the world's rotated pairs teach it the rotations
# again and take its shapes apart (docs/SHAPES.md, "Upright shapes"), so its table uses these.
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=$(cd "${SHARED:-../shared}" && pwd)
WORK=${WORK:-target/table1}
RUNS=${RUNS:-"sft:- dspo:0.001 dspo:1 dspo:10 diffusion_dpo:- dspo_e:-"}
SEEDS=${SEEDS:-2}
PY=${PYTHON:-python3}
PORT=${PORT:-18431}
BIN=target/release/dspo-server
URL=http://127.0.0.1:$PORT
OUT=${OUT:-docs/table1}
PAIRS=${PAIRS:-world}
mkdir -p "$WORK" "$OUT"
WORK=$(cd "$WORK" && pwd)
cargo build --release

case $PAIRS in
  world) DATASET=$SHARED/shapes/prefs_centered.parquet ;;
  upright)
    DATASET=$WORK/prefs_centered_upright.parquet
    if [ ! -f "$DATASET" ]; then
      # Written under a temporary name, so an interrupted run is not taken for a finished file.
      $PY scripts/shapes/upright_prefs.py "$SHARED/shapes/prefs_centered.parquet" \
        "$SHARED/shapes/prefs_centered_meta.parquet" "$DATASET.tmp"
      mv "$DATASET.tmp" "$DATASET"
    fi ;;
  *) echo "PAIRS must be world or upright, not '$PAIRS'" >&2; exit 2 ;;
esac

$BIN serve --listen 127.0.0.1:$PORT --data-dir "$WORK/data" --set datasets.file_roots="$SHARED/shapes,$(dirname "$DATASET")" \
  > "$WORK/server.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 1 120); do curl -sf "$URL/ready" >/dev/null && break; sleep 1; done

# A run's raw files are kept with machine paths made relative (../shared, $WORK), so they can
# be committed.
keep() { sed -e "s#$SHARED#../shared#g" -e "s#$WORK#\$WORK#g" "$1" > "$2"; }
BASE_CACHE="$WORK/eval/.base-$(cat models/shapes/*/*.safetensors models/shapes/dspo_server.json | sha256sum | cut -c1-12)-s$SEEDS"
for run in $RUNS; do
  IFS=: read -r method beta lr steps batch seed targets extra <<< "$run"
  name="t1-${method}-${beta//./p}"; [ -n "$lr" ] && [ "$lr" != "-" ] && name="$name-lr${lr//./p}"
  [ -n "$steps" ] && [ "$steps" != "-" ] && name="$name-s$steps"
  [ -n "$batch" ] && [ "$batch" != "-" ] && name="$name-b$batch"
  [ -n "$seed" ] && [ "$seed" != "-" ] && name="$name-seed$seed"
  case ${targets:--} in
    -) ;;
    self) name="$name-self"; targets=attn1.to_q,attn1.to_k,attn1.to_v,attn1.to_out.0 ;;
    nokv) name="$name-nokv"; targets=attn1.to_q,attn1.to_k,attn1.to_v,attn1.to_out.0,attn2.to_q,attn2.to_out.0 ;;
    *) name="$name-t$(tr -c 'a-z0-9\n' _ <<< "$targets")" ;;
  esac
  # Adapter names are at most 64 characters: anchor_weight is always shortened, noise_offset
  # only where the name would not fit otherwise (so earlier runs keep their names).
  short=${extra//anchor_weight/anchor}
  [ -n "$extra" ] && [ "$extra" != "-" ] && name="$name-$(tr -c 'a-z0-9\n' _ <<< "${short//./p}")"
  # Runs on the upright pairs are named apart, so both files' runs can share a WORK.
  [ "$PAIRS" = upright ] && name="$name-upright"
  name=${name//-/_}
  [ ${#name} -le 64 ] || name=${name//noise_offset/offset}
  if [ -f "$WORK/eval/$name/result.json" ]; then echo "$name: done"; continue; fi
  if ! curl -sf "$URL/adapters" | jq -e --arg n "$name" '.[] | select(.name == $n)' >/dev/null; then
    hp='{}'; [ "$beta" != "-" ] && hp=$(jq -c --argjson b "$beta" '. + {beta: $b}' <<< "$hp")
    [ -n "$lr" ] && [ "$lr" != "-" ] && hp=$(jq -c --argjson l "$lr" '. + {learning_rate: $l}' <<< "$hp")
    [ -n "$steps" ] && [ "$steps" != "-" ] && hp=$(jq -c --argjson s "$steps" '. + {max_steps: $s}' <<< "$hp")
    [ -n "$batch" ] && [ "$batch" != "-" ] && hp=$(jq -c --argjson s "$batch" '. + {batch_size: $s}' <<< "$hp")
    [ -n "$seed" ] && [ "$seed" != "-" ] && hp=$(jq -c --argjson s "$seed" '. + {seed: $s}' <<< "$hp")
    if [ -n "$extra" ] && [ "$extra" != "-" ]; then
      hp=$(jq -c --arg e "$extra" '. + ($e | split(",") | map(split("=") | {(.[0]): (.[1] | tonumber)}) | add)' <<< "$hp")
    fi
    body=$(jq -nc --arg url "file://$DATASET" --arg m "$method" --arg n "$name" \
      --argjson hp "$hp" '{dataset_url: $url, method: $m, adapter_name: $n, hyperparameters: $hp}')
    if [ -n "$targets" ] && [ "$targets" != "-" ]; then
      # Only the targets: the job keeps the model's rank and alpha.
      body=$(jq -c --arg t "$targets" '. + {lora: {target_modules: ($t | split(","))}}' <<< "$body")
    fi
    reply=$(curl -s -X POST "$URL/finetune" -H 'content-type: application/json' -d "$body")
    id=$(jq -r '.job_id // empty' <<< "$reply")
    [ -n "$id" ] || { echo "$name: refused: $reply" >&2; exit 1; }
    echo "$name: job $id"
    while :; do
      st=$(curl -sf "$URL/finetune/$id" | jq -r .status)
      case $st in completed) break ;; failed|cancelled) echo "$name: $st"; curl -s "$URL/finetune/$id"; exit 1 ;; esac
      sleep 10
    done
    curl -sf "$URL/finetune/$id/metrics" > "$WORK/$name.metrics.json"
    curl -sf "$URL/finetune/$id" > "$WORK/$name.job.json"
  fi
  # The hyperparameters the run actually used (request over the model's defaults).
  [ -f "$WORK/$name.adapter.json" ] || curl -sf "$URL/adapters" \
    | jq --arg n "$name" '.[] | select(.name == $n)' > "$WORK/$name.adapter.json"
  # The base side (b/) is the same images for every run: generate it once per base model and
  # seed count (keyed by a hash of its weights and defaults) and let --reuse pick it up.
  if [ -d "$BASE_CACHE" ] && [ ! -d "$WORK/eval/$name/b" ]; then
    mkdir -p "$WORK/eval/$name" && cp -al "$BASE_CACHE" "$WORK/eval/$name/b"
  fi
  $BIN eval --model models/shapes --adapter "$WORK/data/adapters/$name/adapter.safetensors" \
    --prompts "$SHARED/shapes/eval_prompts.txt" --seeds "$SEEDS" --out "$WORK/eval/$name" --reuse \
    --reward-cmd "$PY $SHARED/shapes/score.py --json --prompts {prompts} {dir}" > /dev/null
  [ -d "$BASE_CACHE" ] || cp -al "$WORK/eval/$name/b" "$BASE_CACHE"
  jq -c '{winrate: .result.winrate, ci95: .result.ci95}' "$WORK/eval/$name/result.json"
  mkdir -p "$OUT/runs/$name"
  keep "$WORK/eval/$name/result.json" "$OUT/runs/$name/result.json"
  for f in job metrics adapter; do
    if [ -f "$WORK/$name.$f.json" ]; then keep "$WORK/$name.$f.json" "$OUT/runs/$name/$f.json"; fi
  done
done
kill $SERVER 2>/dev/null || true
$PY scripts/table1_report.py "$WORK" "$OUT"
