"""The preallocated-cache decode path (decode.static_cache) gives the dynamic path's tokens.

On the CPU the path runs eagerly. Where a GPU is present (a device session, not CI) the same tests
also run on it, where every step is a replayed CUDA graph; bench/vs_transformers.py --static-cache
compares those tokens with transformers' generate on larger models."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import yaml

from blip2.config import DecodeConfig, LLMConfig, from_dict
from blip2.generate import _BeamStep, generate_ids
from blip2.llm import FrozenLM
from blip2.static_decode import StaticDecodeState, use_static_cache
from conftest import tiny_llama, tiny_lm_tokenizer, tiny_opt, tiny_t5
from test_generate import PROMPTS, SETTINGS, _hf_generate, _soft

LMS = {"llama": tiny_llama, "opt": tiny_opt}
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=[(lm, dev) for lm in sorted(LMS) for dev in DEVICES], ids=lambda p: "-".join(p))
def causal_lm(request):
    name, device = request.param
    return FrozenLM(LMS[name](), tiny_lm_tokenizer(), LLMConfig(max_prompt_len=8, max_text_len=8)).to(device)


def _on(lm, seed):
    return _soft(lm, seed=seed).to(lm.model.device)


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: f"beams{s['num_beams']}-min{s['min_new_tokens']}")
def test_static_equals_dynamic(causal_lm, setting):
    dynamic = DecodeConfig(**setting, static_cache="off")
    static = dataclasses.replace(dynamic, static_cache="on")
    stopped_early = False
    for seed in range(4):  # later seeds reuse the first call's buffers (and graph), holding its stale cache
        ours = generate_ids(causal_lm, _on(causal_lm, seed), PROMPTS, static)
        assert ours == generate_ids(causal_lm, _on(causal_lm, seed), PROMPTS, dynamic)
        stopped_early |= min(map(len, ours)) < dynamic.max_new_tokens
    # Rows must have finished while others went on (the random OPT rarely emits eos; the search
    # code around the step is the same for both).
    if setting["min_new_tokens"] == 0 and causal_lm.model.config.model_type == "llama":
        assert stopped_early


@pytest.mark.parametrize("make", [tiny_llama, tiny_opt], ids=["llama", "opt"])
def test_static_in_bf16(make):
    """The cache, mask and logits follow the LLM's precision (`--precision bf16`)."""
    lm = FrozenLM(make(), tiny_lm_tokenizer(), LLMConfig(precision="bf16", max_prompt_len=8, max_text_len=8))
    for seed, beams in ((0, 1), (1, 4), (2, 4)):
        cfg = DecodeConfig(num_beams=beams, max_new_tokens=8, min_new_tokens=0, static_cache="off")
        soft = _soft(lm, seed=seed)
        assert generate_ids(lm, soft, PROMPTS, dataclasses.replace(cfg, static_cache="on")) == \
            generate_ids(lm, soft, PROMPTS, cfg)
    bufs = [buf for free in lm.static_buffers.values() for buf in free]
    assert bufs and all(buf.keys.dtype == buf.values.dtype == torch.bfloat16 for buf in bufs)


def test_static_matches_transformers_beam_search(causal_lm):
    cfg = DecodeConfig(num_beams=4, max_new_tokens=10, min_new_tokens=2, static_cache="on")
    soft = _on(causal_lm, 11)
    assert generate_ids(causal_lm, soft, PROMPTS, cfg) == _hf_generate(causal_lm, soft, PROMPTS, cfg)


def test_buffers_are_reused_by_calls_of_the_same_shape(causal_lm):
    cfg = DecodeConfig(num_beams=3, max_new_tokens=6, min_new_tokens=0, static_cache="on")
    generate_ids(causal_lm, _on(causal_lm, 0), PROMPTS, cfg)
    (key, [buf]), = causal_lm.static_buffers.items()
    # Another prompt length, same rounded cache length: the same buffers serve it.
    out = generate_ids(causal_lm, _on(causal_lm, 1), [[3], [4, 5, 6, 7], []], cfg)
    assert causal_lm.static_buffers == {key: [buf]}
    assert out == generate_ids(causal_lm, _on(causal_lm, 1), [[3], [4, 5, 6, 7], []],
                               dataclasses.replace(cfg, static_cache="off"))


def test_the_beam_step_is_kept_with_its_buffers(causal_lm):
    """The beam-search step (its graph on a GPU) is built once per buffer set and decoding config."""
    cfg = DecodeConfig(num_beams=3, max_new_tokens=6, min_new_tokens=0, static_cache="on")
    generate_ids(causal_lm, _on(causal_lm, 0), PROMPTS, cfg)
    (_, [buf]), = causal_lm.static_buffers.items()
    first = buf.beam
    generate_ids(causal_lm, _on(causal_lm, 1), PROMPTS, cfg)
    assert buf.beam is first
    other = dataclasses.replace(cfg, length_penalty=0.5, no_repeat_ngram_size=2)
    out = generate_ids(causal_lm, _on(causal_lm, 2), PROMPTS, other)
    assert buf.beam is not first and buf.beam.cfg == other  # rebuilt: the step bakes the config in
    assert out == generate_ids(causal_lm, _on(causal_lm, 2), PROMPTS, dataclasses.replace(other, static_cache="off"))


