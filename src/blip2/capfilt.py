"""CapFilt (BLIP's caption bootstrapping, used for BLIP-2's web data): for every image, sample
synthetic captions with a captioner, score them and the original captions against the image with a
filter, keep the top k, and write a new dataset.

Each image's captions are sampled from streams seeded by (seed, image index, sample), so the result does
not depend on batching, on the number of processes (`torchrun`: images are dealt round-robin to
ranks) or on interruptions: results are appended per image to out/parts/rank-R.jsonl, and a rerun
skips the images already there. When every image is done the main process merges the parts into
out/dataset.json (Karpathy format) and out/report.json.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from blip2.config import DecodeConfig
from blip2.data.records import ImageRecord, load_records
from blip2.generate import stream_seed
from blip2.io import write_json
from blip2.model import Blip2
from blip2.retrieval import itc_similarity
from blip2.tasks import image_features
from blip2.text import clean_caption

log = logging.getLogger(__name__)


@dataclass
class CapFiltConfig:
    """What CapFilt samples and keeps."""

    # Synthetic captions sampled per image (nucleus sampling).
    num_samples: int = 5
    # Captions kept per image (originals and synthetic ones compete for the same places).
    top_k: int = 2
    # How captions are sampled (nucleus sampling; its seed is unused: see `seed`).
    sampling: DecodeConfig = field(default_factory=lambda: DecodeConfig(
        num_beams=1, do_sample=True, top_p=0.9, max_new_tokens=30, min_new_tokens=5))
    # Optional prompt before every sampled caption (e.g. "a photo of").
    prompt: str = ""
    # Score with ITM's match probability instead of ITC's cosine similarity.
    use_itm: bool = False
    # Base seed; sample j of image i draws from stream_seed(seed, i, j) (blip2.generate).
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_samples < 0 or self.top_k < 1:
            raise ValueError("capfilt: num_samples must be >= 0 and top_k >= 1")
        if not self.sampling.do_sample or self.sampling.num_beams != 1:
            raise ValueError("capfilt.sampling must sample (do_sample=True, num_beams=1): beam search would "
                             "return the same caption num_samples times")


@torch.no_grad()
def score_captions(scorer: Blip2, feats: torch.Tensor, captions: list[str], use_itm: bool = False) -> torch.Tensor:
    """(1, N, C) features of one image, n captions -> (n,) scores: ITC cosine (max over queries), or
    ITM match probability."""
    if use_itm:
        ids, mask = scorer.tokenize(captions)
        image = scorer.vision_input(feats.float()).expand(len(captions), -1, -1)
        return scorer.itm_logits(image, ids, mask).softmax(-1)[:, 1].cpu()
    _, image_itc = scorer.encode_image(feats.float())  # (1, Q, E)
    return itc_similarity(image_itc, scorer.encode_text(captions))[0].cpu()


@torch.no_grad()
def filter_image(captioner: Blip2, scorer: Blip2, feats: torch.Tensor, scorer_feats: torch.Tensor,
                 record: ImageRecord, index: int, cfg: CapFiltConfig) -> dict[str, Any]:
    """One image: sample (captioner features `feats`), score (`scorer_feats`: the filter's own
    encoder), keep the top k. Returns the per-image result written to the parts."""
    synthetic: list[str] = []
    if cfg.num_samples:
        seeds = [stream_seed(cfg.seed, index, j) for j in range(cfg.num_samples)]  # sample j of image `index`
        out = captioner.generate(feats.expand(cfg.num_samples, -1, -1), [cfg.prompt] * cfg.num_samples,
                                 cfg.sampling, seeds)
        synthetic = [clean_caption(f"{cfg.prompt} {t}".strip()) for t in out]
    candidates = [(c, "original") for c in record.captions] + [(c, "synthetic") for c in synthetic if c]
    scores = score_captions(scorer, scorer_feats, [c for c, _ in candidates], cfg.use_itm).tolist()
    order = sorted(range(len(candidates)), key=lambda i: -scores[i])  # stable: ties keep input order
    return {"index": index, "path": record.path,
            "candidates": [{"caption": c, "source": s, "score": round(float(x), 6)}
                           for (c, s), x in zip(candidates, scores, strict=True)],
            "kept": [candidates[i][0] for i in order[:cfg.top_k]],
            "kept_sources": [candidates[i][1] for i in order[:cfg.top_k]]}


def run_capfilt(captioner: Blip2, scorer: Blip2, annotations: str, out: str | Path, cfg: CapFiltConfig,
                images: str | None = None, split: str | None = None, rank: int = 0, world_size: int = 1,
                progress: bool = True, wait_for_ranks: Callable[[], None] | None = None) -> dict[str, Any] | None:
    """Filter this rank's share of the images (resuming its part file); returns the report once all
    parts are complete (None on a rank whose merge is left to the main process). Under torchrun
    `wait_for_ranks` (a barrier) holds the main process until every rank has finished its part."""
    out = Path(out)
    records = load_records(annotations, images, split)
    parts = out / "parts"
    parts.mkdir(parents=True, exist_ok=True)
    part = parts / f"rank-{rank}.jsonl"
    _drop_partial_line(part)
    done = set(_read_parts(parts))
    mine = [i for i in range(rank, len(records), world_size) if i not in done]
    write_json(out / "capfilt_config.json", {"config": asdict(cfg), "annotations": str(annotations),
                                             "split": split, "images": len(records)})
    with open(part, "a") as f:
        for i in tqdm(mine, desc=f"capfilt (rank {rank})", unit="img", disable=not progress):
            path = records[i].path
            try:
                feats = image_features(captioner, [path])
            except (OSError, ValueError, SyntaxError) as e:  # unreadable image: skipped and named
                result = {"index": i, "path": path, "skipped": f"{type(e).__name__}: {e}"}
            else:
                scorer_feats = feats if scorer is captioner else image_features(scorer, [path])
                result = filter_image(captioner, scorer, feats, scorer_feats, records[i], i, cfg)
            f.write(json.dumps(result) + "\n")
            f.flush()  # a killed run keeps every finished image
    if wait_for_ranks is not None:
        wait_for_ranks()
    if rank != 0:
        return None
    results = _read_parts(parts)
    if len(results) < len(records):
        log.info("capfilt: %d of %d images done; the other ranks' parts are not complete yet", len(results),
                 len(records))
        return None
    return _write_outputs(out, records, results, cfg, split)


def _drop_partial_line(part: Path) -> None:
    """A kill mid-write leaves half a line; cut it so appended results start on a line of their own."""
    if not part.is_file():
        return
    data = part.read_bytes()
    if data and not data.endswith(b"\n"):
        with open(part, "r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)


def _read_parts(parts: Path) -> dict[int, dict[str, Any]]:
    """Every finished image of every rank; a line cut short by a kill is ignored (and redone)."""
    results: dict[int, dict[str, Any]] = {}
    for p in sorted(parts.glob("rank-*.jsonl")):
        for line in p.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            results[int(row["index"])] = row
    return results


def _write_outputs(out: Path, records: list[ImageRecord], results: dict[int, dict[str, Any]], cfg: CapFiltConfig,
                   split: str | None) -> dict[str, Any]:
    images, examples = [], []
    kept_original = kept_synthetic = originals = images_with_synthetic = 0
    skipped = {}
    for i, r in enumerate(records):
        row = results[i]
        if "skipped" in row:
            skipped[r.path] = row["skipped"]
            continue
        originals += len(r.captions)
        n_orig = row["kept_sources"].count("original")
        kept_original += n_orig
        kept_synthetic += len(row["kept"]) - n_orig
        images_with_synthetic += n_orig < len(row["kept"])
        # an absolute filename: the dataset reads from wherever it is written (tar members included)
        images.append({"filename": r.path, "split": split or "train", "sentences": [{"raw": c} for c in row["kept"]],
                       "qa": [{"question": q, "answer": a} for q, a in r.qa]})
        if row["kept_sources"].count("synthetic") and len(examples) < 10:
            examples.append({"image": r.path, "before": r.captions,
                             "after": [dict(caption=c, source=s) for c, s in zip(row["kept"], row["kept_sources"],
                                                                                   strict=True)]})
    write_json(out / "dataset.json", {"images": images})
    report = {"images": len(images), "skipped_images": len(skipped), "skipped": skipped,
              "original_captions": originals, "kept_captions": kept_original + kept_synthetic,
              "kept_original": kept_original, "kept_synthetic": kept_synthetic,
              "dropped_original": originals - kept_original, "images_with_synthetic_kept": images_with_synthetic,
              "config": asdict(cfg), "examples": examples}
    write_json(out / "report.json", report)
    return report

