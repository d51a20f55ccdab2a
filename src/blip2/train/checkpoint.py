"""Training checkpoints: weights (safetensors) + recipe + optimizer + data position.

<out>/checkpoints/step-00001200/
    model.safetensors   trainable weights          config.json   recipe + model config
    optimizer.pt        optimizer state dict (loaded with weights_only=True)
    state.json          step, sampler position, number of processes that wrote it
    ema.safetensors     the weight average, with train.ema_decay only
Each directory is written atomically; only the newest `keep` are kept. No RNG state is needed: the
loop seeds every random draw from (seed, step, rank), so a resumed run repeats an uninterrupted one.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from blip2.io import atomic_dir, read_json, write_json

STEP_DIR = re.compile(r"^step-(\d{8})$")
EMA = "ema.safetensors"


@dataclass
class Checkpoint:
    path: Path
    step: int
    recipe: dict[str, Any]
    weights: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    state: dict[str, Any]
    ema: dict[str, torch.Tensor] | None = None


def latest(out: Path) -> Path | None:
    root = out / "checkpoints"
    if not root.is_dir():
        return None
    steps = sorted((int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)))
    return steps[-1][1] if steps else None


def save(out: Path, step: int, recipe: dict[str, Any], weights: dict[str, torch.Tensor],
         optimizer: torch.optim.Optimizer, state: dict[str, Any], keep: int = 2,
         ema: dict[str, torch.Tensor] | None = None) -> Path:
    dest = out / "checkpoints" / f"step-{step:08d}"
    with atomic_dir(dest) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, str(tmp / "model.safetensors"))
        if ema is not None:
            save_file(ema, str(tmp / EMA))
        write_json(tmp / "config.json", recipe)
        torch.save({"optimizer": optimizer.state_dict()}, tmp / "optimizer.pt")
        write_json(tmp / "state.json", dict(state, step=step))
    old = sorted(p for p in dest.parent.iterdir() if STEP_DIR.match(p.name))[:-keep]
    for p in old:
        shutil.rmtree(p, ignore_errors=True)
    return dest


def load(path: Path) -> Checkpoint:
    """Read and validate a checkpoint completely before anything is changed."""
    needed = ["model.safetensors", "config.json", "optimizer.pt", "state.json"]
    missing = [n for n in needed if not (path / n).is_file()]
    if missing:
        raise FileNotFoundError(f"checkpoint {path} is incomplete (missing {missing}); delete it to resume "
                                "from the previous one")
    try:
        weights = load_file(str(path / "model.safetensors"))
        blob = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
        state = read_json(path / "state.json")
        recipe = read_json(path / "config.json")
        ema = load_file(str(path / EMA)) if (path / EMA).is_file() else None
    except Exception as e:  # corrupt files of any kind: refuse with the path
        raise ValueError(f"checkpoint {path} is unreadable ({type(e).__name__}: {e}); delete it to resume "
                         "from the previous one") from e
    return Checkpoint(path, int(state["step"]), recipe, weights, blob["optimizer"], state, ema)
