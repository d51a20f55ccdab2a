"""Does contextual calibration rescue likelihood-ranked yes/no answers?

Ranking "yes" against "no" by LLM likelihood (`blip2 eval vqa --options yes,no`) can be biased
toward one answer whatever the image. Contextual calibration (Zhao et al., ICML 2021) subtracts
each option's score under a content-free input. Here the content-free input is a soft prompt that
carries no particular image, three ways: the soft prompt of the split's mean image feature, the
mean of the split's soft prompts, and the soft prompt of an all-zero feature map. For each,
prints the POPE metrics with the decision at 0 and the ROC AUC of score(yes) - score(no), which
does not depend on the threshold and so says whether the image-specific part of the score
discriminates at all.

    python bench/yesno_calibration.py --model runs/e2e288/stage2/model \
        --data ../shared/data/coco_mini/pope_style_yesno.json --splits train val
"""

from __future__ import annotations

import argparse

import torch

from blip2.cli import _load_generator
from blip2.data.cache import cached_features
from blip2.eval.vqa import load_questions, yes_no_scores
from blip2.tasks import option_logprobs, vqa_prompt


def auc(diff: torch.Tensor, gold: list[str]) -> float:
    """ROC AUC of diff as a score for "yes" (ties count half)."""
    pos = diff[[g == "yes" for g in gold]]
    neg = diff[[g == "no" for g in gold]]
    cmp = pos[:, None] - neg[None, :]
    return 100 * ((cmp > 0).float().mean() + 0.5 * (cmp == 0).float().mean()).item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True, help="yes/no question file (POPE-style JSON or Karpathy with qa)")
    ap.add_argument("--images", default=None)
    ap.add_argument("--splits", nargs="+", default=["val"])
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--precision", default="fp32")
    args = ap.parse_args()
    model = _load_generator(args.model, "cpu", args.precision)
    print(f"model {args.model}, data {args.data}, precision {args.precision}")
    print("split | content-free input | accuracy | precision | recall | F1 | yes % | AUC")
    for split in args.splits:
        qs = load_questions(args.data, args.images, split)
        cached = cached_features(model.vision, sorted({p for p, _, _ in qs}), None, 2, False)
        row = {p: i for i, p in enumerate(cached.paths)}
        qs = [q for q in qs if q[0] in row]
        idx = torch.tensor([row[p] for p, _, _ in qs])
        prompts = [vqa_prompt(model.llm, q) for _, q, _ in qs]
        gold = [a[0] for _, _, a in qs]
        with torch.no_grad():
            feats = cached.features.float()  # (I, N, C)
            soft_all = model.soft_prompt(feats)  # (I, Q, H)
            free = {"mean image feature": model.soft_prompt(feats.mean(0, keepdim=True)),
                    "mean soft prompt": soft_all.mean(0, keepdim=True),
                    "zero feature": model.soft_prompt(torch.zeros_like(feats[:1]))}
            scores = {}
            for name, soft in [("none (raw)", None), *free.items()]:
                parts = []
                for s in range(0, len(qs), args.batch_size):
                    n = len(prompts[s:s + args.batch_size])
                    sp = soft_all[idx[s:s + n]] if soft is None else soft.expand(n, -1, -1)
                    parts.append(option_logprobs(model, sp, prompts[s:s + n], ["yes", "no"]))
                scores[name] = torch.cat(parts)  # (M, 2)
        raw = scores["none (raw)"][:, 0] - scores["none (raw)"][:, 1]
        for name, sc in scores.items():
            diff = raw if name == "none (raw)" else raw - (sc[:, 0] - sc[:, 1])
            r = yes_no_scores(["yes" if d > 0 else "no" for d in diff.tolist()], gold)
            print(f"{split} | {name} | {r['accuracy']:.1f} | {r['precision']:.1f} | {r['recall']:.1f} | "
                  f"{r['f1']:.1f} | {r['yes_ratio']:.1f} | {auc(diff, gold):.1f}")
        free_only = scores["mean soft prompt"][:, 0] - scores["mean soft prompt"][:, 1]
        print(f"{split} | question only (the mean soft prompt's own score) | - | - | - | - | - | "
              f"{auc(free_only, gold):.1f}")


if __name__ == "__main__":
    main()
