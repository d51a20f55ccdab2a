"""Ours vs transformers' BLIP-2 classes on identical weights, both measured in the same run.

    python bench/vs_transformers.py [--models tiny,default,MODEL_DIR] [--batches 1,8,32]
                                    [--max-new-tokens 30] [--device cpu|cuda] [--lm-tokenizer DIR]
                                    [--qformer-tokenizer DIR] [--images KARPATHY_JSON]
                                    [--static-cache] [--random-lm]

For each model a transformers checkpoint is written to a temporary directory; transformers loads it
with its own classes, ours imports the same directory (`Blip2.from_dir`). Then:

  * captioning: images/s of `Blip2ForConditionalGeneration.generate` vs ours, greedy and beam 5
    (at least 8, at most 30 new tokens), at each batch size, on the same pixels and prompt ids; the
    generated tokens must be identical. Random LMs rarely emit eos, so the tiny model always runs
    to the maximum length; SmolLM2 stops when it is done, and ours drops finished inputs;
  * VQA with several questions about one image (images x questions rows): transformers runs the
    ViT and Q-Former for every row, ours once per image;
  * "ours" decodes with the dynamic KV cache (decode.static_cache=off); with --static-cache it is
    also timed with static_cache=on (a preallocated KV cache, on CUDA one captured CUDA graph per
    decode step, blip2.static_decode; the default "auto" picks it on CUDA), tokens compared too.
    Each timed call is a fresh generate(); the best of --repeats reuses the graph captured by the
    first call of that shape, as an evaluation loop does;
  * ITM re-ranking: pairs/s of `Blip2ForImageTextRetrieval(use_image_text_matching_head=True)` vs
    ours scoring 32 captions against one image; the ITM logits must agree to 1e-4.

A model name that is a directory is a trained model of ours with any frozen encoder (e.g. the
default EfficientNet-Lite0 + MiniLM Q-Former + SmolLM2 model that `recipes/flickr8k-cpu.yaml`
trains): transformers gets it through `to_transformers(model, any_encoder=True)`, i.e. its own
Q-Former, projection, LM and generate() with our encoder in the ViT's place. It captions real
images (`--images`, Karpathy JSON, val split) with the prompt it was trained with, so captions end
at their natural length, as in use; VQA timing uses the same images; ITM is not run for it.

Models: "tiny" = a tiny-but-realistic random config (ViT 4x256 at 224 px, Q-Former 4x256 with 32
queries, OPT-style 6x512 LM with a 50k vocabulary); "default" = the packaged SmolLM2-135M (real
weights; with --random-lm its architecture with random weights, e.g. where the 540 MB of weights
cannot travel: the config.json in --lm-tokenizer is used) behind a Q-Former of the default size
(6x384, 12 heads, 32 queries). transformers' BLIP-2
only accepts its own ViT, so both models use a random ViT-S/16-sized tower in place of
EfficientNet-Lite0; it costs the same for both sides.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch

from blip2.config import DecodeConfig
from blip2.generate import generate_ids
from blip2.model import Blip2, resolve_device

Q = 32


def _vision_cfg(tf, width: int, layers: int):
    return tf.Blip2VisionConfig(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
                                num_attention_heads=max(1, width // 64), image_size=224, patch_size=16)


def _qformer_cfg(tf, width: int, layers: int, heads: int, ffn: int, text: bool):
    return tf.Blip2QFormerConfig(vocab_size=30523, hidden_size=width, num_hidden_layers=layers,
                                 num_attention_heads=heads, intermediate_size=ffn, use_qformer_text_input=text)


def build_checkpoints(name: str, root: Path, lm_tokenizer: str | None = None, qformer_tokenizer: str = "packaged",
                      random_lm: bool = False) -> tuple[Path, Path]:
    """(generation dir, retrieval dir) with the same vision tower and Q-Former weights."""
    import transformers as tf

    from blip2.llm import packaged_llm_dir
    from blip2.text import load_tokenizer

    torch.manual_seed(0)
    if name == "tiny":
        vis, qf = _vision_cfg(tf, 256, 4), (256, 4, 4, 1024)
        text_cfg = tf.OPTConfig(vocab_size=50272, hidden_size=512, ffn_dim=2048, num_hidden_layers=6,
                                num_attention_heads=8, max_position_embeddings=256, word_embed_proj_dim=512,
                                pad_token_id=1, bos_token_id=2, eos_token_id=2)
        lm, tok = tf.OPTForCausalLM(text_cfg), _gpt2_like_tokenizer(lm_tokenizer)
    else:
        vis, qf = _vision_cfg(tf, 384, 6), (384, 6, 12, 1536)
        src = lm_tokenizer or packaged_llm_dir()
        if random_lm:
            lm = tf.AutoModelForCausalLM.from_config(tf.AutoConfig.from_pretrained(src, local_files_only=True))
        else:
            lm = tf.AutoModelForCausalLM.from_pretrained(src, local_files_only=True)
        tok = tf.AutoTokenizer.from_pretrained(src, local_files_only=True)
        text_cfg = lm.config
    tok.add_tokens(["<image>"], special_tokens=True)
    image_id = tok.convert_tokens_to_ids("<image>")
    if image_id >= lm.get_input_embeddings().weight.shape[0]:
        lm.resize_token_embeddings(image_id + 1)
    text_cfg = lm.config
    gen_cfg = tf.Blip2Config(vision_config=vis.to_dict(),
                             qformer_config=_qformer_cfg(tf, *qf, text=False).to_dict(),
                             text_config=text_cfg.to_dict(), num_query_tokens=Q, image_token_index=image_id)
    gen = tf.Blip2ForConditionalGeneration(gen_cfg).eval()
    gen.language_model.load_state_dict(lm.state_dict())
    with torch.no_grad():  # a larger soft prompt than the 0.02-std init, as trained models have
        gen.language_projection.weight.normal_(std=0.05)
    gen.save_pretrained(root / "gen")
    tok.save_pretrained(root / "gen")
    ret_cfg = tf.Blip2Config(vision_config=vis.to_dict(), qformer_config=_qformer_cfg(tf, *qf, text=True).to_dict(),
                             text_config=tf.OPTConfig(vocab_size=8, hidden_size=8, num_hidden_layers=1, ffn_dim=8,
                                                      num_attention_heads=1).to_dict(), num_query_tokens=Q)
    ret = tf.Blip2ForImageTextRetrieval(ret_cfg).eval()
    ret.vision_model.load_state_dict(gen.vision_model.state_dict())
    ret.save_pretrained(root / "ret")
    load_tokenizer(qformer_tokenizer, 30523).save_pretrained(root / "ret")
    return root / "gen", root / "ret"


def _gpt2_like_tokenizer(directory: str | None):
    """The packaged SmolLM2 BPE tokenizer (or the one in `directory`) stands in for OPT's (only ids
    matter for timing)."""
    from transformers import AutoTokenizer

    from blip2.llm import packaged_llm_dir

    return AutoTokenizer.from_pretrained(directory or packaged_llm_dir(), local_files_only=True)


def timed(fn, repeats: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        _sync()
        t = time.perf_counter()
        out = fn()
        _sync()
        best = min(best, time.perf_counter() - t)
    return best, out


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def hf_generate(hf, pixels, ids, cfg: DecodeConfig, eos: int, pad: int) -> list[list[int]]:
    out = hf.generate(pixel_values=pixels, input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                      num_beams=cfg.num_beams, max_new_tokens=cfg.max_new_tokens, min_new_tokens=cfg.min_new_tokens,
                      length_penalty=cfg.length_penalty, early_stopping=False, eos_token_id=eos, pad_token_id=pad)
    rows = out[:, ids.shape[1]:].tolist()
    return [r[: r.index(eos)] if eos in r else r for r in rows]


def ours_generate(ours, pixels, prompt_ids, cfg: DecodeConfig) -> list[list[int]]:
    return generate_ids(ours.llm, ours.soft_prompt(ours.image_features(pixels)), prompt_ids, cfg)


def real_pixels(model, annotations: str, n: int) -> torch.Tensor:
    """The first n val images of a Karpathy JSON, preprocessed for the model's encoder: (n, 3, S, S)."""
    from blip2.data.records import load_records
    from blip2.tasks import load_pixels

    return load_pixels(model, [r.path for r in load_records(annotations, split="val")[:n]])


