"""Which encoder and input resolution give the most caption-relevant frozen features?

    python bench/feature_resolution.py [--encoders efficientnet_lite0,efficientnet_lite2]
        [--sizes 224,256,288,320,384] [--feature-map head] [--k 10]

A full stage 1 + stage 2 per setting costs 1.5 hours on a 2-core CPU, so this ranks encoders and
resolutions first with a training-free proxy: nearest-neighbour captioning (Devlin et al., 2015). Each val image
takes the consensus caption of its k nearest train images (cosine of the mean-pooled feature map):
of the k*5 candidate captions, the one with the highest mean n-gram F1 (n = 1..4) to the others.
Better features find neighbours with more relevant captions. The scores come from the same COCO
caption metrics as `blip2 eval caption`; every encoder runs at every size, and the last columns are
differences from the first (encoder, size) pair, all measured in this run. Features go through the
same on-disk cache as training, so a setting chosen here is not encoded again by `blip2 train`.
"""

from __future__ import annotations

import argparse
import time
from collections import Counter

import torch
import torch.nn.functional as F

from blip2.config import VisionConfig
from blip2.data.cache import split_features
from blip2.eval.caption import caption_metrics
from blip2.eval.significance import ngram_counts
from blip2.vision import build_vision_encoder

DATA = "../shared/data/flickr8k/dataset_flickr8k.json"
METRICS = ("bleu4", "meteor", "rouge_l", "cider")


def _grams(text: str) -> list[Counter]:
    words = text.lower().split()
    return [ngram_counts(words, n) for n in range(1, 5)]


def _f1(a: list[Counter], b: list[Counter]) -> float:
    """Mean over n = 1..4 of the n-gram F1 between two captions."""
    total = 0.0
    for ga, gb in zip(a, b, strict=True):
        common = sum((ga & gb).values())
        na, nb = sum(ga.values()), sum(gb.values())
        total += 0.0 if common == 0 else 2 * common / (na + nb)
    return total / len(a)


def consensus(candidates: list[str]) -> str:
    """The candidate that agrees most with the others (mean n-gram F1)."""
    grams = [_grams(c) for c in candidates]
    scores = [sum(_f1(g, h) for j, h in enumerate(grams) if j != i) for i, g in enumerate(grams)]
    return candidates[max(range(len(candidates)), key=scores.__getitem__)]


def nn_captions(name: str, size: int, feature_map: str, k: int,
                data: str) -> tuple[dict[int, list[str]], dict[int, str], int, float]:
    """(val references, val consensus captions, image tokens, seconds spent encoding or loading features)."""
    encoder = build_vision_encoder(VisionConfig(name=name, feature_map=feature_map, image_size=size))
    t0 = time.perf_counter()
    train, train_feats = split_features(encoder, data, None, "train")
    val, val_feats = split_features(encoder, data, None, "val")
    seconds = time.perf_counter() - t0
    pooled_train = F.normalize(train_feats.features.float().mean(1), dim=-1)  # (N_train, C)
    pooled_val = F.normalize(val_feats.features.float().mean(1), dim=-1)  # (N_val, C)
    nearest = (pooled_val @ pooled_train.T).topk(k, dim=-1).indices  # (N_val, k)
    refs = {i: r.captions for i, r in enumerate(val)}
    cands = {i: consensus([c for j in nearest[i].tolist() for c in train[j].captions]) for i in range(len(val))}
    return refs, cands, val_feats.features.shape[1], seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--encoders", default="efficientnet_lite0",
                    help="comma-separated packaged encoders (vision.name); the first is the baseline")
    ap.add_argument("--sizes", default="224,256,288,320,384",
                    help="comma-separated input resolutions; the first is the baseline")
    ap.add_argument("--feature-map", default="head", choices=("head", "stage6"))
    ap.add_argument("--k", type=int, default=10, help="nearest train images per val image")
    ap.add_argument("--data", default=DATA)
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    rows = []
    for name in args.encoders.split(","):
        for size in (int(s) for s in args.sizes.split(",")):
            refs, cands, tokens, seconds = nn_captions(name, size, args.feature_map, args.k, args.data)
            rows.append((name, size, tokens, caption_metrics(refs, cands)))
            print(f"{name} {size}: features in {seconds:.0f} s, e.g. {cands[0]!r}", flush=True)
    base = rows[0][3]
    print(f"\nnearest-neighbour captioning, Flickr8k val, k={args.k}, feature map {args.feature_map}")
    header = "  ".join(f"{m:>7}" for m in METRICS) + "  " + "  ".join(f"{'d_' + m:>9}" for m in METRICS)
    print(f"{'encoder':18s}  size  tokens  " + header)
    for name, size, tokens, m in rows:
        print(f"{name:18s}  {size:4d}  {tokens:6d}  " + "  ".join(f"{m[k]:7.2f}" for k in METRICS) + "  "
              + "  ".join(f"{m[k] - base[k]:+9.2f}" for k in METRICS))
    print(f"\ncommand: python bench/feature_resolution.py --encoders {args.encoders} --sizes {args.sizes} "
          f"--feature-map {args.feature_map} --k {args.k}")


if __name__ == "__main__":
    main()
