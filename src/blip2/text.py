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


def caption_token_prior(tok: BertTokenizerFast, texts: list[str], max_len: int, vocab_size: int,
                        label_smoothing: float = 0.0, chunk: int = 4096) -> torch.Tensor:
    """Log-probabilities (V,) of the ITG targets (every token after [CLS], [SEP] included) in `texts`.

    Add-one counts, mixed with the uniform share that label smoothing gives every token, so each
    entry is the logit a bias-only LM head would learn under that loss (up to a constant).
    """
    counts = torch.zeros(vocab_size, dtype=torch.float64)
    for i in range(0, len(texts), chunk):
        ids, mask = tokenize(tok, [clean_caption(t) for t in texts[i:i + chunk]], max_len)
        counts += torch.bincount(ids[:, 1:][mask[:, 1:].bool()], minlength=vocab_size).double()
    p = (counts + 1) / (counts.sum() + vocab_size)
    p = (1 - label_smoothing) * p + label_smoothing / vocab_size
    return p.log().float()
