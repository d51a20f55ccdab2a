"""Weight averaging of models fine-tuned from one start point ("model soup", Wortsman et al., 2022).

Several SCST runs from the same stage-2 model differ by about 1 BLEU-4 from seed to seed
(docs/RESULTS.md). Their average is one model of the same size and speed, so it costs nothing at
inference. Averaging only makes sense for models that share an initialisation and architecture;
this module refuses anything else before writing.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from blip2.io import atomic_dir, read_json, write_json
from blip2.model import CONFIG, WEIGHTS, check_state, require_model_dir

log = logging.getLogger(__name__)


def _read_model(directory: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    require_model_dir(directory, "; convert a transformers or LAVIS checkpoint first (blip2 convert)")
    try:
        weights = load_file(str(directory / WEIGHTS))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{directory / WEIGHTS} is unreadable ({e}); nothing was written") from e
    return read_json(directory / CONFIG), weights


def average_models(dirs: list[str | Path], out: str | Path, weights: list[float] | None = None) -> dict[str, Any]:
    """Write the weighted mean of the trainable weights of model directories `dirs` to `out`.

    Every model must have the same config (architecture, frozen encoder and LLM) and the same keys,
    shapes and dtypes; weights (default: equal) must be >= 0 and are normalised to sum to 1. The
    mean is taken in float64 and stored in each tensor's dtype. `out` must be new: it is written
    atomically, and nothing is written when any check fails. Returns the meta stored with it.
    """
    paths = [Path(d) for d in dirs]
    out = Path(out)
    if len(paths) < 2:
        raise ValueError(f"averaging needs >= 2 model directories, got {len(paths)}")
    if any(out.resolve() == p.resolve() for p in paths):
        raise ValueError(f"--out {out} is one of the models being averaged; choose a new directory")
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty; choose a new --out (nothing is overwritten)")
    w = [1.0] * len(paths) if weights is None else [float(x) for x in weights]
    if len(w) != len(paths) or min(w) < 0 or sum(w) <= 0:
        raise ValueError(f"weights {w}: need one non-negative weight per model ({len(paths)}), not all zero")
    w = [x / sum(w) for x in w]

    docs, states = zip(*(_read_model(p) for p in paths), strict=True)
    for p, doc, state in zip(paths[1:], docs[1:], states[1:], strict=True):
        if doc["model"] != docs[0]["model"]:
            diff = sorted(k for k in docs[0]["model"] if doc["model"].get(k) != docs[0]["model"][k])
            raise ValueError(f"{p} has another model config than {paths[0]} (differs in {diff}); only models "
                             "fine-tuned from one start point can be averaged")
        check_state(states[0], state, f"{p} (against {paths[0]})")
        for k, v in states[0].items():
            if state[k].dtype != v.dtype:
                raise ValueError(f"{p}: {k} is {state[k].dtype}, {paths[0]} has {v.dtype}")
    prints = {d.get("meta", {}).get("vision_fingerprint") for d in docs}
    if len(prints) > 1:
        log.warning("the models were trained with frozen encoders of different fingerprints %s",
                    sorted(map(str, prints)))

    mean = {}
    for k, v in states[0].items():
        acc = torch.zeros(v.shape, dtype=torch.float64)
        for wi, state in zip(w, states, strict=True):
            acc += wi * state[k].double()
        mean[k] = acc.to(v.dtype).contiguous()
    meta = {**docs[0].get("meta", {}), "averaged_from": [str(p) for p in paths], "average_weights": w}
    with atomic_dir(out) as tmp:
        save_file(mean, str(tmp / WEIGHTS))
        write_json(tmp / CONFIG, {"model": docs[0]["model"], "meta": meta})
    return meta
