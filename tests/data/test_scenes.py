import json

from blip2.data.records import load_records
from blip2.data.scenes import COLORS, SHAPES, write_scenes


def test_scenes_are_deterministic_and_consistent(tmp_path):
    a = write_scenes(tmp_path / "a", 6, 2, size=64, seed=3)
    b = write_scenes(tmp_path / "b", 6, 2, size=64, seed=3)
    da, db = json.loads(a.read_text()), json.loads(b.read_text())
    assert da["images"] == db["images"]
    assert (tmp_path / "a/images/scene_00000.png").read_bytes() == (tmp_path / "b/images/scene_00000.png").read_bytes()
    assert len(load_records(a, None, "train")) == 6 and len(load_records(a, None, "val")) == 2
    for e in da["images"]:
        assert len(e["sentences"]) == 5
        objs = e["objects"]
        for o in objs:  # every object is mentioned in the first caption
            assert f"{o['color']} {o['shape']} at the {o['position']}" in e["sentences"][0]["raw"]
            assert o["shape"] in SHAPES and o["color"] in COLORS
        qa = {q["question"]: q["answer"] for q in e["qa"]}
        assert qa["how many shapes are there?"] == ["zero", "one", "two", "three"][len(objs)]
        for q, ans in qa.items():
            if q.startswith("is there a "):
                color, shape = q[len("is there a "):-1].split()
                present = any(o["color"] == color and o["shape"] == shape for o in objs)
                assert ans == ("yes" if present else "no")