def _first_or_random(images: torch.Tensor | None, n: int, seed: int) -> torch.Tensor:
    """The first n real images, or n seeded random 224 px ones for the random models: (n, 3, S, S)."""
    if images is not None:
        return images[:n]
    return torch.randn(n, 3, 224, 224, generator=torch.Generator().manual_seed(seed))


def bench_captioning(hf, ours, batches, max_new, repeats, prompt: str = "a photo of",
                     images: torch.Tensor | None = None, static: bool = False) -> list[dict]:
    rows = []
    p_ids = ours.llm.encode_prompts([prompt])[0]
    image_id, q = hf.config.image_token_index, hf.config.num_query_tokens
    for decode in ("greedy", "beam5"):
        cfg = DecodeConfig(num_beams=1 if decode == "greedy" else 5, max_new_tokens=max_new,
                           min_new_tokens=min(8, max_new), static_cache="off")  # captioning defaults, dynamic cache
        for b in batches:
            pixels = _first_or_random(images, b, seed=b).to(ours.device)
            ids = torch.tensor([[image_id] * q + p_ids] * b, device=ours.device)
            with torch.no_grad():
                t_hf, out_hf = timed(partial(hf_generate, hf, pixels, ids, cfg, ours.llm.eos_id, ours.llm.pad_id),
                                     repeats)
                t_us, out_us = timed(partial(ours_generate, ours, pixels, [p_ids] * b, cfg), repeats)
            rows.append({"task": "caption", "decode": decode, "batch": b, "transformers_img_s": b / t_hf,
                         "ours_img_s": b / t_us, "speedup": t_hf / t_us, "identical_tokens": out_hf == out_us,
                         "mean_new_tokens": sum(map(len, out_us)) / b})
            if static:
                with torch.no_grad():
                    run = partial(ours_generate, ours, pixels, [p_ids] * b, replace(cfg, static_cache="on"))
                    t_first, _ = timed(run, 1)  # includes capturing this shape's graph
                    t_st, out_st = timed(run, repeats)
                rows[-1].update(ours_static_img_s=b / t_st, speedup_static=t_hf / t_st,
                                identical_tokens_static=out_st == out_hf, static_first_call_s=t_first,
                                static_call_s=t_st)
            print(json.dumps(rows[-1]), flush=True)
    return rows


