"""Training for both stages, top to bottom: model -> data -> resume -> steps -> checkpoints -> eval.

The two stages differ only in how the model is initialised, which pairs are read, the objective
and the final evaluation; those are the small functions above `train`. The loop itself is shared.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import os
import random
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from tqdm import tqdm

from blip2.config import PipelineRecipe, Stage1Recipe, Stage2Recipe, TrainConfig, from_dict, to_dict
from blip2.data.cache import cached_features
from blip2.data.pairs import EpochSampler, Pairs, drop_tokens
from blip2.data.records import ImageRecord, has_splits, load_records
from blip2.generate import stream_seed
from blip2.io import read_json, write_json
from blip2.losses import SCSTLoss, Stage1Loss, Stage2Loss
from blip2.model import (
    CONFIG,
    WEIGHTS,
    Blip2,
    Blip2Ensemble,
    auto_half,
    machine_info,
    resolve_auto,
    resolve_device,
    warn_slow_half,
)
from blip2.qformer import load_bert_init
from blip2.reward import CiderD, SentenceBleu, WeightedReward
from blip2.text import caption_token_prior
from blip2.train import checkpoint
from blip2.train.distributed import World
from blip2.train.ema import WeightEMA
from blip2.train.optim import build_optimizer, lr_at, plan_step, step_time, steps_within_cap
from blip2.vision.transforms import load_rgb

log = logging.getLogger(__name__)

# Mean cosine between one image's query outputs above which they count as collapsed: they then hand
# the LLM copies of one vector and stage 2 barely learns (docs/RESULTS.md, "Query collapse").
# Healthy Flickr8k models sit at 0.2-0.7; collapsed ones at 0.99-1.0.
COLLAPSED_QUERY_COS = 0.95

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _now() -> float:
    """The training clock (seconds); tests replace it to give steps a known duration."""
    return time.perf_counter()


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


def _usable(records: list[ImageRecord]) -> tuple[list[ImageRecord], dict[str, str]]:
    """Online mode: drop records whose image cannot be decoded (counted, not fatal)."""
    good, bad = [], {}
    for r in records:
        try:
            load_rgb(r.path)
            good.append(r)
        except (OSError, ValueError, SyntaxError) as e:
            bad[r.path] = f"{type(e).__name__}: {e}"
    return good, bad


def report_skipped(skipped: dict[str, str], out: Path, shown: int = 100) -> None:
    """Name every skipped image in the log (up to `shown`) and all of them in out/skipped_images.json."""
    if not skipped:
        return
    write_json(out / "skipped_images.json", skipped)
    for path, why in list(skipped.items())[:shown]:
        log.warning("skipped image %s (%s)", path, why)
    if len(skipped) > shown:
        log.warning("... and %d more skipped images, all listed in %s", len(skipped) - shown,
                    out / "skipped_images.json")


Recipe = Stage1Recipe | Stage2Recipe


def vqa_template(recipe: Stage2Recipe, model: Blip2 | Blip2Ensemble) -> str:
    from blip2.tasks import default_vqa_template

    assert model.llm is not None
    return recipe.stage2.qa_template or default_vqa_template(model.llm)


def build_training_data(recipe: Recipe, model: Blip2, world: World | None = None
                        ) -> tuple[Pairs, dict[str, int], dict[str, str]]:
    """Pairs for training + counts + the images that could not be read (path -> reason).

    With several processes the main one fills the feature cache first; the others then read it.
    """
    world = world or World()
    d = recipe.data
    records = load_records(d.train, d.images, d.train_split)[: d.max_images]
    assert model.vision is not None
    text: dict[str, Any] = {"tokenizer": model.tokenizer, "max_len": recipe.model.qformer.max_text_len}
    if isinstance(recipe, Stage2Recipe):  # the LLM tokenizes its own prompts and targets
        text = {"tokenizer": None, "max_len": 0, "caption_prompt": recipe.stage2.caption_prompt,
                "qa_template": vqa_template(recipe, model) if recipe.stage2.use_qa else None,
                "per_image": recipe.scst is not None}  # SCST reads all of an image's references itself
    if d.use_cache:
        if not world.is_main:
            world.barrier()  # wait until the main process has encoded and saved every image
        cached = cached_features(model.vision, [r.path for r in records], d.cache_dir, d.num_workers,
                                 progress=world.is_main)
        if world.is_main:
            world.barrier()
        ok = set(cached.paths)
        usable = [r for r in records if r.path in ok]
        skipped = {r.path: cached.failed.get(r.path, "unreadable") for r in records if r.path not in ok}
        pairs = Pairs(usable, features=cached.features, **text)
    else:
        usable, skipped = _usable(records)
        pairs = Pairs(usable, encoder=model.vision, augment=d.augment, seed=recipe.train.seed, **text)
    stats = {"images": len(usable), "skipped_images": len(skipped), "pairs": len(pairs)}
    log.info("training data: %d images (%d skipped as unreadable), %d pairs", *stats.values())
    return pairs, stats, skipped


def init_model(recipe: Recipe, model: Blip2, out: Path | None) -> None:
    """Fresh-run initialisation: the Q-Former from BERT, or stage 2 from a stage-1 model; the report
    goes to out/init_report.json (out=None: not written, as on every process but the main one)."""
    init_dir = recipe.stage2.init if isinstance(recipe, Stage2Recipe) else ""
    report = None
    if init_dir and isinstance(recipe, Stage2Recipe) and recipe.scst is not None:  # every weight from stage 2
        model.load_trainable(load_file(str(Path(init_dir) / WEIGHTS)), source=init_dir)
        report = {"stage2_model": str(init_dir)}
    elif init_dir:
        model.load_trainable(load_file(str(Path(init_dir) / WEIGHTS)), source=init_dir, allow_missing=("llm_proj.",))
        report = {"stage1_model": str(init_dir), "new": ["llm_proj.weight", "llm_proj.bias"]}
    elif recipe.model.qformer.init != "none":
        report = load_bert_init(model.qformer, recipe.model.qformer.init)
    if report is not None and out is not None:
        write_json(out / "init_report.json", report)


def set_itg_prior_bias(model: Blip2, texts: list[str], label_smoothing: float) -> None:
    """ITG's output bias <- the captions' token log-frequencies (loss.itg_prior_bias)."""
    q = model.cfg.qformer
    prior = caption_token_prior(model.tokenizer, texts, q.max_text_len, q.vocab_size, label_smoothing)
    with torch.no_grad():
        model.qformer.lm_head.bias.copy_(prior - prior.mean())
    log.info("ITG bias set to the token prior of %d captions (entropy %.2f nats; ln(vocab) = %.2f)",
             len(texts), float(-(prior.exp() * prior).sum()), math.log(q.vocab_size))


def resolve_stage2_model(recipe: Stage2Recipe) -> None:
    """A stage-2 run from a stage-1 model takes that model's encoder and Q-Former structure (its
    weights fix them) but the recipe's Q-Former dropout rates, which are training behaviour, not
    weights; an SCST run takes the whole config of the stage-2 model it fine-tunes (its LLM included)."""
    if recipe.scst is not None and not recipe.stage2.init:
        raise ValueError("an SCST run fine-tunes a stage-2 model: name it with stage2.init "
                         "(blip2 train scst --init DIR)")
    if recipe.stage2.init:
        doc = read_json(Path(recipe.stage2.init) / CONFIG)
        init = from_dict(type(recipe.model), doc["model"])
        own, scst = recipe.model, recipe.scst is not None
        keep = () if scst else ("hidden_dropout", "attention_dropout")  # what stage 2 takes from its recipe
        ignored = [*_overridden("vision", own.vision, init.vision),
                   *_overridden("qformer", own.qformer, init.qformer, keep=keep)]
        if scst:
            if init.llm is None:
                raise ValueError(f"{recipe.stage2.init} is a stage-1 model (no LLM); SCST starts from a stage-2 model")
            if own.llm is not None:
                ignored += _overridden("llm", own.llm, init.llm)
            recipe.model = init
        else:
            recipe.model.vision = init.vision
            recipe.model.qformer = dataclasses.replace(init.qformer, **{k: getattr(own.qformer, k) for k in keep})
        if ignored:
            log.warning("%s starts from %s, whose config replaces the recipe's model.%s; set these where that "
                        "model was trained (in a pipeline recipe: in every section)",
                        "SCST" if scst else "stage 2", recipe.stage2.init, ", model.".join(ignored))


def _overridden(section: str, own: Any, init: Any, keep: tuple[str, ...] = ()) -> list[str]:
    """`field=value (init's value)` for each field a recipe moved off its default that the init model
    overrides; a field left at its default says nothing, so it is not reported."""
    default = type(own)()
    out = []
    for f in dataclasses.fields(own):
        mine, theirs = getattr(own, f.name), getattr(init, f.name)
        if f.name not in keep and mine is not None and mine != theirs and mine != getattr(default, f.name):
            out.append(f"{section}.{f.name}={mine!r} (it has {theirs!r})")
    return out


def objective_for(recipe: Recipe, world: World, pairs: Pairs):
    """batch -> dict of loss terms ("loss" is optimised); this rank's share of the global-batch loss."""
    if isinstance(recipe, Stage2Recipe) and recipe.scst is not None:
        sc, seed = recipe.scst, recipe.train.seed
        refs = [r.captions for r in pairs.records]
        reward = CiderD(refs)  # idf from every training reference
        if sc.bleu_weight:
            reward = WeightedReward([(1.0, reward), (sc.bleu_weight, SentenceBleu(refs))])
        scst = SCSTLoss(reward, sc.samples, sc.decode(), world.world_size)
        # an image's samples are keyed by (seed, step, image) on every rank alike, so the number of
        # processes changes only the dropout masks they are drawn under (as in stage 2)
        return lambda model, batch, feats, gen, step: scst(model, feats, batch.prompts, batch.image_ids.tolist(),
                                                           stream_seed(seed, step))
    if isinstance(recipe, Stage2Recipe):
        lm = Stage2Loss(recipe.stage2.prefix_split, world.world_size)
        return lambda model, batch, feats, gen, step: lm(model, feats, batch.prompts, batch.texts, gen)
    lc = recipe.loss
    s1 = Stage1Loss(lc.itc, lc.itm, lc.itg, lc.label_smoothing, lc.itc_grad, lc.itc_targets, rank=world.rank,
                    world_size=world.world_size, itg_ramp_steps=lc.itg_ramp_steps, query_div=lc.query_div,
                    itm_weight=lc.itm_weight)
    return lambda model, batch, feats, gen, step: s1(model, feats, batch.ids, batch.mask, batch.image_ids, gen,
                                                     step)


