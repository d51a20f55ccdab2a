"""VQA scoring: the official VQAv2 answer normalisation and accuracy, and yes/no accuracy/F1."""

from __future__ import annotations

import re
from collections.abc import Sequence

_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hes": "he's", "howd": "how'd", "howll": "how'll", "hows": "how's",
    "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't", "shant": "shan't",
    "shed": "she'd", "shes": "she's", "shouldve": "should've", "shouldnt": "shouldn't", "somebodyd": "somebody'd",
    "somebodys": "somebody's", "someoned": "someone'd", "someones": "someone's", "somethingd": "something'd",
    "somethings": "something's", "thered": "there'd", "theres": "there's", "theyd": "they'd",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed": "we'd", "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's",
    "whereve": "where've", "whod": "who'd", "wholl": "who'll", "whos": "who's", "whove": "who've",
    "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've",
    "wouldnt": "wouldn't", "yall": "y'all", "youd": "you'd", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
            "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
          "?", "!"]
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")


def normalize_answer(answer: str) -> str:
    """VQAv2 evaluation normalisation: punctuation, periods, number words, articles, contractions."""
    text = answer.replace("\n", " ").replace("\t", " ").strip()
    for p in _PUNCT:  # punctuation next to a space (or a digit comma) is dropped, else becomes a space
        if (p + " " in text or " " + p in text) or _COMMA_STRIP.search(text) is not None:
            text = text.replace(p, "")
        else:
            text = text.replace(p, " ")
    text = _PERIOD_STRIP.sub("", text)
    words = []
    for w in text.lower().split():
        w = _NUMBERS.get(w, w)
        if w in _ARTICLES:
            continue
        words.append(_CONTRACTIONS.get(w, w))
    return " ".join(words)


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQAv2 accuracy: min(#annotators who gave the answer / 3, 1), averaged over the 10 leave-one-out
    subsets of the annotators. With fewer than 3 reference answers (single-answer sets such as our
    scenes) it is exact match against any normalised reference."""
    pred = normalize_answer(prediction)
    refs = [normalize_answer(a) for a in answers]
    if len(refs) < 3:
        return float(pred in refs)
    accs = []
    for i in range(len(refs)):
        others = refs[:i] + refs[i + 1:]
        accs.append(min(1.0, sum(r == pred for r in others) / 3))
    return sum(accs) / len(accs)


def to_yes_no(answer: str) -> str | None:
    """Map a free-form answer to yes/no (first yes/no word), None if it has neither."""
    for w in normalize_answer(answer).split():
        if w in ("yes", "no"):
            return w
    return None


def yes_no_scores(predictions: Sequence[str], answers: Sequence[str]) -> dict[str, float]:
    """Accuracy, precision, recall and F1 with "yes" as the positive class (POPE's convention);
    answers that are neither yes nor no count as wrong."""
    mapped = [to_yes_no(p) for p in predictions]
    tp = sum(p == "yes" and a == "yes" for p, a in zip(mapped, answers, strict=True))
    fp = sum(p == "yes" and a == "no" for p, a in zip(mapped, answers, strict=True))
    fn = sum(p != "yes" and a == "yes" for p, a in zip(mapped, answers, strict=True))
    correct = sum(p == a for p, a in zip(mapped, answers, strict=True))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"accuracy": 100 * correct / len(answers), "precision": 100 * precision, "recall": 100 * recall,
            "f1": 100 * f1, "yes_ratio": 100 * sum(p == "yes" for p in mapped) / len(answers),
            "unmapped": sum(p is None for p in mapped)}


def load_questions(path: str, images: str | None = None, split: str | None = None
                   ) -> list[tuple[str, str, list[str]]]:
    """(image path, question, reference answers) from a question file.

    Accepted: {"questions": [{"image", "question", "answer" | "answers", "split"?}]} (e.g. the
    POPE-style probe), the same entries as JSONL, or Karpathy JSON whose images carry "qa" lists.
    Relative image paths resolve against `images` (default: images/ beside the file).
    """
    import json
    from pathlib import Path

    from blip2.data.records import load_records

    p = Path(path)
    root = Path(images) if images else (p.parent / "images" if (p.parent / "images").is_dir() else p.parent)
    if p.suffix == ".jsonl":
        rows = [json.loads(line) for line in open(p) if line.strip()]
    else:
        doc = json.loads(p.read_text())
        if "images" in doc:  # Karpathy-style with qa lists
            return [(r.path, q, [a]) for r in load_records(p, images, split) for q, a in r.qa]
        if "questions" not in doc:
            raise ValueError(f"{p}: expected a 'questions' list or Karpathy-style 'images' with 'qa'")
        rows = doc["questions"]
    out = []
    for i, row in enumerate(rows):
        if split is not None and "split" in row and row["split"] != split:
            continue
        try:
            answers = row["answers"] if "answers" in row else [row["answer"]]
            answers = [a["answer"] if isinstance(a, dict) else str(a) for a in answers]
            out.append((str(root / row["image"]), str(row["question"]), answers))
        except KeyError as e:
            raise ValueError(f"{p}: question {i} lacks {e} (needs image, question, answer/answers)") from None
    if not out:
        raise ValueError(f"{p}: no questions for split {split!r}")
    return out


def evaluate_vqa(model, questions: list[tuple[str, str, list[str]]], decode=None, batch_size: int = 16,
                 options: list[str] | None = None, template: str = "", cache_dir: str | None = None,
                 num_workers: int = 2, progress: bool = True, predictions: str | None = None) -> dict:
    """Zero-shot VQA: generate short answers (or rank `options` by LLM likelihood) and score them.

    Reports VQAv2 accuracy; when every reference is yes/no, accuracy/precision/recall/F1 after mapping
    each answer to yes/no (POPE's protocol), the unmapped VQA score kept as `exact_match`.
    `predictions` names a JSONL file that receives every answer with its question and references
    (and, ranked, every option's log-likelihood), for per-category or per-image breakdowns.
    """
    import json
    import time

    import torch

    from blip2.data.cache import cached_features
    from blip2.eval.caption import generate_for
    from blip2.tasks import VQA_DECODE, rank_options, vqa_prompt

    t0 = time.perf_counter()
    paths = sorted({p for p, _, _ in questions})
    cached = cached_features(model.vision, paths, cache_dir, num_workers, progress)
    row = {p: i for i, p in enumerate(cached.paths)}
    kept = [(p, q, a) for p, q, a in questions if p in row]
    idx = torch.tensor([row[p] for p, _, _ in kept])
    prompts = [vqa_prompt(model.llm, q, template) for _, q, _ in kept]
    feats = cached.features[idx]
    model.eval()
    option_scores: list[list[float]] = []
    if options:
        preds = []
        for s in range(0, len(kept), batch_size):
            scores = rank_options(model, feats[s:s + batch_size].float(), prompts[s:s + batch_size], options)
            preds += [options[j] for j in scores.argmax(-1).tolist()]
            option_scores += scores.tolist()
    else:
        preds = generate_for(model, feats, prompts, decode or VQA_DECODE, batch_size, progress, "answering")
    acc = sum(vqa_accuracy(p, a) for p, (_, _, a) in zip(preds, kept, strict=True)) / len(kept)
    result = {"accuracy": 100 * acc,
              "num_questions": len(kept), "skipped_questions": len(questions) - len(kept),
              "mode": "ranked" if options else "generated"}
    gold = [a[0] for _, _, a in kept]
    if all(len(a) == 1 and normalize_answer(a[0]) in ("yes", "no") for _, _, a in kept):
        # POPE's protocol: map each answer to yes/no first; "accuracy" is then the mapped accuracy
        result["exact_match"] = result["accuracy"]
        result.update(yes_no_scores(preds, [normalize_answer(g) for g in gold]))
    rows = [{"image": p, "question": q, "answers": a, "predicted": x}
            for x, (p, q, a) in zip(preds, kept, strict=True)]
    if predictions:
        from blip2.io import atomic_write_text

        for r, sc in zip(rows, option_scores, strict=False):  # generated answers have no option scores
            r["scores"] = dict(zip(options or [], sc, strict=True))
        atomic_write_text(predictions, "".join(json.dumps(r) + "\n" for r in rows))
    result["examples"] = rows[:8]
    result["seconds"] = round(time.perf_counter() - t0, 1)
    return result
