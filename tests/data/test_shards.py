"""WebDataset shards: write -> read gives the same samples, the streaming reader splits over ranks and
shuffles reproducibly, and training from shards equals training from the JSON source."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file

from blip2.config import load_recipe
from blip2.data.records import has_splits, load_records
from blip2.data.scenes import write_scenes
from blip2.data.shards import load_shard_records, shard_paths, stream, write_shards, write_shards_from
from blip2.io import split_member
from blip2.train.loop import train
from blip2.vision.transforms import load_rgb
from conftest import TINY_SETS


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    ann = write_scenes(root / "data", 14, 5, size=64, seed=4)
    shards = root / "shards"
    report = write_shards_from(ann, shards, maxcount=4)
    return ann, shards, report


def test_round_trip_keeps_every_sample_its_split_and_its_bytes(scenes):
    ann, shards, report = scenes
    assert report["samples"] == 19 and len(report["shards"]) == 5 and report["missing_images"] == []
    assert has_splits(shards)
    for split in ("train", "val"):
        src, got = load_records(ann, None, split), load_records(shards, None, split)
        assert [r.captions for r in got] == [r.captions for r in src]
        assert [r.qa for r in got] == [r.qa for r in src]
        for a, b in zip(src, got, strict=True):
            tar, member = split_member(b.path)
            assert Path(tar).parent == shards and member.endswith(".png")
            assert np.array_equal(np.asarray(load_rgb(a.path)), np.asarray(load_rgb(b.path)))


def test_stream_splits_over_ranks_and_shuffles_reproducibly(scenes):
    ann, shards, _ = scenes
    files = {r.captions[0]: Path(r.path).read_bytes() for s in ("train", "val") for r in load_records(ann, None, s)}
    everything = list(stream(shards))
    assert len(everything) == 19
    for s in everything:  # the original file bytes, never re-encoded
        assert s.image == files[s.meta["captions"][0]]
    ranks = [[s.path for s in stream(shards, rank=r, world_size=2)] for r in range(2)]
    assert not set(ranks[0]) & set(ranks[1])
    assert sorted(ranks[0] + ranks[1]) == sorted(s.path for s in everything)
    assert [len(r) for r in ranks] == [4 + 4 + 3, 4 + 4]  # whole shards: 0, 2, 4 and 1, 3
    order = [s.path for s in stream(shards, shuffle=8, seed=1)]
    assert sorted(order) == sorted(s.path for s in everything) and order != [s.path for s in everything]
    assert order == [s.path for s in stream(shards, shuffle=8, seed=1)]
    with pytest.raises(ValueError, match="cannot be split over 6 ranks"):
        next(stream(shards, world_size=6))


def test_missing_image_is_reported_not_packed(tmp_path, scenes):
    ann, _, _ = scenes
    records = load_records(ann, None, "val")
    gone = Path(records[1].path)
    records[1] = type(records[1])(str(tmp_path / "gone.png"), records[1].captions)
    report = write_shards(records, tmp_path / "s", maxcount=10)
    assert report["samples"] == 4 and report["missing_images"] == [str(tmp_path / "gone.png")]
    assert gone.is_file()
    assert len(load_shard_records(tmp_path / "s")) == 4
    with pytest.raises(FileNotFoundError, match="shards.json"):
        shard_paths(tmp_path)
    pattern = str(tmp_path / "s" / "shard-{000000..000001}.tar")
    with pytest.raises(FileNotFoundError, match="shard-000001.tar"):
        shard_paths(pattern)


def test_a_corrupt_member_is_skipped_and_counted(tmp_path, scenes):
    ann, _, _ = scenes
    records = load_records(ann, None, "train")[:6]
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    records[2] = type(records[2])(str(bad), records[2].captions)
    write_shards(records, tmp_path / "s", maxcount=4)
    recipe = load_recipe(None, [*TINY, f"data.train={tmp_path / 's'}", f"data.cache_dir={tmp_path / 'cache'}",
                                "train.steps=1", "eval.enabled=false"])
    summary = train(recipe, tmp_path / "run", progress=False)
    assert summary["data"]["images"] == 5 and summary["data"]["skipped_images"] == 1
    skipped = json.loads((tmp_path / "run" / "skipped_images.json").read_text())
    assert list(skipped) == [load_shard_records(tmp_path / "s")[2].path]


TINY = [*TINY_SETS, "train.batch_size=8", "train.log_every=1", "train.warmup_steps=1", "eval.k_test=3"]


@pytest.mark.parametrize("use_cache", [True, False])
def test_training_from_shards_equals_training_from_json(tmp_path, scenes, use_cache):
    ann, shards, _ = scenes
    common = [*TINY, "train.steps=3", f"data.use_cache={str(use_cache).lower()}", "data.augment=true"]
    a = train(load_recipe(None, [*common, f"data.train={ann}", f"data.cache_dir={tmp_path / 'ca'}"]),
              tmp_path / "json", progress=False)
    b = train(load_recipe(None, [*common, f"data.train={shards}", f"data.cache_dir={tmp_path / 'cb'}"]),
              tmp_path / "shards", progress=False)
    wa = load_file(str(tmp_path / "json" / "model" / "model.safetensors"))
    wb = load_file(str(tmp_path / "shards" / "model" / "model.safetensors"))
    for k in wa:
        assert wa[k].equal(wb[k]), k
    assert a["retrieval"] == b["retrieval"] | {"seconds": a["retrieval"]["seconds"]}
