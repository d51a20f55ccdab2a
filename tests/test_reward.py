"""Caption rewards: CIDEr-D is the COCO caption package's CIDEr when the idf corpus is the scored
images' references, sentence BLEU-4 is the package's per-image BLEU-4, and the properties each
reward must have."""

from __future__ import annotations

import math

import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider

from blip2.reward import CiderD, SentenceBleu, WeightedReward, cider_tokens

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


def test_sentence_bleu_equals_the_coco_packages_per_image_bleu4():
    candidates = {**CANDIDATES, 4: "a dog", 5: "a dog runs on the grass", 6: "zebra"}
    refs = {**REFS, 4: REFS[0], 5: REFS[0], 6: REFS[1]}
    _, per_image = Bleu(4).compute_score({i: list(r) for i, r in refs.items()}, {i: [c] for i, c in candidates.items()})
    ours = SentenceBleu([refs[i] for i in range(7)], tokenized=True)(list(candidates.values()), list(range(7)))
    assert ours == pytest.approx(list(per_image[3]), rel=1e-9, abs=1e-15)


def test_sentence_bleu_by_hand():
    bleu = SentenceBleu([["a dog runs on the grass", "the dog is running outside"]]).score
    assert bleu("a dog runs on the grass", 0) == pytest.approx(1.0)  # a reference scores 1
    # every n-gram of "a dog runs on" matches, but the closest reference length is 5, not 4
    assert bleu("a dog runs on", 0) == pytest.approx(math.exp(1 - 5 / 4))
    # 5 of 6 unigrams, 3/5 bigrams, 1/4 trigrams, 0/3 4-grams: only the 1e-15 guard is left
    assert bleu("a dog runs in the grass", 0) == pytest.approx((5 / 6 * 3 / 5 * 1 / 4 * 1e-15 / 3) ** 0.25)
    assert bleu("A dog, runs on the grass!", 0) == bleu("a dog runs on the grass", 0)


def test_weighted_reward_adds_the_weighted_terms():
    cider, bleu = CiderD([REFS[i] for i in range(4)]), SentenceBleu([REFS[i] for i in range(4)])
    texts, images = list(CANDIDATES.values()), [0, 1, 2, 3]
    mixed = WeightedReward([(1.0, cider), (0.5, bleu)])(texts, images)
    expected = [c + 0.5 * b for c, b in zip(cider(texts, images), bleu(texts, images), strict=True)]
    assert mixed == pytest.approx(expected) and mixed != pytest.approx(cider(texts, images))
    with pytest.raises(ValueError, match="at least one"):
        WeightedReward([])
