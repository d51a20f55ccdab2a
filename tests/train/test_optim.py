import math

import pytest

from blip2.config import Blip2Config, TrainConfig
from blip2.model import Blip2
from blip2.train.optim import PLAN_MIN_STEPS, build_optimizer, lr_at, plan_step, step_time, steps_within_cap
from conftest import tiny_qformer


def test_no_weight_decay_on_norms_biases_and_temperature():
    model = Blip2(Blip2Config(qformer=tiny_qformer()))
    opt = build_optimizer(model, TrainConfig(weight_decay=0.05))
    decay, no_decay = opt.param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.05, 0.0)
    assert {"temp", "ln_vision.weight", "ln_vision.bias", "itm_head.bias",
            "qformer.embeddings.LayerNorm.weight"} <= no_decay_names
    assert all(p.ndim >= 2 for p in decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == sum(1 for _ in model.parameters())


def test_warmup_then_cosine_to_floor():
    cfg = TrainConfig(steps=110, lr=1e-3, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(1e-4)
    assert lr_at(9, cfg) == pytest.approx(1e-3)
    assert lr_at(10, cfg) == pytest.approx(1e-3)
    mid = 1e-4 + 0.9e-3 * 0.5 * (1 + math.cos(math.pi * 0.5))
    assert lr_at(60, cfg) == pytest.approx(mid)
    assert lr_at(110, cfg) == pytest.approx(1e-4)
    lrs = [lr_at(s, cfg) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:], strict=False))


def test_time_cap_plans_the_steps_that_fit():
    # 50 steps took 100 s; at 2 s/step the other 500 s of a 10-minute cap hold 250 more
    assert steps_within_cap(10, 1000, 50, 100.0, 2.0) == 300
    assert steps_within_cap(10, 1000, 50, 100.0, 2.01) == 298  # floor(500 / 2.01) = 248: never over the cap
    assert steps_within_cap(10, 1000, 50, 100.0, 0.1) == 1000  # all fit: the recipe's count, not more
    assert steps_within_cap(10, 1000, 50, 700.0, 2.0) == 50  # the cap is spent already: stop here
    # planned from the end of the warmup, which lr_at's cosine has not started yet
    assert plan_step(TrainConfig(warmup_steps=50)) == 50 and plan_step(TrainConfig(warmup_steps=3)) == PLAN_MIN_STEPS
    with pytest.raises(ValueError, match="max_minutes must be >= 0"):
        TrainConfig(max_minutes=-1)


def test_step_time_is_the_latest_half_of_the_steps():
    assert step_time([1.0, 2.0, 3.0]) is None  # too few to time
    # five steps of 5 s, then five of 1 s: timed from the fifth end (25 s) to the last (30 s)
    ends = [5.0 * i for i in range(1, 6)] + [25.0 + i for i in range(1, 6)]
    assert step_time(ends) == pytest.approx(1.0)  # the whole-run mean would say 3.0


def _names_by_mult(model, opt) -> dict[float, set[str]]:
    names = {id(p): n for n, p in model.named_parameters()}
    by_mult: dict[float, set[str]] = {}
    for g in opt.param_groups:
        by_mult.setdefault(g["lr_mult"], set()).update(names[id(p)] for p in g["params"])
    return by_mult


def test_lr_multiplier_patterns_are_searched_and_the_first_match_wins():
    model = Blip2(Blip2Config(qformer=tiny_qformer()))
    cross = {n for n, _ in model.named_parameters() if ".crossattention." in n}
    assert cross  # every cross-attention layer, found by the pattern wherever it sits in the name
    opt = build_optimizer(model, TrainConfig(), {r"crossattention\.self": 3.0, "crossattention": 10.0})
    by_mult = _names_by_mult(model, opt)
    assert by_mult[3.0] == {n for n in cross if ".crossattention.self." in n}
    assert by_mult[10.0] == {n for n in cross if ".crossattention.self." not in n}
    assert by_mult[1.0] == {n for n, _ in model.named_parameters()} - cross


def test_train_lr_mult_is_validated_and_read_from_yaml_overrides():
    from blip2.config import Stage1Recipe, from_dict, load_recipe, to_dict

    recipe = load_recipe(None, ["train.lr_mult={crossattention|itm_head: 10}"])
    assert recipe.train.lr_mult == {"crossattention|itm_head": 10.0}
    assert from_dict(Stage1Recipe, to_dict(recipe)).train.lr_mult == recipe.train.lr_mult  # saved with the model
    with pytest.raises(ValueError, match="not a regular expression"):
        TrainConfig(lr_mult={"cross(": 10.0})
    with pytest.raises(ValueError, match="positive multiplier"):
        TrainConfig(lr_mult={"crossattention": 0.0})
    with pytest.raises(TypeError, match="expected a mapping"):
        load_recipe(None, ["train.lr_mult=10"])


def test_lr_multiplier_groups_by_prefix():
    model = Blip2(Blip2Config(qformer=tiny_qformer()))
    opt = build_optimizer(model, TrainConfig(weight_decay=0.05), {"qformer.query_tokens": 10.0, "itm_head.": 10.0})
    for g in opt.param_groups:
        assert g["weight_decay"] == (0.05 if all(p.ndim >= 2 for p in g["params"]) else 0.0)
    by_mult = _names_by_mult(model, opt)
    assert by_mult[10.0] == {"qformer.query_tokens", "itm_head.weight", "itm_head.bias"}
    assert sum(len(v) for v in by_mult.values()) == sum(1 for _ in model.parameters())
