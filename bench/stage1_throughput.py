"""Stage-1 training throughput on this machine, every ratio measured in the same run.

    python bench/stage1_throughput.py [--batch-size 32] [--queries 16] [--layers 6] [--steps 5] [--image-sizes 224,288]

Prints:
  * the machine's fp32 matmul peak (large square torch.mm), the baseline for efficiency;
  * samples/s of a full stage-1 step (ITC + ITM + ITG forward, backward, AdamW) on cached features,
    the FLOPs of that step (torch.utils.flop_counter) and achieved FLOP/s as a fraction of the peak;
  * the same step when the frozen EfficientNet-Lite0 runs on 224 px pixels every step, and the
    speed-up that caching the frozen features buys;
  * the cost of deterministic kernels (train.deterministic);
  * with --image-sizes, the cached step on each input resolution's feature map (EfficientNet-Lite0's
    head map has ceil(size/32)^2 tokens), as a ratio to the first size, timed alternately.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from blip2.config import Blip2Config, QFormerConfig, TrainConfig, VisionConfig
from blip2.losses import Stage1Loss
from blip2.model import Blip2
from blip2.train.optim import build_optimizer


def matmul_peak(n: int = 2048, reps: int = 10) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def timed(fn, steps: int) -> float:
    """Median seconds per call after one warm-up call."""
    fn()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--queries", type=int, default=16)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--text-len", type=int, default=20)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--image-sizes", default="224",
                    help="comma-separated input sizes whose cached feature maps are timed against the first")
    args = ap.parse_args()
    torch.manual_seed(0)
    b = args.batch_size

    cfg = Blip2Config(vision=VisionConfig(), qformer=QFormerConfig(num_layers=args.layers, num_queries=args.queries))
    model = Blip2.build(cfg)
    model.train()
    opt = build_optimizer(model, TrainConfig())
    objective = Stage1Loss()
    ids = torch.randint(1000, 20000, (b, args.text_len))
    ids[:, 0] = 101
    mask = torch.ones_like(ids)
    image_ids = torch.arange(b)
    pixels = torch.randn(b, 3, 224, 224)
    with torch.no_grad():
        feats = model.image_features(pixels)  # (B, 49, 1280)

    def step(image_feats_fn):
        out = objective(model, image_feats_fn(), ids, mask, image_ids, torch.Generator().manual_seed(0))
        out["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    peak = matmul_peak()
    with FlopCounterMode(display=False) as counter:
        step(lambda: feats)
    flops = counter.get_total_flops()

    t_cached = timed(lambda: step(lambda: feats), args.steps)
    t_online = timed(lambda: step(lambda: model.image_features(pixels)), args.steps)
    torch.use_deterministic_algorithms(True)
    t_det = timed(lambda: step(lambda: feats), args.steps)
    torch.use_deterministic_algorithms(False)

    # Per resolution: the recipe's cached stage-1 step on that size's (B, ceil(size/32)^2, 1280) map.
    # Rounds alternate between sizes so that a drifting machine speed hits every size alike.
    sizes = [int(x) for x in args.image_sizes.split(",")]
    with torch.no_grad():
        feats_by_size = {s: model.image_features(torch.randn(b, 3, s, s)) for s in sizes}
    times: dict[int, list[float]] = {s: [] for s in sizes}
    for s in sizes:  # one warm-up step per size (new shapes)
        step(lambda f=feats_by_size[s]: f)
    for _ in range(args.steps):
        for s in sizes:
            t = time.perf_counter()
            step(lambda f=feats_by_size[s]: f)
            times[s].append(time.perf_counter() - t)
    by_size = {s: {"tokens": feats_by_size[s].shape[1], "s_per_step": round(statistics.median(t), 3),
                   "ratio_vs_first": round(statistics.median(t) / statistics.median(times[sizes[0]]), 3)}
               for s, t in times.items()}

    result = {
        "command": "python bench/stage1_throughput.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()),
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                    "torch": torch.__version__},
        "matmul_peak_gflops": round(peak / 1e9, 1),
        "step_gflop": round(flops / 1e9, 1),
        "cached": {"s_per_step": round(t_cached, 3), "samples_per_s": round(b / t_cached, 2),
                   "achieved_gflops": round(flops / t_cached / 1e9, 1),
                   "fraction_of_peak": round(flops / t_cached / peak, 3)},
        "online_encoder": {"s_per_step": round(t_online, 3), "samples_per_s": round(b / t_online, 2)},
        "cache_speedup": round(t_online / t_cached, 2),
        "deterministic": {"s_per_step": round(t_det, 3), "ratio_vs_default": round(t_det / t_cached, 3)},
        "cached_by_image_size": by_size,
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
