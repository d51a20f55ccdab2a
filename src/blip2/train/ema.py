"""An exponential moving average of the trained weights (train.ema_decay).

Small batches and a learning rate that stays well above zero at the end of the schedule (the
Flickr8k stage 2 ends its projection at 3e-4) leave the last weights with step-to-step noise; the
average of the last few hundred steps smooths it out at the cost of one copy of the trained weights.
"""

from __future__ import annotations

import torch
from torch import nn

from blip2.model import check_state


class WeightEMA:
    """avg <- d * avg + (1 - d) * w after every optimizer step past `start`; up to and including
    step `start` the average is a copy of the weights. Starting at the warmup's end keeps the
    weights of the first steps, far from where training ends, out of the average: the weights of
    step `start` carry d ** (steps - start) of it at the end, everything earlier nothing."""

    def __init__(self, params: dict[str, nn.Parameter], decay: float, start: int):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.params = params
        self.decay = decay
        self.start = start
        self.avg = {k: p.detach().clone() for k, p in params.items()}

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Call after the optimizer has taken its `step`-th step (1-based)."""
        for k, p in self.params.items():
            if step <= self.start:
                self.avg[k].copy_(p)
            else:
                self.avg[k].lerp_(p, 1.0 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().contiguous().cpu() for k, v in self.avg.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor], source: str = "state") -> None:
        """Strict: the same parameter names and shapes as the weights being averaged."""
        check_state(self.avg, state, f"{source} (weight average)")
        for k, v in self.avg.items():
            v.copy_(state[k])

    @torch.no_grad()
    def copy_to_params(self) -> None:
        """Replace the weights by their average (at the end of training)."""
        for k, p in self.params.items():
            p.copy_(self.avg[k])
