"""How many steps ITM spends on its 0.636 plateau, and what shortens it.

    python bench/itm_plateau.py [--seeds 0,1,2,3] [--steps 600]

ITM (1 positive : 2 hard negatives per image) starts at its prior, cross-entropy 0.636, and stays
there until the queries start reading the text in the joint pass. On Flickr8k that took longer
than the 680-step CPU recipe. This measures the same plateau on a problem small enough to repeat:
8 distinct random "images" and captions, a 2-layer random Q-Former, ITC + ITM (no ITG), AdamW
without warmup. It prints the first step with ITM < 0.5 for each variant and seed, and each
variant's mean as a ratio to the reference setting measured in the same run.

A variant is `name:key=value,...` with keys lr (peak learning rate, default 1e-3), itm_weight
(loss.itm_weight) and any other key as a train.lr_mult pattern (e.g. crossattention=10).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from blip2.config import Blip2Config, QFormerConfig, TrainConfig
from blip2.losses import Stage1Loss
from blip2.model import Blip2
from blip2.text import load_tokenizer
from blip2.train.optim import build_optimizer

CAPTIONS = ["red circle", "blue square", "green star", "black triangle", "white ring", "orange box",
            "purple moon", "yellow sun"]
VARIANTS = [
    "reference:",
    "itm_weight_5:itm_weight=5",
    "crossattn_lr_10x:crossattention=10",
    "both:crossattention=10,itm_weight=5",
    "all_lr_3x:lr=3e-3",
]


def parse(variant: str) -> tuple[str, float, float, dict[str, float]]:
    name, _, spec = variant.partition(":")
    lr, itm_weight, mult = 1e-3, 1.0, {}
    for item in filter(None, spec.split(",")):
        key, value = item.split("=")
        if key == "lr":
            lr = float(value)
        elif key == "itm_weight":
            itm_weight = float(value)
        else:
            mult[key] = float(value)
    return name, lr, itm_weight, mult


def steps_to_leave(variant: str, seed: int, steps: int, tokenizer) -> int | None:
    """First step whose ITM loss is below 0.5 (None: still on the plateau after `steps`)."""
    _, lr, itm_weight, mult = parse(variant)
    torch.manual_seed(seed)
    cfg = QFormerConfig(init="none", num_layers=2, hidden_size=32, num_heads=4, intermediate_size=64,
                        num_queries=4, cross_attention_freq=2, vision_width=24, vocab_size=30523,
                        max_text_len=16, embed_dim=16, hidden_dropout=0.0, attention_dropout=0.0,
                        text_pool="mean")
    model = Blip2(Blip2Config(qformer=cfg), None, tokenizer)
    feats = torch.randn(len(CAPTIONS), 5, 24) * 2  # (B, N_img, C): one random "image" per caption
    ids, mask = model.tokenize(CAPTIONS)
    opt = build_optimizer(model, TrainConfig(lr=lr, weight_decay=0.0), mult)
    for group in opt.param_groups:
        group["lr"] = lr * group["lr_mult"]
    objective = Stage1Loss(itg=False, itm_weight=itm_weight)
    for step in range(steps):
        out = objective(model, feats, ids, mask, torch.arange(len(CAPTIONS)), torch.Generator().manual_seed(step))
        out["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if out["itm"].item() < 0.5:  # logged unweighted
            return step
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0,1,2,3")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--variant", action="append", help="name:key=value,... (repeatable; default: a built-in set)")
    args = ap.parse_args()
    variants = args.variant or VARIANTS
    seeds = [int(s) for s in args.seeds.split(",")]
    tokenizer = load_tokenizer("packaged", 30523)
    t0 = time.time()
    means: dict[str, float] = {}
    reference = parse(variants[0])[0]  # ratios are against the first variant
    print(f"steps until ITM < 0.5 (of {args.steps}; '-' = never), seeds {seeds}")
    for variant in variants:
        name = parse(variant)[0]
        hits = [steps_to_leave(variant, s, args.steps, tokenizer) for s in seeds]
        means[name] = statistics.mean(args.steps if h is None else h for h in hits)
        ratio = means[reference] / means[name]
        print(f"{name:20s} {' '.join('-' if h is None else str(h) for h in hits):24s} mean {means[name]:6.1f}  "
              f"{ratio:.2f}x faster than {reference}", flush=True)
    print(f"({time.time() - t0:.0f} s; python bench/itm_plateau.py --seeds {args.seeds} --steps {args.steps})")


if __name__ == "__main__":
    main()
