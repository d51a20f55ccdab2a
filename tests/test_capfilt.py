"""CapFilt: the kept captions are the top-k by a score recomputed independently, the report counts
match the dataset, and the result does not depend on interruptions or on the number of ranks."""

from __future__ import annotations

import json

import pytest
import torch

from blip2.capfilt import CapFiltConfig, run_capfilt
from blip2.config import Blip2Config, DecodeConfig, LLMConfig, VisionConfig
from blip2.data.records import load_records
from blip2.data.scenes import write_scenes
from blip2.model import Blip2
from blip2.retrieval import embed_gallery
from blip2.tasks import image_features
from conftest import save_tiny_llm, tiny_qformer

CFG = CapFiltConfig(num_samples=3, top_k=2, seed=7, sampling=DecodeConfig(
    num_beams=1, do_sample=True, top_p=0.9, max_new_tokens=6, min_new_tokens=2))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("capfilt")
    ann = write_scenes(root / "data", 4, 5, size=64, seed=5)
    llm_dir = save_tiny_llm(root / "llm", init_std=0.3)
    torch.manual_seed(0)
    cfg = Blip2Config(vision=VisionConfig(image_size=64), qformer=tiny_qformer(vision_width=None),
                      llm=LLMConfig(path=str(llm_dir), max_prompt_len=8, max_text_len=8))
    model = Blip2.build(cfg).eval()
    return model, ann


def test_kept_captions_are_the_top_k_by_an_independent_score(setup, tmp_path):
    model, ann = setup
    report = run_capfilt(model, model, str(ann), tmp_path, CFG, split="val", progress=False)
    assert report is not None
    records = load_records(ann, None, "val")
    parts = {json.loads(x)["index"]: json.loads(x) for x in (tmp_path / "parts" / "rank-0.jsonl").open()}
    dataset = json.loads((tmp_path / "dataset.json").read_text())["images"]
    assert len(dataset) == len(records) == report["images"] == 5
    n_synth = 0
    for i, (r, entry) in enumerate(zip(records, dataset, strict=True)):
        cands = parts[i]["candidates"]
        assert [c["caption"] for c in cands if c["source"] == "original"] == r.captions
        synth = [c["caption"] for c in cands if c["source"] == "synthetic"]
        assert 1 <= len(synth) <= CFG.num_samples
        n_synth += len(synth)
        # independent: the retrieval evaluation's gallery embedding, cosine max over queries, by hand
        gallery = embed_gallery(model, image_features(model, [r.path]), [c["caption"] for c in cands])
        sim = (gallery.image_itc[0] @ gallery.text_itc.t()).max(0).values  # (Q, E) x (E, n) -> (n,)
        torch.testing.assert_close(torch.tensor([c["score"] for c in cands]), sim, atol=1e-5, rtol=0)
        best = sim.argsort(descending=True, stable=True)[: CFG.top_k].tolist()
        kept = [s["raw"] for s in entry["sentences"]]
        assert kept == [cands[j]["caption"] for j in best]
        assert entry["filename"] == r.path and entry["split"] == "val"
    assert report["kept_captions"] == 5 * CFG.top_k == report["kept_original"] + report["kept_synthetic"]
    assert report["original_captions"] == sum(len(r.captions) for r in records)
    assert report["dropped_original"] == report["original_captions"] - report["kept_original"]
    # the written dataset is a training input like any other
    again = load_records(tmp_path / "dataset.json", None, "val")
    assert [r.path for r in again] == [r.path for r in records]


def test_interrupted_and_multi_rank_runs_give_the_same_dataset(setup, tmp_path):
    model, ann = setup
    run_capfilt(model, model, str(ann), tmp_path / "one", CFG, split="val", progress=False)
    want = (tmp_path / "one" / "dataset.json").read_text()

    # killed after two images, the last line cut in half: the rerun redoes only what is missing
    lines = (tmp_path / "one" / "parts" / "rank-0.jsonl").read_text().splitlines()
    (tmp_path / "killed" / "parts").mkdir(parents=True)
    (tmp_path / "killed" / "parts" / "rank-0.jsonl").write_text("\n".join(lines[:2]) + "\n" + lines[2][:40])
    run_capfilt(model, model, str(ann), tmp_path / "killed", CFG, split="val", progress=False)
    assert (tmp_path / "killed" / "dataset.json").read_text() == want

    # two ranks, the second one finishing first: rank 0 merges once both parts are complete
    assert run_capfilt(model, model, str(ann), tmp_path / "two", CFG, split="val", rank=1, world_size=2,
                       progress=False) is None
    report = run_capfilt(model, model, str(ann), tmp_path / "two", CFG, split="val", rank=0, world_size=2,
                         progress=False)
    assert report is not None and (tmp_path / "two" / "dataset.json").read_text() == want


def test_an_unreadable_image_is_skipped_and_named(setup, tmp_path):
    model, ann = setup
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    records = load_records(ann, None, "val")[:3]
    lines = [{"image": r.path, "caption": r.captions[0]} for r in records]
    lines.insert(1, {"image": str(bad), "caption": "a red square"})
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(x) + "\n" for x in lines))
    report = run_capfilt(model, model, str(data), tmp_path / "out", CFG, progress=False)
    assert report is not None and report["images"] == 3 and report["skipped_images"] == 1
    assert list(report["skipped"]) == [str(bad)]
    kept = json.loads((tmp_path / "out" / "dataset.json").read_text())["images"]
    assert [e["filename"] for e in kept] == [r.path for r in records]
