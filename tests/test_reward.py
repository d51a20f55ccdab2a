"""CIDEr-D reward: the COCO caption package's CIDEr when the idf corpus is the scored images'
references, and the properties a reward with a fixed training-corpus idf must have."""

from __future__ import annotations

import pytest
from pycocoevalcap.cider.cider import Cider

from blip2.reward import CiderD, cider_tokens

REFS = {
    0: ["a dog runs on the grass", "a brown dog running through a field", "the dog is running outside"],
    1: ["two children play in the water", "kids splash in a pool", "two kids are swimming"],
    2: ["a man rides a bike down a hill", "a cyclist rides downhill", "a man on a bicycle on a dirt road"],
    3: ["a woman sits on a bench", "a lady sitting on a park bench reading", "a woman rests on a bench"],
}
CANDIDATES = {0: "a dog runs through the grass", 1: "two kids play in a pool of water",
              2: "a woman sits on a bench", 3: "a woman sitting on a bench in a park"}


def test_equals_the_coco_package_when_the_corpus_is_the_scored_references():
    gts = {i: list(r) for i, r in REFS.items()}
    res = {i: [c] for i, c in CANDIDATES.items()}
    mean, per_image = Cider().compute_score(gts, res)
    ours = CiderD([REFS[i] for i in range(4)], tokenized=True)(list(CANDIDATES.values()), [0, 1, 2, 3])
    assert ours == pytest.approx(list(per_image), abs=1e-12)
    assert sum(ours) / 4 == pytest.approx(mean, abs=1e-12)


def test_a_reference_of_the_image_beats_a_reference_of_another_image():
    cider = CiderD([REFS[i] for i in range(4)])
    own, other = cider(["a dog runs on the grass", "a man rides a bike down a hill"], [0, 0])
    assert own > other >= 0.0


def test_ngrams_found_in_every_corpus_image_carry_no_weight():
    corpus = [["a dog", "a dog runs"], ["a cat", "a cat sits"]]  # "a" is in both images
    cider = CiderD(corpus)
    assert cider(["a", "a a a"], [0, 1]) == [0.0, 0.0]
    assert cider(["dog"], [0])[0] > 0.0


def test_raw_text_is_tokenized_like_the_evaluation():
    cider = CiderD([REFS[i] for i in range(4)])
    assert cider(["A dog, running on the grass!"], [0]) == cider(["a dog running on the grass"], [0])
    assert cider_tokens("The dog's ball; don't.") == ["the", "dog", "'s", "ball", "don", "'t"]


def test_refuses_an_empty_corpus_and_mismatched_inputs():
    with pytest.raises(ValueError, match="at least one"):
        CiderD([["a dog"], []])
    with pytest.raises(ValueError, match="2 candidates for 1 images"):
        CiderD([["a dog"]])(["a", "b"], [0])