def evaluate(recipe: Recipe, model: Blip2 | Blip2Ensemble, progress: bool) -> dict[str, Any]:
    val = _val_annotations(recipe)
    if not (recipe.eval.enabled and val):
        return {}
    d = recipe.data
    if isinstance(recipe, Stage2Recipe):
        from blip2.eval.caption import evaluate_generation

        return {"generation": evaluate_generation(model, val, d.images, d.val_split, recipe.eval, d.cache_dir,
                                                  d.num_workers, progress, prompt=recipe.stage2.caption_prompt,
                                                  qa_template=vqa_template(recipe, model))}
    from blip2.eval.retrieval import evaluate_split

    return {"retrieval": evaluate_split(model, val, d.images, d.val_split, recipe.eval, d.cache_dir,
                                        d.num_workers, progress)}


def train_pipeline(recipe: PipelineRecipe, out: str | Path, progress: bool = True) -> dict[str, Any]:
    """Stage 1 into out/stage1, then stage 2 from its model into out/stage2 (and, with recipe.scst,
    SCST from stage 2's model into out/scst). With recipe.ensemble_seeds, one such stage 2 (+ SCST)
    per seed, member k > 0 in out/member{k}/, and the members' last models evaluated as one ensemble
    into out/ensemble.json. A finished stage is kept (rerunning the command resumes the unfinished
    one). Writes out/summary.json with wall times."""
    out = Path(out)
    t = time.perf_counter()
    summary: dict[str, Any] = {"run_stage1": recipe.run_stage1}
    init, trained_stage1 = "", False  # trained_stage1: its end-of-run check has reported its queries
    if recipe.run_stage1:
        done = _finished(out / "stage1")
        trained_stage1 = done is None
        summary["stage1"] = done or train(recipe.stage1, out / "stage1", progress=progress)
        init = str(out / "stage1" / "model")
    seconds = {"stage1": round(time.perf_counter() - t, 1)}
    last_dirs = []
    for k, seed in enumerate(recipe.ensemble_seeds or [None]):
        where, key = (out / f"member{k}", f"member{k}/") if k else (out, "")
        stages = [("stage2", _member_recipe(recipe.stage2, seed, init))]
        if recipe.scst is not None:
            stages.append(("scst", _member_recipe(recipe.scst, seed, str(where / "stage2" / "model"))))
        for name, stage in stages:
            t = time.perf_counter()
            summary[key + name] = _finished(where / name) or train(
                stage, where / name, progress=progress, check_init=name == "scst" or (k == 0 and not trained_stage1))
            seconds[key + name] = round(time.perf_counter() - t, 1)
        last_dirs.append(str(where / stages[-1][0] / "model"))
    main = "rank" not in summary["stage2"]  # the main process (the only one under torchrun that evaluates)
    if len(last_dirs) > 1 and main:
        t = time.perf_counter()
        last = recipe.scst if recipe.scst is not None else recipe.stage2  # members differ in seed and init only
        summary["ensemble"] = _evaluate_ensemble(last, last_dirs, out / "ensemble.json", progress)
        seconds["ensemble"] = round(time.perf_counter() - t, 1)
    summary["seconds_this_invocation"] = seconds
    if main:
        write_json(out / "summary.json", summary)
    return summary


