"""Stage-2 learning-rate probe: how fast does the frozen LLM's loss fall for a few learning rates?

Trains stage 2 from a stage-1 model on cached features for a fixed number of steps per setting
(warmup 10, cosine) and prints the loss on 32 held-out captions every 10 steps, plus the mean
off-diagonal cosine between the query outputs of one image before and after (1.0 = identical).

    python bench/stage2_lr_probe.py --run runs/quickstart --steps 60 \\
        --settings 1e-4,1e-4,1e-4 3e-4,3e-3,3e-3     # Q-Former lr, llm_proj lr, query-token lr
    python bench/stage2_lr_probe.py --model runs/flickr8k-stage1/model \\
        --data ../shared/data/flickr8k/dataset_flickr8k.json --steps 40 --settings 3e-4,3e-3,3e-3
"""

from __future__ import annotations

import argparse
import math

import torch

from blip2.config import LLMConfig
from blip2.data.cache import cached_features
from blip2.data.pairs import EpochSampler, Pairs
from blip2.data.records import load_records
from blip2.llm import load_llm
from blip2.losses import Stage2Loss
from blip2.model import Blip2


def probe(model_dir: str, ann: str, cache: str | None, lr_q: float, lr_p: float, lr_tok: float, steps: int,
          batch: int) -> tuple[list[float], float, float]:
    torch.manual_seed(0)
    s1 = Blip2.from_dir(model_dir)
    s1.cfg.llm = LLMConfig(max_prompt_len=24, max_text_len=24)
    model = Blip2(s1.cfg, s1.vision, s1.tokenizer, load_llm(s1.cfg.llm))
    model.load_trainable(s1.trainable_state_dict(), allow_missing=("llm_proj.",))
    model.freeze_text_branch()
    train = load_records(ann, None, "train")
    feats = cached_features(model.vision, [r.path for r in train], cache, progress=False).features
    val = load_records(ann, None, "val")[:32]
    val_feats = cached_features(model.vision, [r.path for r in val], cache, progress=False).features.float()
    val_caps = [r.captions[0] for r in val]
    cos_before = model.query_diversity(val_feats)
    pairs = Pairs(train, None, 0, features=feats)
    sampler = EpochSampler(len(pairs), batch, 0)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad and not n.startswith("llm.")]
    groups = [{"params": [p for n, p in named if n.startswith("llm_proj")], "peak": lr_p},
              {"params": [p for n, p in named if n == "qformer.query_tokens"], "peak": lr_tok, "weight_decay": 0.0},
              {"params": [p for n, p in named if not n.startswith("llm_proj") and n != "qformer.query_tokens"],
               "peak": lr_q}]
    opt = torch.optim.AdamW(groups, lr=lr_q, weight_decay=0.05, betas=(0.9, 0.98))
    objective, warm = Stage2Loss(), 10

    def val_loss() -> float:
        model.eval()
        with torch.no_grad():
            loss = objective(model, val_feats, [""] * len(val_caps), val_caps, torch.Generator().manual_seed(0))
        model.train()
        return round(loss["loss"].item(), 3)

    curve = [val_loss()]
    for s in range(steps):
        f = (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(steps - warm, 1)))
        for g in opt.param_groups:
            g["lr"] = g["peak"] * max(f, 0.1)
        b = pairs.batch(sampler.next())
        loss = objective(model, b.image_feats, b.prompts, b.texts, torch.Generator().manual_seed(s))["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        if (s + 1) % 10 == 0:
            curve.append(val_loss())
    return curve, cos_before, model.query_diversity(val_feats)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default=None, help="a quickstart output directory (stage1/, data/, cache/)")
    p.add_argument("--model", default=None, help="a stage-1 model directory (instead of --run)")
    p.add_argument("--data", default=None, help="Karpathy JSON with train/val splits (with --model)")
    p.add_argument("--cache-dir", default=None, help="feature cache root (default: the shared one)")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--settings", nargs="+", default=["1e-4,1e-4,1e-4", "3e-4,3e-3,3e-3"])
    args = p.parse_args()
    if args.run:
        model_dir, ann, cache = f"{args.run}/stage1/model", f"{args.run}/data/scenes.json", f"{args.run}/cache"
    elif args.model and args.data:
        model_dir, ann, cache = args.model, args.data, args.cache_dir
    else:
        p.error("give --run, or --model and --data")
    print(f"{'qformer lr':>10} {'proj lr':>8} {'token lr':>8}  held-out loss every 10 steps  query cos before -> after")
    for setting in args.settings:
        lr_q, lr_p, lr_tok = (float(x) for x in setting.split(","))
        curve, before, after = probe(model_dir, ann, cache, lr_q, lr_p, lr_tok, args.steps, args.batch_size)
        print(f"{lr_q:>10.0e} {lr_p:>8.0e} {lr_tok:>8.0e}  {curve}  {before:.3f} -> {after:.3f}", flush=True)


if __name__ == "__main__":
    main()
