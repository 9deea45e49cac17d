#!/usr/bin/env bash
# Dynamic batching benchmark: images/s through the real HTTP server (loopback, in-process
# server, ureq clients) at client concurrency 1, 4 and 8, with batching off (max_batch=1) and
# on (max_batch=8, wait 10 ms), on the tiny conformance model and on a mid-size random-weight
# SD1.5-layout model (UNet and VAE at 1/4 width, ~57M UNet parameters, real CLIP-L size).
# Results and the machine they came from: bench/BATCHING.md.
#
#   bench/batching.sh            # both models
#   MODELS=tiny bench/batching.sh
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release
BIN=target/release/dspo-server
SHARED=${SHARED:-../shared}
MID=${MID_MODEL_DIR:-target/bench-models/sd15-w025}
MODELS=${MODELS:-tiny mid}
for m in $MODELS; do
  case $m in
    tiny)
      "$BIN" bench-serve --model "tiny-sd15=$SHARED/conformance/models/tiny-sd15" \
        --concurrency 1,4,8 --requests 32 --steps 8 ;;
    mid)
      if [ ! -f "$MID/model_index.json" ]; then
        "$BIN" make-random-model --config-dir "$SHARED/configs/stable-diffusion-v1-5" --out "$MID" --width-scale 0.25
      fi
      "$BIN" bench-serve --model "sd15-w025=$MID" --size 128 \
        --concurrency 1,4,8 --requests 8 --steps 8 ;;
    *) echo "unknown model set '$m' (tiny or mid)" >&2; exit 2 ;;
  esac
done
