#!/usr/bin/env bash
# Every GPU check of a session in one device call (the device time is short; the machine starts bare):
#   here:   bash bench/gpu_prepare.sh
#   device: run(command="bash bench/gpu_session.sh", carry=[".gpu"], timeout_s=540)
# Logs and gpu_check.json land in $OUT:
#   gpu_check.py (device vs CPU training, bf16 autocast, two processes on one GPU, step timings per
#   precision; skipped with CHECK=0 once a session has measured it); the static-cache decode tests on
#   the GPU (CUDA-graph steps against the dynamic cache); vs_transformers.py with --static-cache on the
#   tiny model and on SmolLM2's architecture with random weights (greedy and beam-5 captioning, VQA, ITM
#   against transformers' BLIP-2 on the same GPU, outputs compared); bench/sampling.py (the sampler alone).
set -u
OUT=${OUT:-/tmp/gpu-session}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu/whl/*.whl || exit 1
export PYTHONPATH=src:/tmp/site PYTHONUNBUFFERED=1
nvidia-smi -L
python3 -c "import sys, torch, transformers; print(sys.version.split()[0], torch.__version__, transformers.__version__)"
if [ "${CHECK:-1}" != 0 ]; then
    timeout 330 python3 bench/gpu_check.py --device cuda --tokenizer .gpu/minilm-tok --out "$OUT" "$@" 2>&1 \
        | grep -v "it/s\]$" | tee "$OUT/gpu_check.log"
fi
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_static_decode.py 2>&1 | tail -15 | tee "$OUT/static_tests.log"
for model in tiny default; do
    timeout 200 python3 bench/vs_transformers.py --models $model --random-lm --static-cache --device cuda \
        --batches 1,8,32 --repeats 3 --lm-tokenizer .gpu/smollm2-tok --qformer-tokenizer .gpu/minilm-tok 2>&1 \
        | grep -v "it/s\]$" | tee "$OUT/vs_transformers_$model.log"
done
# per-row inverse-CDF sampling vs torch.multinomial on the GPU (CPU numbers: docs/RESULTS.md)
timeout 60 python3 bench/sampling.py --device cuda --no-generate 2>&1 | tee "$OUT/sampling.log"
