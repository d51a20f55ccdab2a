"""Teacher-forced caption loss of stage-2 models on held-out (or training) captions.

    python bench/caption_nll.py --model RUN/stage2/model [--model OTHER ...] [--split val]
        [--max-images 300] [--prompt "a photo of"] [--precision fp32]

Beam-decoded BLEU-4 of one stage-2 run moves by ~1.5 between runs that differ only in a few dozen
steps (docs/RESULTS.md, "A moving average of stage 2's weights"), so one run per setting says little
through it. The mean negative log-likelihood per caption token (text + eos, the training loss, in
eval mode, every caption of the first `--max-images` images of the split, cached features) is a much
smoother measure of how well a model predicts captions it did not train on (for an encoder-decoder
LLM the whole caption is the decoder target: no random prefix split as in training); `--split train` gives the
same on training captions, so the difference is the generalisation gap.
Prints one JSON line per model.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from blip2.data.cache import split_features
from blip2.data.pairs import Pairs
from blip2.model import Blip2


def caption_nll(model: Blip2, pairs: Pairs, batch_size: int) -> tuple[float, int]:
    """(mean NLL per target token, target tokens) of every pair, teacher-forced."""
    lm, cfg = model.llm, model.cfg.llm
    assert lm is not None and cfg is not None, "a stage-2 model (with an LLM) is needed"
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(pairs), batch_size):
            batch = pairs.batch(torch.arange(start, min(start + batch_size, len(pairs))))
            prompt_ids = lm.encode_prompts(batch.prompts)
            target_ids = lm.encode_targets(batch.prompts, batch.texts, cfg.max_text_len)
            s, c = lm.loss_sum(model.soft_prompt(batch.image_feats), prompt_ids, target_ids)
            total, count = total + float(s), count + int(c)
    return total / count, count


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", required=True, help="a stage-2 model directory (repeatable)")
    ap.add_argument("--data", default="../shared/data/flickr8k/dataset_flickr8k.json")
    ap.add_argument("--split", default="val")
    ap.add_argument("--max-images", type=int, default=300)
    ap.add_argument("--prompt", default="", help="the caption prompt the model was trained with")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="the frozen LLM's")
    ap.add_argument("--batch-size", type=int, default=64)
    args = ap.parse_args()
    torch.manual_seed(0)
    for directory in args.model:
        t0 = time.perf_counter()
        model = Blip2.from_dir(directory, precision=args.precision).eval()
        records, cached = split_features(model.vision, args.data, None, args.split, args.max_images, progress=False)
        pairs = Pairs(records, None, 0, features=cached.features, caption_prompt=args.prompt)
        nll, tokens = caption_nll(model, pairs, args.batch_size)
        print(json.dumps({"model": directory, "split": args.split, "images": len(records), "pairs": len(pairs),
                          "tokens": tokens, "nll_per_token": round(nll, 4), "precision": args.precision,
                          "seconds": round(time.perf_counter() - t0, 1)}), flush=True)


if __name__ == "__main__":
    main()
