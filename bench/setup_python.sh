#!/usr/bin/env bash
# Creates .venv (git-ignored) with the pinned diffusers stack for bench/cpu_txt2img.sh:
#   bench/setup_python.sh && PYTHON=.venv/bin/python bench/cpu_txt2img.sh
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${VENV:-$ROOT/.venv}
python3 -m venv "$VENV"
"$VENV/bin/pip" install -r "$ROOT/bench/requirements.txt"
"$VENV/bin/python" -c 'import torch, diffusers, transformers; print("torch", torch.__version__, "diffusers", diffusers.__version__, "transformers", transformers.__version__)'