def _member_recipe(section: Stage2Recipe, seed: int | None, init: str) -> Stage2Recipe:
    """A copy of a stage-2 or SCST section starting from `init`, with train.seed `seed` (None: its own)."""
    member = copy.deepcopy(section)
    member.stage2.init = init
    if seed is not None:
        member.train.seed = seed
    return member


def _evaluate_ensemble(recipe: Stage2Recipe, model_dirs: list[str], path: Path, progress: bool) -> dict[str, Any]:
    """Val metrics of `model_dirs` decoded as one Blip2Ensemble with `recipe`'s evaluation, kept in
    `path` (reused while it names the same models and is newer than their weights)."""
    newest = max((Path(d) / WEIGHTS).stat().st_mtime_ns for d in model_dirs)
    if path.is_file() and path.stat().st_mtime_ns > newest:
        kept = read_json(path)
        if kept.get("models") == model_dirs:
            return kept
    device = resolve_device(recipe.train.device)
    models = [Blip2.from_dir(d).to(device) for d in model_dirs]
    result = {"models": model_dirs, **evaluate(recipe, Blip2Ensemble(models), progress)}
    write_json(path, result)
    return result


def _finished(run: Path) -> dict[str, Any] | None:
    done = run / "summary.json"
    return read_json(done) if done.is_file() and (run / "model" / CONFIG).is_file() else None


