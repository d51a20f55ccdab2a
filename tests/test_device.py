"""Device placement without a GPU: a model on the `meta` device must accept CPU inputs (a feature
cache, tokenized text) at every entry point, because any tensor left behind on the CPU would make
the op fail with a device mismatch. The same moves put the inputs on a GPU (bench/gpu_check.py
checks that on real hardware)."""

from __future__ import annotations

import pytest
import torch

from blip2.config import Blip2Config, LLMConfig, TrainConfig
from blip2.data.pairs import Batch
from blip2.llm import FrozenLM
from blip2.losses import Stage1Loss
from blip2.model import Blip2, resolve_device
from conftest import tiny_llama, tiny_lm_tokenizer, tiny_opt, tiny_qformer, tiny_t5

META = torch.device("meta")


def test_stage1_entry_points_move_cpu_inputs_to_the_model_device(tiny_model):
    model = tiny_model.to(META)
    feats = torch.randn(3, 5, 24)  # on the CPU, as read from the feature cache
    query, itc = model.encode_image(feats)
    assert query.device == META and itc.shape == (3, 4, 16)
    assert model.encode_text(["a dog", "a cat"]).device == META
    assert model.itm(feats[:2], ["a dog", "a cat"]).device == META
    assert model.encode_multimodal(feats[:2], ["a dog", "a cat"]).device == META


def test_stage1_loss_runs_on_the_model_device_until_data_dependent_sampling(tiny_model):
    """Everything up to ITM's hard-negative sampling (which reads values) runs on meta from CPU
    features: the only failure allowed is meta's missing data, not a device mismatch."""
    model = tiny_model.to(META)
    ids, mask = model.tokenize(["a dog runs", "a cat sits", "two birds fly"])
    with pytest.raises(RuntimeError, match="meta tensors"):
        Stage1Loss(True, True, False)(model, torch.randn(3, 5, 24), ids, mask, torch.arange(3, device=META),
                                      torch.Generator().manual_seed(0))


@pytest.mark.parametrize("make_lm", [tiny_llama, tiny_opt, tiny_t5], ids=["llama", "opt", "t5"])
def test_stage2_soft_prompt_and_llm_layout_land_on_the_model_device(tokenizer, make_lm):
    llm = FrozenLM(make_lm(), tiny_lm_tokenizer(), LLMConfig(max_prompt_len=8, max_text_len=8))
    model = Blip2(Blip2Config(qformer=tiny_qformer(), llm=LLMConfig()), None, tokenizer, llm).to(META)
    soft = model.soft_prompt(torch.randn(2, 5, 24))
    assert soft.device == META and soft.shape == (2, 4, 32)
    x = llm.layout(soft, llm.encode_prompts(["a question", ""]), [[5, 6], [7]])
    for name in ("embeds", "mask", "labels", "decoder_ids"):
        t = getattr(x, name)
        assert t is None or t.device == META, name


def test_batch_to_moves_every_tensor_and_keeps_the_texts():
    b = Batch(ids=torch.ones(2, 3, dtype=torch.long), mask=torch.ones(2, 3, dtype=torch.long),
              image_ids=torch.arange(2), image_feats=torch.randn(2, 5, 24), prompts=["", "q"], texts=["a", "b"])
    moved = b.to(META)
    assert all(t.device == META for t in (moved.ids, moved.mask, moved.image_ids, moved.image_feats))
    assert moved.pixels is None and moved.prompts == ["", "q"] and moved.texts == ["a", "b"]
    assert b.ids.device.type == "cpu"  # the original is untouched


def test_resolve_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="sees no GPU"):
        resolve_device("cuda")
    # under torchrun a bare "cuda" is this process's GPU
    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert resolve_device("cuda") == torch.device("cuda:1") and chosen == [torch.device("cuda:1")]
    assert resolve_device("auto") == torch.device("cuda:1")
    with pytest.raises(ValueError, match="only 2 GPU"):
        resolve_device("cuda:2")


def test_train_device_is_validated():
    assert TrainConfig(device="cuda:1").device == "cuda:1"
    with pytest.raises(ValueError, match="train.device 'gpu'"):
        TrainConfig(device="gpu")
