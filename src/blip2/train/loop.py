"""Stage-1 training, top to bottom: data -> model -> resume -> steps -> checkpoints -> eval."""

from __future__ import annotations

import json
import logging
import random
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from blip2.config import Stage1Recipe, from_dict, to_dict
from blip2.data.cache import cached_features
from blip2.data.pairs import EpochSampler, Pairs
from blip2.data.records import ImageRecord, has_splits, load_records
from blip2.io import write_json
from blip2.losses import Stage1Loss
from blip2.model import Blip2
from blip2.qformer import load_bert_init
from blip2.train import checkpoint
from blip2.train.optim import build_optimizer, lr_at
from blip2.vision.transforms import load_rgb

log = logging.getLogger(__name__)


class MetricsLog:
    """JSONL metrics (always) + TensorBoard scalars (when tensorboard is installed)."""

    def __init__(self, out: Path):
        self.file = open(out / "metrics.jsonl", "a")
        self.tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out / "tensorboard"))
        except ImportError:
            pass

    def write(self, row: dict[str, Any]) -> None:
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, int | float):
                    self.tb.add_scalar(k, v, row["step"])

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()


def _usable(records: list[ImageRecord]) -> tuple[list[ImageRecord], int]:
    """Online mode: drop records whose image cannot be decoded (counted, not fatal)."""
    good = []
    for r in records:
        try:
            load_rgb(r.path)
            good.append(r)
        except (OSError, ValueError, SyntaxError) as e:
            log.warning("skipping unreadable image %s (%s)", r.path, e)
    return good, len(records) - len(good)


def build_training_data(recipe: Stage1Recipe, model: Blip2) -> tuple[Pairs, dict[str, int]]:
    d = recipe.data
    records = load_records(d.train, d.images, d.train_split)[: d.max_images]
    assert model.vision is not None
    if d.use_cache:
        cached = cached_features(model.vision, [r.path for r in records], d.cache_dir, d.num_workers)
        ok = set(cached.paths)
        usable = [r for r in records if r.path in ok]
        skipped = len(records) - len(usable)
        pairs = Pairs(usable, model.tokenizer, recipe.model.qformer.max_text_len, features=cached.features)
    else:
        usable, skipped = _usable(records)
        pairs = Pairs(usable, model.tokenizer, recipe.model.qformer.max_text_len, encoder=model.vision,
                      augment=d.augment, seed=recipe.train.seed)
    stats = {"images": len(usable), "skipped_images": skipped, "pairs": len(pairs)}
    log.info("training data: %d images (%d skipped as unreadable), %d pairs", *stats.values())
    return pairs, stats


