"""Q-Former tokenizer: BERT WordPiece plus the added [DEC] token (BOS for ITG)."""

from __future__ import annotations

import re

import torch
from transformers import BertTokenizerFast

from blip2.qformer import resolve_dir

DEC_TOKEN = "[DEC]"


def load_tokenizer(path: str, vocab_size: int) -> BertTokenizerFast:
    """Load a local BERT tokenizer and add [DEC]; checks it fits the Q-Former's vocabulary."""
    tok = BertTokenizerFast.from_pretrained(str(resolve_dir(path)), local_files_only=True)
    tok.add_special_tokens({"bos_token": DEC_TOKEN})
    if len(tok) != vocab_size:
        raise ValueError(f"tokenizer has {len(tok)} tokens with [DEC] but qformer.vocab_size={vocab_size}")
    return tok


def clean_caption(text: str, max_words: int = 50) -> str:
    """Lower-case, drop punctuation except apostrophes, collapse spaces, cap the word count."""
    text = re.sub(r"[^\w\s']", " ", text.lower())
    return " ".join(text.split()[:max_words])


def tokenize(tok: BertTokenizerFast, texts: list[str], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded [CLS] ... [SEP] ids and attention mask, both (B, T) with T <= max_len."""
    enc = tok(texts, padding="longest", truncation=True, max_length=max_len, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]
