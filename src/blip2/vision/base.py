"""The frozen-image-encoder contract shared by every backbone.

pixels (B, 3, S, S), normalised by `preprocess` -> features (B, T, C) float32.
Frozen means: parameters never require grad, the module is in eval mode forever (train() is a
no-op), and forward runs under no_grad in the configured precision.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from torch import nn

from blip2.vision.transforms import Preprocess

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def file_fingerprint(paths: list[Path]) -> str:
    """Cheap content fingerprint of weight files: size + first/last MiB of each."""
    h = hashlib.sha256()
    for p in sorted(paths):
        size = p.stat().st_size
        h.update(f"{p.name}:{size}".encode())
        with open(p, "rb") as f:
            h.update(f.read(1 << 20))
            if size > 2 << 20:
                f.seek(-(1 << 20), 2)
                h.update(f.read(1 << 20))
    return h.hexdigest()


class FrozenImageEncoder(nn.Module):
    """Base class: subclasses implement `_features(pixels) -> (B, T, C)`."""

    feature_dim: int
    num_tokens: int
    preprocess: Preprocess

    def __init__(self, precision: str, identity: dict):
        super().__init__()
        self.dtype = DTYPES[precision]
        self._identity = identity

    def freeze(self) -> FrozenImageEncoder:
        for p in self.parameters():
            p.requires_grad_(False)
        self.to(self.dtype)
        return super().train(False)

    def train(self, mode: bool = True) -> FrozenImageEncoder:
        # Frozen: BatchNorm statistics and dropout must never switch to training behaviour.
        return super().train(False)

    @torch.no_grad()
    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) pixels on any device -> (B, T, C) float32 features on the encoder's device."""
        device = next(self.parameters()).device
        feats = self._features(pixels.to(device, self.dtype))
        return feats.float()

    def _features(self, pixels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def fingerprint(self, precision: str | None = None) -> str:
        """Changes whenever weights, feature choice, precision or preprocessing change; `precision`
        stands in for the encoder's own (is this the encoder a model was trained with, at any
        precision?)."""
        ident = dict(self._identity, preprocess=self.preprocess.key())
        if precision is not None:
            ident["precision"] = precision
        return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