def train_stage1(recipe: Stage1Recipe, out: str | Path, stop_after: int | None = None,
                 progress: bool = True) -> dict[str, Any]:
    """Train (or resume) stage 1 in `out`; returns a summary. `stop_after` simulates a kill."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tc = recipe.train
    if tc.threads:
        torch.set_num_threads(tc.threads)
    torch.use_deterministic_algorithms(tc.deterministic)

    # Resume point: read and validate fully before anything is written.
    ckpt_path = checkpoint.latest(out)
    ckpt = checkpoint.load(ckpt_path) if ckpt_path else None
    if ckpt is not None:
        saved = from_dict(Stage1Recipe, ckpt.recipe)
        if to_dict(saved.model) != to_dict(_resolved_model_cfg(recipe, saved)):
            raise ValueError(f"{ckpt.path} was trained with a different model config; use a new --out "
                             "directory or the recipe saved in its config.json")
        recipe.model = saved.model

    random.seed(tc.seed)
    torch.manual_seed(tc.seed)
    model = Blip2.build(recipe.model)
    if ckpt is None and recipe.model.qformer.init != "none":
        report = load_bert_init(model.qformer, recipe.model.qformer.init)
        write_json(out / "init_report.json", report)
    pairs, data_stats = build_training_data(recipe, model)
    sampler = EpochSampler(len(pairs), tc.batch_size, tc.seed)
    optimizer = build_optimizer(model, tc)
    objective = Stage1Loss(recipe.loss.itc, recipe.loss.itm, recipe.loss.itg, recipe.loss.label_smoothing,
                           recipe.loss.itc_grad, recipe.loss.itc_targets, rank=0, world_size=1)
    # Re-seed after data preparation: whether the feature cache already existed (its DataLoader draws
    # from the global RNG) must not change the training trajectory.
    torch.manual_seed(tc.seed + 1)
    start = 0
    if ckpt is not None:
        model.load_trainable(ckpt.weights, source=str(ckpt.path))
        optimizer.load_state_dict(ckpt.optimizer)
        sampler.load_state(ckpt.state["sampler"])
        if "pairs_rng" in ckpt.state:
            pairs.rng.setstate(_tuple_state(ckpt.state["pairs_rng"]))
        checkpoint.restore_rng(ckpt)
        start = ckpt.step
        log.info("resumed from %s at step %d", ckpt.path, start)
    recipe_dict = to_dict(recipe)
    write_json(out / "recipe.json", recipe_dict)

    metrics = MetricsLog(out)
    bar = tqdm(total=tc.steps, initial=start, desc="stage 1", unit="step", disable=not progress)
    window_t, window_n = time.perf_counter(), 0
    step = start
    while step < tc.steps:
        lr = lr_at(step, tc)
        for group in optimizer.param_groups:
            group["lr"] = lr
        model.train()
        totals: dict[str, float] = {}
        for micro in range(tc.grad_accum):
            batch = pairs.batch(sampler.next())
            feats = batch.image_feats if batch.image_feats is not None else model.image_features(batch.pixels)
            gen = torch.Generator().manual_seed(tc.seed * 1_000_003 + step * tc.grad_accum + micro)
            terms = objective(model, feats, batch.ids, batch.mask, batch.image_ids, gen)
            (terms["loss"] / tc.grad_accum).backward()
            for k, v in terms.items():
                totals[k] = totals.get(k, 0.0) + float(v.detach()) / tc.grad_accum
        grad_norm = torch.nn.utils.clip_grad_norm_(
            [p for p in model.parameters() if p.requires_grad], tc.grad_clip if tc.grad_clip > 0 else float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        window_n += tc.batch_size * tc.grad_accum
        bar.update(1)
        if step % tc.log_every == 0 or step == tc.steps:
            elapsed = time.perf_counter() - window_t
            row = {"step": step, **{k: round(v, 5) for k, v in totals.items()}, "lr": lr,
                   "temp": model.temp.item(), "grad_norm": float(grad_norm), "epoch": sampler.epoch,
                   "samples_per_s": round(window_n / elapsed, 2)}
            metrics.write(row)
            bar.set_postfix(loss=f"{totals['loss']:.3f}", sps=row["samples_per_s"])
            window_t, window_n = time.perf_counter(), 0
        if step % tc.ckpt_every == 0 or step == tc.steps:
            checkpoint.save(out, step, recipe_dict, model.trainable_state_dict(), optimizer,
                            {"sampler": sampler.state(), "pairs_rng": _list_state(pairs.rng.getstate())})
        if stop_after is not None and step >= stop_after:
            bar.close()
            metrics.close()
            return {"stopped_at": step}
    bar.close()
    metrics.close()

    meta = {"stage": 1, "itc_grad": recipe.loss.itc_grad, "steps": tc.steps, "recipe": recipe_dict}
    model.save(out / "model", meta)
    summary: dict[str, Any] = {"steps": tc.steps, "data": data_stats, "model_dir": str(out / "model")}
    _plot_curves(out)
    val = _val_annotations(recipe)
    if recipe.eval.enabled and val:
        from blip2.eval.retrieval import evaluate_split

        summary["retrieval"] = evaluate_split(model, val, recipe.data.images, recipe.data.val_split,
                                              recipe.eval, recipe.data.cache_dir, recipe.data.num_workers, progress)
    write_json(out / "summary.json", summary)
    return summary


def _val_annotations(recipe: Stage1Recipe) -> str:
    """Where end-of-run evaluation reads from; "" when there is no held-out split to use."""
    d = recipe.data
    if d.val:
        return d.val
    if not has_splits(d.train):
        log.warning("%s has no splits and data.val is not set: skipping end-of-run evaluation", d.train)
        return ""
    return d.train


def _resolved_model_cfg(recipe: Stage1Recipe, saved: Stage1Recipe):
    """The current recipe's model config with the encoder-derived width filled in as saved."""
    cfg = from_dict(type(recipe.model), to_dict(recipe.model))
    if cfg.qformer.vision_width is None:
        cfg.qformer.vision_width = saved.model.qformer.vision_width
    return cfg


def _list_state(state: tuple) -> list:
    return [state[0], list(state[1]), state[2]]


def _tuple_state(state: list) -> tuple:
    return (state[0], tuple(state[1]), state[2])


def _plot_curves(out: Path) -> None:
    """metrics.jsonl -> loss_curves.png (skipped quietly if matplotlib is not installed)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    for key in ("loss", "itc", "itm", "itg"):
        pts = [(r["step"], r[key]) for r in rows if key in r]
        if pts:
            ax.plot(*zip(*pts, strict=True), label=key)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("stage-1 training losses")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "loss_curves.png", dpi=100)
    plt.close(fig)
