"""Feature cache: computed once, reused, invalidated by encoder/file changes, bad images skipped."""

import os

import pytest
import torch

from blip2.data.cache import FeatureCache, cached_features
from blip2.vision.transforms import eval_transform, load_rgb
from conftest import TinyEncoder, write_images


def test_cache_matches_encoder_and_is_reused(tmp_path, tiny_encoder):
    paths = write_images(tmp_path / "imgs", 5)
    first = cached_features(tiny_encoder, paths, tmp_path / "cache", num_workers=0, progress=False)
    assert tiny_encoder.calls == 5 and first.paths == paths and not first.failed
    direct = tiny_encoder(torch.stack([eval_transform(load_rgb(p), tiny_encoder.preprocess) for p in paths]))
    torch.testing.assert_close(first.features.float(), direct, atol=2e-3, rtol=1e-3)  # stored as fp16
    # a second cache object on the same directory computes nothing
    again = FeatureCache(tiny_encoder, tmp_path / "cache")
    assert again.ensure(paths, num_workers=0, progress=False) == 0
    assert torch.equal(again.load(paths).features, first.features)
    # order of the request is respected
    assert torch.equal(again.load(paths[::-1]).features, first.features.flip(0))


def test_cache_invalidated_by_encoder_and_file_changes(tmp_path):
    paths = write_images(tmp_path / "imgs", 3)
    a, b = TinyEncoder("a"), TinyEncoder("b")
    cached_features(a, paths, tmp_path / "cache", num_workers=0, progress=False)
    cached_features(b, paths, tmp_path / "cache", num_workers=0, progress=False)
    assert b.calls == 3  # another encoder identity -> its own cache
    assert len(list((tmp_path / "cache").iterdir())) == 2
    # same bytes, new mtime (a copied dataset): hashed, not re-encoded, and remembered
    os.utime(paths[1], ns=(5, 5))
    assert FeatureCache(a, tmp_path / "cache").ensure(paths, num_workers=0, progress=False) == 0
    assert FeatureCache(a, tmp_path / "cache").index["items"][paths[1]]["stat"][1] == 5
    write_images(tmp_path / "imgs", 1, seed=9)  # overwrites img0.jpg with other pixels
    os.utime(paths[0], ns=(1, 1))
    cache = FeatureCache(a, tmp_path / "cache")
    assert cache.ensure(paths, num_workers=0, progress=False) == 1


def test_corrupt_and_missing_images_are_skipped_and_counted(tmp_path, tiny_encoder):
    paths = write_images(tmp_path / "imgs", 3)
    bad = tmp_path / "imgs" / "broken.jpg"
    bad.write_bytes(b"not a jpeg at all")
    missing = str(tmp_path / "imgs" / "gone.jpg")
    result = cached_features(tiny_encoder, [paths[0], str(bad), missing, paths[1], paths[2]],
                             tmp_path / "cache", num_workers=0, progress=False)
    assert result.paths == paths and result.features.shape == (3, 4, 24)
    assert set(result.failed) == {str(bad), missing}
    assert "Error" in result.failed[missing]


@pytest.mark.slow
def test_cache_with_worker_processes_and_real_encoder(tmp_path):
    from blip2.config import VisionConfig
    from blip2.vision import build_vision_encoder

    enc = build_vision_encoder(VisionConfig(image_size=64))
    paths = write_images(tmp_path / "imgs", 6, size=80)
    res = cached_features(enc, paths, tmp_path / "cache", num_workers=2, progress=False)
    assert res.features.shape == (6, 4, 1280)
    direct = enc(torch.stack([eval_transform(load_rgb(p), enc.preprocess) for p in paths]))
    torch.testing.assert_close(res.features.float(), direct, atol=1e-2, rtol=1e-2)
