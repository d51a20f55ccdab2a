"""On-disk cache of frozen image features.

Layout: <root>/<encoder fingerprint>/{index.json, shard-00000.safetensors, ...}. The fingerprint
covers the encoder weights, the feature choice, precision and preprocessing, so changing any of
them starts a fresh cache. Each image is stored once per fingerprint, keyed by absolute path and
checked against its size and mtime (a changed file is re-encoded). Shards are append-only and
written atomically, and the index is replaced atomically after each shard, so a killed caching run
keeps what it finished. Images that cannot be decoded are recorded with their error and skipped.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from blip2.data.records import ImageRecord, load_records
from blip2.io import open_binary, read_json, source_stat, split_member, write_json
from blip2.vision import FrozenImageEncoder
from blip2.vision.transforms import Preprocess, eval_transform, load_rgb, load_rgb_bytes

log = logging.getLogger(__name__)

INDEX = "index.json"


def default_cache_root() -> Path:
    return Path(os.environ.get("BLIP2_CACHE", Path.home() / ".cache" / "blip2" / "features"))


def _digest(path: str) -> str | None:
    """Content hash: a copied dataset (new mtimes, same bytes) keeps its cached features."""
    try:
        with open_binary(path) as f:
            return hashlib.blake2b(f.read(), digest_size=16).hexdigest()
    except OSError:
        return None


class _Decode(Dataset):
    def __init__(self, paths: list[str], pre: Preprocess):
        self.paths, self.pre = paths, pre

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str]:
        return _decoded(i, partial(load_rgb, self.paths[i]), self.pre)


def _decoded(i: int, load: Callable[[], Image.Image], pre: Preprocess) -> tuple[int, torch.Tensor | None, str]:
    """(i, preprocessed pixels, "") or (i, None, the error) for an image that cannot be decoded."""
    try:
        return i, eval_transform(load(), pre), ""
    except (OSError, ValueError, SyntaxError) as e:  # PIL raises these for bad/missing files
        return i, None, f"{type(e).__name__}: {e}"


def _collate(items: list) -> list:
    return items


def _shard_batches(todo: list[str], pre: Preprocess, batch_size: int) -> Iterator[list]:
    """Items as _Decode yields them, read by streaming the shards that hold `todo` (WebDataset);
    a member that cannot be decoded is reported like a bad file, one missing from its shard too."""
    from blip2.data.shards import stream

    where = {p: i for i, p in enumerate(todo)}
    shards = list(dict.fromkeys(split_member(p)[0] for p in todo))  # type: ignore[index]
    batch: list = []
    seen = set()
    for sample in stream(shards, sequential=True):
        i = where.get(sample.path)
        if i is None:
            continue
        seen.add(i)
        batch.append(_decoded(i, partial(load_rgb_bytes, sample.image), pre))
        if len(batch) == batch_size:
            yield batch
            batch = []
    batch += [(i, None, f"FileNotFoundError: {todo[i]} is not in its shard") for i in range(len(todo)) if i not in seen]
    for s in range(0, len(batch), batch_size):
        yield batch[s:s + batch_size]


@dataclass
class CachedFeatures:
    features: torch.Tensor  # (N_ok, T, C) in the cache dtype (float16)
    paths: list[str]  # the N_ok images that decoded, in request order
    failed: dict[str, str]  # path -> error for images that could not be read


class FeatureCache:
    def __init__(self, encoder: FrozenImageEncoder, root: str | Path | None = None,
                 dtype: torch.dtype = torch.float16):
        self.encoder = encoder
        self.dir = Path(root or default_cache_root()) / encoder.fingerprint()
        self.dir.mkdir(parents=True, exist_ok=True)
        self.dtype = dtype
        self._dirty = False  # an entry's mtime was refreshed in memory (see _fresh)
        self.index = read_json(self.dir / INDEX) if (self.dir / INDEX).is_file() else {
            "fingerprint": encoder.fingerprint(), "items": {}, "shards": 0}

    def _fresh(self, path: str) -> bool:
        """Cached and unchanged: same size and mtime, or same size and content (then the new mtime is
        remembered, so a copied dataset is hashed once, not re-encoded)."""
        item = self.index["items"].get(path)
        if item is None:
            return False
        stat = source_stat(path)
        if tuple(item["stat"] or ()) == tuple(stat or ()):
            return True
        if stat is None or not item.get("digest") or not item["stat"] or item["stat"][0] != stat[0]:
            return False
        if _digest(path) != item["digest"]:
            return False
        item["stat"], self._dirty = list(stat), True
        return True

    def ensure(self, paths: list[str], batch_size: int = 32, num_workers: int = 2,
               shard_size: int = 512, progress: bool = True) -> int:
        """Encode every path not yet cached (or changed on disk); returns how many were encoded."""
        self._dirty = False
        todo = [p for p in dict.fromkeys(paths) if not self._fresh(p)]
        if self._dirty and not todo:
            write_json(self.dir / INDEX, self.index)  # remember the new mtimes of unchanged files
        if not todo:
            return 0
        bar = tqdm(total=len(todo), desc="caching image features", unit="img", disable=not progress)
        if all(split_member(p) for p in todo):  # shards: one sequential pass, not a seek per image
            loader = _shard_batches(todo, self.encoder.preprocess, batch_size)
        else:
            loader = DataLoader(_Decode(todo, self.encoder.preprocess), batch_size=batch_size,
                                num_workers=num_workers, collate_fn=_collate)
        pending: list[tuple[str, torch.Tensor]] = []
        for items in loader:
            good = [(todo[i], x) for i, x, err in items if x is not None]
            for i, _, err in items:
                if err:
                    self.index["items"][todo[i]] = {"error": err, "stat": source_stat(todo[i])}
            if good:
                feats = self.encoder(torch.stack([x for _, x in good])).to("cpu", self.dtype)  # (b, T, C)
                pending.extend(zip([p for p, _ in good], feats, strict=True))
            while len(pending) >= shard_size:
                self._write_shard(pending[:shard_size])
                pending = pending[shard_size:]
            bar.update(len(items))
        if pending:
            self._write_shard(pending)
        else:
            write_json(self.dir / INDEX, self.index)  # record errors even if no shard was written
        bar.close()
        return len(todo)

    def _write_shard(self, rows: list[tuple[str, torch.Tensor]]) -> None:
        shard = self.index["shards"]
        name = f"shard-{shard:05d}.safetensors"
        tmp = self.dir / (name + ".tmp")
        save_file({"features": torch.stack([f for _, f in rows]).contiguous()}, str(tmp))
        os.replace(tmp, self.dir / name)
        for r, (path, _) in enumerate(rows):
            self.index["items"][path] = {"shard": shard, "row": r, "stat": source_stat(path), "digest": _digest(path)}
        self.index["shards"] = shard + 1
        write_json(self.dir / INDEX, self.index)

    def load(self, paths: list[str]) -> CachedFeatures:
        """Features for `paths` (which must have been `ensure`d); failed images are left out."""
        failed = {}
        ok: list[str] = []
        by_shard: dict[int, list[tuple[int, int]]] = {}
        for path in paths:
            item = self.index["items"].get(path)
            if item is None:
                raise KeyError(f"{path} is not in the feature cache; call ensure() first")
            if "error" in item:
                failed[path] = item["error"]
                continue
            by_shard.setdefault(item["shard"], []).append((len(ok), item["row"]))
            ok.append(path)
        out: torch.Tensor | None = None
        for shard, rows in by_shard.items():
            with safe_open(str(self.dir / f"shard-{shard:05d}.safetensors"), "pt") as f:
                data = f.get_tensor("features")  # (n, T, C)
            if out is None:
                out = torch.empty((len(ok), *data.shape[1:]), dtype=data.dtype)
            dst = torch.tensor([d for d, _ in rows])
            src = torch.tensor([s for _, s in rows])
            out[dst] = data[src]
        if out is None:
            out = torch.empty((0, self.encoder.num_tokens, self.encoder.feature_dim), dtype=self.dtype)
        return CachedFeatures(out, ok, failed)


def cached_features(encoder: FrozenImageEncoder, paths: list[str], root: str | Path | None = None,
                    num_workers: int = 2, progress: bool = True) -> CachedFeatures:
    """Encode what is missing, then load; logs how many images were skipped and why."""
    cache = FeatureCache(encoder, root)
    cache.ensure(paths, num_workers=num_workers, progress=progress)
    result = cache.load(paths)
    if result.failed:
        examples = "; ".join(f"{Path(p).name}: {e}" for p, e in list(result.failed.items())[:3])
        log.warning("skipped %d of %d images that could not be read (%s)", len(result.failed), len(paths), examples)
    return result


def split_features(encoder: FrozenImageEncoder | None, annotations: str | Path, images: str | Path | None,
                   split: str, max_images: int | None = None, root: str | Path | None = None,
                   num_workers: int = 2, progress: bool = True) -> tuple[list[ImageRecord], CachedFeatures]:
    """The records of a split whose images decoded, aligned with their cached features."""
    records = load_records(annotations, images, split)[:max_images]
    if encoder is None:
        raise RuntimeError("evaluation on images needs the model's vision encoder")
    cached = cached_features(encoder, [r.path for r in records], root, num_workers, progress)
    by_path = {r.path: r for r in records}
    return [by_path[p] for p in cached.paths], cached
