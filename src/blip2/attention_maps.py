"""Where the queries look: the Q-Former's cross-attention over the image, as numbers and as a plot.

The attention probabilities are recomputed from the query and key projections that the real
forward pass produced (captured with forward hooks), so the model code keeps its fused
scaled_dot_product_attention and nothing here can drift from what the model computes.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from blip2.model import Blip2


@torch.no_grad()
def cross_attention(model: Blip2, image_feats: torch.Tensor) -> torch.Tensor:
    """(B, N, C) frozen features -> (L, B, H, Q, N) attention of every query over the N image tokens,
    for each of the L layers that have cross-attention (softmax over N: each row sums to 1)."""
    captured: dict[tuple[int, str], torch.Tensor] = {}
    hooks = []
    layers = [(i, layer.crossattention) for i, layer in enumerate(model.qformer.layer)
              if layer.crossattention is not None]
    for i, attn in layers:
        for name in ("query", "key"):
            def keep(_module, _inputs, out, key=(i, name)):
                captured[key] = out
            hooks.append(getattr(attn.self, name).register_forward_hook(keep))
    try:
        model.qformer(image=model.vision_input(image_feats), use_queries=True)  # the query pass alone
    finally:
        for h in hooks:
            h.remove()
    maps = []
    for i, attn in layers:
        q, k = attn._split(captured[(i, "query")]), attn._split(captured[(i, "key")])  # (B, H, Q|N, Dh)
        maps.append(torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1))  # (B, H, Q, N)
    return torch.stack(maps)


def attention_stats(maps: torch.Tensor) -> dict[str, float]:
    """Two numbers for (..., H, Q, N) maps of one layer: how focused a head's map is (mean entropy in
    nats; log N is uniform) and how alike the queries look (mean Pearson correlation between the
    head-averaged maps of two different queries; 1 = every query sees the same)."""
    p = maps.float()
    entropy = -(p * p.clamp_min(1e-12).log()).sum(-1).mean()
    per_query = p.mean(-3)  # (..., Q, N)
    x = per_query - per_query.mean(-1, keepdim=True)
    x = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    corr = x @ x.transpose(-1, -2)  # (..., Q, Q)
    q = corr.shape[-1]
    off = ~torch.eye(q, dtype=torch.bool, device=corr.device)
    return {"entropy": float(entropy), "uniform_entropy": math.log(p.shape[-1]),
            "query_correlation": float(corr[..., off].mean()) if q > 1 else float("nan")}


def token_grid(num_tokens: int) -> tuple[int, int]:
    """(leading non-patch tokens, grid side) for N image tokens: a square grid (a CNN feature map),
    or one class token before a square grid (a ViT)."""
    for prefix in (0, 1):
        side = math.isqrt(num_tokens - prefix)
        if side * side == num_tokens - prefix:
            return prefix, side
    raise ValueError(f"cannot lay {num_tokens} image tokens out on a square grid (with at most one class token); "
                     "attention maps need a square patch grid")


def plot_attention(image, maps: torch.Tensor, out: str | Path, title: str = "", max_queries: int = 32) -> Path:
    """One image's maps (H, Q, N) of a layer, averaged over heads, drawn over the image: the mean over
    queries first, then each query (at most `max_queries`). `image` is what the encoder saw (a PIL
    image after the eval transform's resize and crop). Writes a PNG and returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    prefix, side = token_grid(maps.shape[-1])
    per_query = maps.float().mean(0)  # (Q, N), averaged over heads
    grids = per_query[:, prefix:].reshape(-1, side, side)
    shown = [("all queries", grids.mean(0))] + [(f"query {j}", g) for j, g in enumerate(grids[:max_queries])]
    cols = min(len(shown), 6)
    rows = math.ceil(len(shown) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.3 * rows), squeeze=False)
    w, h = image.size
    for ax, (name, g) in zip(axes.flat, shown, strict=False):
        ax.imshow(image)
        ax.imshow(g.numpy(), cmap="jet", alpha=0.45, extent=(0, w, h, 0), interpolation="bilinear")
        ax.set_title(name, fontsize=8)
    for ax in axes.flat:
        ax.axis("off")
    cls = f"; class token {per_query[:, :prefix].mean():.0%} of the attention" if prefix else ""
    fig.suptitle(f"{title} ({side}x{side} grid{cls}; colours stretched per panel)".strip(), fontsize=9)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out
