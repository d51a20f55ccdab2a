"""Annotation readers: Karpathy-style JSON (with splits) and JSONL image-caption pairs."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)


@dataclass
class ImageRecord:
    path: str  # absolute image path
    captions: list[str]
    qa: list[tuple[str, str]] = field(default_factory=list)  # (question, answer) pairs, if annotated


def load_records(annotations: str | Path, images: str | Path | None = None,
                 split: str | None = None) -> list[ImageRecord]:
    """Read images with their captions, in file order.

    Karpathy JSON: {"images": [{"filename", "filepath"?, "split", "sentences": [{"raw"}],
    "qa"?: [{"question", "answer"}]}]}. JSONL: one {"image": path, "caption": text} (or "captions":
    [...], or "question" + "answer"; optional "split") per line; lines for the same image are
    grouped. Relative image paths resolve against `images` (default: an `images/` folder beside
    the annotations, else the annotations' folder). WebDataset shards written by `blip2 shards`
    (their directory, a .tar, or a brace pattern of .tar files) are read the same way.
    """
    from blip2.data.shards import is_shard_spec, load_shard_records

    if is_shard_spec(annotations):
        records = load_shard_records(annotations, split)
        if not records:
            raise ValueError(f"{annotations}: no samples for split {split!r}")
        return records
    annotations = Path(annotations)
    if not annotations.is_file():
        raise FileNotFoundError(f"annotation file {annotations} does not exist")
    root = Path(images) if images else _default_root(annotations)
    if annotations.suffix == ".jsonl":
        records = _load_jsonl(annotations, root, split)
    else:
        records = _load_karpathy(annotations, root, split)
    if not records:
        raise ValueError(f"{annotations}: no images for split {split!r}")
    return records


def has_splits(annotations: str | Path) -> bool:
    """Whether the annotations name splits (Karpathy JSON always does; JSONL and shards only with
    "split" fields)."""
    from blip2.data.shards import is_shard_spec, shard_splits

    if is_shard_spec(annotations):
        return bool(shard_splits(annotations) - {None})
    annotations = Path(annotations)
    if annotations.suffix != ".jsonl":
        return True
    with open(annotations) as f:
        return any("split" in json.loads(line) for line in f if line.strip())


def _default_root(annotations: Path) -> Path:
    beside = annotations.parent / "images"
    return beside if beside.is_dir() else annotations.parent


def _load_karpathy(path: Path, root: Path, split: str | None) -> list[ImageRecord]:
    with open(path) as f:
        doc = json.load(f)
    if "images" not in doc:
        raise ValueError(f"{path} is not Karpathy-style JSON (no top-level 'images' list)")
    out = []
    for e in doc["images"]:
        if split is not None and e.get("split") != split:
            continue
        image = root / e.get("filepath", "") / e["filename"]
        if e.get("filepath") and not image.exists() and (root / e["filename"]).exists():
            image = root / e["filename"]  # a flat image folder (filepath only names the COCO split)
        caps = [s["raw"].strip() for s in e.get("sentences", [])]
        qa = [(q["question"], q["answer"]) for q in e.get("qa", [])]
        out.append(ImageRecord(str(image), caps, qa))
    return out


def _load_jsonl(path: Path, root: Path, split: str | None) -> list[ImageRecord]:
    grouped: dict[str, ImageRecord] = {}
    has_split = False
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                image = row["image"]
            except (json.JSONDecodeError, KeyError) as e:
                raise ValueError(f"{path}:{lineno}: expected {{\"image\": ..., \"caption\": ...}} ({e})") from e
            has_split |= "split" in row
            if split is not None and "split" in row and row["split"] != split:
                continue
            caps = row.get("captions") or [row.get("caption", "")]
            full = str(root / image)
            rec = grouped.setdefault(full, ImageRecord(full, []))
            rec.captions.extend(c.strip() for c in caps if c and c.strip())
            if "question" in row and "answer" in row:
                rec.qa.append((str(row["question"]), str(row["answer"])))
    if split is not None and not has_split:
        log.info("%s has no 'split' field; using every line for split %r", path, split)
    return list(grouped.values())
