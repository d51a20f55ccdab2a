"""Shared fixtures: tiny configs, a tiny frozen encoder, the packaged tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from blip2.config import Blip2Config, QFormerConfig, VisionConfig
from blip2.model import Blip2
from blip2.text import load_tokenizer
from blip2.vision.base import FrozenImageEncoder
from blip2.vision.transforms import Preprocess

torch.set_num_threads(2)

# The project's shared/ folder (real data) sits beside the repository checkout.
SHARED = Path(__file__).resolve().parents[1].parent / "shared"

# Recipe overrides for a tiny random model on 64-px procedural scenes (2 x 32 Q-Former, 4 queries);
# tests add their own train.* / data.* settings.
TINY_SETS = ["model.vision.image_size=64", "model.qformer.init=none", "model.qformer.num_layers=2",
             "model.qformer.hidden_size=32", "model.qformer.num_heads=4", "model.qformer.intermediate_size=64",
             "model.qformer.num_queries=4", "model.qformer.embed_dim=16", "data.num_workers=0"]


def tiny_qformer(**kw) -> QFormerConfig:
    base = dict(init="none", num_layers=2, hidden_size=32, num_heads=4, intermediate_size=64, num_queries=4,
                cross_attention_freq=2, vision_width=24, vocab_size=30523, max_text_len=16, embed_dim=16,
                hidden_dropout=0.0, attention_dropout=0.0)
    base.update(kw)
    return QFormerConfig(**base)


@pytest.fixture(scope="session")
def tokenizer():
    return load_tokenizer("packaged", 30523)


@pytest.fixture
def tiny_model(tokenizer) -> Blip2:
    torch.manual_seed(0)
    return Blip2(Blip2Config(qformer=tiny_qformer()), None, tokenizer)


class TinyEncoder(FrozenImageEncoder):
    """A deterministic 'frozen encoder' for data/cache tests: 2x2 average-pooled pixels -> 4 tokens."""

    def __init__(self, tag: str = "a", size: int = 32):
        super().__init__("fp32", {"kind": "tiny", "tag": tag})
        self.proj = nn.Linear(3, 24)
        torch.nn.init.normal_(self.proj.weight, generator=torch.Generator().manual_seed(1))
        self.feature_dim, self.num_tokens = 24, 4
        self.preprocess = Preprocess(size=size, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
        self.calls = 0
        self.freeze()

    def _features(self, pixels: torch.Tensor) -> torch.Tensor:
        self.calls += pixels.shape[0]
        pooled = nn.functional.adaptive_avg_pool2d(pixels, 2).flatten(2).transpose(1, 2)  # (B, 4, 3)
        return self.proj(pooled)


@pytest.fixture
def tiny_encoder() -> TinyEncoder:
    return TinyEncoder()


def write_images(folder, n: int, size: int = 40, seed: int = 0) -> list[str]:
    """n random RGB JPEGs; returns their paths."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        p = folder / f"img{i}.jpg"
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(p)
        paths.append(str(p))
    return paths


@pytest.fixture
def vision_default() -> VisionConfig:
    return VisionConfig()


# --------------------------------------------------------------------------- tiny frozen LLMs

LM_WORDS = ("a dog cat runs on the grass red blue square circle is there yes no two three "
            "question answer photo of man woman sits bench water ball").split()


def tiny_lm_tokenizer():
    """A word-level tokenizer: <pad>=0, </s>=1, <unk>=2, then LM_WORDS (vocab 32)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(LM_WORDS)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="</s>", pad_token="<pad>", unk_token="<unk>")


def save_tiny_llm(directory, init_std: float = 0.02):
    """A tiny Llama + word-level tokenizer saved as a transformers directory (model.llm.path)."""
    tiny_llama(init_std=init_std).save_pretrained(directory)
    tiny_lm_tokenizer().save_pretrained(directory)
    return directory


def tiny_llama(seed: int = 0, init_std: float = 0.3):
    """A 2-layer Llama-style causal LM (GQA, RoPE, tied embeddings) with peaky random logits."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      initializer_range=init_std, tie_word_embeddings=True, bos_token_id=None,
                      eos_token_id=1, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


def tiny_opt(seed: int = 0, init_std: float = 0.3):
    """A 2-layer OPT-style causal LM (learned positions offset by 2, pre-norm)."""
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(seed)
    cfg = OPTConfig(vocab_size=32, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                    max_position_embeddings=128, word_embed_proj_dim=32, init_std=init_std, dropout=0.0,
                    attention_dropout=0.0, pad_token_id=0, eos_token_id=1, bos_token_id=1)
    return OPTForCausalLM(cfg).eval()


def tiny_gemma3(seed: int = 0, init_std: float = 0.3):
    """A 2-layer Gemma-3-style causal LM: one sliding-window layer (window 6, shorter than the
    sequences, so the hybrid cache is exercised) and one full layer, embeddings scaled by sqrt(H)."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(seed)
    cfg = Gemma3TextConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=1, head_dim=8, max_position_embeddings=128,
                           sliding_window=6, layer_types=["sliding_attention", "full_attention"],
                           initializer_range=init_std, tie_word_embeddings=True, bos_token_id=None,
                           eos_token_id=1, pad_token_id=0)
    return Gemma3ForCausalLM(cfg).eval()


def tiny_t5(seed: int = 0, init_std: float = 1.0):
    """A 2+2-layer T5-style encoder-decoder LM (relative positions, decoder start = pad)."""
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    cfg = T5Config(vocab_size=32, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
                   relative_attention_num_buckets=8, dropout_rate=0.0, initializer_factor=init_std,
                   eos_token_id=1, pad_token_id=0, decoder_start_token_id=0, feed_forward_proj="gated-gelu",
                   tie_word_embeddings=False)
    model = T5ForConditionalGeneration(cfg).eval()
    # An untied head whose pad row is zero: random T5 logits otherwise favour pad (= the decoder
    # start token), which would make every output empty. (A random T5 decoder still mostly repeats
    # one token per input: its output is dominated by cross-attention, not by the tokens so far.)
    head = model.lm_head.weight.detach().clone()
    head[cfg.pad_token_id] = 0.0
    model.lm_head.weight = nn.Parameter(head)
    return model


@pytest.fixture(params=["causal", "opt", "gemma3", "seq2seq"])
def tiny_lm(request):
    from blip2.config import LLMConfig
    from blip2.llm import FrozenLM

    model = {"causal": tiny_llama, "opt": tiny_opt, "gemma3": tiny_gemma3, "seq2seq": tiny_t5}[request.param]()
    return FrozenLM(model, tiny_lm_tokenizer(), LLMConfig(max_prompt_len=8, max_text_len=8))
