"""Retrieval evaluation on a dataset split (features from the shared cache)."""

from __future__ import annotations

import logging
import time
from typing import Any

from blip2.config import EvalConfig
from blip2.data.cache import split_features
from blip2.model import Blip2
from blip2.retrieval import evaluate_retrieval
from blip2.text import clean_caption

log = logging.getLogger(__name__)


def evaluate_split(model: Blip2, annotations: str, images: str | None, split: str, cfg: EvalConfig,
                   cache_dir: str | None = None, num_workers: int = 2, progress: bool = True) -> dict[str, Any]:
    """R@1/5/10 both directions on `split` (ITC-only and ITC top-k + ITM re-rank)."""
    t0 = time.perf_counter()
    records, cached = split_features(model.vision, annotations, images, split, cfg.max_images, cache_dir,
                                     num_workers, progress)
    captions = [[clean_caption(c) for c in r.captions] for r in records]
    result = evaluate_retrieval(model, cached.features, captions, cfg.k_test, cfg.batch_size, progress)
    result["skipped_images"] = len(cached.failed)
    result["split"] = split
    result["seconds"] = round(time.perf_counter() - t0, 1)
    log.info("retrieval on %s: TR@1 %.1f IR@1 %.1f (ITC-only TR@1 %.1f IR@1 %.1f)", split, result["tr_r1"],
             result["ir_r1"], result["itc_tr_r1"], result["itc_ir_r1"])
    return result
