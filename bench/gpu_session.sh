#!/usr/bin/env bash
# Every GPU check of a session in one device call (the device time is short; the machine starts bare):
#   here:   bash bench/gpu_prepare.sh
#   device: run(command="bash bench/gpu_session.sh", carry=[".gpu"], timeout_s=480)
# Logs and gpu_check.json land in $OUT: gpu_check.py (device vs CPU training, bf16 autocast, two
# processes on one GPU, step timings per precision) and vs_transformers.py on the tiny model (greedy and
# beam-5 captioning, VQA, ITM against transformers' BLIP-2 on the same GPU, outputs compared).
set -u
OUT=${OUT:-/tmp/gpu-session}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu/whl/*.whl || exit 1
export PYTHONPATH=src:/tmp/site PYTHONUNBUFFERED=1
nvidia-smi -L
python3 -c "import sys, torch, transformers; print(sys.version.split()[0], torch.__version__, transformers.__version__)"
timeout 330 python3 bench/gpu_check.py --device cuda --tokenizer .gpu/minilm-tok --out "$OUT" "$@" 2>&1 \
    | grep -v "it/s\]$" | tee "$OUT/gpu_check.log"
timeout 120 python3 bench/vs_transformers.py --models tiny --device cuda --batches 1,8,32 --repeats 3 \
    --lm-tokenizer .gpu/smollm2-tok --qformer-tokenizer .gpu/minilm-tok 2>&1 | grep -v "it/s\]$" | tee "$OUT/vs_transformers.log"
