"""The embedded default job: procedural scenes -> stage 1 -> retrieval -> stage 2 through the packaged
SmolLM2 -> captions and answers for held-out scenes, all in one report.

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
from blip2.config import Stage2Recipe, load_recipe
from blip2.data.cache import cached_features
from blip2.data.records import load_records
from blip2.data.scenes import write_scenes
from blip2.io import write_json
from blip2.model import Blip2
from blip2.retrieval import itc_similarity
from blip2.text import clean_caption
from blip2.train.loop import train

log = logging.getLogger(__name__)


def run_quickstart(out: str | Path, steps: int | None = None, n_train: int = 1000, n_val: int = 200,
                   progress: bool = True, stage2_steps: int | None = None, extra: tuple[str, ...] = (),
                   extra_stage2: tuple[str, ...] = ()) -> dict[str, Any]:
    """Run the whole default job in `out`; `extra`/`extra_stage2` are recipe overrides (tests shrink it)."""
    out = Path(out)
    t0 = time.perf_counter()
    ann = write_scenes(out / "data", n_train, n_val, seed=0)
    t_data = time.perf_counter() - t0
    overrides = [f"data.train={ann}", f"data.cache_dir={out / 'cache'}", *extra]
    if steps is not None:
        overrides.append(f"train.steps={steps}")
    recipe = load_recipe(RECIPES / "quickstart-stage1.yaml", overrides)
    summary = train(recipe, out / "stage1", progress=progress)
    t_stage1 = time.perf_counter() - t0
    retrieval = summary["retrieval"]
    examples = _examples(out / "stage1" / "model", ann, recipe.data.cache_dir)

    s2_overrides = [f"data.train={ann}", f"data.cache_dir={out / 'cache'}", f"stage2.init={out / 'stage1' / 'model'}",
                    *extra_stage2]
    if stage2_steps is not None:
        s2_overrides.append(f"train.steps={stage2_steps}")
    recipe2 = load_recipe(RECIPES / "quickstart-stage2.yaml", s2_overrides, Stage2Recipe)
    summary2 = train(recipe2, out / "stage2", progress=progress, check_init=False)  # stage 1 reported its queries
    result = {
        "retrieval": retrieval,
        "chance": {"tr_r1": 100.0 / retrieval["num_images"], "ir_r1": 100.0 / retrieval["num_images"]},
        "train": summary["data"] | {"steps": recipe.train.steps, "batch_size": recipe.train.batch_size},
        "generation": summary2.get("generation", {}),
        "train_stage2": summary2["data"] | {"steps": recipe2.train.steps, "batch_size": recipe2.train.batch_size},
        "seconds": {"data": round(t_data, 1), "stage1": round(t_stage1, 1),
                    "stage2": round(time.perf_counter() - t0 - t_stage1, 1),
                    "total": round(time.perf_counter() - t0, 1)},
        "machine": {"platform": platform.platform(), "torch": torch.__version__,
                    "threads": torch.get_num_threads()},
        "model_dir": str(out / "stage1" / "model"),
        "stage2_model_dir": str(out / "stage2" / "model"),
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
        "Training curves: `stage1/loss_curves.png`; metrics: `stage1/metrics.jsonl`.",
        "",
        "## Examples (top-3 captions by ITC)",
        "",
    ]
    for ex in r["examples"]:
        lines.append(f"- `{ex['image']}` — truth: *{ex['truth']}*")
        for cap, ok in zip(ex["retrieved"], ex["correct"], strict=True):
            lines.append(f"  - {'✔' if ok else '✘'} {cap}")
    g, t2 = r["generation"], r["train_stage2"]
    lines += ["", "## Stage 2: captions and answers through the frozen SmolLM2-135M", "",
              f"{t2['steps']} steps of batch {t2['batch_size']} on {t2['pairs']} caption and question/answer pairs, "
              "starting from the stage-1 Q-Former; the LLM stays frozen.", ""]
    if "cider" in g:
        lines += [f"Captions for {g['num_images']} held-out scenes (beam search): "
                  + ", ".join(f"{k} {g[k]:.1f}" for k in ("bleu4", "meteor", "rouge_l", "cider")) + ".", ""]
    if "vqa_accuracy" in g:
        lines += [f"Answers to {g['vqa_questions']} questions about them: accuracy {g['vqa_accuracy']:.1f}% "
                  "(exact match after VQA answer normalisation).", ""]
    for ex in g.get("examples", []):
        lines.append(f"- `{Path(ex['image']).name}` — generated: *{ex['caption']}* — truth: *{ex['references'][0]}*")
    if g.get("vqa_examples"):
        lines += ["", "| question | truth | answer |", "|---|---|---|"]
        lines += [f"| {ex['question']} | {ex['answer']} | {ex['predicted']} |" for ex in g["vqa_examples"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":  # pragma: no cover
    print(json.dumps(run_quickstart("quickstart-out"), indent=2))