@pytest.mark.parametrize("setting", [s for s in SETTINGS if s["num_beams"] > 1] +
                         [dict(num_beams=2, max_new_tokens=5, min_new_tokens=1, repetition_penalty=0.8,
                               no_repeat_ngram_size=1)], ids=lambda s: f"beams{s['num_beams']}")
def test_the_beam_step_reads_nothing_back_to_the_host(setting):
    """A step captured as a CUDA graph may not read a tensor's value on the host (`.item()`, `if
    tensor`, boolean-mask indexing, data-dependent shapes): on meta tensors, which have shapes but
    no values, every such read raises. So the search's bookkeeping runs on meta tensors here."""
    lm = FrozenLM(tiny_llama(), tiny_lm_tokenizer(), LLMConfig(max_prompt_len=8, max_text_len=8))
    cfg = DecodeConfig(**setting, static_cache="on")
    state = lm.start(_soft(lm), PROMPTS)
    state.expand(cfg.num_beams)
    search = _BeamStep(StaticDecodeState(state, cfg.max_new_tokens), cfg, lm.eos_id, lm.pad_id)
    for name, value in list(vars(search).items()):
        if isinstance(value, torch.Tensor):
            setattr(search, name, value.to("meta"))
    rows = search._search()
    assert rows.device.type == "meta" and rows.shape == (len(PROMPTS) * cfg.num_beams,)
    with pytest.raises(RuntimeError, match="meta"):  # the check can fail: a host read on meta raises
        bool(search.done.any())


def test_pool_keeps_the_most_recent_shapes(causal_lm):
    cfg = DecodeConfig(num_beams=1, max_new_tokens=4, min_new_tokens=0, static_cache="on")
    for b in (1, 2, 3, 2):  # rows 1, 2, 3, then 2 again (reused): 3 and 2 stay, 1 is dropped
        generate_ids(causal_lm, _on(causal_lm, b)[:b], PROMPTS[:b], cfg)
    assert [key[0] for key in causal_lm.static_buffers] == [3, 2]
    assert all(len(free) == 1 for free in causal_lm.static_buffers.values())


def test_eager_static_step_logits_match_dynamic(causal_lm):
    """Three steps with a reorder in between: same next-token logits as the dynamic cache."""
    dev = causal_lm.model.device
    soft = _on(causal_lm, 2)
    dyn = causal_lm.start(soft, PROMPTS)
    st = StaticDecodeState(causal_lm.start(soft, PROMPTS), max_new_tokens=4)
    for rows, tokens in (([0, 1, 2], [5, 6, 7]), ([2, 0], [8, 9]), ([1], [4])):
        for s in (dyn, st):
            s.select(torch.tensor(rows, device=dev))
            s.step(torch.tensor(tokens, device=dev))
        torch.testing.assert_close(st.logits, dyn.logits, rtol=1e-5, atol=1e-5)
        assert torch.equal(st.history, dyn.history)


def test_auto_is_on_for_cuda_decoder_only_lms_only():
    llama = FrozenLM(tiny_llama(), tiny_lm_tokenizer(), LLMConfig())
    t5 = FrozenLM(tiny_t5(), tiny_lm_tokenizer(), LLMConfig())
    assert not use_static_cache(llama, "auto")  # CPU: the dynamic cache is faster there
    assert use_static_cache(llama, "on") and not use_static_cache(llama, "off")
    assert not use_static_cache(t5, "auto") and not use_static_cache(t5, "off")
    if torch.cuda.is_available():
        assert use_static_cache(llama.to("cuda"), "auto") and not use_static_cache(t5.to("cuda"), "auto")


def test_refusals():
    t5 = FrozenLM(tiny_t5(), tiny_lm_tokenizer(), LLMConfig(max_prompt_len=8, max_text_len=8))
    with pytest.raises(ValueError, match="static_cache=off"):
        generate_ids(t5, _soft(t5), PROMPTS, DecodeConfig(num_beams=2, max_new_tokens=3, min_new_tokens=0,
                                                           static_cache="on"))
    lm = FrozenLM(tiny_llama(), tiny_lm_tokenizer(), LLMConfig())
    with pytest.raises(ValueError, match="CUDA device"):
        StaticDecodeState(lm.start(_soft(lm), PROMPTS), max_new_tokens=3, graphs=True)
    with pytest.raises(ValueError, match="auto, on or off"):
        DecodeConfig(static_cache="always")
    # YAML 1.1 reads a bare `off` as false
    assert from_dict(DecodeConfig, yaml.safe_load("static_cache: off")).static_cache == "off"
