#!/usr/bin/env bash
# A/B of whole preference fine-tuning steps on the shapes model, as POST /finetune runs them
# (parquet rows -> PNG decode -> frozen VAE and text encoder -> policy and reference UNet passes
# -> backward -> AdamW), unlike `bench-train`, which starts from synthetic latents. Runs
# `dspo-server train` with each binary in turn, ROUNDS times, and prints the training seconds
# per step of each process (the run's own `seconds`, i.e. without model and dataset loading).
#
#   bench/finetune_ab.sh OLD_BINARY NEW_BINARY      # STEPS=20 BATCH=32 ROUNDS=3 by default
#
# Run it on an otherwise idle machine: the two binaries alternate, so drift hits both alike.
set -euo pipefail
cd "$(dirname "$0")/.."
OLD=$1 NEW=$2
STEPS=${STEPS:-20} BATCH=${BATCH:-32} ROUNDS=${ROUNDS:-3}
SHARED=${SHARED:-../shared}
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
# The shipped DSPO default of models/shapes (dspo_server.json), as a train config.
cat > "$TMP/ab.toml" <<TOML
model = "models/shapes"
dataset = "$SHARED/shapes/prefs_centered.parquet"
output_dir = "$TMP/out"
method = "dspo"
[lora]
rank = 8
alpha = 8.0
target_modules = ["to_q", "to_k", "to_v", "to_out.0"]
[hyperparameters]
beta = 1.75
learning_rate = 3e-4
max_steps = $STEPS
batch_size = $BATCH
warmup_steps = 10
resolution = 64
caption_dropout = 0.1
checkpoint_every = 100000
TOML
echo "binary,round,steps,batch,seconds,seconds_per_step,final_loss_mean_last10"
for r in $(seq 1 "$ROUNDS"); do
  for b in "$OLD" "$NEW"; do
    rm -rf "$TMP/out"
    "$b" train --config "$TMP/ab.toml" > "$TMP/log" 2> "$TMP/err" || { cat "$TMP/err" >&2; exit 1; }
    sed -n '/^{/,$p' "$TMP/log" > "$TMP/summary.json"
    python3 - "$b" "$r" "$STEPS" "$BATCH" "$TMP/summary.json" <<'PY'
import json, sys
b, r, steps, batch, path = sys.argv[1:]
j = json.load(open(path))
print(f"{b},{r},{steps},{batch},{j['seconds']:.2f},{j['seconds'] / int(steps):.3f},{j['final_loss_mean_last10']:.6f}")
PY
  done
done
