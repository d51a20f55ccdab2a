"""Shared fixtures: tiny configs, a tiny frozen encoder, the packaged tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from blip2.config import Blip2Config, QFormerConfig, VisionConfig
from blip2.model import Blip2
from blip2.text import load_tokenizer
from blip2.vision.base import FrozenImageEncoder
from blip2.vision.transforms import Preprocess

torch.set_num_threads(2)

# The project's shared/ folder (real data) sits beside the repository checkout.
SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def tiny_qformer(**kw) -> QFormerConfig:
    base = dict(init="none", num_layers=2, hidden_size=32, num_heads=4, intermediate_size=64, num_queries=4,
                cross_attention_freq=2, vision_width=24, vocab_size=30523, max_text_len=16, embed_dim=16,
                hidden_dropout=0.0, attention_dropout=0.0)
    base.update(kw)
    return QFormerConfig(**base)


@pytest.fixture(scope="session")
def tokenizer():
    return load_tokenizer("packaged", 30523)


@pytest.fixture
def tiny_model(tokenizer) -> Blip2:
    torch.manual_seed(0)
    return Blip2(Blip2Config(qformer=tiny_qformer()), None, tokenizer)


class TinyEncoder(FrozenImageEncoder):
    """A deterministic 'frozen encoder' for data/cache tests: 2x2 average-pooled pixels -> 4 tokens."""

    def __init__(self, tag: str = "a", size: int = 32):
        super().__init__("fp32", {"kind": "tiny", "tag": tag})
        self.proj = nn.Linear(3, 24)
        torch.nn.init.normal_(self.proj.weight, generator=torch.Generator().manual_seed(1))
        self.feature_dim, self.num_tokens = 24, 4
        self.preprocess = Preprocess(size=size, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
        self.calls = 0
        self.freeze()

    def _features(self, pixels: torch.Tensor) -> torch.Tensor:
        self.calls += pixels.shape[0]
        pooled = nn.functional.adaptive_avg_pool2d(pixels, 2).flatten(2).transpose(1, 2)  # (B, 4, 3)
        return self.proj(pooled)


@pytest.fixture
def tiny_encoder() -> TinyEncoder:
    return TinyEncoder()


def write_images(folder, n: int, size: int = 40, seed: int = 0) -> list[str]:
    """n random RGB JPEGs; returns their paths."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        p = folder / f"img{i}.jpg"
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(p)
        paths.append(str(p))
    return paths


@pytest.fixture
def vision_default() -> VisionConfig:
    return VisionConfig()
