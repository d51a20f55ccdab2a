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


# The time cap (train.max_minutes) plans no earlier than this many steps in, so that its seconds per
# step average over enough steps; a process's first step, with its one-off allocations, is not timed.
PLAN_MIN_STEPS = 10


def plan_step(cfg: TrainConfig) -> int:
    """The step after which the time cap plans: the end of the warmup, and at least PLAN_MIN_STEPS.
    Planning within the warmup leaves the schedule exactly that of a recipe with the planned count."""
    return max(cfg.warmup_steps, PLAN_MIN_STEPS)


def steps_within_cap(cfg: TrainConfig, step: int, spent_s: float, s_per_step: float) -> int:
    """How many steps fit cfg.max_minutes of training: `step` done in `spent_s` seconds, the rest at
    `s_per_step`. Never more than cfg.steps, never fewer than `step` (a cap already spent stops now)."""
    left = cfg.max_minutes * 60 - spent_s
    more = max(0, math.floor(left / s_per_step)) if s_per_step > 0 else cfg.steps
    return max(step, min(cfg.steps, step + more))
