"""Weight averaging of model directories: the mean by hand, and refusals that write nothing."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from blip2.average import average_models
from blip2.cli import main
from blip2.config import Blip2Config, VisionConfig
from blip2.model import Blip2
from conftest import tiny_qformer


def _save(path, seed: int, **qformer):
    torch.manual_seed(seed)
    cfg = Blip2Config(vision=VisionConfig(image_size=64), qformer=tiny_qformer(vision_width=None, **qformer))
    Blip2.build(cfg).save(path, {"stage": 2})
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("avg")
    return [_save(root / f"m{s}", s) for s in range(3)]


def test_mean_and_weighted_mean_by_hand(models, tmp_path, capsys):
    ws = [load_file(str(m / "model.safetensors")) for m in models]
    assert main(["average", *map(str, models), "--out", str(tmp_path / "soup")]) == 0
    assert json.loads(capsys.readouterr().out)["weights"] == pytest.approx([1 / 3] * 3)
    soup = load_file(str(tmp_path / "soup" / "model.safetensors"))
    assert soup.keys() == ws[0].keys()
    float_keys = [k for k in soup if soup[k].is_floating_point()]
    assert float(max((ws[0][k] - ws[1][k]).abs().max() for k in float_keys)) > 1e-2  # different seeds
    for k in float_keys:
        torch.testing.assert_close(soup[k], (ws[0][k] + ws[1][k] + ws[2][k]) / 3, rtol=0, atol=1e-6)
    meta = average_models(models[:2], tmp_path / "w", weights=[3, 1])
    w = load_file(str(tmp_path / "w" / "model.safetensors"))
    for k in float_keys:
        torch.testing.assert_close(w[k], 0.75 * ws[0][k] + 0.25 * ws[1][k], rtol=0, atol=1e-6)
    assert meta["average_weights"] == [0.75, 0.25] and meta["stage"] == 2
    # the averaged directory is a model like any other (strict load)
    loaded = Blip2.from_dir(tmp_path / "soup")
    assert loaded.meta["averaged_from"] == [str(m) for m in models]


def test_refusals_write_nothing(models, tmp_path):
    other = _save(tmp_path / "other", 0, num_queries=6)  # another architecture
    with pytest.raises(ValueError, match="another model config.*qformer"):
        average_models([models[0], other], tmp_path / "a")
    with pytest.raises(ValueError, match=">= 2"):
        average_models(models[:1], tmp_path / "a")
    with pytest.raises(ValueError, match="one non-negative weight per model"):
        average_models(models[:2], tmp_path / "a", weights=[1.0, -1.0])
    with pytest.raises(ValueError, match="one of the models"):
        average_models(models[:2], models[1])
    with pytest.raises(FileNotFoundError, match="not a blip2 model directory"):
        average_models([models[0], tmp_path], tmp_path / "a")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((models[0] / "config.json").read_text())
    (bad / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="unreadable"):
        average_models([models[0], bad], tmp_path / "a")
    assert not (tmp_path / "a").exists()
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "note.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        average_models(models[:2], kept)
    assert [p.name for p in kept.iterdir()] == ["note.txt"]


def test_refuses_other_keys_shapes_and_dtypes(models, tmp_path):
    weights = load_file(str(models[1] / "model.safetensors"))
    key = sorted(k for k in weights if weights[k].is_floating_point())[0]
    variants = {
        "fewer": ({k: v for k, v in weights.items() if k != key}, KeyError, r"1 missing keys \['" + key),
        "shape": ({**weights, key: torch.zeros(3)}, ValueError, f"{key} has shape \\(3,\\)"),
        "dtype": ({**weights, key: weights[key].half()}, ValueError, f"{key} is torch.float16"),
    }
    for name, (state, error, pattern) in variants.items():
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text((models[1] / "config.json").read_text())
        save_file(state, str(d / "model.safetensors"))
        with pytest.raises(error, match=pattern):
            average_models([models[0], d], tmp_path / "out")
        assert not (tmp_path / "out").exists()
