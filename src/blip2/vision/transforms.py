"""Image preprocessing without torchvision: PIL decode/resize + a few tensor ops.

Eval: squash-resize to (size, size) with bicubic filtering (BLIP's eval transform).
Train: RandomResizedCrop(scale 0.5-1, ratio 3/4-4/3) + horizontal flip (the paper's recipe).
"""

from __future__ import annotations

import io
import math
import random
import warnings
from dataclasses import asdict, dataclass

import numpy as np
import torch
from PIL import Image

from blip2.io import open_binary, split_member


@dataclass(frozen=True)
class Preprocess:
    """What an encoder expects: resolution and per-channel normalisation."""

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def key(self) -> dict:
        return asdict(self)


def load_rgb(path: str) -> Image.Image:
    """Decode an image file (or a member of a tar shard) to 8-bit RGB.

    Raises OSError/ValueError (what callers skip and count) for a missing, empty, truncated or
    corrupt file, and for decompression bombs: more than PIL's MAX_IMAGE_PIXELS (89M) pixels is
    refused before decoding instead of only warned about. Greyscale, palette, CMYK and alpha images
    become RGB as in the reference (alpha dropped); 16-bit and float images are scaled to 8 bits
    rather than clipped (PIL's own conversion saturates them to white).
    """
    return _decode(path if split_member(path) is None else open_binary(path))


def load_rgb_bytes(data: bytes) -> Image.Image:
    """load_rgb for image bytes already in memory (a streamed shard sample)."""
    return _decode(io.BytesIO(data))


def _decode(source) -> Image.Image:
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(source) as im:
                im.load()
                return _to_rgb(im)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise ValueError(f"refusing a decompression bomb: {e}") from e


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode.startswith("I;16") or im.mode in ("I", "F"):
        arr = np.asarray(im, dtype=np.float32)
        top = 65535.0 if im.mode.startswith("I;16") else max(float(arr.max()), 1.0)
        im = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    return im.convert("RGB")


def to_tensor(img: Image.Image, pre: Preprocess) -> torch.Tensor:
    """PIL RGB (size x size) -> normalised float tensor (3, size, size)."""
    arr = np.asarray(img, dtype=np.float32) / 255.0  # (H, W, 3)
    x = torch.from_numpy(arr).permute(2, 0, 1)
    mean = torch.tensor(pre.mean).view(3, 1, 1)
    std = torch.tensor(pre.std).view(3, 1, 1)
    return (x - mean) / std


def eval_transform(img: Image.Image, pre: Preprocess) -> torch.Tensor:
    return to_tensor(img.resize((pre.size, pre.size), Image.BICUBIC), pre)


def random_resized_crop_box(width: int, height: int, rng: random.Random,
                            scale: tuple[float, float] = (0.5, 1.0),
                            ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """Sample a crop box (left, top, right, bottom) the way RandomResizedCrop does."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            left = rng.randint(0, width - w)
            top = rng.randint(0, height - h)
            return left, top, left + w, top + h
    # Fallback: centre crop clamped to the allowed aspect ratios.
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


def train_transform(img: Image.Image, pre: Preprocess, rng: random.Random) -> torch.Tensor:
    box = random_resized_crop_box(img.width, img.height, rng)
    img = img.resize((pre.size, pre.size), Image.BICUBIC, box=box)
    if rng.random() < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    return to_tensor(img, pre)
