"""The README main job end to end on the real packaged parts, shrunk to seconds."""

from __future__ import annotations

import json

import pytest

from blip2.quickstart import run_quickstart

pytestmark = pytest.mark.slow


def test_quickstart_runs_both_stages_and_reports(tmp_path):
    s1 = ("train.batch_size=8", "train.warmup_steps=1", "eval.k_test=2", "data.num_workers=0")
    s2 = ("train.batch_size=4", "train.warmup_steps=1", "eval.max_images=2", "eval.decode.num_beams=2",
          "eval.decode.max_new_tokens=4", "eval.decode.min_new_tokens=1", "data.num_workers=0")
    result = run_quickstart(tmp_path, steps=2, n_train=16, n_val=4, progress=False, stage2_steps=2, extra=s1,
                            extra_stage2=s2)
    assert result["retrieval"]["num_images"] == 4 and result["train_stage2"]["steps"] == 2
    gen = result["generation"]
    assert gen["num_images"] == 2 and "cider" in gen and gen["vqa_questions"] > 0
    assert len(gen["examples"]) == 2 and all(isinstance(e["caption"], str) for e in gen["examples"])
    report = (tmp_path / "report.md").read_text()
    assert "## Stage 2" in report and "| question | truth | answer |" in report
    assert json.loads((tmp_path / "summary.json").read_text())["seconds"]["total"] > 0
