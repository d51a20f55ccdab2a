"""The real training loop on two gloo processes: one optimizer step of each stage (SCST included)
gives the weights one process reaches on the concatenated global batch, and a run resumes on another
process count."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from blip2.config import Stage1Recipe, Stage2Recipe, load_recipe
from blip2.data.scenes import write_scenes
from blip2.model import Blip2
from blip2.train import checkpoint
from blip2.train.distributed import World
from blip2.train.loop import train
from conftest import TINY_SETS, save_tiny_llm

QFORMER = [*TINY_SETS, "model.qformer.hidden_dropout=0.0", "model.qformer.attention_dropout=0.0",
           "eval.enabled=false", "train.warmup_steps=0", "train.log_every=1", "train.ckpt_every=1", "train.threads=1"]


# AdamW's first step moves a weight by lr * g / (|g| + eps). With the default eps=1e-8 that is
# lr * sign(g) wherever |g| >> eps, and near-zero gradients whose sign depends on summation order
# (different per-rank shapes) flip whole lr-sized updates. eps=1 with lr=1 makes the step ~g itself,
# so the weights expose the gradients and 1e-6 compares them, not their signs.
OPTIM = ["train.lr=1.0", "train.adam_eps=1.0", "train.weight_decay=0.0"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    ann = write_scenes(root / "data", 12, 4, size=64, seed=3)
    llm_dir = save_tiny_llm(root / "llm", init_std=0.02)
    return ann, root / "cache", llm_dir


def _recipe(stage: int | str, data, steps: int, batch: int):
    ann, cache, llm_dir = data
    common = [*QFORMER, f"data.train={ann}", f"data.cache_dir={cache}", f"train.steps={steps}",
              f"train.batch_size={batch}", *OPTIM]
    if stage == "scst":  # from a stage-2 model trained (one process, one step) on the same data
        init = cache.parent / "stage2-init"
        if not (init / "model").is_dir():
            train(_recipe(2, data, 1, 6), init, progress=False, world=World())
        return load_recipe(None, [*common, f"stage2.init={init / 'model'}", "scst.samples=3",
                                  "scst.max_new_tokens=6"], Stage2Recipe)
    if stage == 1:  # with the rank-0-only ITG prior (broadcast) and the batch-local query term
        return load_recipe(None, [*common, "loss.itg_prior_bias=true", "loss.query_div=1.0"], Stage1Recipe)
    # stage 2 from scratch (no stage-1 init): the Q-Former config comes from the recipe
    return load_recipe(None, [*common, f"model.llm.path={llm_dir}", "model.llm.max_text_len=12"], Stage2Recipe)


def _worker(rank: int, world_size: int, init_file: str, stage: int | str, data, steps: int, batch: int, out: str):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        train(_recipe(stage, data, steps, batch), out, progress=False, world=World(rank, world_size))
    finally:
        dist.destroy_process_group()


def _spawn(tmp_path, name: str, stage: int | str, data, steps: int, batch: int, out):
    os.environ.pop("MASTER_ADDR", None)
    mp.spawn(_worker, args=(2, str(tmp_path / f"init-{name}"), stage, data, steps, batch, str(out)), nprocs=2,
             join=True)


def _initial_weights(recipe) -> dict[str, torch.Tensor]:
    """The weights train() starts from: the model built from the recipe's seed (Q-Former init=none),
    or for SCST the stage-2 model it fine-tunes."""
    if isinstance(recipe, Stage2Recipe) and recipe.scst is not None:
        return load_file(str(Path(recipe.stage2.init) / "model.safetensors"))
    torch.manual_seed(recipe.train.seed)
    return {k: v.clone() for k, v in Blip2.build(recipe.model).trainable_state_dict().items()}


@pytest.mark.parametrize("stage", [1, 2, "scst"])
def test_one_step_on_two_processes_equals_one_process_on_the_global_batch(tmp_path, data, stage):
    """For SCST this needs each image's samples to come from its own seed, not from the rank's
    position in a shared random stream; the images' rewards differ (samples of a random LM), so
    the advantages and the step are not zero."""
    batch = {1: 8, 2: 6, "scst": 4}[stage]
    single = train(_recipe(stage, data, 1, batch), tmp_path / "single", progress=False, world=World())
    assert single["steps"] == 1
    _spawn(tmp_path, "a", stage, data, 1, batch, tmp_path / "multi")
    w1 = load_file(str(tmp_path / "single" / "model" / "model.safetensors"))
    w2 = load_file(str(tmp_path / "multi" / "model" / "model.safetensors"))
    assert w1.keys() == w2.keys()
    for k in w1:  # 1e-6, plus float32 rounding on the few large values (temp moves to ~0.15)
        torch.testing.assert_close(w2[k], w1[k], atol=1e-6, rtol=1e-5, msg=k)

    # The step moved the weights by far more than the tolerance, so the comparison above is not
    # between two barely touched models.
    init = _initial_weights(_recipe(stage, data, 1, batch))
    assert init.keys() == w1.keys()
    assert max(float((w1[k] - init[k]).abs().max()) for k in w1) > 1e-3

    # only the main process wrote: one metrics row per step, one checkpoint, recording 2 processes
    rows = [json.loads(line) for line in open(tmp_path / "multi" / "metrics.jsonl")]
    assert len(rows) == 1
    if stage == "scst":  # the logged mean reward is the global batch's, as on one process
        one = json.loads(open(tmp_path / "single" / "metrics.jsonl").readline())
        assert rows[0]["reward"] > 0 and abs(rows[0]["reward"] - one["reward"]) < 1e-5
    ckpt = checkpoint.load(checkpoint.latest(tmp_path / "multi"))
    assert ckpt.state["world_size"] == 2 and ckpt.step == 1


def test_resume_on_a_different_number_of_processes(tmp_path, data):
    # uninterrupted: 3 steps on one process
    train(_recipe(1, data, 3, 8), tmp_path / "full", progress=False, world=World())
    # killed after step 1 on one process, resumed to the end on two
    assert train(_recipe(1, data, 3, 8), tmp_path / "mixed", stop_after=1, progress=False,
                 world=World()) == {"stopped_at": 1}
    _spawn(tmp_path, "b", 1, data, 3, 8, tmp_path / "mixed")
    full = load_file(str(tmp_path / "full" / "model" / "model.safetensors"))
    mixed = load_file(str(tmp_path / "mixed" / "model" / "model.safetensors"))
    for k in full:
        torch.testing.assert_close(mixed[k], full[k], atol=1e-5, rtol=0, msg=k)
    steps = [json.loads(line)["step"] for line in open(tmp_path / "mixed" / "metrics.jsonl")]
    assert steps == [1, 2, 3]


def test_global_batch_must_split_evenly(tmp_path, data):
    with pytest.raises(ValueError, match="multiple of 3"):
        train(_recipe(1, data, 1, 8), tmp_path / "x", progress=False, world=World(0, 3))
