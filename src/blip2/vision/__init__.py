"""Frozen image encoders behind one interface: pixels -> (B, T, C) feature sequences."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from blip2.config import PACKAGED, VisionConfig
from blip2.vision.base import FrozenImageEncoder, file_fingerprint
from blip2.vision.efficientnet_lite import VARIANTS, EfficientNetLite, packaged_weights_path
from blip2.vision.transforms import Preprocess


class EfficientNetLiteEncoder(FrozenImageEncoder):
    """An EfficientNet-Lite feature map flattened to tokens: (B, C, h, w) -> (B, h*w, C)."""

    def __init__(self, cfg: VisionConfig):
        path = packaged_weights_path(cfg.name) if cfg.path == PACKAGED else Path(cfg.path)
        super().__init__(cfg.precision, {"kind": cfg.name, "weights": file_fingerprint([path]),
                                         "map": cfg.feature_map, "precision": cfg.precision})
        self.net = EfficientNetLite(cfg.name)
        state = torch.load(path, map_location="cpu", weights_only=True)
        self.net.load_state_dict(state, strict=True)
        self.feature_map = cfg.feature_map
        self.feature_dim = 1280 if cfg.feature_map == "head" else self.net.variant.stage6_channels
        stride = 32 if cfg.feature_map == "head" else 16
        self.num_tokens = math.ceil(cfg.image_size / stride) ** 2
        self.preprocess = Preprocess(size=cfg.image_size, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
        self.freeze()

    def _features(self, pixels: torch.Tensor) -> torch.Tensor:
        fmap = self.net.features(pixels.contiguous(memory_format=torch.channels_last), self.feature_map)
        return fmap.flatten(2).transpose(1, 2)  # (B, h*w, C)


def build_vision_encoder(cfg: VisionConfig) -> FrozenImageEncoder:
    """Build and load the frozen encoder named by `cfg` (local files only)."""
    if cfg.name in VARIANTS:
        return EfficientNetLiteEncoder(cfg)
    from blip2.vision.hf import HFVisionEncoder

    return HFVisionEncoder(cfg)


__all__ = ["FrozenImageEncoder", "Preprocess", "build_vision_encoder", "EfficientNetLiteEncoder"]