def train(recipe: Recipe, out: str | Path, stop_after: int | None = None, progress: bool = True,
          world: World | None = None, check_init: bool = True) -> dict[str, Any]:
    """Train (or resume) a stage-1 or stage-2 recipe in `out`; returns a summary.

    `stop_after` stops after that many steps, as a kill would (used by the resume tests). `world`
    (default: from torchrun's environment) splits each global batch of train.batch_size over the
    processes; the main process alone writes checkpoints, logs, the model and evaluates. torch's
    thread count and determinism flag (train.threads / train.deterministic) are restored on return.
    `check_init=False` skips the stage-2 check of the stage-1 queries, for callers that have just
    trained that stage 1 (its end-of-run check already reported them).
    """
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    try:
        return _train(recipe, out, stop_after, progress, world, check_init)
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)


def _train(recipe: Recipe, out: str | Path, stop_after: int | None, progress: bool,
           world: World | None, check_init: bool) -> dict[str, Any]:
    stage = _stage(recipe)
    out = Path(out)
    tc = recipe.train
    device = resolve_device(tc.device)
    if device.type == "cuda" and tc.deterministic:  # cuBLAS needs this to be deterministic
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    world = world or World.from_env(device)
    if tc.batch_size % world.world_size:
        raise ValueError(f"train.batch_size {tc.batch_size} is the global batch and must split evenly over "
                         f"{world.world_size} processes; use a multiple of {world.world_size}")
    if world.is_main:
        out.mkdir(parents=True, exist_ok=True)
    if tc.threads:
        torch.set_num_threads(tc.threads)
    torch.use_deterministic_algorithms(tc.deterministic)

    # Resume point: read and validate fully before anything is written.
    ckpt_path = checkpoint.latest(out)
    ckpt = checkpoint.load(ckpt_path) if ckpt_path else None
    if stage == 2:
        resolve_stage2_model(recipe)
    _resolve_auto_precision(recipe, device)
    if ckpt is not None:
        saved = from_dict(type(recipe), ckpt.recipe)
        if to_dict(saved.model) != to_dict(_resolved_model_cfg(recipe, saved)):
            raise ValueError(f"{ckpt.path} was trained with a different model config; use a new --out "
                             "directory or the recipe saved in its config.json")
        recipe.model = saved.model

    warn_slow_half(device, [tc.amp, *recipe.model.frozen_precisions])
    random.seed(tc.seed)
    torch.manual_seed(tc.seed)
    model = Blip2.build(recipe.model)
    if ckpt is None:
        init_model(recipe, model, out if world.is_main else None)
    if stage == 2:
        model.freeze_text_branch()
    model.to(device)  # before the optimizer exists, so that its state is created on the device too
    pairs, data_stats, skipped = build_training_data(recipe, model, world)
    if world.is_main:
        report_skipped(skipped, out)
    if stage == 1 and ckpt is None and recipe.loss.itg_prior_bias and world.is_main:  # broadcast_ below copies it
        set_itg_prior_bias(model, [t for _, _, t in pairs.pairs], recipe.loss.label_smoothing)
    # One sampler over the global batch on every rank (same seed): its state is independent of the
    # number of processes, so a run can resume on a different one.
    lengths = [len(p) + len(t) for _, p, t in pairs.pairs] if tc.group_by_length else None  # characters
    sampler = EpochSampler(len(pairs), tc.batch_size, tc.seed, lengths, tc.group_by_length)
    mult = recipe.stage2.prompt_lr_mult if stage == 2 else 1.0
    prompt_mult = {r"^llm_proj\.": mult, r"^qformer\.query_tokens$": mult} if mult != 1.0 else {}
    optimizer = build_optimizer(model, tc, {**prompt_mult, **tc.lr_mult})  # first match wins
    objective = objective_for(recipe, world, pairs)
    trainable = [p for p in model.parameters() if p.requires_grad]
    # fp16 needs loss scaling (its gradients underflow); bf16 has fp32's range and needs none
    scaler = torch.amp.GradScaler(device.type, enabled=tc.amp == "fp16")
    start = 0
    spent0 = 0.0  # training seconds before this process (a resumed run's earlier ones)
    time_plan: dict[str, Any] | None = None  # train.max_minutes' latest plan
    recipe_steps = tc.steps  # the most the time cap may plan
    if ckpt is not None:
        model.load_trainable(ckpt.weights, source=str(ckpt.path))
        optimizer.load_state_dict(ckpt.optimizer)
        sampler.load_state(ckpt.state["sampler"])
        if "grad_scaler" in ckpt.state:
            scaler.load_state_dict(ckpt.state["grad_scaler"])
        start = ckpt.step
        spent0 = float(ckpt.state.get("train_seconds", 0.0))
        time_plan = ckpt.state.get("time_plan")
        if time_plan is not None:  # the killed run's planned step count, not the recipe's
            recipe_steps, tc.steps = int(time_plan["recipe_steps"]), int(time_plan["planned_steps"])
        log.info("resumed from %s at step %d", ckpt.path, start)
    world.broadcast_(trainable)
    ema = _weight_ema(model, tc, ckpt)
    if stage == 2 and ckpt is None and world.is_main and recipe.stage2.init and check_init:
        init_stage = 1 if recipe.scst is None else 2  # SCST starts from a stage-2 model
        _check_queries(model, pairs, device, f"the stage-{init_stage} model {recipe.stage2.init}")
    recipe_dict = to_dict(recipe)
    if world.is_main:
        write_json(out / "recipe.json", recipe_dict)

    metrics = MetricsLog(out) if world.is_main else None
    bar = tqdm(total=tc.steps, initial=start, desc=_run_name(recipe), unit="step",
               disable=not (progress and world.is_main))
    window_t, window_n = time.perf_counter(), 0
    # Gradient spikes between logged steps are what precede a divergence: keep the window's largest
    # norm and how many steps the clip changed (device tensors, read only when a row is logged).
    window_gmax: torch.Tensor | None = None
    window_clipped = 0
    warned_collapse = False
    step = start
    t_start = _now()
    ends: list[float] = []  # this process's step-end times, for the time cap's seconds per step
    while step < tc.steps:
        lr = lr_at(step, tc)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_mult", 1.0)
        model.train()
        # Dropout draws from the global RNG, seeded per (step, rank): a resumed run, on any number
        # of processes, continues exactly as an uninterrupted one with that many processes.
        torch.manual_seed((tc.seed * 1_000_003 + step) * 1009 + world.rank + 1)
        totals: dict[str, float] = {}
        for micro in range(tc.grad_accum):
            batch = pairs.batch(world.shard(sampler.next()), step).to(device)
            feats = batch.image_feats if batch.image_feats is not None else model.image_features(batch.pixels)
            if recipe.data.token_drop > 0:  # seeded per (step, micro-batch, rank), like dropout: resumes exactly
                drop = torch.Generator().manual_seed((tc.seed * 1_000_003 + step) * 7919 + micro * 31 + world.rank)
                feats = drop_tokens(feats, recipe.data.token_drop, drop)  # (B, N, C) -> (B, K, C)
            # the same on every rank: ITM's negative sampling draws for the global batch
            gen = torch.Generator().manual_seed(tc.seed * 1_000_003 + step * tc.grad_accum + micro)
            with torch.autocast(device.type, dtype=AMP_DTYPES.get(tc.amp), enabled=tc.amp != "none"):
                terms = objective(model, batch, feats, gen, step)
            scaler.scale(terms["loss"] / tc.grad_accum).backward()
            for k, v in terms.items():
                totals[k] = totals.get(k, 0.0) + float(v.detach()) / tc.grad_accum
        world.average_gradients_(trainable)
        scaler.unscale_(optimizer)  # (no-op without fp16) so that the norm and the clip see true gradients
        clip = tc.grad_clip if tc.grad_clip > 0 and step >= tc.grad_clip_from else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, clip).detach()  # ()
        window_gmax = grad_norm if window_gmax is None else torch.maximum(window_gmax, grad_norm)
        if tc.grad_clip > 0:
            window_clipped = window_clipped + (grad_norm > clip).int()
        scaler.step(optimizer)  # skipped when an fp16 gradient overflowed; the scale then shrinks
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        if ema is not None:
            ema.update(step)
        window_n += tc.batch_size * tc.grad_accum
        bar.update(1)
        ends.append(_now())
        if tc.max_minutes and step >= plan_step(tc) and (rate := step_time(ends)) is not None:
            time_plan = _plan_time_cap(tc, world, step, spent0 + ends[-1] - t_start, rate, recipe_steps, time_plan)
            if time_plan["planned_steps"] != tc.steps:  # the schedule follows from this step on
                tc.steps = time_plan["planned_steps"]
                bar.total = tc.steps
                bar.refresh()
                recipe_dict = to_dict(recipe)  # checkpoints and the model record the planned count
        log_now = step % tc.log_every == 0 or step == tc.steps
        if log_now:  # every rank joins the average; only logged steps pay for it
            totals = world.mean(totals)
        if world.is_main and log_now:
            assert metrics is not None
            elapsed = time.perf_counter() - window_t
            row = {"step": step, **{k: round(v, 5) for k, v in totals.items()}, "lr": lr,
                   "grad_norm": float(grad_norm), "grad_norm_max": float(window_gmax), "epoch": sampler.epoch,
                   "samples_per_s": round(window_n / elapsed, 2)}
            if tc.grad_clip > 0:
                row["clipped_steps"] = int(window_clipped)
            if time_plan is not None:
                row["planned_steps"] = tc.steps
            if stage == 1:
                row["temp"] = model.temp.item()
            if scaler.is_enabled():
                row["loss_scale"] = scaler.get_scale()
            row["query_cos"] = round(model.query_diversity(feats), 4)  # last micro-batch
            metrics.write(row)
            if stage == 2 and not warned_collapse and step >= tc.warmup_steps \
                    and row["query_cos"] > COLLAPSED_QUERY_COS:
                warned_collapse = True
                _warn_stage2_collapse(step, row["query_cos"], tc)
            bar.set_postfix(loss=f"{totals['loss']:.3f}", sps=row["samples_per_s"])
        if log_now:  # a new window starts on every rank
            window_t, window_n, window_gmax, window_clipped = time.perf_counter(), 0, None, 0
        if world.is_main and (step % tc.ckpt_every == 0 or step == tc.steps):
            state = {"sampler": sampler.state(), "world_size": world.world_size,
                     "train_seconds": round(spent0 + _now() - t_start, 3)}
            if time_plan is not None:
                state["time_plan"] = time_plan
                write_json(out / "recipe.json", recipe_dict)
            if scaler.is_enabled():
                state["grad_scaler"] = scaler.state_dict()
            checkpoint.save(out, step, recipe_dict, model.trainable_state_dict(), optimizer, state,
                            ema=ema.state_dict() if ema is not None else None)
        if stop_after is not None and step >= stop_after:
            bar.close()
            if metrics is not None:
                metrics.close()
            return {"stopped_at": step}
    bar.close()
    train_minutes = round((spent0 + _now() - t_start) / 60, 2)
    meta = {"stage": stage, "steps": tc.steps, "recipe": recipe_dict}
    if ema is not None:  # model/ gets the average, model_raw/ the last weights
        if world.is_main:
            model.save(out / "model_raw", meta)
        ema.copy_to_params()
    if world.is_main:
        model.save(out / "model", meta)
    world.barrier()  # the model is on disk before any process moves on (e.g. to stage 2 from it)
    if metrics is None:  # not the main process: the main one summarises and evaluates
        return {"stage": stage, "steps": tc.steps, "rank": world.rank}
    metrics.close()
    query_cos = _check_queries(model, pairs, device, f"the stage-{stage} model", warn=stage == 1)
    summary: dict[str, Any] = {"stage": stage, "steps": tc.steps, "data": data_stats, "model_dir": str(out / "model"),
                               "machine": machine_info(device), "query_cos": query_cos,
                               "train_minutes": train_minutes}
    if time_plan is not None:
        summary["time_cap"] = time_plan
    _plot_curves(out, stage, _run_name(recipe))
    summary.update(evaluate(recipe, model, progress))
    write_json(out / "summary.json", summary)
    return summary


