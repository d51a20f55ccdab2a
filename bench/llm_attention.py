"""The frozen LLM's attention kernel in training: transformers' SDPA vs its eager implementation.

    python bench/llm_attention.py --model RUN/stage2/model [--batches 6] [--batch-size 16] [--repeats 3]

Stage 2 and SCST run the frozen LLM forward and backward under bf16 autocast. On a CPU, bf16 SDPA's
backward is slow (docs/RESULTS.md, "Step speed on this CPU"), and `llm.attn_implementation: eager`
avoids it. This times what a stage-2 step spends in the model: for `--batches` batches of
`--batch-size` Flickr8k training captions (the first caption of consecutive training images, no
prompt, as the recipe's captions-only stage 2), the soft prompt from cached image features, then
the LLM loss forward and backward, with the model's own LLM precision, under bf16 autocast
(`--amp none`: without). Per repeat both kernels run the same batches, in alternating order, on
one model. Prints the median seconds of each, the median of the per-repeat ratio sdpa / eager, and
per repeat the relative differences between their summed losses and their gradients of the trainable
weights (the two kernels round differently in bf16).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from blip2.data.records import load_records
from blip2.model import Blip2, machine_info
from blip2.tasks import image_features

KERNELS = ("sdpa", "eager")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a stage-2 model directory")
    ap.add_argument("--data", default="../shared/data/flickr8k/dataset_flickr8k.json")
    ap.add_argument("--batches", type=int, default=6)
    ap.add_argument("--batch-size", type=int, default=16, help="the recipe's stage-2 batch")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--amp", choices=["bf16", "none"], default="bf16")
    args = ap.parse_args()
    torch.manual_seed(0)
    model = Blip2.from_dir(args.model)
    lm = model.llm
    records = load_records(args.data, split="train")[: args.batches * args.batch_size]
    feats = image_features(model, [r.path for r in records])  # (N, T, C)
    batches = []
    for i in range(0, len(records), args.batch_size):
        rows = records[i:i + args.batch_size]
        prompts = lm.encode_prompts([""] * len(rows))
        targets = lm.encode_targets([""] * len(rows), [r.captions[0] for r in rows], lm.cfg.max_text_len)
        batches.append((feats[i:i + len(rows)], prompts, targets))
    trainable = [p for p in model.parameters() if p.requires_grad]
    model.train()
    print(json.dumps({**machine_info(torch.device("cpu")), "threads": torch.get_num_threads(), "model": args.model,
                      "llm_precision": lm.cfg.precision, "amp": args.amp, "batches": len(batches),
                      "batch_size": args.batch_size}))
    times: dict[str, list[float]] = {k: [] for k in KERNELS}
    for rep in range(args.repeats):
        results = {}
        for kernel in KERNELS if rep % 2 == 0 else KERNELS[::-1]:  # alternate which runs first
            lm.model.set_attn_implementation(kernel)
            model.zero_grad(set_to_none=True)
            torch.manual_seed(rep)  # the same Q-Former dropout masks for both
            total = 0.0
            t0 = time.perf_counter()
            for f, prompts, targets in batches:
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.amp == "bf16"):
                    loss = lm.loss(model.soft_prompt(f), prompts, targets)
                loss.backward()
                total += loss.item()
            times[kernel].append(time.perf_counter() - t0)
            results[kernel] = (total, torch.cat([p.grad.flatten() for p in trainable if p.grad is not None]))
        (l_s, g_s), (l_e, g_e) = results["sdpa"], results["eager"]
        print(json.dumps({"repeat": rep, **{f"{k}_s": round(t[-1], 2) for k, t in times.items()},
                          "loss_rel_diff": abs(l_s - l_e) / abs(l_s),
                          "grad_rel_diff": float((g_s - g_e).abs().max() / g_s.abs().max())}))
    print(json.dumps({"median_s": {k: round(statistics.median(t), 2) for k, t in times.items()},
                      "eager_speedup": round(statistics.median(s / e for s, e in zip(times["sdpa"], times["eager"],
                                                                                     strict=True)), 2)}))


if __name__ == "__main__":
    main()
