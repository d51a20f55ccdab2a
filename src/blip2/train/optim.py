"""AdamW with decay only on matrices, and linear warmup + cosine decay."""

from __future__ import annotations

import math
import re

import torch
from torch import nn

from blip2.config import TrainConfig


def build_optimizer(model: nn.Module, cfg: TrainConfig, lr_mult: dict[str, float] | None = None
                    ) -> torch.optim.AdamW:
    """Weight decay on >= 2-D weights; none on norms, biases and the temperature (as the reference).

    `lr_mult` maps regular expressions to learning-rate multipliers: a parameter takes the first
    pattern found (re.search) in its name, else 1 (each group keeps its multiplier in
    group["lr_mult"]; the schedule sets lr = lr_at(step) * lr_mult).
    """
    patterns = [(re.compile(k), m) for k, m in (lr_mult or {}).items()]
    groups: dict[tuple[bool, float], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        mult = next((m for pattern, m in patterns if pattern.search(name)), 1.0)
        groups.setdefault((p.ndim >= 2, mult), []).append(p)
    return torch.optim.AdamW([{"params": ps, "weight_decay": cfg.weight_decay if decay else 0.0, "lr_mult": mult}
                              for (decay, mult), ps in sorted(groups.items(), key=lambda kv: (not kv[0][0], kv[0][1]))],
                             lr=cfg.lr, betas=cfg.betas, eps=cfg.adam_eps)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to cfg.lr over warmup_steps, then cosine to cfg.lr * min_lr_ratio at cfg.steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(cfg.steps - cfg.warmup_steps, 1)
    progress = min((step - cfg.warmup_steps) / span, 1.0)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


# The time cap (train.max_minutes) plans from this many steps in (or the warmup's end if later), so
# that its seconds per step average over enough steps.
PLAN_MIN_STEPS = 10


def plan_step(cfg: TrainConfig) -> int:
    """The first step after which the time cap plans: the end of the warmup, and at least PLAN_MIN_STEPS."""
    return max(cfg.warmup_steps, PLAN_MIN_STEPS)


def step_time(ends: list[float]) -> float | None:
    """Seconds per step over the latest half of `ends` (consecutive step-end times), None while fewer
    than 4 are known. The latest half because early steps run slower: on the Zen 4 box stage 2's first
    ~300 steps ran ~20% below its median speed, stage 1's first 20 ~25%, so a mean from the start
    would cut a run that fits."""
    if len(ends) < 4:
        return None
    i = (len(ends) - 1) // 2
    return (ends[-1] - ends[i]) / (len(ends) - 1 - i)


def steps_within_cap(max_minutes: float, steps: int, step: int, spent_s: float, s_per_step: float) -> int:
    """How many steps fit `max_minutes` of training: `step` done in `spent_s` seconds, the rest at
    `s_per_step`. Never more than `steps` (the recipe's), never fewer than `step` (a spent cap stops now)."""
    left = max_minutes * 60 - spent_s
    more = max(0, math.floor(left / s_per_step)) if s_per_step > 0 else steps
    return max(step, min(steps, step + more))