def _weight_ema(model: Blip2, tc: TrainConfig, ckpt: checkpoint.Checkpoint | None) -> WeightEMA | None:
    """train.ema_decay's average of the trained weights (None when off), restored from a checkpoint."""
    if not tc.ema_decay:
        return None
    ema = WeightEMA({n: p for n, p in model.named_parameters() if p.requires_grad}, tc.ema_decay, tc.warmup_steps)
    if ckpt is not None:
        if ckpt.ema is None:
            raise ValueError(f"{ckpt.path} has no weight average: it was written without train.ema_decay. Resume "
                             "with train.ema_decay=0, or start the averaged run in a new --out directory")
        ema.load_state_dict(ckpt.ema, source=str(ckpt.path))
    return ema


def _plan_time_cap(tc: TrainConfig, world: World, step: int, spent_s: float, s_per_step: float, recipe_steps: int,
                   previous: dict[str, Any] | None) -> dict[str, Any]:
    """train.max_minutes' plan after `step` steps: how many of the recipe's steps fit (rank 0's
    measurement on every rank, so that all processes stop together); the first plan is logged."""
    planned = int(world.from_main(steps_within_cap(tc.max_minutes, recipe_steps, step, spent_s, s_per_step)))
    first = previous["first_plan"] if previous else {"at_step": step, "steps": planned}
    if previous is None and planned < recipe_steps:
        log.warning("train.max_minutes=%g: at %.2f s/step the recipe's %d steps would take %.0f min of training on "
                    "this machine, so the schedule now ends at step %d; the count follows the measured speed "
                    "(--set train.max_minutes=0 trains them all)", tc.max_minutes, s_per_step, recipe_steps,
                    (spent_s + (recipe_steps - step) * s_per_step) / 60, planned)
    elif previous is None:
        log.info("train.max_minutes=%g: the %d steps fit (%.2f s/step)", tc.max_minutes, recipe_steps, s_per_step)
    return {"max_minutes": tc.max_minutes, "recipe_steps": recipe_steps, "planned_steps": planned,
            "seconds_per_step": round(s_per_step, 4), "first_plan": first}


