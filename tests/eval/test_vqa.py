"""VQAv2 normalisation and accuracy, yes/no scoring — against hand-worked cases."""

from __future__ import annotations

import pytest

from blip2.eval.vqa import normalize_answer, to_yes_no, vqa_accuracy, yes_no_scores


@pytest.mark.parametrize("raw,norm", [
    ("Two", "2"), ("the red one.", "red 1"), ("A Dog!", "dog"), ("dont know", "don't know"),
    ("yes, it is", "yes it is"), ("1,000", "1000"), ("3.5", "3.5"), ("black-and-white", "black and white"),
])
def test_normalize_answer(raw, norm):
    assert normalize_answer(raw) == norm


def test_vqa_accuracy_leave_one_out():
    refs = ["2"] * 3 + ["3"] * 7
    # "2": subsets without a "2" annotator (7 of 10) see 3 matches -> 1; the 3 others see 2 -> 2/3
    assert vqa_accuracy("two", refs) == pytest.approx((7 * 1 + 3 * 2 / 3) / 10)
    assert vqa_accuracy("3", refs) == 1.0
    assert vqa_accuracy("4", refs) == 0.0
    assert vqa_accuracy("A circle", ["circle"]) == 1.0  # single-reference sets: exact match


def test_yes_no_scores_by_hand():
    preds = ["Yes", "no", "yes, there is", "I think so", "no"]
    gold = ["yes", "yes", "no", "yes", "no"]
    s = yes_no_scores(preds, gold)
    # mapped: yes, no, yes, None, no -> tp 1, fp 1, fn 2, correct 2 of 5
    assert s["accuracy"] == 40.0 and s["precision"] == 50.0
    assert s["recall"] == pytest.approx(100 / 3) and s["f1"] == pytest.approx(40.0)
    assert s["unmapped"] == 1 and to_yes_no("Nope") is None
