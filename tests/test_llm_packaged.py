"""The packaged LLMs (SmolLM2-135M-Instruct, the default, and Gemma-3-270M) through our bridge."""

from __future__ import annotations

import pytest
import torch

from blip2.config import DecodeConfig, LLMConfig
from blip2.generate import generate_ids
from blip2.llm import PACKAGED_GEMMA3, load_llm, packaged_llm_dir

pytestmark = pytest.mark.slow


def test_packaged_smollm2_converts_once_and_answers():
    packaged_llm_dir()  # converts on first use (~30 s), cached afterwards
    lm = load_llm(LLMConfig())
    assert not lm.is_encoder_decoder and lm.hidden_size == 576 and lm.tokenizer.chat_template
    prompt = lm.tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                              tokenize=False, add_generation_prompt=True)
    ids = lm.encode([prompt], 256)
    empty_soft = torch.zeros(1, 0, lm.hidden_size)  # no image: the bridge works for text-only prompts too
    out = generate_ids(lm, empty_soft, ids, DecodeConfig(num_beams=1, max_new_tokens=12, min_new_tokens=0))
    assert "Paris" in lm.decode(out[0])


def test_packaged_gemma3_reassembles_its_chunks_and_knows_facts():
    """Gemma-3-270M base (four chunk wheels): reassembled, sha256-checked, converted once; a base LM,
    so it is asked to continue text rather than to answer a chat turn."""
    path = packaged_llm_dir(which=PACKAGED_GEMMA3)  # ~30-70 s the first time, cached afterwards
    assert packaged_llm_dir(which=PACKAGED_GEMMA3) == path
    assert not list(path.glob("*.gguf"))  # the reassembled GGUF is not kept next to the copy
    lm = load_llm(LLMConfig(path=PACKAGED_GEMMA3, prompt_special_tokens=True))
    assert lm.model.config.model_type == "gemma3_text" and lm.hidden_size == 640
    prompts = ["The Eiffel Tower is in the city of", "The capital of Japan is the city of"]
    ids = lm.encode_prompts(prompts)
    assert all(x[0] == lm.tokenizer.bos_token_id for x in ids)  # Gemma expects <bos> first
    empty_soft = torch.zeros(2, 0, lm.hidden_size)
    out = generate_ids(lm, empty_soft, ids, DecodeConfig(num_beams=1, max_new_tokens=4, min_new_tokens=0))
    assert "Paris" in lm.decode(out[0]) and "Tokyo" in lm.decode(out[1])


def test_unknown_packaged_llm_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="packaged:gemma-3-270m"):
        load_llm(LLMConfig(path="packaged:gpt-5"))
