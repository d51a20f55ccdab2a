"""The packaged default LLM (SmolLM2-135M-Instruct from its GGUF wheel) through our bridge."""

from __future__ import annotations

import pytest
import torch

from blip2.config import DecodeConfig, LLMConfig
from blip2.generate import generate_ids
from blip2.llm import load_llm, packaged_llm_dir

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
