"""Mixed precision (train.amp): autocast really runs the trained parts in low precision, computes the
same objective as fp32 to low-precision accuracy, and fp16's loss scaler survives a kill and resume."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from blip2.config import Blip2Config, LLMConfig, Stage1Recipe, Stage2Recipe, VisionConfig, load_recipe
from blip2.data.scenes import write_scenes
from blip2.model import Blip2, auto_half, resolve_auto
from blip2.train import checkpoint
from blip2.train.loop import train
from conftest import TINY_SETS, save_tiny_llm


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("amp")
    return write_scenes(root / "data", 12, 4, size=64, seed=5), root / "cache", save_tiny_llm(root / "llm")


def _recipe(stage: int, data, amp: str, steps: int = 2):
    ann, cache, llm_dir = data
    sets = [*TINY_SETS, f"data.train={ann}", f"data.cache_dir={cache}", f"train.steps={steps}", "train.batch_size=8",
            "train.warmup_steps=0", "train.log_every=1", "train.ckpt_every=1", "train.lr=1e-3", "eval.enabled=false",
            f"train.amp={amp}"]
    if stage == 1:
        return load_recipe(None, sets, Stage1Recipe)
    return load_recipe(None, [*sets, f"model.llm.path={llm_dir}", "model.llm.max_text_len=12"], Stage2Recipe)


def _losses(out) -> list[dict]:
    return [json.loads(line) for line in open(out / "metrics.jsonl")]


@pytest.mark.parametrize("stage", [1, 2])
def test_bf16_autocast_matches_fp32_to_bf16_accuracy(tmp_path, data, stage):
    for amp in ("none", "bf16"):
        train(_recipe(stage, data, amp), tmp_path / amp, progress=False)
    fp32, bf16 = _losses(tmp_path / "none"), _losses(tmp_path / "bf16")
    # same weights, same batch at step 1: the loss differs only by bf16 rounding (8-bit mantissa)
    assert bf16[0]["loss"] == pytest.approx(fp32[0]["loss"], rel=0.03)
    assert bf16[0]["loss"] != fp32[0]["loss"]  # ... and it does differ: the matmuls really ran in bf16
    w32, w16 = (load_file(str(tmp_path / a / "model" / "model.safetensors")) for a in ("none", "bf16"))
    assert all(torch.isfinite(v).all() for v in w16.values())
    # two AdamW steps of lr 1e-3 move a weight by at most ~2e-3; bf16 may flip the sign of small
    # gradients but cannot move any weight further than two full steps from the fp32 run
    assert max(float((w32[k] - w16[k]).abs().max()) for k in w32) < 4.5e-3


def test_fp16_loss_scaler_is_checkpointed_and_resumes_exactly(tmp_path, data):
    # The tiny model's first fp16 gradients overflow at the initial scale (2**16): the scaler skips
    # those steps, halving the scale each time, then steps normally. A run cut during the skipping
    # only ends equal to the uninterrupted one if the resumed run continues from the saved scale.
    train(_recipe(1, data, "fp16", steps=6), tmp_path / "full", progress=False)
    rows = _losses(tmp_path / "full")
    skipped = [r["step"] for r in rows if not math.isfinite(r["grad_norm"])]
    assert skipped and skipped[-1] < 5, rows  # some overflowed steps, then at least two real ones
    assert [r["loss_scale"] for r in rows[: len(skipped)]] == [2.0**15 / 2**i for i in range(len(skipped))]
    cut = min(3, skipped[-1])
    train(_recipe(1, data, "fp16", steps=6), tmp_path / "cut", progress=False, stop_after=cut)
    state = checkpoint.load(checkpoint.latest(tmp_path / "cut")).state
    assert state["grad_scaler"]["scale"] == rows[cut - 1]["loss_scale"]
    train(_recipe(1, data, "fp16", steps=6), tmp_path / "cut", progress=False)
    a, b = (load_file(str(tmp_path / r / "model" / "model.safetensors")) for r in ("full", "cut"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss_scale"] for r in _losses(tmp_path / "cut")] == [r["loss_scale"] for r in rows]


def test_unknown_amp_mode_is_refused(data):
    with pytest.raises(ValueError, match="train.amp must be one of none, bf16, fp16, auto"):
        _recipe(1, data, "fp8")


@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_trains_as_the_native_choice_and_saves_it(tmp_path, data, monkeypatch, native):
    # "auto" is bf16 on a CPU that computes it natively and fp32 where bf16 would be emulated; the
    # run must equal the explicitly named precision's run step for step and record that name
    monkeypatch.setattr("blip2.model.native_half", lambda precision: native)
    explicit = ("bf16", "bf16") if native else ("none", "fp32")
    runs = {}
    for name, amp, llm in (("auto", "auto", "auto"), ("explicit", *explicit)):
        recipe = _recipe(2, data, amp)
        recipe.model.llm = replace(recipe.model.llm, precision=llm)
        train(recipe, tmp_path / name, progress=False)
        runs[name] = _losses(tmp_path / name)
    assert [r["loss"] for r in runs["auto"]] == [r["loss"] for r in runs["explicit"]]
    saved = json.loads((tmp_path / "auto" / "recipe.json").read_text())
    assert (saved["train"]["amp"], saved["model"]["llm"]["precision"]) == explicit
    model_cfg = json.loads((tmp_path / "auto" / "model" / "config.json").read_text())["model"]
    assert model_cfg["llm"]["precision"] == explicit[1] and model_cfg["vision"]["precision"] == "fp32"


def test_auto_half_per_device(monkeypatch):
    monkeypatch.setattr("blip2.model.native_half", lambda precision: False)
    assert auto_half(torch.device("cpu")) is None and auto_half(torch.device("mps")) is None
    monkeypatch.setattr("blip2.model.native_half", lambda precision: precision == "bf16")
    assert auto_half(torch.device("cpu")) == "bf16"
    for bf16, want in ((True, "bf16"), (False, "fp16")):  # Ampere and later / older GPUs
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True, b=bf16: b)
        assert auto_half(torch.device("cuda")) == want
    cfg = resolve_auto(Blip2Config(vision=VisionConfig(precision="auto"), llm=LLMConfig(precision="auto")),
                       torch.device("cuda"))
    assert (cfg.vision.precision, cfg.llm.precision) == ("fp16", "fp16")


def test_building_a_model_with_unresolved_auto_precision_is_refused():
    with pytest.raises(ValueError, match="resolve it first with blip2.model.resolve_auto"):
        Blip2.build(Blip2Config(vision=VisionConfig(precision="auto")))
