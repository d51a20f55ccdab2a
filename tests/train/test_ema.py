"""train.ema_decay's weight average against a hand computation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from blip2.config import TrainConfig
from blip2.train.ema import WeightEMA


def test_average_copies_until_start_then_mixes_each_step_by_hand():
    w = nn.Parameter(torch.tensor([1.0, -2.0]))
    ema = WeightEMA({"w": w}, decay=0.75, start=2)
    seen = []
    for step, value in enumerate(([3.0, 0.0], [5.0, 4.0], [9.0, 8.0], [1.0, 0.0]), start=1):
        with torch.no_grad():
            w.copy_(torch.tensor(value))
        ema.update(step)
        seen.append(ema.state_dict()["w"].tolist())
    # steps 1-2 copy; step 3: 0.75 * [5, 4] + 0.25 * [9, 8]; step 4: 0.75 * that + 0.25 * [1, 0]
    assert seen == [[3.0, 0.0], [5.0, 4.0], [6.0, 5.0], [4.75, 3.75]]
    assert w.tolist() == [1.0, 0.0]  # the average never touches the weights ...
    ema.copy_to_params()
    assert w.tolist() == [4.75, 3.75]  # ... until asked to


def test_load_state_dict_is_strict():
    ema = WeightEMA({"w": nn.Parameter(torch.zeros(2))}, decay=0.9, start=0)
    with pytest.raises(KeyError, match=r"ckpt \(weight average\): 1 missing keys \['w'\], 1 unexpected keys \['v'\]"):
        ema.load_state_dict({"v": torch.zeros(2)}, source="ckpt")
    with pytest.raises(ValueError, match=r"ckpt \(weight average\): w has shape \(3,\)"):
        ema.load_state_dict({"w": torch.zeros(3)}, source="ckpt")
    ema.load_state_dict({"w": torch.ones(2)})
    assert ema.state_dict()["w"].tolist() == [1.0, 1.0]


@pytest.mark.parametrize("decay", [-0.1, 1.0, 1.5])
def test_config_refuses_a_decay_outside_0_1(decay):
    with pytest.raises(ValueError, match="train.ema_decay must be in"):
        TrainConfig(ema_decay=decay)