def bench_questions(hf, ours, n_images, n_questions, max_new, repeats, images: torch.Tensor | None = None,
                    static: bool = False) -> dict:
    """Several prompts about one image: transformers encodes the image once per row, ours once."""
    from blip2.tasks import vqa_prompt

    questions = [vqa_prompt(ours.llm, q) for q in ("what is this?", "what colour is it?", "is it outdoors?",
                                                   "how many are there?", "what is on the left?",
                                                   "who is in the picture?", "is it daytime?", "where is it?")]
    questions = (questions * n_questions)[:n_questions]
    p_ids = ours.llm.encode_prompts(questions)
    width = max(len(p) for p in p_ids)
    image_id, q = hf.config.image_token_index, hf.config.num_query_tokens
    pad = ours.llm.pad_id
    pixels = _first_or_random(images, n_images, seed=7).to(ours.device)
    rows_px = pixels.repeat_interleave(n_questions, 0)
    # transformers: left-padded [pads | image tokens | question] rows
    ids = torch.tensor([[pad] * (width - len(p)) + [image_id] * q + p for _ in range(n_images) for p in p_ids],
                       device=ours.device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * (q + len(p)) for _ in range(n_images) for p in p_ids],
                        device=ours.device)
    cfg = DecodeConfig(num_beams=5, max_new_tokens=max_new, min_new_tokens=1, length_penalty=-1.0, static_cache="off")

    def run_hf():
        out = hf.generate(pixel_values=rows_px, input_ids=ids, attention_mask=mask, do_sample=False, num_beams=5,
                          max_new_tokens=max_new, min_new_tokens=1, length_penalty=-1.0, early_stopping=False,
                          eos_token_id=ours.llm.eos_id, pad_token_id=pad)
        rows = out[:, ids.shape[1]:].tolist()
        return [r[: r.index(ours.llm.eos_id)] if ours.llm.eos_id in r else r for r in rows]

    def run_ours(decode: DecodeConfig):
        soft = ours.soft_prompt(ours.image_features(pixels)).repeat_interleave(n_questions, 0)
        return generate_ids(ours.llm, soft, p_ids * n_images, decode)

    with torch.no_grad():
        t_hf, out_hf = timed(run_hf, repeats)
        t_us, out_us = timed(partial(run_ours, cfg), repeats)
    n = n_images * n_questions
    row = {"task": f"vqa {n_images} img x {n_questions} q", "decode": "beam5", "batch": n,
           "transformers_q_s": n / t_hf, "ours_q_s": n / t_us, "speedup": t_hf / t_us,
           "identical_tokens": out_hf == out_us}
    if static:
        run = partial(run_ours, replace(cfg, static_cache="on"))
        with torch.no_grad():
            timed(run, 1)  # captures this shape's graph
            t_st, out_st = timed(run, repeats)
        row.update(ours_static_q_s=n / t_st, speedup_static=t_hf / t_st, identical_tokens_static=out_st == out_hf)
    print(json.dumps(row), flush=True)
    return row


