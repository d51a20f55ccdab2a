import random

import pytest
import torch
from PIL import Image

from blip2.vision.transforms import Preprocess, eval_transform, random_resized_crop_box, train_transform

PRE = Preprocess(size=32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


def test_crop_boxes_respect_scale_and_bounds():
    rng = random.Random(0)
    for w, h in [(224, 224), (640, 480), (100, 300)]:
        for _ in range(200):
            l, t, r, b = random_resized_crop_box(w, h, rng)
            assert 0 <= l < r <= w and 0 <= t < b <= h
            frac = (r - l) * (b - t) / (w * h)
            aspect = (r - l) / (b - t)
            assert 3 / 4 - 0.02 <= aspect <= 4 / 3 + 0.02
            if w / h >= 3 / 4:  # a sampled (not fallback) crop: area within scale (0.5, 1)
                assert 0.48 <= frac <= 1.0


def test_eval_transform_normalises_to_minus_one_one():
    img = Image.new("RGB", (50, 70), (255, 0, 128))
    x = eval_transform(img, PRE)
    assert x.shape == (3, 32, 32)
    assert torch.allclose(x[0], torch.ones(32, 32)) and torch.allclose(x[1], -torch.ones(32, 32))
    assert x[2].mean().item() == pytest.approx(128 / 255 * 2 - 1, abs=1e-3)


def test_train_transform_flips_sometimes():
    img = Image.new("RGB", (64, 64))
    img.paste((255, 255, 255), (0, 0, 32, 64))  # left half white
    rng = random.Random(1)
    lefts = [train_transform(img, PRE, rng)[0, :, :4].mean().item() for _ in range(40)]
    assert any(v > 0.9 for v in lefts) and any(v < -0.9 for v in lefts)
