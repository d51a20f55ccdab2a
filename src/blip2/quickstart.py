"""The embedded default job: procedural scenes -> stage 1 on the packaged parts -> retrieval report.

Needs nothing but the pip-installed packages; about 10 minutes on a 2-core CPU.
"""

from __future__ import annotations

import json
import logging
import platform
import time
from pathlib import Path
from typing import Any

import torch

from blip2.cli import RECIPES
from blip2.config import load_recipe
from blip2.data.cache import cached_features
from blip2.data.records import load_records
from blip2.data.scenes import write_scenes
from blip2.io import write_json
from blip2.model import Blip2
from blip2.retrieval import itc_similarity
from blip2.text import clean_caption
from blip2.train.loop import train_stage1

log = logging.getLogger(__name__)


def run_quickstart(out: str | Path, steps: int | None = None, n_train: int = 1500, n_val: int = 200,
                   progress: bool = True) -> dict[str, Any]:
    out = Path(out)
    t0 = time.perf_counter()
    ann = write_scenes(out / "data", n_train, n_val, seed=0)
    t_data = time.perf_counter() - t0
    overrides = [f"data.train={ann}", f"data.cache_dir={out / 'cache'}"]
    if steps is not None:
        overrides.append(f"train.steps={steps}")
    recipe = load_recipe(RECIPES / "quickstart-stage1.yaml", overrides)
    summary = train_stage1(recipe, out / "run", progress=progress)
    retrieval = summary["retrieval"]
    examples = _examples(out / "run" / "model", ann, recipe.data.cache_dir)
    result = {
        "retrieval": retrieval,
        "chance": {"tr_r1": 100.0 / retrieval["num_images"], "ir_r1": 100.0 / retrieval["num_images"]},
        "train": summary["data"] | {"steps": recipe.train.steps, "batch_size": recipe.train.batch_size},
        "seconds": {"data": round(t_data, 1), "total": round(time.perf_counter() - t0, 1)},
        "machine": {"platform": platform.platform(), "torch": torch.__version__,
                    "threads": torch.get_num_threads()},
        "model_dir": str(out / "run" / "model"),
        "examples": examples,
    }
    write_json(out / "summary.json", result)
    (out / "report.md").write_text(_report(result))
    return result


def _examples(model_dir: Path, ann: Path, cache_dir: str | None, n: int = 4) -> list[dict[str, Any]]:
    """Top-3 ITC captions for a few validation scenes, beside their ground truth."""
    model = Blip2.from_dir(model_dir)
    records = load_records(ann, None, "val")
    assert model.vision is not None
    feats = cached_features(model.vision, [r.path for r in records], cache_dir, progress=False)
    captions = [clean_caption(c) for r in records for c in r.captions]
    with torch.no_grad():
        _, img = model.encode_image(feats.features[:n].float())
        txt = torch.cat([model.encode_text(captions[i:i + 256]) for i in range(0, len(captions), 256)])
    sim = itc_similarity(img, txt)
    rows = []
    for i in range(n):
        top = sim[i].topk(3).indices.tolist()
        rows.append({"image": Path(records[i].path).name, "truth": clean_caption(records[i].captions[0]),
                     "retrieved": [captions[t] for t in top],
                     "correct": [t // 5 == i for t in top]})
    return rows


def _report(r: dict[str, Any]) -> str:
    ret = r["retrieval"]
    lines = [
        "# blip2 quickstart report",
        "",
        f"Stage 1 (ITC + ITM + ITG) on {r['train']['images']} procedural scenes "
        f"({r['train']['pairs']} captions), {r['train']['steps']} steps of batch {r['train']['batch_size']}; "
        f"frozen EfficientNet-Lite0, Q-Former initialised from all-MiniLM-L6-v2.",
        f"Total wall time {r['seconds']['total']:.0f} s on {r['machine']['platform']} "
        f"(torch {r['machine']['torch']}, {r['machine']['threads']} threads).",
        "",
        f"## Retrieval on {ret['num_images']} held-out scenes / {ret['num_texts']} captions",
        "",
        "| | R@1 | R@5 | R@10 |",
        "|---|---|---|---|",
        f"| text retrieval (ITC + ITM re-rank, k={ret['k_test']}) | {ret['tr_r1']:.1f} | {ret['tr_r5']:.1f} | "
        f"{ret['tr_r10']:.1f} |",
        f"| image retrieval (ITC + ITM re-rank) | {ret['ir_r1']:.1f} | {ret['ir_r5']:.1f} | {ret['ir_r10']:.1f} |",
        f"| text retrieval (ITC only) | {ret['itc_tr_r1']:.1f} | {ret['itc_tr_r5']:.1f} | {ret['itc_tr_r10']:.1f} |",
        f"| image retrieval (ITC only) | {ret['itc_ir_r1']:.1f} | {ret['itc_ir_r5']:.1f} | {ret['itc_ir_r10']:.1f} |",
        "",
        f"Chance R@1: text retrieval {r['chance']['tr_r1']:.2f}, image retrieval {r['chance']['ir_r1']:.2f}.",
        "",
        "Training curves: `run/loss_curves.png`; metrics: `run/metrics.jsonl`.",
        "",
        "## Examples (top-3 captions by ITC)",
        "",
    ]
    for ex in r["examples"]:
        lines.append(f"- `{ex['image']}` — truth: *{ex['truth']}*")
        for cap, ok in zip(ex["retrieved"], ex["correct"], strict=True):
            lines.append(f"  - {'✔' if ok else '✘'} {cap}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":  # pragma: no cover
    print(json.dumps(run_quickstart("quickstart-out"), indent=2))