def bench_itm(ret_hf, ret_ours, n_texts: int, repeats: int) -> dict:
    texts = [f"a photo of {n} {w} on the grass" for n in ("one", "two", "three", "four") for w in
             ("dogs", "cats", "people", "birds", "cars", "balls", "boats", "trees")][:n_texts]
    ids, mask = ret_ours.tokenize(texts)
    pixels = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(3)).to(ret_ours.device)
    with torch.no_grad():
        t_hf, ref = timed(lambda: ret_hf(pixel_values=pixels.expand(n_texts, -1, -1, -1), input_ids=ids,
                                         attention_mask=mask, use_image_text_matching_head=True).logits_per_image,
                          repeats)

        def run_ours():
            feats = ret_ours.ln_vision(ret_ours.image_features(pixels))  # the image once
            return ret_ours.itm_logits(feats.expand(n_texts, -1, -1), ids, mask)

        t_us, mine = timed(run_ours, repeats)
    row = {"task": f"itm 1 img x {n_texts} captions", "batch": n_texts, "transformers_pairs_s": n_texts / t_hf,
           "ours_pairs_s": n_texts / t_us, "speedup": t_hf / t_us,
           "max_abs_logit_diff": float((mine - ref).abs().max())}
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="tiny,default")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--max-new-tokens", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N (both sides run there)")
    ap.add_argument("--lm-tokenizer", default=None,
                    help="tokenizer directory for the tiny model's LM (default: the packaged SmolLM2's)")
    ap.add_argument("--qformer-tokenizer", default="packaged", help="BERT tokenizer directory for the ITM model")
    ap.add_argument("--static-cache", action="store_true",
                    help="also time ours with decode.static_cache (CUDA graphs on a GPU)")
    ap.add_argument("--random-lm", action="store_true",
                    help="'default' model: SmolLM2's architecture with random weights (config from --lm-tokenizer)")
    ap.add_argument("--images", default="../shared/data/flickr8k/dataset_flickr8k.json",
                    help="Karpathy JSON whose val images a trained model (a MODEL_DIR in --models) captions")
    args = ap.parse_args()
    device = resolve_device(args.device)
    torch.set_num_threads(args.threads)
    import transformers as tf

    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, transformers "
          f"{tf.__version__}, {torch.get_num_threads()} threads, device {device}"
          f"{' (' + torch.cuda.get_device_name() + ')' if device.type == 'cuda' else ''}; best of {args.repeats}")
    batches = [int(b) for b in args.batches.split(",")]
    for name in args.models.split(","):
        if Path(name).is_dir():
            bench_trained(Path(name), device, batches, args)
            continue
        with tempfile.TemporaryDirectory() as tmp:
            gen_dir, ret_dir = build_checkpoints(name, Path(tmp), args.lm_tokenizer, args.qformer_tokenizer,
                                                 args.random_lm)
            hf = tf.Blip2ForConditionalGeneration.from_pretrained(gen_dir).to(device).eval()
            ours = Blip2.from_dir(gen_dir).to(device)
            print(f"## model {name}: LM {hf.config.text_config.model_type} "
                  f"{sum(p.numel() for p in hf.language_model.parameters()) / 1e6:.0f}M params")
            rows = bench_captioning(hf, ours, batches, args.max_new_tokens, args.repeats, static=args.static_cache)
            rows.append(bench_questions(hf, ours, 2, 4, 10, args.repeats, static=args.static_cache))
            ret_hf = tf.Blip2ForImageTextRetrieval.from_pretrained(ret_dir).to(device).eval()
            rows.append(bench_itm(ret_hf, Blip2.from_dir(ret_dir).to(device), 32, args.repeats))
            summarise(name, rows)


