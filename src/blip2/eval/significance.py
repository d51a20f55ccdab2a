"""Is caption model A better than B on the same images? A paired bootstrap over images.

Differences of a few tenths of BLEU-4 between two runs are common on a 1000-image split and are
often noise. Resampling the images (the same draw for both models) and recomputing the corpus
metrics gives an interval for A - B. BLEU-1..4 come from per-image n-gram counts summed over each
resample, exactly as pycocoevalcap sums them over the corpus; CIDEr and ROUGE-L are means of
pycocoevalcap's per-image scores (CIDEr's document frequencies stay those of the full split).
METEOR is not resampled: its corpus score is not a sum or mean of per-image parts.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

# pycocoevalcap's BleuScorer smoothing constants, so that full-set scores agree with it exactly.
_TINY, _SMALL = 1e-15, 1e-9


def ngram_counts(words: Sequence[str], n: int) -> Counter:
    """How often each n-gram (a tuple of n words) occurs in `words`."""
    return Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))


def bleu_stats(references: Sequence[str], candidate: str, max_n: int = 4) -> np.ndarray:
    """Per-image BLEU statistics of tokenized (space-separated) text:
    [matches_1, guesses_1, ..., matches_n, guesses_n, candidate_len, closest_reference_len].

    Matches are clipped by the most times an n-gram occurs in any one reference; the reference
    length is the one closest to the candidate's (the shorter on ties), pycocoevalcap's default.
    """
    if not references:
        raise ValueError("every image needs at least one reference caption")
    cand = candidate.split()
    refs = [r.split() for r in references]
    row: list[float] = []
    for n in range(1, max_n + 1):
        grams = ngram_counts(cand, n)
        most: Counter = Counter()
        for ref in refs:
            for g, k in ngram_counts(ref, n).items():
                most[g] = max(most[g], k)
        row += [sum(min(k, most[g]) for g, k in grams.items()), max(len(cand) - n + 1, 0)]
    closest = min((abs(len(r) - len(cand)), len(r)) for r in refs)[1]
    return np.array(row + [len(cand), closest], dtype=np.float64)


def corpus_bleu(stats: np.ndarray) -> np.ndarray:
    """Summed statistics (..., 2n + 2) -> BLEU-1..n (..., n), x100.

    BLEU-k is the geometric mean of the first k clipped precisions times the brevity penalty
    exp(1 - reference_len / candidate_len) when the candidates are shorter.
    """
    n = (stats.shape[-1] - 2) // 2
    prec = (stats[..., 0:2 * n:2] + _TINY) / (stats[..., 1:2 * n:2] + _SMALL)  # (..., n)
    ratio = (stats[..., -2] + _TINY) / (stats[..., -1] + _SMALL)
    bp = np.where(ratio < 1, np.exp(1 - 1 / np.minimum(ratio, 1)), 1.0)
    geo = np.exp(np.cumsum(np.log(prec), axis=-1) / np.arange(1, n + 1))
    return 100 * geo * bp[..., None]


def paired_bootstrap(references: Sequence[Sequence[str]], cand_a: Sequence[str], cand_b: Sequence[str],
                     resamples: int = 2000, seed: int = 0, tokenized: bool = False) -> dict[str, Any]:
    """95% intervals of A - B for BLEU-1..4, ROUGE-L and CIDEr over `resamples` draws of the images.

    `references[i]` are image i's reference captions, `cand_a[i]` / `cand_b[i]` the two models'
    captions for it. Text goes through the COCO PTB tokenizer (Java) unless `tokenized`.
    Returns per metric the full-set scores of A and B, their difference, the interval and the share
    of resamples in which A scores higher.
    """
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    n_img = len(references)
    if not (len(cand_a) == len(cand_b) == n_img) or n_img == 0:
        raise ValueError(f"need the same, non-zero number of images on each side; got {n_img} reference sets, "
                         f"{len(cand_a)} and {len(cand_b)} captions")
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    gts = {i: list(r) for i, r in enumerate(references)}
    res_a = {i: [c] for i, c in enumerate(cand_a)}
    res_b = {i: [c] for i, c in enumerate(cand_b)}
    if not tokenized:
        from blip2.eval.caption import ptb_tokenize

        gts, res_a, res_b = ptb_tokenize(gts, res_a, res_b)

    def per_image(res: dict[int, list[str]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        bleu = np.stack([bleu_stats(gts[i], res[i][0]) for i in range(n_img)])  # (N, 10)
        rouge = np.asarray(Rouge().compute_score(gts, res)[1], dtype=np.float64)  # (N,)
        cider = np.asarray(Cider().compute_score(gts, res)[1], dtype=np.float64)  # (N,)
        return bleu, rouge, cider

    parts_a, parts_b = per_image(res_a), per_image(res_b)
    rng = np.random.default_rng(seed)
    everything = np.ones((1, n_img))

    def scores(parts: tuple[np.ndarray, np.ndarray, np.ndarray], weights: np.ndarray) -> np.ndarray:
        bleu, rouge, cider = parts
        out = [corpus_bleu(weights @ bleu), (weights @ rouge)[:, None] / n_img * 100,
               (weights @ cider)[:, None] / n_img * 100]
        return np.concatenate(out, axis=1)  # (R, 6): bleu1..4, rouge_l, cider

    full_a, full_b = scores(parts_a, everything)[0], scores(parts_b, everything)[0]
    diffs = []
    for start in range(0, resamples, 256):  # (256, N) draw counts at a time keeps memory flat for big splits
        draws = rng.multinomial(n_img, np.full(n_img, 1.0 / n_img), size=min(256, resamples - start))
        draws = draws.astype(np.float64)  # (r, N): how often each image is drawn
        diffs.append(scores(parts_a, draws) - scores(parts_b, draws))
    diff = np.concatenate(diffs)  # (R, 6)
    names = ["bleu1", "bleu2", "bleu3", "bleu4", "rouge_l", "cider"]
    out: dict[str, Any] = {"num_images": n_img, "resamples": resamples, "seed": seed}
    for j, name in enumerate(names):
        out[name] = {"a": float(full_a[j]), "b": float(full_b[j]), "a_minus_b": float(full_a[j] - full_b[j]),
                     "ci95": [float(np.percentile(diff[:, j], 2.5)), float(np.percentile(diff[:, j], 97.5))],
                     "a_better": float((diff[:, j] > 0).mean())}
    return out


def load_predictions(path: str | Path) -> list[dict[str, Any]]:
    """Rows of an `eval caption --predictions` file: {"image", "caption", "references"}."""
    rows = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n} is not JSON ({e}); pass a file written by `blip2 eval caption "
                             "--predictions`") from e
        if not {"image", "caption", "references"} <= set(row):
            raise ValueError(f"{path}:{n} lacks image/caption/references; pass a file written by "
                             "`blip2 eval caption --predictions`")
        rows.append(row)
    return rows


def compare_prediction_files(path_a: str | Path, path_b: str | Path, resamples: int = 2000,
                             seed: int = 0) -> dict[str, Any]:
    """Paired bootstrap of two `--predictions` files that cover the same images in the same order."""
    a, b = load_predictions(path_a), load_predictions(path_b)
    images_a, images_b = [r["image"] for r in a], [r["image"] for r in b]
    if images_a != images_b:
        pairs = enumerate(zip(images_a, images_b, strict=False))
        first = next((i for i, (x, y) in pairs if x != y), min(len(a), len(b)))
        raise ValueError(f"{path_a} and {path_b} do not cover the same images in the same order (first "
                         f"difference at row {first + 1}; {len(a)} vs {len(b)} rows); evaluate both models "
                         "on the same --split and --max-images")
    result = paired_bootstrap([r["references"] for r in a], [r["caption"] for r in a], [r["caption"] for r in b],
                              resamples, seed)
    result.update(a=str(path_a), b=str(path_b))
    return result


def format_comparison(result: dict[str, Any]) -> str:
    """A small table of the comparison for people."""
    lines = [f"A = {result['a']}", f"B = {result['b']}",
             f"{result['num_images']} images, {result['resamples']} paired bootstrap resamples (seed {result['seed']})",
             f"{'metric':8} {'A':>7} {'B':>7} {'A-B':>7} {'95% interval':>18} {'A better':>9}"]
    for name in ("bleu1", "bleu2", "bleu3", "bleu4", "rouge_l", "cider"):
        m = result[name]
        lo, hi = m["ci95"]
        lines.append(f"{name:8} {m['a']:7.2f} {m['b']:7.2f} {m['a_minus_b']:+7.2f} "
                     f"{f'[{lo:+.2f}, {hi:+.2f}]':>18} {100 * m['a_better']:8.1f}%")
    return "\n".join(lines)
