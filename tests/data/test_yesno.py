import json
from collections import Counter

import pytest

from blip2.cli import main
from blip2.data.records import load_records
from blip2.data.yesno import CATEGORY_WORDS, QUESTION, add_yesno_questions, derive_questions, mentioned_categories
from blip2.eval.vqa import load_questions


def _cat(question: str) -> str:
    return question.removeprefix("Is there a ").removesuffix(" in the image?")


def test_the_80_coco_categories():
    assert len(CATEGORY_WORDS) == 80 and len(set(CATEGORY_WORDS)) == 80
    assert {"person", "dining table", "sports ball", "hair drier", "toothbrush"} <= set(CATEGORY_WORDS)


@pytest.mark.parametrize("caption, expected", [
    ("A boy in a tie-dye shirt throws a Frisbee to his dog .", {"person", "frisbee", "dog"}),
    ("A man in an orange shirt rides a bike", {"person", "bicycle"}),  # orange the colour is no fruit
    ("a girl hugs her teddy bear", {"person", "teddy bear"}),  # not a bear
    ("A man rides a dirt bike", {"person", "motorcycle"}),  # not a bicycle
    ("a hot dog stand on the street", {"hot dog"}),  # not a dog
    ("Two dogs play with a ball in the snow", {"dog", "sports ball"}),
    ("people on jet   skis", {"person"}),  # neither a jet nor skis; any run of spaces
    ("The black   labrador jumps", {"dog"}),
    ("A landscape with mountains", set()),
    ("Mentioning a carpet, a category word inside another word", set()),
])
def test_mentioned_categories(caption, expected):
    assert mentioned_categories([caption]) == expected


def test_mentions_are_pooled_over_the_captions():
    assert mentioned_categories(["A dog .", "A man on a bench ."]) == {"dog", "person", "bench"}


def test_derived_questions_are_balanced_and_consistent_with_the_captions():
    caps = [["A man and a dog on a bench with a ball ."], ["A cat ."], ["Mountains ."], ["Two boys ."]]
    qa = derive_questions(caps, per_image=2, negatives="random", seed=3)
    for c, pairs in zip(caps, qa, strict=True):
        named = mentioned_categories(c)
        yes = [_cat(q) for q, a in pairs if a == "yes"]
        no = [_cat(q) for q, a in pairs if a == "no"]
        assert len(yes) == min(2, len(named)) and len(no) == len(yes)
        assert set(yes) <= named and not set(no) & named
        assert len(set(yes + no)) == len(pairs)
        assert all(q == QUESTION.format(_cat(q)) for q, _ in pairs)
    assert qa[2] == []  # nothing named: no question (POPE asks only about images with objects)
    assert derive_questions(caps, 2, "random", 3) == qa
    assert derive_questions(caps, 2, "random", 4) != qa


def test_frequency_negatives_ask_common_categories_both_ways():
    # 200 images: half name a dog, half a man on a bench. Uniform negatives almost never ask about
    # the dog where there is none (1/78 per draw); frequency-weighted ones do ~40% of the time
    # (weight 101 against 77 categories of weight 1), so "dog" stops giving its answer away.
    caps = [["A dog runs ."]] * 100 + [["A man sits on a bench ."]] * 100
    ratios = {}
    for mode in ("random", "frequency"):
        qa = derive_questions(caps, per_image=1, negatives=mode, seed=0)
        counts = Counter((_cat(q), a) for pairs in qa for q, a in pairs)
        ratios[mode] = counts["dog", "no"] / counts["dog", "yes"]
    assert ratios["random"] < 0.1 < 0.25 < ratios["frequency"] < 0.6


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="negatives must be"):
        derive_questions([["a dog"]], negatives="popular")
    with pytest.raises(ValueError, match="per_image"):
        derive_questions([["a dog"]], per_image=0)


def _karpathy(tmp_path):
    doc = {"images": [
        {"filename": "a.jpg", "split": "train", "sentences": [{"raw": "A dog on the grass ."}],
         "qa": [{"question": "What colour is the dog?", "answer": "brown"}]},
        {"filename": "b.jpg", "split": "train", "sentences": [{"raw": "A man rides a bike ."}]},
        {"filename": "c.jpg", "split": "val", "sentences": [{"raw": "Two girls with a kite ."}]},
    ]}
    path = tmp_path / "d.json"
    path.write_text(json.dumps(doc))
    return path


def test_written_file_trains_and_evaluates(tmp_path):
    src = _karpathy(tmp_path)
    out = tmp_path / "out" / "yesno.json"
    report = add_yesno_questions(src, out, per_image=3, seed=0)
    assert report["splits"]["train"]["questions"] == 2 + 4 and report["splits"]["val"]["questions"] == 4
    assert [p.name for p in out.parent.iterdir()] == ["yesno.json"]  # no temporary file left
    train = load_records(out, tmp_path, "train")
    assert train[0].qa[0] == ("What colour is the dog?", "brown")  # existing questions kept, first
    assert sorted(a for _, a in train[0].qa[1:]) == ["no", "yes"]
    val = load_questions(str(out), str(tmp_path), "val")
    assert {_cat(q) for _, q, a in val if a == ["yes"]} == {"person", "kite"}
    assert all(p == str(tmp_path / "c.jpg") for p, _, _ in val)
    assert json.loads(out.read_text())["yesno_derivation"]["negatives"] == "frequency"


def test_not_karpathy_is_refused_before_writing(tmp_path):
    bad = tmp_path / "q.json"
    bad.write_text(json.dumps({"questions": []}))
    with pytest.raises(ValueError, match="not Karpathy-style"):
        add_yesno_questions(bad, tmp_path / "out.json")
    assert not (tmp_path / "out.json").exists()


def test_cli(tmp_path, capsys):
    src = _karpathy(tmp_path)
    assert main(["yesno", "--data", str(src), "--out", str(tmp_path / "o.json"), "--per-image", "1",
                 "--negatives", "random"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["negatives"] == "random" and report["splits"]["train"]["yes"] == 2
