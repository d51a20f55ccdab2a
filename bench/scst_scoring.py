"""SCST's scoring pass: samples scored after a shared [soft prompt | prompt] vs one full sequence each.

    python bench/scst_scoring.py --model RUN/stage2/model [--images 16] [--samples 5] [--repeats 3]

An SCST step (blip2.losses.SCSTLoss) samples K captions per image, then runs the frozen LLM forward
and backward over every sample to get the gradient of its log-likelihood. The K samples of an
image share their first Q + P positions (the soft prompt and the prompt), so the scoring now runs
that prefix once per image (`FrozenLM.prefix`, with gradient) and only the samples after it
(`FrozenLM.continuation_logprob`). The baseline is the previous way, each sample as a full
[soft | prompt | sample | eos] row, in the same chunks of similar length.

For the first `--images` Flickr8k val images, under the recipe's bf16 autocast, with the model's
own LLM precision, per repeat: one sampling call (generate_ids, K samples per image, up to 30 new
tokens, temperature 1, as the recipe's scst stage), then both scorings of the same samples with the
same random advantages, forward and backward, timed; the two run in alternating order. Prints the
median seconds of each part, the median over repeats of the ratio baseline / shared for the scoring
and for the whole step (sampling + scoring), and per repeat the relative differences between the two
losses and the two gradients of the trainable weights (bf16 rounding: ~1-2% of the largest gradient).
`--attn eager` switches the LLM's attention from SDPA to transformers' eager implementation for both.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from blip2.config import ScstConfig
from blip2.data.records import load_records
from blip2.generate import generate_ids, stream_seed
from blip2.model import Blip2, machine_info
from blip2.tasks import image_features


def full_rows(lm, soft, prompts, drawn, owner, advantage, chunk_rows):
    """The baseline: every sample as its own full sequence after a copy of its image's soft prompt."""
    soft_rows, rows = soft[owner], [prompts[i] for i in owner.tolist()]
    order = sorted(range(len(drawn)), key=lambda i: len(rows[i]) + len(drawn[i]))
    total = soft.new_zeros((), dtype=torch.float32)
    for chunk in torch.tensor(order).split(chunk_rows):
        idx = chunk.tolist()
        x = lm.layout(soft_rows[chunk], [rows[i] for i in idx], [drawn[i] for i in idx])
        logits, labels = lm._target_logits(x)  # only the positions that predict a sample's token
        nll = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), labels,
                                                ignore_index=-100, reduction="none").sum(-1)  # (n,)
        total = total + (advantage[chunk] * nll).sum()
    return total


def shared_prefix(lm, soft, prompts, drawn, owner, advantage, chunk_rows):
    """What SCSTLoss does now: the prefix once per image, the samples after it."""
    prefix = lm.prefix(soft, prompts)
    order = sorted(range(len(drawn)), key=lambda i: len(drawn[i]))
    total = soft.new_zeros((), dtype=torch.float32)
    for chunk in torch.tensor(order).split(chunk_rows):
        logp = lm.continuation_logprob(prefix, owner[chunk], [drawn[i] for i in chunk.tolist()])
        total = total - (advantage[chunk] * logp).sum()
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a stage-2 model directory")
    ap.add_argument("--data", default="../shared/data/flickr8k/dataset_flickr8k.json")
    ap.add_argument("--images", type=int, default=16, help="images per step (the recipe's scst batch)")
    ap.add_argument("--samples", type=int, default=5)
    ap.add_argument("--chunk-rows", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--amp", choices=["bf16", "none"], default="bf16")
    ap.add_argument("--attn", default="", help="the LLM's attention implementation "
                    "(default: the model's llm.attn_implementation)")
    args = ap.parse_args()
    torch.manual_seed(0)
    model = Blip2.from_dir(args.model)
    lm, k = model.llm, args.samples
    if args.attn:
        lm.model.set_attn_implementation(args.attn)
    records = load_records(args.data, split="val")[: args.images]
    feats = image_features(model, [r.path for r in records])  # (B, N, C)
    decode = ScstConfig(samples=k).decode()
    prompts = lm.encode_prompts([""] * len(records))
    owner = torch.arange(len(records)).repeat_interleave(k)  # (B * K,)
    trainable = [p for p in model.parameters() if p.requires_grad]
    model.train()
    print(json.dumps({**machine_info(torch.device("cpu")), "threads": torch.get_num_threads(), "model": args.model,
                      "images": len(records), "samples": k, "amp": args.amp,
                      "attn": lm.model.config._attn_implementation}))
    times: dict[str, list[float]] = {"sampling": [], "full_rows": [], "shared_prefix": []}
    for rep in range(args.repeats):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.amp == "bf16"):
            soft = model.soft_prompt(feats)  # (B, Q, H)
            t0 = time.perf_counter()
            with torch.no_grad():
                drawn = generate_ids(lm, soft.detach(), prompts, decode, num_return_sequences=k,
                                     seeds=[stream_seed(rep, i) for i in range(len(records))])
            times["sampling"].append(time.perf_counter() - t0)
        advantage = torch.randn(len(drawn), generator=torch.Generator().manual_seed(rep))
        results = {}
        pair = [("full_rows", full_rows), ("shared_prefix", shared_prefix)]
        for name, fn in pair if rep % 2 == 0 else pair[::-1]:  # alternate which runs first
            model.zero_grad(set_to_none=True)
            torch.manual_seed(rep)  # the same Q-Former dropout masks for both
            t0 = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.amp == "bf16"):
                loss = fn(lm, model.soft_prompt(feats), prompts, drawn, owner, advantage, args.chunk_rows)
            loss.backward()
            times[name].append(time.perf_counter() - t0)
            results[name] = (loss.item(), torch.cat([p.grad.flatten() for p in trainable if p.grad is not None]))
        (l_full, g_full), (l_shared, g_shared) = results["full_rows"], results["shared_prefix"]
        print(json.dumps({"repeat": rep, "sample_tokens_mean": round(sum(map(len, drawn)) / len(drawn), 2),
                          **{f"{n}_s": round(t[-1], 2) for n, t in times.items()},
                          "loss_rel_diff": abs(l_full - l_shared) / abs(l_full),
                          "grad_rel_diff": float((g_full - g_shared).abs().max() / g_full.abs().max())}))
    rows = list(zip(times["sampling"], times["full_rows"], times["shared_prefix"], strict=True))
    # per repeat first (both scorings saw the same samples), then the median over repeats
    print(json.dumps({"median_s": {n: round(statistics.median(t), 2) for n, t in times.items()},
                      "scoring_speedup": round(statistics.median(f / h for _, f, h in rows), 2),
                      "step_speedup": round(statistics.median((a + f) / (a + h) for a, f, h in rows), 2)}))


if __name__ == "__main__":
    main()
