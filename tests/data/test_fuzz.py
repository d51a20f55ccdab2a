"""The bad-image corpus (tests/data/fuzz): odd but valid images load, broken ones are skipped and
counted by name, and a run on a dataset mixing them with good images trains to the end."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from blip2.vision.transforms import load_rgb
from conftest import TINY_SETS

FUZZ = Path(__file__).parent / "fuzz"
EXPECTED = json.loads((FUZZ / "expected.json").read_text())
BAD = sorted(n for n, v in EXPECTED.items() if v == "skip")
TINY = [*TINY_SETS, "train.batch_size=8", "train.ckpt_every=2", "train.warmup_steps=1"]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_file_loads_as_rgb_or_is_refused(name):
    if EXPECTED[name] == "load":
        img = load_rgb(str(FUZZ / name))
        assert img.mode == "RGB" and img.width >= 1 and img.height >= 1
    else:
        with pytest.raises((OSError, ValueError)):
            load_rgb(str(FUZZ / name))


def test_16_bit_images_are_scaled_not_saturated():
    arr = np.asarray(load_rgb(str(FUZZ / "grey_16bit.png")))[..., 0].astype(int)  # a 0..65535 ramp
    assert arr.min() <= 1 and arr.max() >= 254
    assert np.all(np.diff(arr.flatten()) >= 0)  # still a ramp


def test_bombs_are_refused_before_decoding():
    with pytest.raises(ValueError, match="decompression bomb"):
        load_rgb(str(FUZZ / "bomb_100mpx.png"))  # PIL only warns at this size


@pytest.mark.parametrize("use_cache", [True, False])
def test_training_on_a_mixed_dataset_reports_exactly_the_bad_files(tmp_path, caplog, use_cache):
    from blip2.cli import RECIPES
    from blip2.config import load_recipe
    from blip2.data.scenes import write_scenes
    from blip2.train.loop import train

    ann = write_scenes(tmp_path / "data", 10, 0, size=64, seed=2)
    doc = json.loads(ann.read_text())
    rows = [{"image": str(ann.parent / "images" / e["filename"]), "caption": e["sentences"][0]["raw"]}
            for e in doc["images"]]
    rows += [{"image": str(FUZZ / n), "caption": f"a picture called {n}"} for n in sorted(EXPECTED)]
    rows.append({"image": str(tmp_path / "missing.jpg"), "caption": "an image that is not there"})
    jsonl = tmp_path / "mixed.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    overrides = [*TINY, f"data.train={jsonl}", f"data.cache_dir={tmp_path / 'cache'}",
                 f"data.use_cache={str(use_cache).lower()}", "train.steps=3"]
    recipe = load_recipe(RECIPES / "quickstart-stage1.yaml", overrides)
    with caplog.at_level(logging.WARNING):
        summary = train(recipe, tmp_path / "run", progress=False)
    assert summary["steps"] == 3
    n_good = 10 + sum(v == "load" for v in EXPECTED.values())
    assert summary["data"]["images"] == n_good and summary["data"]["skipped_images"] == len(BAD) + 1
    reported = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipped image ")]
    bad_paths = {str(FUZZ / n) for n in BAD} | {str(tmp_path / "missing.jpg")}
    assert {m.split()[2] for m in reported} == bad_paths  # every bad file named once, no good one
    assert set(json.loads((tmp_path / "run" / "skipped_images.json").read_text())) == bad_paths
