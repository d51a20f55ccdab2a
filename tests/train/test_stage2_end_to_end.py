"""Stage 2 through the real entry points on CPU: stage 1 -> stage 2 (--init) -> kill -> resume
(bit-identical) -> caption / ask / eval caption / eval vqa, with a tiny Llama-style LLM on disk."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from blip2.cli import main, resolve_recipe
from blip2.config import Stage2Recipe, load_recipe
from blip2.data.scenes import write_scenes
from blip2.eval.vqa import vqa_accuracy
from blip2.model import Blip2
from blip2.train import checkpoint
from blip2.train.loop import COLLAPSED_QUERY_COS, resolve_stage2_model, train
from conftest import save_tiny_llm

STAGE1 = ["model.vision.image_size=64", "model.qformer.init=none", "model.qformer.num_layers=2",
          "model.qformer.hidden_size=32", "model.qformer.num_heads=4", "model.qformer.intermediate_size=64",
          "model.qformer.num_queries=4", "model.qformer.embed_dim=16", "train.steps=3", "train.batch_size=8",
          "data.num_workers=0", "eval.enabled=false"]
STAGE2 = ["train.steps=5", "train.batch_size=6", "train.ckpt_every=2", "train.log_every=1", "train.warmup_steps=1",
          "data.num_workers=0", "eval.max_images=4", "eval.batch_size=3",
          "eval.decode.num_beams=2", "eval.decode.max_new_tokens=4", "eval.decode.min_new_tokens=1"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("stage2")
    ann = write_scenes(root / "data", 12, 4, size=64, seed=2)
    llm_dir = save_tiny_llm(root / "llm", init_std=0.02)
    common = [f"data.train={ann}", f"data.cache_dir={root / 'cache'}"]
    argv = ["train", "stage1", "--recipe", "quickstart-stage1", "--out", str(root / "s1")]
    for s in STAGE1 + common:
        argv += ["--set", s]
    assert main(argv) == 0
    stage2 = STAGE2 + common + [f"model.llm.path={llm_dir}"]
    return root, ann, stage2


def _recipe(setup, extra=()):
    root, _, stage2 = setup
    from blip2.cli import resolve_recipe

    return load_recipe(resolve_recipe("quickstart-stage2"), [*stage2, f"stage2.init={root / 's1' / 'model'}",
                                                             *extra], Stage2Recipe)


def test_stage2_kill_resume_bit_identical_then_inference(setup, tmp_path, capsys):
    root, ann, stage2 = setup
    argv = ["train", "stage2", "--recipe", "quickstart-stage2", "--init", str(root / "s1" / "model"),
            "--out", str(tmp_path / "a")]
    for s in stage2:
        argv += ["--set", s]
    assert main(argv) == 0
    full = load_file(str(tmp_path / "a" / "model" / "model.safetensors"))
    assert "llm_proj.weight" in full and not any(k.startswith("llm.") for k in full)

    # text-only parts were not trained: identical to the stage-1 model
    s1 = load_file(str(root / "s1" / "model" / "model.safetensors"))
    assert full["qformer.embeddings.word_embeddings.weight"].equal(s1["qformer.embeddings.word_embeddings.weight"])
    assert full["itm_head.weight"].equal(s1["itm_head.weight"])
    assert not full["qformer.query_tokens"].equal(s1["qformer.query_tokens"])

    assert train(_recipe(setup), tmp_path / "b", stop_after=3, progress=False) == {"stopped_at": 3}
    assert checkpoint.latest(tmp_path / "b").name == "step-00000002"
    train(_recipe(setup), tmp_path / "b", progress=False)
    resumed = load_file(str(tmp_path / "b" / "model" / "model.safetensors"))
    for k in full:
        assert full[k].equal(resumed[k]), k

    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    gen = summary["generation"]
    assert gen["num_images"] == 4 and 0 <= gen["cider"] and "bleu4" in gen and gen["vqa_questions"] > 0
    rows = [json.loads(x) for x in open(tmp_path / "a" / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5] and all("lm" in r for r in rows)

    model_dir = str(tmp_path / "a" / "model")
    image = json.loads(ann.read_text())["images"][-1]
    image_path = str(ann.parent / "images" / image["filename"])
    capsys.readouterr()
    assert main(["caption", "--model", model_dir, image_path, "--num-beams", "2", "--max-new-tokens", "4",
                 "--min-new-tokens", "1"]) == 0
    alone = capsys.readouterr().out
    assert alone.startswith(image_path + "\t")
    # the model ensembled with itself captions as the model alone (the mean of equal distributions)
    assert main(["caption", "--model", model_dir, "--ensemble", model_dir, image_path, "--num-beams", "2",
                 "--max-new-tokens", "4", "--min-new-tokens", "1"]) == 0
    assert capsys.readouterr().out == alone
    assert main(["ask", "--model", model_dir, image_path, "is there a red square?", "--options", "yes,no"]) == 0
    ranked = [line.split("\t") for line in capsys.readouterr().out.strip().splitlines()]
    assert sorted(o for o, _ in ranked) == ["no", "yes"] and float(ranked[0][1]) >= float(ranked[1][1])

    assert main(["eval", "caption", "--model", model_dir, "--data", str(ann), "--split", "val", "--max-images", "3",
                 "--num-beams", "2", "--max-new-tokens", "4", "--min-new-tokens", "1", "--workers", "0",
                 "--cache-dir", str(root / "cache"), "--json", "--predictions", str(tmp_path / "pred.jsonl")]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {"bleu1", "bleu2", "bleu3", "bleu4", "meteor", "rouge_l", "cider"} <= set(result)
    # every generated caption is written with all its references, in split order
    preds = [json.loads(line) for line in (tmp_path / "pred.jsonl").read_text().splitlines()]
    val = [im for im in json.loads(ann.read_text())["images"] if im["split"] == "val"][:3]
    assert [p["references"] for p in preds] == [[s["raw"] for s in im["sentences"]] for im in val]
    assert [p["caption"] for p in preds[:len(result["examples"])]] == [e["caption"] for e in result["examples"]]
    assert result["mean_caption_words"] == sum(len(p["caption"].split()) for p in preds) / 3
    # the model ensembled with itself decodes as the model alone (the mean of equal distributions)
    assert main(["eval", "caption", "--model", model_dir, "--ensemble", model_dir, "--data", str(ann), "--split",
                 "val", "--max-images", "3", "--num-beams", "2", "--max-new-tokens", "4", "--min-new-tokens", "1",
                 "--workers", "0", "--cache-dir", str(root / "cache"), "--json",
                 "--predictions", str(tmp_path / "pred-ens.jsonl")]) == 0
    capsys.readouterr()
    assert (tmp_path / "pred-ens.jsonl").read_text() == (tmp_path / "pred.jsonl").read_text()
    assert main(["eval", "vqa", "--model", model_dir, "--data", str(ann), "--split", "val", "--options", "yes,no",
                 "--workers", "0", "--cache-dir", str(root / "cache"), "--max-questions", "6", "--json",
                 "--predictions", str(tmp_path / "answers.jsonl")]) == 0
    vqa = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert vqa["num_questions"] == 6 and 0 <= vqa["accuracy"] <= 100
    # every answer is written; it is the option with the higher log-likelihood, and scores the accuracy
    answers = [json.loads(line) for line in (tmp_path / "answers.jsonl").read_text().splitlines()]
    assert len(answers) == 6 and answers[:len(vqa["examples"])] == [
        {**e, "scores": a["scores"]} for e, a in zip(vqa["examples"], answers, strict=False)]
    assert all(a["predicted"] == max(a["scores"], key=a["scores"].get) for a in answers)
    assert vqa["accuracy"] == pytest.approx(
        100 * sum(vqa_accuracy(a["predicted"], a["answers"]) for a in answers) / 6)


def test_stage2_from_scratch_and_reload_generates_the_same(setup, tmp_path):
    """The no-stage-1 ablation path (Q-Former from its init), and save -> from_dir -> same outputs."""
    recipe = _recipe(setup, ["stage2.init=''", "train.steps=2", "eval.enabled=false",
                             "model.qformer.init=none", "model.vision.image_size=64", "model.qformer.num_layers=2",
                             "model.qformer.hidden_size=32", "model.qformer.num_heads=4",
                             "model.qformer.intermediate_size=64", "model.qformer.num_queries=4",
                             "model.qformer.embed_dim=16"])
    assert recipe.stage2.init == ""
    train(recipe, tmp_path / "s", progress=False)
    a = Blip2.from_dir(tmp_path / "s" / "model").eval()
    b = Blip2.from_dir(tmp_path / "s" / "model").eval()
    feats = torch.randn(2, a.vision.num_tokens, a.vision.feature_dim)
    from blip2.config import DecodeConfig

    cfg = DecodeConfig(num_beams=2, max_new_tokens=5, min_new_tokens=2)
    assert a.generate(feats, ["", "question"], cfg) == b.generate(feats, ["", "question"], cfg)


def test_stage2_takes_the_stage1_structure_but_its_own_dropout(setup, tmp_path):
    """The init's weights fix the Q-Former's shape (the recipe's defaults would not fit them); the
    dropout rates are training behaviour and follow the stage-2 recipe."""
    recipe = _recipe(setup, ["model.qformer.hidden_dropout=0.3", "model.qformer.attention_dropout=0.0",
                             "train.steps=1", "eval.enabled=false"])
    assert recipe.model.qformer.num_queries == 32  # the recipe's default, not the stage-1 model's 4
    train(recipe, tmp_path / "s", progress=False)
    saved = json.loads((tmp_path / "s" / "model" / "config.json").read_text())["model"]["qformer"]
    s1 = json.loads((setup[0] / "s1" / "model" / "config.json").read_text())["model"]["qformer"]
    assert s1["hidden_dropout"] == s1["attention_dropout"] == 0.1
    assert {k: v for k, v in saved.items() if "dropout" not in k} == {k: v for k, v in s1.items() if "dropout" not in k}
    assert (saved["hidden_dropout"], saved["attention_dropout"]) == (0.3, 0.0)
    model = Blip2.from_dir(tmp_path / "s" / "model")
    assert {m.p for m in model.qformer.modules() if isinstance(m, torch.nn.Dropout)} == {0.3}
    assert {m.attn_dropout for m in model.qformer.modules() if hasattr(m, "attn_dropout")} == {0.0}


def test_a_recipe_field_the_init_model_overrides_is_named(setup, tmp_path, caplog):
    """Fields the init model fixes replace the recipe's; one the recipe moved off its default is named
    in a warning (left at its default it says nothing), dropout rates excepted (stage 2 uses them)."""
    root = setup[0]

    def warnings_for(recipe):
        caplog.clear()
        with caplog.at_level("WARNING", logger="blip2.train.loop"):
            resolve_stage2_model(recipe)
        return [m for m in (r.getMessage() for r in caplog.records) if "replaces the recipe's" in m]

    assert warnings_for(_recipe(setup)) == []  # the model fields at their defaults: nothing to say
    recipe = _recipe(setup, ["model.qformer.num_layers=3", "model.vision.image_size=96",
                             "model.qformer.hidden_dropout=0.3"])
    (warned,) = warnings_for(recipe)
    assert warned.startswith(f"stage 2 starts from {root / 's1' / 'model'},")
    assert "model.vision.image_size=96 (it has 64)" in warned and "model.qformer.num_layers=3 (it has 2)" in warned
    assert "dropout" not in warned
    assert (recipe.model.vision.image_size, recipe.model.qformer.num_layers) == (64, 2)
    assert recipe.model.qformer.hidden_dropout == 0.3

    s2 = tmp_path / "s2"
    train(_recipe(setup, ["train.steps=1", "eval.enabled=false"]), s2, progress=False)
    scst = load_recipe(resolve_recipe("quickstart-stage2"), [*setup[2], *SCST, f"stage2.init={s2 / 'model'}",
                                                             "model.llm.max_text_len=20"], Stage2Recipe)
    (warned,) = warnings_for(scst)
    assert warned.startswith(f"SCST starts from {s2 / 'model'},") and "model.llm.max_text_len=20 (it has 24)" in warned
    assert scst.model.llm.max_text_len == 24


def test_pipeline_runs_both_stages_and_skips_a_finished_one(setup, tmp_path, caplog, monkeypatch, capsys):
    import yaml

    import blip2.train.loop
    from blip2.config import PipelineRecipe
    from blip2.train.loop import train_pipeline

    root, ann, stage2 = setup
    tiny_s1 = [s for s in STAGE1 if not s.startswith("train.steps")] + ["train.steps=2"]
    overrides = [f"stage1.{s}" for s in tiny_s1] + [f"stage2.{s}" for s in stage2] + ["stage2.eval.enabled=false"]
    overrides += [f"stage1.data.train={ann}", f"stage1.data.cache_dir={root / 'cache'}"]
    path = tmp_path / "pipe.yaml"
    path.write_text(yaml.safe_dump({"stage1": {}, "stage2": {}}))
    # every model counts as collapsed: the warning must come once per run of the pipeline (at the end
    # of stage 1), not again when stage 2 starts from that model, nor for the stage-2 model
    monkeypatch.setattr(blip2.train.loop, "COLLAPSED_QUERY_COS", -1.0)
    with caplog.at_level("WARNING", logger="blip2.train.loop"):
        summary = train_pipeline(load_recipe(path, overrides, PipelineRecipe), tmp_path / "p", progress=False)
    messages = [r.getMessage() for r in caplog.records]
    assert not [m for m in messages if "replaces the recipe's" in m]  # both sections agree
    warned = [m for m in messages if "have collapsed" in m and not m.startswith("stage 2, step")]
    assert len(warned) == 1 and warned[0].startswith("the stage-1 model:"), warned
    # (stage 2's own check while it trains fires once too: its queries count as collapsed as well)
    assert len([m for m in messages if m.startswith("stage 2, step")]) == 1
    assert summary["stage1"]["steps"] == 2 and summary["stage2"]["steps"] == 5
    init = json.loads((tmp_path / "p" / "stage2" / "init_report.json").read_text())
    assert init["stage1_model"] == str(tmp_path / "p" / "stage1" / "model")
    before = (tmp_path / "p" / "stage2" / "model" / "model.safetensors").stat().st_mtime_ns
    # again through the CLI: both stages are finished, so nothing trains, and it reports both stages'
    # steps and this invocation's wall times (which it used to print as {})
    args = [a for o in overrides for a in ("--set", o)]
    capsys.readouterr()
    assert main(["train", "pipeline", "--recipe", str(path), *args, "--out", str(tmp_path / "p")]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["stage1"]["steps"] == 2 and again["stage2"]["steps"] == 5
    assert set(again["seconds_this_invocation"]) == {"stage1", "stage2"}
    assert all(s >= 0 for s in again["seconds_this_invocation"].values())
    assert (tmp_path / "p" / "stage2" / "model" / "model.safetensors").stat().st_mtime_ns == before
    # stage 1 kept from an earlier invocation: stage 2 checks the model it starts from, once
    shutil.rmtree(tmp_path / "p" / "stage2")
    caplog.clear()
    with caplog.at_level("WARNING", logger="blip2.train.loop"):
        train_pipeline(load_recipe(path, overrides, PipelineRecipe), tmp_path / "p", progress=False)
    warned = [m for m in (r.getMessage() for r in caplog.records)
              if "have collapsed" in m and not m.startswith("stage 2, step")]
    assert len(warned) == 1 and warned[0].startswith(f"the stage-1 model {tmp_path / 'p' / 'stage1' / 'model'}:")


def test_length_grouped_batches_change_the_run_and_resume_exactly(setup, tmp_path):
    grouped = ["train.group_by_length=2"]
    train(_recipe(setup), tmp_path / "plain", progress=False)
    train(_recipe(setup, grouped), tmp_path / "full", progress=False)
    assert train(_recipe(setup, grouped), tmp_path / "cut", stop_after=3, progress=False) == {"stopped_at": 3}
    train(_recipe(setup, grouped), tmp_path / "cut", progress=False)
    weights = {name: load_file(str(tmp_path / name / "model" / "model.safetensors"))
               for name in ("plain", "full", "cut")}
    assert all(weights["full"][k].equal(weights["cut"][k]) for k in weights["full"])
    assert not weights["full"]["llm_proj.weight"].equal(weights["plain"]["llm_proj.weight"])  # other batches


def test_weight_average_is_saved_as_the_model_leaves_training_alone_and_resumes_exactly(setup, tmp_path,
                                                                                        monkeypatch):
    every_step = ["train.ckpt_every=1", "train.ema_decay=0.75"]  # warmup 1: the average starts after step 1
    raw_at: dict[int, dict[str, torch.Tensor]] = {}
    save = checkpoint.save

    def recording_save(out, step, recipe, weights, *args, **kwargs):
        raw_at[step] = {k: v.detach().clone() for k, v in weights.items()}
        return save(out, step, recipe, weights, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "save", recording_save)
    train(_recipe(setup, every_step), tmp_path / "ema", progress=False)
    monkeypatch.setattr(checkpoint, "save", save)
    train(_recipe(setup, ["train.ckpt_every=1"]), tmp_path / "plain", progress=False)
    read = {name: load_file(str(tmp_path / name)) for name in
            ("ema/model/model.safetensors", "ema/model_raw/model.safetensors", "plain/model/model.safetensors")}
    avg, raw, plain = read.values()

    # averaging changes nothing in training: the last weights are the run without it, bit for bit
    assert all(raw[k].equal(plain[k]) for k in plain)
    # model/ holds the average by hand: the step-1 weights, then avg <- 0.75 avg + 0.25 w at steps 2..5
    trained = [k for k in raw if not raw[k].equal(raw_at[1][k])]
    assert "llm_proj.weight" in trained and "qformer.query_tokens" in trained
    for k in raw:
        expect = raw_at[1][k].double()
        for step in range(2, 6):
            expect = 0.75 * expect + 0.25 * raw_at[step][k].double()
        torch.testing.assert_close(avg[k].double(), expect, rtol=1e-6, atol=1e-7, msg=k)
    assert not avg["llm_proj.weight"].equal(raw["llm_proj.weight"])

    # a killed averaged run resumes to the same average; an unaveraged checkpoint is refused
    assert train(_recipe(setup, every_step), tmp_path / "cut", stop_after=3, progress=False) == {"stopped_at": 3}
    train(_recipe(setup, every_step), tmp_path / "cut", progress=False)
    resumed = load_file(str(tmp_path / "cut" / "model" / "model.safetensors"))
    assert all(resumed[k].equal(avg[k]) for k in avg)
    assert train(_recipe(setup), tmp_path / "plain-cut", stop_after=2, progress=False) == {"stopped_at": 2}
    with pytest.raises(ValueError, match="has no weight average.*train.ema_decay=0"):
        train(_recipe(setup, every_step), tmp_path / "plain-cut", progress=False)


def _collapsed_copy(model: Path, out: Path) -> Path:
    """`model` with every query token set to the first one: identical query outputs (queries have no
    position embedding), i.e. the collapse measured on Flickr8k."""
    shutil.copytree(model, out)
    weights = load_file(str(out / "model.safetensors"))
    weights["qformer.query_tokens"] = weights["qformer.query_tokens"][:, :1].expand_as(
        weights["qformer.query_tokens"]).contiguous()
    save_file(weights, str(out / "model.safetensors"))
    return out


def test_stage2_warns_once_when_its_queries_are_still_collapsed_after_the_warmup(setup, tmp_path, caplog):
    # A near-zero learning rate keeps the identical queries identical through all 4 logged steps: no
    # warning while the warmup lasts, then one (not one per logged step after it) that names the clip fix.
    root, _, _ = setup
    collapsed = _collapsed_copy(root / "s1" / "model", tmp_path / "collapsed")
    for warmup, expect in ((5, 0), (2, 1)):
        caplog.clear()
        with caplog.at_level("WARNING", logger="blip2.train.loop"):
            train(_recipe(setup, [f"stage2.init={collapsed}", "train.steps=4", f"train.warmup_steps={warmup}",
                                  "train.lr=1e-12", "train.grad_clip=0", "eval.enabled=false"]),
                  tmp_path / f"warmup{warmup}", progress=False)
        warned = [m for m in (r.getMessage() for r in caplog.records) if m.startswith("stage 2, step")]
        assert len(warned) == expect, warned
    assert warned[0].startswith("stage 2, step 2: the query outputs have collapsed (mean cosine 1.000")
    assert "train.grad_clip=20.0 with train.grad_clip_from=0" in warned[0]
    rows = [json.loads(x) for x in open(tmp_path / "warmup2" / "metrics.jsonl")]
    assert all(r["query_cos"] > COLLAPSED_QUERY_COS for r in rows)  # the logged value the warning read


def test_stage2_warns_when_the_stage1_queries_have_collapsed(setup, tmp_path, caplog):
    # Identical query tokens give identical query outputs (queries have no position embedding), i.e.
    # the collapse measured on Flickr8k; the run must say so before it spends its budget.
    root, _, _ = setup
    s1 = json.loads((root / "s1" / "summary.json").read_text())
    assert -1.0 <= s1["query_cos"] <= 1.0
    collapsed = _collapsed_copy(root / "s1" / "model", tmp_path / "collapsed")

    for init, expect in ((root / "s1" / "model", s1["query_cos"] > COLLAPSED_QUERY_COS), (collapsed, True)):
        caplog.clear()
        with caplog.at_level("WARNING", logger="blip2.train.loop"):
            train(_recipe(setup, [f"stage2.init={init}", "train.steps=1", "eval.enabled=false"]),
                  tmp_path / init.name, progress=False)
        # the check before training (the one at the end looks at the stage-2 model, not asked here)
        warned = [m for m in (r.getMessage() for r in caplog.records)
                  if "collapsed" in m and m.startswith(f"the stage-1 model {init}")]
        assert bool(warned) is expect, warned
    assert str(collapsed) in warned[0] and "loss.query_div" in warned[0]  # names the model and the fix
    assert re.search(r"mean cosine 1\.000", warned[0])


SCST = ["stage2.use_qa=false", "train.steps=4", "train.ckpt_every=2", "scst.samples=3", "scst.max_new_tokens=5"]


def test_scst_fine_tunes_a_stage2_model_resumes_exactly_and_evaluates(setup, tmp_path, capsys):
    root, ann, stage2 = setup
    s2 = tmp_path / "s2"
    train(_recipe(setup, ["stage2.use_qa=false", "train.steps=3", "eval.enabled=false"]), s2, progress=False)
    argv = ["train", "scst", "--recipe", "quickstart-stage2", "--init", str(s2 / "model"), "--out", str(tmp_path / "a")]
    for s in [*stage2, *SCST]:
        argv += ["--set", s]
    capsys.readouterr()
    assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    assert {"bleu4", "cider"} <= set(printed)
    init = json.loads((tmp_path / "a" / "init_report.json").read_text())
    assert init == {"stage2_model": str(s2 / "model")}
    start = load_file(str(s2 / "model" / "model.safetensors"))
    full = load_file(str(tmp_path / "a" / "model" / "model.safetensors"))
    assert not full["llm_proj.weight"].equal(start["llm_proj.weight"])  # every stage-2 weight loaded, then trained
    assert full["itm_head.weight"].equal(start["itm_head.weight"])  # the text branch stays frozen
    rows = [json.loads(x) for x in open(tmp_path / "a" / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all(r["reward"] >= 0 for r in rows)
    # the model settings are the stage-2 model's, whatever the recipe says
    saved = json.loads((tmp_path / "a" / "model" / "config.json").read_text())["model"]
    assert saved == json.loads((s2 / "model" / "config.json").read_text())["model"]

    recipe = load_recipe(resolve_recipe("quickstart-stage2"), [*stage2, *SCST, f"stage2.init={s2 / 'model'}"],
                         Stage2Recipe)
    assert recipe.scst is not None
    assert train(recipe, tmp_path / "b", stop_after=2, progress=False) == {"stopped_at": 2}
    train(recipe, tmp_path / "b", progress=False)
    resumed = load_file(str(tmp_path / "b" / "model" / "model.safetensors"))
    assert all(full[k].equal(resumed[k]) for k in full)

    with pytest.raises(ValueError, match="stage-1 model"):
        train(load_recipe(resolve_recipe("quickstart-stage2"), [*stage2, *SCST, f"stage2.init={root / 's1' / 'model'}"],
                          Stage2Recipe), tmp_path / "c")
    with pytest.raises(ValueError, match="use_qa"):
        load_recipe(resolve_recipe("quickstart-stage2"), ["scst.samples=3"], Stage2Recipe)


def _three_stages(setup, tmp_path, extra: list[str]) -> tuple[Path, list[str]]:
    """A pipeline recipe file with empty stage1/stage2/scst sections, and the overrides that make its
    stages tiny: 2 steps of stage 1 and of stage 2 (not evaluated), then SCST; `extra` last."""
    import yaml

    root, ann, stage2 = setup
    tiny_s1 = [s for s in STAGE1 if not s.startswith("train.steps")] + ["train.steps=2"]
    overrides = [f"stage1.{s}" for s in tiny_s1] + [f"stage2.{s}" for s in stage2] + ["stage2.eval.enabled=false"]
    overrides += [f"stage1.data.train={ann}", f"stage1.data.cache_dir={root / 'cache'}", "stage2.train.steps=2"]
    overrides += [f"scst.{s}" for s in [*stage2, *SCST] if not s.startswith("model.")]
    path = tmp_path / "pipe.yaml"
    path.write_text(yaml.safe_dump({"stage1": {}, "stage2": {}, "scst": {}}))
    return path, [*overrides, *extra]


def test_pipeline_runs_scst_as_a_third_stage(setup, tmp_path):
    from blip2.config import PipelineRecipe
    from blip2.train.loop import train_pipeline

    # with the CIDEr-D + BLEU-4 reward
    path, overrides = _three_stages(setup, tmp_path, ["scst.eval.enabled=false", "scst.scst.bleu_weight=0.5"])
    recipe = load_recipe(path, overrides, PipelineRecipe)
    assert recipe.scst is not None and recipe.scst.scst is not None  # an empty scst: still means SCST
    assert recipe.scst.scst.bleu_weight == 0.5
    summary = train_pipeline(recipe, tmp_path / "p", progress=False)
    assert summary["scst"]["steps"] == 4 and set(summary["seconds_this_invocation"]) == {"stage1", "stage2", "scst"}
    init = json.loads((tmp_path / "p" / "scst" / "init_report.json").read_text())
    assert init == {"stage2_model": str(tmp_path / "p" / "stage2" / "model")}
    assert (tmp_path / "p" / "scst" / "loss_curves.png").is_file()


def test_pipeline_trains_one_stage2_and_scst_per_ensemble_seed_and_evaluates_them_together(setup, tmp_path):
    from blip2.config import PipelineRecipe
    from blip2.eval.caption import evaluate_generation
    from blip2.model import Blip2Ensemble
    from blip2.train.loop import train_pipeline

    root, ann, _ = setup
    path, overrides = _three_stages(setup, tmp_path, ["scst.train.steps=2", "ensemble_seeds=[3, 4]"])
    p = tmp_path / "p"
    summary = train_pipeline(load_recipe(path, overrides, PipelineRecipe), p, progress=False)
    stages = ["stage2", "scst", "member1/stage2", "member1/scst"]
    assert set(summary["seconds_this_invocation"]) == {"stage1", *stages, "ensemble"}
    assert all(summary[s]["steps"] == 2 for s in stages)
    # each member trains with its own seed, stage 2 from the one stage-1 model, SCST from its own stage 2
    seeds = [json.loads((p / s / "recipe.json").read_text())["train"]["seed"] for s in stages]
    assert seeds == [3, 3, 4, 4]
    inits = [json.loads((p / s / "init_report.json").read_text()) for s in stages]
    assert inits[0]["stage1_model"] == inits[2]["stage1_model"] == str(p / "stage1" / "model")
    assert inits[1] == {"stage2_model": str(p / "stage2" / "model")}
    assert inits[3] == {"stage2_model": str(p / "member1" / "stage2" / "model")}
    a, b = (load_file(str(p / d / "scst" / "model" / "model.safetensors")) for d in (".", "member1"))
    assert not a["llm_proj.weight"].equal(b["llm_proj.weight"])
    # the ensemble's metrics are those of the two SCST models decoded together with SCST's evaluation
    ens = json.loads((p / "ensemble.json").read_text())
    dirs = [str(p / "scst" / "model"), str(p / "member1" / "scst" / "model")]
    assert ens["models"] == dirs and summary["ensemble"] == ens
    recipe = load_recipe(path, overrides, PipelineRecipe)
    expect = evaluate_generation(Blip2Ensemble([Blip2.from_dir(d) for d in dirs]), str(ann), None, "val",
                                 recipe.scst.eval, str(root / "cache"), 0, False)
    assert ens["generation"]["examples"] == expect["examples"] and ens["generation"]["cider"] == expect["cider"]
    # a second invocation trains nothing and keeps the ensemble's evaluation
    before = [(p / f).stat().st_mtime_ns for f in ("ensemble.json", "member1/scst/model/model.safetensors")]
    again = train_pipeline(load_recipe(path, overrides, PipelineRecipe), p, progress=False)
    assert [(p / f).stat().st_mtime_ns for f in ("ensemble.json", "member1/scst/model/model.safetensors")] == before
    assert again["ensemble"] == ens
    # a member retrained after the evaluation (here: its weights newer) is evaluated again
    later = before[0] + 10**9
    os.utime(p / "member1" / "scst" / "model" / "model.safetensors", ns=(later, later))
    train_pipeline(load_recipe(path, overrides, PipelineRecipe), p, progress=False)
    assert (p / "ensemble.json").stat().st_mtime_ns > before[0]
    for bad, match in (("[3]", "two or more"), ("[3, 3]", "repeats a seed")):
        with pytest.raises(ValueError, match=match):
            load_recipe(path, [*overrides, f"ensemble_seeds={bad}"], PipelineRecipe)


def test_token_drop_trains_on_fewer_tokens_evaluates_on_all_and_resumes_exactly(setup, tmp_path, monkeypatch):
    seen: list[int] = []
    soft_prompt = Blip2.soft_prompt

    def spy(self, image_feats):
        seen.append(image_feats.shape[1])
        return soft_prompt(self, image_feats)

    monkeypatch.setattr(Blip2, "soft_prompt", spy)
    dropped = ["data.token_drop=0.5"]
    train(_recipe(setup), tmp_path / "plain", progress=False)
    n_all = seen[0]  # 64 px through EfficientNet-Lite0: a 2 x 2 map
    assert n_all == 4 and set(seen) == {n_all}
    seen.clear()
    train(_recipe(setup, dropped), tmp_path / "full", progress=False)
    # 5 training steps on half the tokens, then the end-of-run evaluation on all of them
    assert seen[:5] == [2] * 5 and set(seen[5:]) == {n_all}
    assert train(_recipe(setup, dropped), tmp_path / "cut", stop_after=3, progress=False) == {"stopped_at": 3}
    train(_recipe(setup, dropped), tmp_path / "cut", progress=False)
    weights = {name: load_file(str(tmp_path / name / "model" / "model.safetensors"))
               for name in ("plain", "full", "cut")}
    assert all(weights["full"][k].equal(weights["cut"][k]) for k in weights["full"])
    assert not weights["full"]["llm_proj.weight"].equal(weights["plain"]["llm_proj.weight"])