def bench_trained(directory: Path, device: torch.device, batches: list[int], args) -> None:
    """A trained model of ours (any encoder) against transformers' classes holding the same weights."""
    from blip2.interop.hf import to_transformers

    ours = Blip2.from_dir(directory, precision="fp32").to(device)
    hf = to_transformers(ours, any_encoder=True)[0].to(device)
    prompt = ours.meta.get("recipe", {}).get("stage2", {}).get("caption_prompt", "")
    images = real_pixels(ours, args.images, max(batches))
    print(f"## model {directory}: encoder {ours.cfg.vision.name}, {ours.cfg.qformer.num_queries} queries, LM "
          f"{hf.config.text_config.model_type} {sum(p.numel() for p in hf.language_model.parameters()) / 1e6:.0f}M "
          f"params; caption prompt {prompt!r}; {len(images)} val images of {args.images}")
    rows = bench_captioning(hf, ours, batches, args.max_new_tokens, args.repeats, prompt, images,
                            static=args.static_cache)
    rows.append(bench_questions(hf, ours, 2, 4, 10, args.repeats, images, static=args.static_cache))
    summarise(str(directory), rows)


def summarise(name: str, rows: list[dict]) -> None:
    print(f"## summary {name}")
    for r in rows:
        ok = r.get("identical_tokens", r.get("max_abs_logit_diff", 0) < 1e-4)
        length = f"  {r['mean_new_tokens']:.1f} tokens/caption" if "mean_new_tokens" in r else ""
        static = ""
        if "speedup_static" in r:
            same = r["identical_tokens_static"]
            static = f"  static cache {r['speedup_static']:.2f}x outputs {'identical' if same else 'DIFFERENT'}"
            if "static_first_call_s" in r:
                static += f" (first call {r['static_first_call_s']:.3f} s, then {r['static_call_s']:.3f} s)"
        print(f"{r['task']:<24} {r.get('decode', ''):<7} batch {r['batch']:>3}  ours/transformers "
              f"{r['speedup']:.2f}x  outputs {'identical' if ok is True else ok}{static}{length}")


if __name__ == "__main__":
    main()