def _warn_stage2_collapse(step: int, cos: float, tc: TrainConfig) -> None:
    """Once per run: stage 2's queries are still collapsed after the warmup. Seen on Flickr8k with a
    Q-Former trained from scratch (run_stage1=false): the warmup's unclipped gradients (norms up to
    ~23,000) merged the queries within 20 steps and they stayed merged for ~400 of 2000 steps."""
    unclipped_start = tc.grad_clip_from > 0 or not tc.grad_clip
    clip = (f"train.grad_clip={tc.grad_clip or 20.0} with train.grad_clip_from=0" if unclipped_start
            else "a lower train.lr or a longer train.warmup_steps")
    log.warning("stage 2, step %d: the query outputs have collapsed (mean cosine %.3f between the queries of one "
                "image; 1 = identical), so the LLM reads one vector per image and learns little until they part. "
                "Large gradients early in training do this; try %s (on Flickr8k a clip at 20 from the first "
                "step kept them apart: docs/RESULTS.md, \"The no-stage-1 collapse\").", step, cos, clip)


def _check_queries(model: Blip2, pairs: Pairs, device: torch.device, what: str, n: int = 16,
                   warn: bool = True) -> float:
    """Query diversity of `model` on `n` training pairs spread over the data; warns (naming the fix)
    when the queries of a stage-1 model have collapsed, since a stage 2 trained on them wastes its
    budget. (A stage-2 model's value is only recorded: the fix is a stage-1 setting.)"""
    batch = pairs.batch(torch.arange(0, len(pairs), max(1, len(pairs) // n))[:n]).to(device)
    with torch.no_grad():
        feats = batch.image_feats if batch.image_feats is not None else model.image_features(batch.pixels)
    cos = round(model.query_diversity(feats), 4)
    if warn and cos > COLLAPSED_QUERY_COS:
        log.warning("%s: its query outputs have collapsed (mean cosine %.3f between the queries of one image; "
                    "1 = identical), so they hand the LLM one vector and stage 2 learns little from them "
                    "(docs/RESULTS.md, \"Query collapse\"). Train stage 1 with loss.query_div=1.0 and "
                    "loss.itg_prior_bias=true to keep them apart.", what, cos)
    return cos


def _val_annotations(recipe: Recipe) -> str:
    """Where end-of-run evaluation reads from; "" when there is no held-out split to use."""
    d = recipe.data
    if d.val:
        return d.val
    if not has_splits(d.train):
        log.warning("%s has no splits and data.val is not set: skipping end-of-run evaluation", d.train)
        return ""
    return d.train


def _resolve_auto_precision(recipe: Recipe, device: torch.device) -> None:
    """Replace "auto" in train.amp and the frozen parts' precisions by what `device` computes natively,
    so that the checkpoints, the saved model and the summary record the choice."""
    before = [recipe.train.amp, *recipe.model.frozen_precisions]
    if recipe.train.amp == "auto":
        recipe.train.amp = auto_half(device) or "none"
    recipe.model = resolve_auto(recipe.model, device)
    if "auto" in before:
        log.info("precision auto on %s (native half: %s): train.amp=%s, vision.precision=%s%s", device,
                 auto_half(device), recipe.train.amp, recipe.model.vision.precision,
                 f", llm.precision={recipe.model.llm.precision}" if recipe.model.llm is not None else "")


def _resolved_model_cfg(recipe: Recipe, saved: Recipe):
    """The current recipe's model config with the encoder-derived width filled in as saved."""
    cfg = from_dict(type(recipe.model), to_dict(recipe.model))
    if cfg.qformer.vision_width is None:
        cfg.qformer.vision_width = saved.model.qformer.vision_width
    return cfg


def _run_name(recipe: Recipe) -> str:
    return "scst" if isinstance(recipe, Stage2Recipe) and recipe.scst is not None else f"stage {_stage(recipe)}"


def _stage(recipe: Recipe) -> int:
    return 2 if isinstance(recipe, Stage2Recipe) else 1


def _plot_curves(out: Path, stage: int, name: str) -> None:
    """metrics.jsonl -> loss_curves.png: losses above, gradient norms (log scale) below; skipped quietly
    if matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    if not rows:
        return
    fig, (ax, gax) = plt.subplots(2, 1, figsize=(7, 6), sharex=True, height_ratios=(2, 1))
    for key in ("loss", "itc", "itm", "itg", "query_div") if stage == 1 else ("loss", "reward"):
        pts = [(r["step"], r[key]) for r in rows if key in r]
        if pts:
            ax.plot(*zip(*pts, strict=True), label=key)
    ax.set_ylabel("loss and reward" if name == "scst" else "loss")
    ax.set_title(f"{name}: training loss" + (" and mean reward of the samples" if name == "scst" else "es"))
    ax.legend()
    for key, label in (("grad_norm", "at the logged step"), ("grad_norm_max", "largest in the window")):
        pts = [(r["step"], r[key]) for r in rows if key in r and math.isfinite(r[key])]
        if pts:
            gax.plot(*zip(*pts, strict=True), label=label)
    gax.set_yscale("log")
    gax.set_xlabel("step")
    gax.set_ylabel("gradient norm")
    gax.legend()
    fig.tight_layout()
    fig.savefig(out / "loss_curves.png", dpi=100)
    plt.close(fig)
