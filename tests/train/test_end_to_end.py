"""The real entry point on CPU: train -> checkpoint -> kill -> resume (bit-identical) -> eval."""

import json
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from blip2.cli import main
from blip2.config import load_recipe
from blip2.data.scenes import write_scenes
from blip2.model import native_half
from blip2.train import checkpoint
from blip2.train.loop import train
from conftest import TINY_SETS

TINY = [*TINY_SETS, "train.steps=6", "train.batch_size=8", "train.ckpt_every=2", "train.log_every=1",
        "train.warmup_steps=2", "eval.k_test=3", "eval.max_images=6"]


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    root = tmp_path_factory.mktemp("scenes")
    return write_scenes(root / "data", 12, 6, size=64, seed=1), root / "cache"


def _args(scenes):
    ann, cache = scenes
    return TINY + [f"data.train={ann}", f"data.cache_dir={cache}"]


def _cli_train(scenes, out, extra=()):
    argv = ["train", "stage1", "--recipe", "quickstart-stage1", "--out", str(out)]
    for s in [*_args(scenes), *extra]:
        argv += ["--set", s]
    return main(argv)


def test_train_kill_resume_is_bit_identical_then_eval(scenes, tmp_path, capsys):
    assert _cli_train(scenes, tmp_path / "a") == 0
    full = load_file(str(tmp_path / "a" / "model" / "model.safetensors"))

    # the same run killed after step 3; its last checkpoint is step 2 (ckpt_every=2)
    recipe = load_recipe(_recipe_path(), _args(scenes))
    assert train(recipe, tmp_path / "b", stop_after=3, progress=False) == {"stopped_at": 3}
    assert checkpoint.latest(tmp_path / "b").name == "step-00000002"
    assert not (tmp_path / "b" / "model").exists()
    assert _cli_train(scenes, tmp_path / "b") == 0  # resumes from step 2
    resumed = load_file(str(tmp_path / "b" / "model" / "model.safetensors"))
    assert full.keys() == resumed.keys()
    for k in full:
        assert full[k].equal(resumed[k]), k

    lines = [json.loads(x) for x in open(tmp_path / "b" / "metrics.jsonl")]
    assert [r["step"] for r in lines] == [1, 2, 3, 3, 4, 5, 6]  # step 3 was redone after the kill
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert summary["retrieval"]["num_images"] == 6 and summary["data"]["images"] == 12
    # the machine is recorded with the run, so that its timings can be read
    assert summary["machine"]["native_bf16"] == native_half("bf16") and summary["machine"]["cpu"]
    assert summary["machine"]["torch"] == torch.__version__
    cfg = json.loads((tmp_path / "a" / "model" / "config.json").read_text())
    assert cfg["meta"]["recipe"]["loss"]["itc_grad"] == "reference" and cfg["meta"]["stage"] == 1
    assert (tmp_path / "a" / "loss_curves.png").is_file()

    capsys.readouterr()
    ann, cache = scenes
    assert main(["eval", "retrieval", "--model", str(tmp_path / "a" / "model"), "--data", str(ann),
                 "--split", "val", "--k", "3", "--cache-dir", str(cache), "--workers", "0", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("tr_r1", "tr_r5", "tr_r10", "ir_r1", "ir_r5", "ir_r10"):
        assert 0 <= result[key] <= 100
    assert (result["num_images"], result["num_texts"]) == (6, 30)
    assert result["tr_r1"] == pytest.approx(summary["retrieval"]["tr_r1"])


def test_corrupt_checkpoint_is_refused_before_anything_changes(scenes, tmp_path):
    recipe = load_recipe(_recipe_path(), _args(scenes))
    train(recipe, tmp_path / "c", stop_after=2, progress=False)
    ckpt = checkpoint.latest(tmp_path / "c")
    (ckpt / "model.safetensors").write_bytes(b"garbage")
    before = sorted(p.name for p in (tmp_path / "c").rglob("*"))
    with pytest.raises(ValueError, match="unreadable.*delete it"):
        train(load_recipe(_recipe_path(), _args(scenes)), tmp_path / "c", progress=False)
    assert sorted(p.name for p in (tmp_path / "c").rglob("*")) == before


def test_resume_with_another_model_config_is_refused(scenes, tmp_path):
    train(load_recipe(_recipe_path(), _args(scenes)), tmp_path / "d", stop_after=2, progress=False)
    other = load_recipe(_recipe_path(), [*_args(scenes), "model.qformer.num_queries=5"])
    with pytest.raises(ValueError, match="different model config"):
        train(other, tmp_path / "d", progress=False)


def _recipe_path():
    from blip2.cli import RECIPES

    return RECIPES / "quickstart-stage1.yaml"


def test_jsonl_without_splits_trains_and_skips_evaluation(scenes, tmp_path):
    ann, cache = scenes
    doc = json.loads(ann.read_text())
    lines = [json.dumps({"image": e["filename"], "caption": s["raw"]}) for e in doc["images"] for s in e["sentences"]]
    jsonl = tmp_path / "pairs.jsonl"
    jsonl.write_text("\n".join(lines) + "\n")
    args = [a for a in _args(scenes) if not a.startswith("data.train=")]
    recipe = load_recipe(_recipe_path(), [*args, f"data.train={jsonl}", f"data.images={ann.parent / 'images'}",
                                          "train.steps=2"])
    summary = train(recipe, tmp_path / "j", progress=False)
    assert summary["data"]["images"] == 18 and "retrieval" not in summary


def test_sigkill_at_a_random_step_resumes_bit_identical(scenes, tmp_path):
    """A real process killed with SIGKILL at a random point (mid-step, mid-checkpoint write, ...)
    resumes from its last complete checkpoint to the weights of an uninterrupted run."""
    # threads pinned: the killed part runs in a subprocess, the rest in this one, whose thread count
    # earlier tests may have changed (and float sums differ in the last bits between thread counts)
    extra = ["train.steps=12", "eval.enabled=false", "train.threads=1"]
    assert _cli_train(scenes, tmp_path / "full", extra) == 0
    full = load_file(str(tmp_path / "full" / "model" / "model.safetensors"))

    seed = random.randrange(1 << 30)
    kill_after = random.Random(seed).randint(1, 10)  # steps logged before the kill
    why = f"killed after step {kill_after} (seed {seed})"
    argv = [sys.executable, "-m", "blip2.cli", "train", "stage1", "--recipe", "quickstart-stage1",
            "--out", str(tmp_path / "killed")]
    for s in [*_args(scenes), *extra]:
        argv += ["--set", s]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = tmp_path / "killed" / "metrics.jsonl"
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            if metrics.is_file() and len(metrics.read_text().splitlines()) >= kill_after:
                break
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, why  # it was still running: the kill was real
    assert not (tmp_path / "killed" / "model").exists(), why

    assert _cli_train(scenes, tmp_path / "killed", extra) == 0
    resumed = load_file(str(tmp_path / "killed" / "model" / "model.safetensors"))
    assert full.keys() == resumed.keys()
    for k in full:
        assert full[k].equal(resumed[k]), f"{k}: {why}"


def _ticking_clock(monkeypatch, seconds_per_step):
    """The loop's clock advanced by seconds_per_step(step) at the start of every step (lr_at is
    called once per step), so that the time cap sees known step times."""
    from blip2.train import loop

    clock = {"t": 0.0}
    lr_at = loop.lr_at

    def lr_at_ticking(step, cfg):
        clock["t"] += seconds_per_step(step)
        return lr_at(step, cfg)

    monkeypatch.setattr(loop, "lr_at", lr_at_ticking)
    monkeypatch.setattr(loop, "_now", lambda: clock["t"])
    return clock


def test_time_cap_trains_the_steps_that_fit_as_if_the_recipe_said_so(scenes, tmp_path, monkeypatch):
    """train.max_minutes when every step takes 10 s: after the warmup's 10 steps (100 s) a 3-minute
    cap leaves 80 s, i.e. 8 more steps. The run equals one configured with steps=18, and a kill after
    the plan resumes to the same 18 steps."""
    clock = _ticking_clock(monkeypatch, lambda step: 10.0)
    base = [*_args(scenes), "train.warmup_steps=10", "train.ckpt_every=4", "eval.enabled=false", "train.threads=1"]
    capped = [*base, "train.steps=40", "train.max_minutes=3"]

    summary = train(load_recipe(_recipe_path(), capped), tmp_path / "cap", progress=False)
    assert summary["steps"] == 18
    assert summary["time_cap"] == {"max_minutes": 3.0, "recipe_steps": 40, "planned_steps": 18,
                                   "seconds_per_step": 10.0, "first_plan": {"at_step": 10, "steps": 18}}
    assert summary["train_minutes"] == 3.0
    cfg = json.loads((tmp_path / "cap" / "model" / "config.json").read_text())
    assert cfg["meta"]["steps"] == 18 and cfg["meta"]["recipe"]["train"]["steps"] == 18
    assert json.loads((tmp_path / "cap" / "recipe.json").read_text())["train"]["steps"] == 18
    rows = [json.loads(x) for x in open(tmp_path / "cap" / "metrics.jsonl")]
    assert [r.get("planned_steps") for r in rows] == [None] * 9 + [18] * 9
    capped_w = load_file(str(tmp_path / "cap" / "model" / "model.safetensors"))

    train(load_recipe(_recipe_path(), [*base, "train.steps=18"]), tmp_path / "fixed", progress=False)
    fixed_w = load_file(str(tmp_path / "fixed" / "model" / "model.safetensors"))

    clock["t"] = 0.0
    assert train(load_recipe(_recipe_path(), capped), tmp_path / "kill", stop_after=14, progress=False) \
        == {"stopped_at": 14}
    clock["t"] = 1e6  # another process, another clock: the plan comes from the checkpoint (step 12)
    resumed = train(load_recipe(_recipe_path(), capped), tmp_path / "kill", progress=False)
    assert resumed["steps"] == 18 and resumed["time_cap"]["planned_steps"] == 18
    assert resumed["train_minutes"] == 2.0 + 6 * 10 / 60  # 120 s to the checkpoint + 6 steps
    resumed_w = load_file(str(tmp_path / "kill" / "model" / "model.safetensors"))
    for k in fixed_w:
        assert capped_w[k].equal(fixed_w[k]), k
        assert resumed_w[k].equal(fixed_w[k]), k


@pytest.mark.parametrize("later, steps, seconds", [(20.0, 22, 290.0), (5.0, 40, 275.0)])
def test_time_cap_follows_the_speed_and_never_exceeds_the_recipe(scenes, tmp_path, monkeypatch, later, steps,
                                                                 seconds):
    """Steps of 10 s, then from the 16th of `later` s, under a 5-minute cap on a 40-step recipe. The
    first plan (at step 10) is 30 steps. Slower: 15 steps take 150 s and 7 more of 20 s fit the other
    150 s, so the run stops after 22 (290 s). Faster: all 40 fit (150 + 25 x 5 = 275 s), no more."""
    _ticking_clock(monkeypatch, lambda step: 10.0 if step < 15 else later)
    recipe = load_recipe(_recipe_path(), [*_args(scenes), "train.warmup_steps=10", "train.steps=40",
                                          "train.max_minutes=5", "train.ckpt_every=100", "eval.enabled=false"])
    summary = train(recipe, tmp_path / "run", progress=False)
    assert summary["time_cap"]["first_plan"] == {"at_step": 10, "steps": 30}
    assert (summary["steps"], summary["train_minutes"]) == (steps, round(seconds / 60, 2))


def test_logged_rows_carry_the_windows_largest_gradient_norm_and_clip_count(scenes, tmp_path):
    # The same 6 steps logged every step and every 3 steps: training is identical, so each 3-step
    # row's grad_norm_max is the largest of the per-step norms, and a clip below every norm counts
    # every step of the window (and changes the run, so it is compared against itself only).
    base = [*_args(scenes), "train.ckpt_every=100", "eval.enabled=false"]
    for every in (1, 3):
        train(load_recipe(_recipe_path(), [*base, f"train.log_every={every}"]), tmp_path / f"e{every}", progress=False)
    each = [json.loads(x) for x in open(tmp_path / "e1" / "metrics.jsonl")]
    window = [json.loads(x) for x in open(tmp_path / "e3" / "metrics.jsonl")]
    assert all(r["grad_norm_max"] == r["grad_norm"] for r in each)
    norms = [r["grad_norm"] for r in each]
    assert [r["grad_norm_max"] for r in window] == [max(norms[:3]), max(norms[3:])]
    assert [r["grad_norm"] for r in window] == [norms[2], norms[5]] and "clipped_steps" not in window[0]

    clip = min(norms) / 10
    train(load_recipe(_recipe_path(), [*base, "train.log_every=3", f"train.grad_clip={clip}"]), tmp_path / "c",
          progress=False)
    clipped = [json.loads(x) for x in open(tmp_path / "c" / "metrics.jsonl")]
    assert [r["clipped_steps"] for r in clipped] == [3, 3]
    assert all(r["grad_norm_max"] >= r["grad_norm"] > clip for r in clipped)

    # A clip that starts at step 3 leaves the first window exactly as the unclipped run's and counts
    # every step after it; step 4's norm is still the unclipped one (measured before its clip).
    train(load_recipe(_recipe_path(), [*base, "train.log_every=3", f"train.grad_clip={clip}",
                                       "train.grad_clip_from=3"]), tmp_path / "late", progress=False)
    late = [json.loads(x) for x in open(tmp_path / "late" / "metrics.jsonl")]
    assert [r["clipped_steps"] for r in late] == [0, 3]
    same = ("loss", "grad_norm", "grad_norm_max")
    assert [late[0][k] for k in same] == [window[0][k] for k in same]
    assert late[1]["grad_norm_max"] >= norms[3] and late[1]["loss"] != window[1]["loss"]
