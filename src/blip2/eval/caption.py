"""Captioning metrics through the COCO caption evaluation package, and generation evaluation
(captions, plus VQA when the annotations carry questions) on a dataset split."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import torch
from tqdm import tqdm

from blip2.config import CaptionEvalConfig, DecodeConfig
from blip2.data.cache import split_features
from blip2.eval.vqa import vqa_accuracy
from blip2.io import atomic_write_text
from blip2.model import Blip2, Blip2Ensemble
from blip2.tasks import VQA_DECODE

log = logging.getLogger(__name__)


def ptb_tokenize(*texts: dict[int, list[str]]) -> list[dict[int, list[str]]]:
    """Captions per id through the COCO PTB tokenizer (Java): lower-cased, punctuation removed.

    Several dicts go through one Java process (each launch costs about a second); one dict comes
    back per dict given, with the same ids.
    """
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    merged = {(j, k): [{"caption": c} for c in v] for j, t in enumerate(texts) for k, v in t.items()}
    out = PTBTokenizer().tokenize(merged)
    return [{k: out.get((j, k), []) for k in t} for j, t in enumerate(texts)]


def caption_metrics(references: dict[int, list[str]], candidates: dict[int, str]) -> dict[str, float]:
    """BLEU-1..4, METEOR, ROUGE-L, CIDEr (x100, as papers report them) with pycocoevalcap.

    Both sides go through the PTB tokenizer first, as the COCO evaluation server does (the tokenizer
    and METEOR run Java). SPICE is not computed: it needs Stanford CoreNLP models from the network.
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge

    if set(references) != set(candidates):
        raise ValueError("references and candidates must cover the same ids")
    gts, res = ptb_tokenize(references, {k: [v] for k, v in candidates.items()})
    out: dict[str, float] = {}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    for n, b in enumerate(bleu, 1):
        out[f"bleu{n}"] = 100 * b
    meteor = Meteor()
    try:
        out["meteor"] = 100 * meteor.compute_score(gts, res)[0]
    finally:
        with meteor.lock:
            meteor.meteor_p.stdin.close()
            meteor.meteor_p.kill()
            meteor.meteor_p.wait()
    out["rouge_l"] = 100 * Rouge().compute_score(gts, res)[0]
    out["cider"] = 100 * float(Cider().compute_score(gts, res)[0])
    return out


def generate_for(model: Blip2 | Blip2Ensemble, feats: torch.Tensor | list[torch.Tensor], prompts: list[str],
                 decode: DecodeConfig, batch_size: int, progress: bool = False, desc: str = "generating") -> list[str]:
    """Generate for (N, T, C) features in batches (one prompt per row; an ensemble takes one feature
    tensor per member). Sampled rows draw from stream_seed(decode.seed, row), so the texts do not
    depend on `batch_size`."""
    from blip2.generate import stream_seed

    out: list[str] = []
    model.eval()
    n = (feats[0] if isinstance(feats, list) else feats).shape[0]
    for s in tqdm(range(0, n, batch_size), desc=desc, disable=not progress):
        rows = range(s, min(s + batch_size, n))
        seeds = [stream_seed(decode.seed, r) for r in rows] if decode.do_sample else None
        batch = _rows(feats, slice(s, s + batch_size))
        out += model.generate(batch, prompts[s:s + batch_size], decode, seeds)  # type: ignore[arg-type]
    return out


def _rows(feats: torch.Tensor | list[torch.Tensor], idx: slice | torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
    """The given rows, in float32, of one feature tensor or of each ensemble member's."""
    return [f[idx].float() for f in feats] if isinstance(feats, list) else feats[idx].float()


def evaluate_generation(model: Blip2 | Blip2Ensemble, annotations: str, images: str | None, split: str,
                        cfg: CaptionEvalConfig, cache_dir: str | None = None, num_workers: int = 2,
                        progress: bool = True, prompt: str = "", qa_template: str = "",
                        predictions: str | None = None) -> dict[str, Any]:
    """Caption metrics on `split` and, where images carry question/answer pairs, VQA accuracy.

    `predictions` names a JSONL file that receives every generated caption with its references, so
    that errors can be read beyond the few examples kept in the result. An ensemble reads the split
    through each member's encoder.
    """
    from blip2.tasks import vqa_prompt

    t0 = time.perf_counter()
    members = model.members if isinstance(model, Blip2Ensemble) else [model]
    loaded = [split_features(m.vision, annotations, images, split, cfg.max_images, cache_dir, num_workers, progress)
              for m in members]
    recs, cached = loaded[0]
    if any([r.path for r in other] != [r.path for r in recs] for other, _ in loaded[1:]):
        raise RuntimeError("ensemble members read different images of the split (an image failed for one "
                           "encoder only?): rerun with a clean feature cache")
    feats: torch.Tensor | list[torch.Tensor] = (
        [c.features for _, c in loaded] if isinstance(model, Blip2Ensemble) else cached.features)
    captions = generate_for(model, feats, [prompt] * len(recs), cfg.decode, cfg.batch_size, progress, "captioning")
    result: dict[str, Any] = {"num_images": len(recs), "skipped_images": len(cached.failed), "split": split}
    refs = {i: r.captions for i, r in enumerate(recs) if r.captions}
    if refs:
        result.update(caption_metrics(refs, {i: captions[i] for i in refs}))
        # BLEU's brevity penalty and CIDEr both punish length mismatch; these say which way it goes.
        result["mean_caption_words"] = sum(len(captions[i].split()) for i in refs) / len(refs)
        result["mean_reference_words"] = (sum(len(c.split()) for v in refs.values() for c in v)
                                          / sum(len(v) for v in refs.values()))
    if predictions:
        atomic_write_text(predictions, "".join(
            json.dumps({"image": r.path, "caption": c, "references": r.captions}) + "\n"
            for r, c in zip(recs, captions, strict=True)))
    result["examples"] = [{"image": r.path, "caption": c, "references": r.captions[:2]}
                          for r, c in list(zip(recs, captions, strict=True))[:5]]
    qa = [(i, q, a) for i, r in enumerate(recs) for q, a in r.qa]
    if qa:
        assert model.llm is not None
        idx = torch.tensor([i for i, _, _ in qa])
        prompts = [vqa_prompt(model.llm, q, qa_template) for _, q, _ in qa]
        answers = generate_for(model, _rows(feats, idx), prompts, VQA_DECODE, cfg.batch_size, progress, "vqa")
        result["vqa_accuracy"] = 100 * sum(vqa_accuracy(p, [a]) for p, (_, _, a) in zip(answers, qa, strict=True)
                                           ) / len(qa)
        result["vqa_questions"] = len(qa)
        result["vqa_examples"] = [{"question": q, "answer": a, "predicted": p}
                                  for p, (_, q, a) in list(zip(answers, qa, strict=True))[:8]]
    result["seconds"] = round(time.perf_counter() - t0, 1)
    log.info("generation on %s: %s", split, {k: round(v, 2) for k, v in result.items() if isinstance(v, float)})
    return result
