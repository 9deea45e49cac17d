#!/usr/bin/env bash
# The drift guard on the shapes demo: the model's default DSPO job (only `dataset_url` given)
# on the world's preference pairs as they are (rotated shapes, which take the upright model's
# shapes apart) and on the same pairs turned upright (as the model draws). Each job reports
# `drift` at every tenth of its run; with DRIFT_LIMIT set, jobs carry it as `drift_limit` and
# the one that passes it fails with `drift_exceeded`. Writes $OUT/<pairs>.{job,metrics}.json.
#
#   scripts/drift_demo.sh                               # report only, both pair sets
#   DRIFT_LIMIT=0.05 PAIRS="world upright" OUT=docs/drift/limit scripts/drift_demo.sh
#
# About 9 minutes per completed job on 2 cores. Needs curl, jq, and pyarrow + pillow in
# $PYTHON for the upright pairs.
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=$(cd "${SHARED:-../shared}" && pwd)
WORK=${WORK:-target/drift}
OUT=${OUT:-docs/drift}
PAIRS=${PAIRS:-"upright world"}
PY=${PYTHON:-python3}
PORT=${PORT:-18432}
URL=http://127.0.0.1:$PORT
LIMIT=${DRIFT_LIMIT:-}
mkdir -p "$WORK" "$OUT"
WORK=$(cd "$WORK" && pwd)
cargo build --release
UPRIGHT=$WORK/prefs_centered_upright.parquet
if [ ! -f "$UPRIGHT" ]; then
  $PY scripts/shapes/upright_prefs.py "$SHARED/shapes/prefs_centered.parquet" \
    "$SHARED/shapes/prefs_centered_meta.parquet" "$UPRIGHT.tmp"
  mv "$UPRIGHT.tmp" "$UPRIGHT"
fi
rm -rf "$WORK/data"
target/release/dspo-server serve --listen 127.0.0.1:$PORT --data-dir "$WORK/data" \
  --set datasets.file_roots="$SHARED/shapes,$WORK" > "$WORK/server.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 1 120); do curl -sf "$URL/ready" >/dev/null && break; sleep 1; done
for pairs in $PAIRS; do
  case $pairs in
    world) dataset=$SHARED/shapes/prefs_centered.parquet ;;
    upright) dataset=$UPRIGHT ;;
    *) echo "pairs must be world or upright, not '$pairs'" >&2; exit 2 ;;
  esac
  hyper='{}'
  [ -n "$LIMIT" ] && hyper="{\"drift_limit\": $LIMIT}"
  body="{\"dataset_url\": \"file://$dataset\", \"adapter_name\": \"drift-$pairs\", \"hyperparameters\": $hyper}"
  id=$(curl -sf -X POST "$URL/finetune" -H 'content-type: application/json' -d "$body" | jq -r .job_id)
  while :; do
    st=$(curl -sf "$URL/finetune/$id" | jq -r .status)
    case $st in completed|failed|cancelled) break ;; esac
    sleep 10
  done
  curl -sf "$URL/finetune/$id" | sed -e "s#$SHARED#../shared#g" -e "s#$WORK#\$WORK#g" > "$OUT/$pairs.job.json"
  curl -sf "$URL/finetune/$id/metrics" > "$OUT/$pairs.metrics.json"
  echo "$pairs: $st; drift by step:"
  jq -r '.[] | select(.drift != null) | "  step \(.step): \(.drift)"' "$OUT/$pairs.metrics.json"
done
