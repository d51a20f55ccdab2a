"""Caption metrics through pycocoevalcap, checked on cases worked out by hand."""

from __future__ import annotations

import math
import shutil

import pytest

from blip2.eval.caption import caption_metrics, ptb_tokenize

pytestmark = pytest.mark.skipif(shutil.which("java") is None, reason="the COCO caption tools need Java")


def test_identical_and_disjoint_captions():
    refs = {0: ["a dog runs on the grass", "a brown dog running"], 1: ["two people sit on a bench"]}
    same = caption_metrics(refs, {0: "a dog runs on the grass", 1: "two people sit on a bench"})
    assert same["bleu1"] == pytest.approx(100, abs=1e-3) and same["bleu4"] == pytest.approx(100, abs=1e-3)
    assert same["rouge_l"] == pytest.approx(100, abs=1e-3) and same["meteor"] > 90
    other = caption_metrics(refs, {0: "blue sky", 1: "green car"})
    assert other["bleu1"] < 1e-3 and other["cider"] == 0 and other["rouge_l"] == 0


def test_bleu1_brevity_penalty_by_hand():
    # 3 of 3 candidate words match; closest reference length 4 -> BP = exp(1 - 4/3)
    m = caption_metrics({0: ["a dog runs fast"]}, {0: "a dog runs"})
    assert m["bleu1"] == pytest.approx(100 * math.exp(1 - 4 / 3), abs=1e-2)


def test_one_tokenizer_call_keeps_dicts_with_the_same_ids_apart():
    refs = {0: ["A Dog, running!", "the dog's ball."], 1: ["Two people."]}
    cands = {0: ["Blue sky."], 1: ["green car ..."]}
    toks_refs, toks_cands = ptb_tokenize(refs, cands)
    assert toks_refs == {0: ["a dog running", "the dog 's ball"], 1: ["two people"]}
    assert toks_cands == {0: ["blue sky"], 1: ["green car"]}
