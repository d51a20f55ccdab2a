"""WebDataset shards: a writer from any annotations we read, and two readers.

One sample per image: `<key>.<ext>` holds the original image bytes (never re-encoded) and
`<key>.json` holds {"filename", "split", "captions", "qa"}. The shard set is a directory of
`shard-000000.tar`, ... plus `shards.json` (the shard list and sample counts).

Readers:
- `load_shard_records`: the samples' metadata as ImageRecords whose path names the tar member
  (`.../shard-000003.tar#000001234.jpg`), so training, evaluation and the feature cache use shards
  exactly like image files (random access through the tar's member index, `blip2.io.open_binary`).
- `stream`: webdataset's streaming pipeline over the shards, split per rank and per DataLoader
  worker, with an optional shuffle buffer; for passes that read everything once in any order.
"""

from __future__ import annotations

import json
import random
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from blip2.data.records import ImageRecord
from blip2.io import MEMBER_SEP, write_json

INDEX = "shards.json"


def write_shards(records: list[ImageRecord], out: str | Path, maxcount: int = 1000,
                 splits: list[str] | None = None) -> dict:
    """Pack `records` (image bytes + captions/QA) into tar shards of at most `maxcount` samples.

    `splits` (aligned with records) is stored per sample so split filters keep working. A record
    whose image file is missing is not packed; it is listed in the returned report instead.
    """
    import webdataset as wds

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    missing: list[str] = []
    n = 0
    with wds.ShardWriter(str(out / "shard-%06d.tar"), maxcount=maxcount, verbose=0) as sink:
        for i, r in enumerate(records):
            try:
                data = Path(r.path).read_bytes()
            except OSError:
                missing.append(r.path)
                continue
            ext = Path(r.path).suffix.lower().lstrip(".") or "img"
            meta = {"filename": Path(r.path).name, "split": splits[i] if splits else None,
                    "captions": r.captions, "qa": [list(p) for p in r.qa]}
            sink.write({"__key__": f"{n:09d}", ext: data, "json": json.dumps(meta).encode()})
            n += 1
    shards = sorted(p.name for p in out.glob("shard-*.tar"))
    report = {"shards": shards, "samples": n, "maxcount": maxcount, "missing_images": missing}
    write_json(out / INDEX, report)
    return report


def write_shards_from(annotations: str | Path, out: str | Path, images: str | Path | None = None,
                      split: str | None = None, maxcount: int = 1000) -> dict:
    """Shards from Karpathy JSON / JSONL annotations (or an image folder via its JSONL): one split,
    or every split the annotations name, each sample keeping its split."""
    from blip2.data.records import load_records

    splits = [split] if split else _annotation_splits(annotations)
    records, labels = [], []
    for s in splits:
        part = load_records(annotations, images, s)
        records += part
        labels += [s] * len(part)
    return write_shards(records, out, maxcount, labels)


def _annotation_splits(annotations: str | Path) -> list[str | None]:
    """The splits named in Karpathy JSON / JSONL annotations, in first-seen order ([None] if none)."""
    path = Path(annotations)
    if path.suffix == ".jsonl":
        with open(path) as f:
            found = [json.loads(line).get("split") for line in f if line.strip()]
    else:
        with open(path) as f:
            found = [im.get("split") for im in json.load(f).get("images", [])]
    named = list(dict.fromkeys(s for s in found if s))
    return named if named and None not in found else [None]


def shard_paths(spec: str | Path) -> list[Path]:
    """A shard directory (with shards.json), one .tar, or a brace pattern (`dir/shard-{000000..000009}.tar`)."""
    spec = str(spec)
    if Path(spec).is_dir():
        index = Path(spec) / INDEX
        if not index.is_file():
            raise FileNotFoundError(f"{spec} has no {INDEX}; write shards with `blip2 shards`")
        with open(index) as f:
            return [Path(spec) / name for name in json.load(f)["shards"]]
    import braceexpand

    paths = [Path(p) for p in braceexpand.braceexpand(spec)]
    absent = [str(p) for p in paths if not p.is_file()]
    if absent:
        raise FileNotFoundError(f"shards not found: {', '.join(absent[:3])}{' ...' if len(absent) > 3 else ''}")
    return paths


def is_shard_spec(spec: str | Path) -> bool:
    s = str(spec)
    return s.endswith(".tar") or (Path(s).is_dir() and (Path(s) / INDEX).is_file())


def _samples(spec: str | Path) -> Iterator[tuple[str, dict]]:
    """(tar-member path of the image, metadata) for every sample, in shard order; only the small
    JSON members are decoded."""
    for tar_path in shard_paths(spec):
        images: dict[str, str] = {}
        metas: dict[str, dict] = {}
        with tarfile.open(tar_path) as tar:
            for m in tar:
                key, _, ext = m.name.partition(".")
                if ext == "json":
                    f = tar.extractfile(m)
                    assert f is not None
                    metas[key] = json.load(f)
                elif m.isfile():
                    images[key] = m.name
        root = tar_path.resolve()
        for key, meta in metas.items():
            if key in images:
                yield f"{root}{MEMBER_SEP}{images[key]}", meta


def load_shard_records(spec: str | Path, split: str | None = None) -> list[ImageRecord]:
    """ImageRecords for the samples of the shards (in shard order), their paths naming tar members.
    A sample without a split belongs to every split (as a JSONL line without one)."""
    return [ImageRecord(path, list(meta["captions"]), [(q, a) for q, a in meta.get("qa", [])])
            for path, meta in _samples(spec) if split is None or meta.get("split") in (None, split)]


def shard_splits(spec: str | Path) -> set[str | None]:
    return {meta.get("split") for _, meta in _samples(spec)}


@dataclass
class ShardSample:
    path: str  # tar member path, as in load_shard_records
    image: bytes
    meta: dict


def stream(spec: str | Path | list, rank: int = 0, world_size: int = 1, shuffle: int = 0, seed: int = 0,
           sequential: bool = False) -> Iterator[ShardSample]:
    """Stream every sample once: shards split over ranks (rank r takes shards r, r + world, ...)
    and over DataLoader workers (unless `sequential`: all shards in this process, in order);
    `shuffle` > 0 also shuffles shard order and samples in a buffer of that size, reproducibly
    from `seed`. `spec` may also be a list of shard paths."""
    import webdataset as wds

    urls = [str(p) for p in spec] if isinstance(spec, list) else [str(p) for p in shard_paths(spec)]
    if world_size > len(urls):
        raise ValueError(f"{len(urls)} shards cannot be split over {world_size} ranks; write more shards "
                         "(smaller --maxcount)")

    def by_rank(src):
        yield from list(src)[rank::world_size]

    ds = wds.WebDataset(urls, nodesplitter=by_rank, workersplitter=None if sequential else wds.split_by_worker,
                        shardshuffle=len(urls) if shuffle else False, seed=seed, empty_check=False)
    if shuffle:
        ds = ds.shuffle(shuffle, rng=random.Random(seed))
    for sample in ds:
        meta = json.loads(sample["json"])
        exts = [k for k in sample if not k.startswith("__") and k != "json"]
        if len(exts) != 1:
            continue  # a sample without exactly one image member is not ours
        url = str(Path(sample["__url__"]).resolve())
        yield ShardSample(f"{url}{MEMBER_SEP}{sample['__key__']}.{exts[0]}", sample[exts[0]], meta)
