"""Caption rewards for self-critical sequence training (blip2.losses.SCSTLoss): CIDEr-D, sentence
BLEU-4, and a weighted sum of rewards.

The COCO caption package's CIDEr computes its document frequencies from the references of the
captions it scores, so a batch of 16 images would get idf weights from 80 sentences. A reward
needs them fixed from the whole training corpus (as the SCST papers do): they are computed once
here, together with every image's reference vectors, and each call only scores candidates. The
formula is the package's (tf-idf n-gram vectors for n = 1..4, clipped candidate counts, a Gaussian
length penalty with sigma 6, the mean over n and over references, x10); with the corpus equal to
the scored images' references the scores are the package's (tests/test_reward.py).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable

_TOKEN = re.compile(r"'?[a-z0-9]+")

Vec = tuple[list[dict[tuple[str, ...], float]], list[float], int]  # per-n tf-idf, per-n norm, length
# (captions, corpus index of each one's image) -> one reward per caption
Reward = Callable[[list[str], list[int]], list[float]]


def cider_tokens(text: str) -> list[str]:
    """Lower-cased words with punctuation dropped and clitics split ("dog's" -> dog 's), close to
    the PTB tokenizer the evaluation runs (which needs Java, too slow for every training step)."""
    return _TOKEN.findall(text.lower())


def _ngrams(words: list[str], n: int) -> Counter[tuple[str, ...]]:
    return Counter(tuple(words[i:i + k]) for k in range(1, n + 1) for i in range(len(words) - k + 1))


class _ReferenceReward:
    """A reward that scores each candidate against its own image's references in a fixed corpus."""

    tokenized: bool

    def _check_corpus(self, corpus: list[list[str]]) -> None:
        if not corpus or not all(corpus):
            raise ValueError(f"{type(self).__name__} needs at least one image, and at least one reference per image")

    def _words(self, text: str) -> list[str]:
        return text.split() if self.tokenized else cider_tokens(text)

    def score(self, candidate: str, image: int) -> float:
        raise NotImplementedError

    def __call__(self, candidates: list[str], images: list[int]) -> list[float]:
        """One score per (candidate, corpus image index) pair."""
        if len(candidates) != len(images):
            raise ValueError(f"{len(candidates)} candidates for {len(images)} images")
        return [self.score(c, i) for c, i in zip(candidates, images, strict=True)]


class CiderD(_ReferenceReward):
    """CIDEr-D of candidates against the references of corpus images, with the corpus' idf.

    corpus: the reference captions of every image (raw text; tokenized with `cider_tokens`, or
    pass `tokenized=True` for captions that are already space-separated tokens).
    """

    def __init__(self, corpus: list[list[str]], n: int = 4, sigma: float = 6.0, tokenized: bool = False):
        self._check_corpus(corpus)
        self.n, self.sigma, self.tokenized = n, sigma, tokenized
        counts = [[_ngrams(self._words(r), n) for r in refs] for refs in corpus]
        df: Counter[tuple[str, ...]] = Counter()
        for refs in counts:
            df.update({g for c in refs for g in c})  # an n-gram counts once per image
        self.log_df = {g: math.log(v) for g, v in df.items()}
        self.log_n = math.log(len(corpus))
        self.refs = [[self._vec(c) for c in refs] for refs in counts]

    def _vec(self, counts: Counter[tuple[str, ...]]) -> Vec:
        vec: list[dict[tuple[str, ...], float]] = [{} for _ in range(self.n)]
        norm = [0.0] * self.n
        length = 0
        for g, tf in counts.items():
            k = len(g) - 1
            w = tf * (self.log_n - self.log_df.get(g, 0.0))  # unseen n-grams: df 1, log 0
            vec[k][g] = w
            norm[k] += w * w
            if k == 1:  # the package counts bigrams as the length (kept for parity)
                length += tf
        return vec, [math.sqrt(x) for x in norm], length

    def score(self, candidate: str, image: int) -> float:
        """CIDEr-D of one candidate against corpus image `image`'s references (x10, as the package)."""
        vec, norm, length = self._vec(_ngrams(self._words(candidate), self.n))
        refs = self.refs[image]
        total = 0.0
        for rvec, rnorm, rlength in refs:
            penalty = math.exp(-((length - rlength) ** 2) / (2 * self.sigma ** 2))
            for k in range(self.n):
                dot = sum(min(w, rvec[k].get(g, 0.0)) * rvec[k].get(g, 0.0) for g, w in vec[k].items())
                if norm[k] and rnorm[k]:
                    dot /= norm[k] * rnorm[k]
                total += dot * penalty
        return 10.0 * total / (self.n * len(refs))


class SentenceBleu(_ReferenceReward):
    """BLEU-4 of one candidate against its image's references, as the COCO caption package scores one
    image (its per-image list): clipped n-gram precisions for n = 1..4 with the package's 1e-15 / 1e-9
    guards instead of smoothing, their geometric mean, and a brevity penalty against the reference
    length closest to the candidate's. A candidate without a matching 4-gram scores ~1e-4, so as a
    reward it pays for whole phrases of the references, and its brevity penalty pays for length.

    corpus: the reference captions of every image, as for `CiderD`.
    """

    def __init__(self, corpus: list[list[str]], n: int = 4, tokenized: bool = False):
        self._check_corpus(corpus)
        self.n, self.tokenized = n, tokenized
        self.refs: list[tuple[list[int], dict[tuple[str, ...], int]]] = []
        for refs in corpus:
            lengths, maxcounts = [], {}
            for r in refs:
                words = self._words(r)
                lengths.append(len(words))
                for g, c in _ngrams(words, n).items():
                    maxcounts[g] = max(maxcounts.get(g, 0), c)
            self.refs.append((lengths, maxcounts))

    def score(self, candidate: str, image: int) -> float:
        """BLEU-4 (in [0, 1]) of one candidate against corpus image `image`'s references."""
        words = self._words(candidate)
        lengths, maxcounts = self.refs[image]
        correct = [0] * self.n
        for g, c in _ngrams(words, self.n).items():
            correct[len(g) - 1] += min(c, maxcounts.get(g, 0))
        bleu = 1.0
        for k in range(self.n):
            bleu *= (correct[k] + 1e-15) / (max(0, len(words) - k) + 1e-9)
        bleu **= 1.0 / self.n
        reflen = min((abs(r - len(words)), r) for r in lengths)[1]
        ratio = (len(words) + 1e-15) / (reflen + 1e-9)
        return bleu * math.exp(1 - 1 / ratio) if ratio < 1 else bleu


class WeightedReward:
    """sum_i weight_i * reward_i(candidates, images): e.g. CIDEr-D plus BLEU-4, so that SCST pays for
    the metric it is judged on as well as for the consensus one."""

    def __init__(self, terms: list[tuple[float, Reward]]):
        if not terms:
            raise ValueError("WeightedReward needs at least one (weight, reward) term")
        self.terms = terms

    def __call__(self, candidates: list[str], images: list[int]) -> list[float]:
        total = [0.0] * len(candidates)
        for weight, reward in self.terms:
            total = [t + weight * r for t, r in zip(total, reward(candidates, images), strict=True)]
        return total
