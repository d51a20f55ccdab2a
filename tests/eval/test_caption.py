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


def test_an_ensemble_of_models_with_different_encoders_captions_a_split(tmp_path):
    """evaluate_generation with a Blip2Ensemble reads the split through each member's own encoder
    (64 px -> 4 tokens, 96 px -> 9 tokens): its captions equal a by-hand path from the image files
    through each member's preprocessing, encoder and soft prompt into ensemble decoding."""
    import json

    import torch

    from blip2.config import Blip2Config, CaptionEvalConfig, DecodeConfig, LLMConfig, VisionConfig
    from blip2.data.scenes import write_scenes
    from blip2.eval.caption import evaluate_generation
    from blip2.generate import generate_ensemble_ids
    from blip2.model import Blip2, Blip2Ensemble
    from blip2.vision.transforms import eval_transform, load_rgb
    from conftest import save_tiny_llm, tiny_qformer

    ann = write_scenes(tmp_path / "data", 0, 3, size=80, seed=1)
    llm = LLMConfig(path=str(save_tiny_llm(tmp_path / "llm", init_std=0.3)), max_text_len=8)
    members = []
    for seed, size in ((0, 64), (1, 96)):
        torch.manual_seed(seed)
        cfg = Blip2Config(vision=VisionConfig(image_size=size), qformer=tiny_qformer(vision_width=None), llm=llm)
        members.append(Blip2.build(cfg).eval())
    ens = Blip2Ensemble(members)
    decode = DecodeConfig(num_beams=3, max_new_tokens=6, min_new_tokens=2)
    result = evaluate_generation(ens, str(ann), None, "val", CaptionEvalConfig(batch_size=2, decode=decode),
                                 str(tmp_path / "cache"), num_workers=0, progress=False,
                                 predictions=str(tmp_path / "pred.jsonl"))
    preds = [json.loads(line) for line in (tmp_path / "pred.jsonl").read_text().splitlines()]
    assert result["num_images"] == 3 and len(preds) == 3

    with torch.no_grad():
        softs = []
        for m in members:
            pixels = torch.stack([eval_transform(load_rgb(p["image"]), m.vision.preprocess) for p in preds])
            feats = m.image_features(pixels)  # (3, 4 or 9, 1280)
            assert feats.shape[1] == (4 if m.cfg.vision.image_size == 64 else 9)
            softs.append(m.soft_prompt(feats))
        ids = generate_ensemble_ids([(m.llm, s) for m, s in zip(members, softs, strict=True)], [[]] * 3, decode)
    assert [p["caption"] for p in preds] == [members[0].llm.decode(x) for x in ids]
    alone = evaluate_generation(members[0], str(ann), None, "val", CaptionEvalConfig(batch_size=2, decode=decode),
                                str(tmp_path / "cache"), num_workers=0, progress=False)
    assert alone["examples"] != result["examples"]  # the second member changes the captions

    stage1 = Blip2.build(Blip2Config(vision=VisionConfig(image_size=64), qformer=tiny_qformer(vision_width=None)))
    with pytest.raises(ValueError, match="stage-1 model"):
        Blip2Ensemble([members[0], stage1])
    with pytest.raises(ValueError, match="at least two"):
        Blip2Ensemble([members[0]])
    with pytest.raises(ValueError, match="one per member"):
        ens.generate([torch.zeros(1, 4, 1280)])
