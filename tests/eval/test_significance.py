"""Paired bootstrap of caption metrics: per-image BLEU counts against pycocoevalcap and by hand,
and the properties an interval must have (zero for identical models, excludes zero for a clearly
better one, reproducible by seed)."""

from __future__ import annotations

import json
import random
import shutil

import numpy as np
import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge

from blip2.cli import main
from blip2.eval.significance import bleu_stats, compare_prediction_files, corpus_bleu, paired_bootstrap

needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="the COCO PTB tokenizer needs Java")

WORDS = "a the dog cat man woman runs sits on in grass water red blue ball with two is are playing".split()


def _corpus(n: int, seed: int) -> tuple[list[list[str]], list[str]]:
    rng = random.Random(seed)
    refs = [[" ".join(rng.choices(WORDS, k=rng.randint(4, 12))) for _ in range(rng.randint(1, 5))] for _ in range(n)]
    cands = [" ".join(rng.choices(WORDS, k=rng.randint(2, 14))) for _ in range(n)]
    return refs, cands


def test_bleu_stats_by_hand():
    # unigrams: "the" x3 clipped by the most in one reference (2); bigrams "the the" x2 clipped to 1;
    # the one trigram matches nothing; no 4-grams; both lengths 3 (the closest reference is "the the dog").
    got = bleu_stats(["the cat", "the the dog"], "the the the")
    np.testing.assert_array_equal(got, [2, 3, 1, 2, 0, 1, 0, 0, 3, 3])


def test_corpus_bleu_equals_pycocoevalcap():
    refs, cands = _corpus(60, seed=1)
    stats = np.stack([bleu_stats(r, c) for r, c in zip(refs, cands, strict=True)]).sum(0)
    ref_scores, _ = Bleu(4).compute_score({i: r for i, r in enumerate(refs)}, {i: [c] for i, c in enumerate(cands)},
                                          verbose=0)
    np.testing.assert_allclose(corpus_bleu(stats), 100 * np.array(ref_scores), rtol=1e-9, atol=1e-9)


def test_full_set_scores_equal_pycocoevalcap_and_identical_models_differ_by_zero():
    refs, cands = _corpus(40, seed=2)
    out = paired_bootstrap(refs, cands, cands, resamples=200, tokenized=True)
    gts, res = {i: r for i, r in enumerate(refs)}, {i: [c] for i, c in enumerate(cands)}
    assert out["rouge_l"]["a"] == pytest.approx(100 * Rouge().compute_score(gts, res)[0])
    assert out["cider"]["a"] == pytest.approx(100 * Cider().compute_score(gts, res)[0])
    assert out["bleu4"]["a"] == pytest.approx(100 * Bleu(4).compute_score(gts, res, verbose=0)[0][3])
    for name in ("bleu1", "bleu2", "bleu3", "bleu4", "rouge_l", "cider"):
        assert out[name]["a_minus_b"] == 0 and out[name]["ci95"] == [0.0, 0.0] and out[name]["a_better"] == 0


def test_clearly_better_model_wins_every_resample_and_seed_reproduces():
    refs, noise = _corpus(50, seed=3)
    better = [r[0] for r in refs]  # one of the references itself
    out = paired_bootstrap(refs, better, noise, resamples=300, seed=7, tokenized=True)
    for name in ("bleu4", "rouge_l", "cider"):
        lo, hi = out[name]["ci95"]
        assert 0 < lo <= out[name]["a_minus_b"] <= hi and out[name]["a_better"] == 1.0
    again = paired_bootstrap(refs, better, noise, resamples=300, seed=7, tokenized=True)
    other = paired_bootstrap(refs, better, noise, resamples=300, seed=8, tokenized=True)
    assert again["cider"]["ci95"] == out["cider"]["ci95"]
    assert other["cider"]["ci95"] != out["cider"]["ci95"]


def test_interval_narrows_with_more_images():
    # The same kind of model pair on 4x the images: a bootstrap interval shrinks about 2x.
    def width(n: int) -> float:
        refs, a = _corpus(n, seed=4)
        _, b = _corpus(n, seed=5)
        lo, hi = paired_bootstrap(refs, a, b, resamples=400, tokenized=True)["rouge_l"]["ci95"]
        return hi - lo
    assert 1.5 < width(50) / width(200) < 2.7


def test_mismatched_inputs_are_refused():
    with pytest.raises(ValueError, match="same, non-zero number of images"):
        paired_bootstrap([["a dog"]], ["a dog", "a cat"], ["a dog"], tokenized=True)


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@needs_java
def test_compare_files_through_the_cli(tmp_path, capsys):
    refs, noise = _corpus(20, seed=6)
    rows_a = [{"image": f"{i}.jpg", "caption": r[0], "references": r} for i, r in enumerate(refs)]
    rows_b = [{"image": f"{i}.jpg", "caption": c, "references": r}
              for i, (r, c) in enumerate(zip(refs, noise, strict=True))]
    _write(tmp_path / "a.jsonl", rows_a)
    _write(tmp_path / "b.jsonl", rows_b)
    assert main(["eval", "compare", str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl"), "--json",
                 "--resamples", "100"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["num_images"] == 20 and out["bleu4"]["a_better"] == 1.0 and out["cider"]["ci95"][0] > 0
    assert main(["eval", "compare", str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl"), "--resamples", "50"]) == 0
    assert "95% interval" in capsys.readouterr().out


def test_compare_files_refuses_other_images_or_foreign_files(tmp_path):
    _write(tmp_path / "a.jsonl", [{"image": "1.jpg", "caption": "a dog", "references": ["a dog"]}])
    _write(tmp_path / "b.jsonl", [{"image": "2.jpg", "caption": "a dog", "references": ["a dog"]}])
    with pytest.raises(ValueError, match="same images in the same order.*row 1"):
        compare_prediction_files(tmp_path / "a.jsonl", tmp_path / "b.jsonl")
    (tmp_path / "c.jsonl").write_text('{"caption": "a dog"}\n')
    with pytest.raises(ValueError, match="lacks image/caption/references"):
        compare_prediction_files(tmp_path / "c.jsonl", tmp_path / "a.jsonl")
