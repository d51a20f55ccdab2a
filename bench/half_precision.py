"""Is bf16 worth it on this CPU? fp32 vs bf16 matrix products at the frozen LLM's shapes.

    python bench/half_precision.py [--repeats 10] [--threads 0]

The Flickr8k recipe's stage 2 runs SmolLM2 in bf16, which pays only where the CPU computes bf16 in
hardware (AVX512-BF16 or AMX). oneDNN emulates it on other AVX-512 CPUs, and there it is slower
than fp32. Prints, for `F.linear` with SmolLM2-135M's weight shapes and M = 40..2048 rows (a
decode step's rows to a training batch's tokens): the best-of-N time in fp32 and in bf16 (inputs
and weights both bf16, as under the recipe's autocast), their ratio, and what
`blip2.model.native_half` decided (`native_bf16`), so that a slow ratio can be checked against the warning.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from blip2.model import machine_info

# (out, in) of SmolLM2-135M's projections: attention q/o, k/v (3 KV heads), MLP up/down, LM head.
SHAPES = {"attn_q": (576, 576), "attn_kv": (192, 576), "mlp_up": (1536, 576), "mlp_down": (576, 1536),
          "lm_head": (49152, 576)}


def best_ms(fn, repeats: int) -> float:
    fn()  # warm-up: oneDNN picks and caches its kernel on the first call
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--rows", default="40,256,2048", help="comma-separated M (rows of the input)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(json.dumps({**machine_info(torch.device("cpu")), "capability": torch.backends.cpu.get_cpu_capability(),
                      "onednn_says_bf16": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())}))
    total = {"fp32": 0.0, "bf16": 0.0}
    with torch.no_grad():
        for m in (int(r) for r in args.rows.split(",")):
            for name, (n_out, n_in) in SHAPES.items():
                x, w = torch.randn(m, n_in), torch.randn(n_out, n_in) / n_in**0.5
                xb, wb = x.bfloat16(), w.bfloat16()
                t32 = best_ms(lambda: F.linear(x, w), args.repeats)  # noqa: B023 (used at once)
                t16 = best_ms(lambda: F.linear(xb, wb), args.repeats)  # noqa: B023
                total["fp32"] += t32
                total["bf16"] += t16
                print(json.dumps({"rows": m, "weight": name, "fp32_ms": round(t32, 3), "bf16_ms": round(t16, 3),
                                  "bf16_speedup": round(t32 / t16, 2)}))
    print(json.dumps({"all_shapes_fp32_ms": round(total["fp32"], 2), "all_shapes_bf16_ms": round(total["bf16"], 2),
                      "bf16_speedup": round(total["fp32"] / total["bf16"], 2)}))


if __name__ == "__main__":
    main()
