import json

import pytest

from blip2.data.records import load_records


def test_karpathy_splits_and_paths(tmp_path):
    doc = {"images": [
        {"filename": "a.jpg", "split": "train", "sentences": [{"raw": " A dog . "}, {"raw": "a cat"}]},
        {"filename": "b.jpg", "filepath": "val2014", "split": "val", "sentences": [{"raw": "x"}]},
    ]}
    ann = tmp_path / "d.json"
    ann.write_text(json.dumps(doc))
    train = load_records(ann, tmp_path / "imgs", "train")
    assert [(r.path, r.captions) for r in train] == [(str(tmp_path / "imgs" / "a.jpg"), ["A dog .", "a cat"])]
    val = load_records(ann, tmp_path / "imgs", "val")
    assert val[0].path == str(tmp_path / "imgs" / "val2014" / "b.jpg")
    # a flat folder (coco_mini keeps filepath but not the sub-folder): the file that exists wins
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "b.jpg").write_bytes(b"")
    assert load_records(ann, tmp_path / "imgs", "val")[0].path == str(tmp_path / "imgs" / "b.jpg")
    (tmp_path / "imgs" / "val2014").mkdir()
    (tmp_path / "imgs" / "val2014" / "b.jpg").write_bytes(b"")
    assert load_records(ann, tmp_path / "imgs", "val")[0].path == str(tmp_path / "imgs" / "val2014" / "b.jpg")
    with pytest.raises(ValueError, match="no images for split 'test'"):
        load_records(ann, None, "test")


def test_jsonl_groups_captions_by_image(tmp_path):
    ann = tmp_path / "pairs.jsonl"
    ann.write_text("\n".join(json.dumps(r) for r in [
        {"image": "x.png", "caption": "one"}, {"image": "y.png", "caption": "two"},
        {"image": "x.png", "caption": "three"}]) + "\n")
    recs = load_records(ann, tmp_path)
    assert [(r.path.split("/")[-1], r.captions) for r in recs] == [("x.png", ["one", "three"]), ("y.png", ["two"])]


def test_jsonl_bad_line_names_the_line(tmp_path):
    ann = tmp_path / "pairs.jsonl"
    ann.write_text('{"image": "x.png", "caption": "ok"}\n{"caption": "no image"}\n')
    with pytest.raises(ValueError, match="pairs.jsonl:2"):
        load_records(ann, tmp_path)


def test_real_flickr8k_annotations():
    from pathlib import Path

    from conftest import SHARED

    val = load_records(SHARED / "data" / "flickr8k" / "dataset_flickr8k.json", None, "val")
    assert len(val) == 1000 and all(len(r.captions) == 5 for r in val)
    assert Path(val[0].path).is_file()


def test_has_splits(tmp_path):
    from blip2.data.records import has_splits

    with_split = tmp_path / "a.jsonl"
    with_split.write_text('{"image": "x.png", "caption": "a \\"split\\" word", "split": "val"}\n')
    without = tmp_path / "b.jsonl"
    without.write_text('{"image": "x.png", "caption": "the word \\"split\\" in a caption"}\n\n')
    assert has_splits(with_split) and not has_splits(without)
    assert has_splits(tmp_path / "karpathy.json")  # Karpathy JSON always carries splits
