"""Per-row inverse-CDF sampling (blip2.generate.sample_tokens) vs torch.multinomial, both in one run.

    python bench/sampling.py [--device cpu|cuda] [--repeats 20] [--no-generate]

generate() used to draw sampled tokens with torch.multinomial from one generator per batch, so a
row's tokens depended on the rest of the batch. It now draws row r from its own uniforms
(blip2.generate.row_uniforms) by inverse CDF. This prints, for both samplers:

  * the sampler alone on (rows, vocab) probabilities of the shapes SCST and captioning meet
    (SmolLM2's 49k vocabulary and Gemma-3's 262k), in ms per call, and the ratio;
  * unless --no-generate: one SCST sampling call, generate_ids on the packaged SmolLM2-135M with
    random soft prompts, 16 inputs x 5 samples, up to 30 new tokens, temperature 1 (the Flickr8k
    recipe's scst stage), in s per call and the ratio. The multinomial baseline is the old sampler
    patched in; its tokens differ (other random numbers), so both calls run to 30 tokens with eos
    suppressed to do the same LM work.
"""

from __future__ import annotations

import argparse
import platform
import time
from unittest import mock

import torch

import blip2.generate as G
from blip2.config import DecodeConfig, LLMConfig
from blip2.llm import load_llm


def _multinomial_sampler(gen: torch.Generator):
    def sample(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:  # the old way: ignores u
        return torch.multinomial(probs, 1, generator=gen).squeeze(1)

    return sample


def _time(f, repeats: int, sync) -> float:
    f()
    sync()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        f()
        sync()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--no-generate", action="store_true")
    args = ap.parse_args()
    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, device {dev}")
    print("sampler alone (best of repeats, ms per call)")
    print(f"{'rows':>5} {'vocab':>7} {'multinomial':>12} {'inverse-cdf':>12} {'ratio':>6}")
    for rows, vocab in [(16, 49152), (80, 49152), (160, 49152), (80, 262144)]:
        probs = torch.randn(rows, vocab, device=dev).mul_(3).softmax(-1)
        u = G.row_uniforms(list(range(rows)), 1, dev)[:, 0]
        old = _multinomial_sampler(torch.Generator(device=dev).manual_seed(0))
        t_old = _time(lambda probs=probs, old=old, u=u: old(probs, u), args.repeats, sync)
        t_new = _time(lambda probs=probs, u=u: G.sample_tokens(probs, u), args.repeats, sync)
        print(f"{rows:>5} {vocab:>7} {t_old * 1e3:>12.2f} {t_new * 1e3:>12.2f} {t_old / t_new:>6.1f}x")
    if args.no_generate:
        return
    lm = load_llm(LLMConfig()).to(dev)
    cfg = DecodeConfig(num_beams=1, do_sample=True, temperature=1.0, top_p=1.0, top_k=0, min_new_tokens=30,
                       max_new_tokens=30, static_cache="off")  # eos banned: both run 30 steps
    soft = torch.randn(16, 32, lm.hidden_size, device=dev) * 0.02
    prompts: list[list[int]] = [[] for _ in range(16)]

    def run() -> list[list[int]]:
        return G.generate_ids(lm, soft, prompts, cfg, num_return_sequences=5)

    reps = max(1, args.repeats // 10)
    with torch.no_grad():
        t_new = _time(run, reps, sync)
        with mock.patch.object(G, "sample_tokens", _multinomial_sampler(torch.Generator(device=dev).manual_seed(0))):
            t_old = _time(run, reps, sync)
    print("SCST sampling call: 16 inputs x 5 samples x 30 tokens, SmolLM2-135M (best of "
          f"{reps + 1}, s per call)")
    print(f"multinomial {t_old:.2f}  inverse-cdf {t_new:.2f}  ratio {t_old / t_new:.2f}x")


if __name__ == "__main__":
    main()
