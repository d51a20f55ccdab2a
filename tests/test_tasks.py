"""Task helpers: closed-set ranking equals the training loss, chat prompts keep the history,
stage 2 trains exactly the query path."""

from __future__ import annotations

import pytest
import torch

from blip2.config import Blip2Config, LLMConfig
from blip2.llm import FrozenLM
from blip2.losses import Stage2Loss
from blip2.model import Blip2, is_text_only
from blip2.tasks import chat_prompt, rank_options
from conftest import tiny_llama, tiny_lm_tokenizer, tiny_qformer, tiny_t5


@pytest.fixture(params=["causal", "seq2seq"])
def model(request, tokenizer):
    torch.manual_seed(0)
    lm_model = tiny_llama() if request.param == "causal" else tiny_t5()
    llm = FrozenLM(lm_model, tiny_lm_tokenizer(), LLMConfig(max_prompt_len=8, max_text_len=8))
    return Blip2(Blip2Config(qformer=tiny_qformer(), llm=LLMConfig()), None, tokenizer, llm).eval()


def test_rank_options_is_the_summed_log_likelihood(model):
    feats = torch.randn(2, 5, 24)
    prompts = ["is there a dog", "question"]
    scores = rank_options(model, feats, prompts, ["yes", "no"])
    lm = model.llm
    for i in range(2):
        for j, opt in enumerate(["yes", "no"]):
            p = lm.encode([prompts[i]], 8)
            t = lm.encode([" " + opt], 8)
            n = len(t[0]) + 1  # + eos
            ref = -lm.loss(model.soft_prompt(feats[i:i + 1]), p, t) * n
            assert scores[i, j].item() == pytest.approx(ref.item(), abs=1e-4)


def test_stage2_trains_exactly_the_query_path(model):
    frozen = set(model.freeze_text_branch())
    model.train()
    loss = Stage2Loss("random")(model, torch.randn(3, 5, 24), ["", "question", ""], ["a dog runs", "yes", "a cat"],
                                torch.Generator().manual_seed(0))["loss"]
    loss.backward()
    for name, p in model.named_parameters():
        if name.startswith(("vision.", "llm.")):
            assert p.grad is None
            continue
        got_grad = p.grad is not None and p.grad.abs().sum() > 0
        assert got_grad == (name not in frozen), name
        assert (name in frozen) == is_text_only(name)
    assert "qformer.layer.0.output_query.dense.weight" not in frozen
    assert "qformer.layer.0.output.dense.weight" in frozen


def test_chat_prompt_keeps_history():
    lm = FrozenLM(tiny_llama(), tiny_lm_tokenizer())
    p = chat_prompt(lm, [("what is it", "a dog")], "what color")
    assert p == "Question: what is it Answer: a dog Question: what color Answer:"
