"""Image-caption pairs, a resumable epoch sampler, and batch assembly."""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, replace

import torch

from blip2.data.records import ImageRecord
from blip2.text import clean_caption, tokenize
from blip2.vision import FrozenImageEncoder
from blip2.vision.transforms import eval_transform, load_rgb, train_transform

log = logging.getLogger(__name__)


@dataclass
class Batch:
    ids: torch.Tensor | None  # (B, T) Q-Former token ids, [CLS] first, right-padded (None in stage 2)
    mask: torch.Tensor | None  # (B, T) 1 = real token
    image_ids: torch.Tensor  # (B,) index of the image each caption belongs to
    image_feats: torch.Tensor | None = None  # (B, N, C) frozen features (cached mode)
    pixels: torch.Tensor | None = None  # (B, 3, S, S) (online mode)
    prompts: list[str] | None = None  # stage 2: the LLM prompt of each text ("" = none)
    texts: list[str] | None = None  # the caption / answer of each pair

    def to(self, device: torch.device | str) -> Batch:
        """The same batch with its tensors on `device` (the model's; the cache stays on the CPU)."""
        def move(x: torch.Tensor | None) -> torch.Tensor | None:
            return None if x is None else x.to(device)

        return replace(self, ids=move(self.ids), mask=move(self.mask), image_ids=self.image_ids.to(device),
                       image_feats=move(self.image_feats), pixels=move(self.pixels))


def drop_tokens(feats: torch.Tensor, frac: float, generator: torch.Generator) -> torch.Tensor:
    """A random `1 - frac` of each image's feature tokens, in their original order.

    Cached features show the model one fixed view of each image, epoch after epoch; a fresh subset
    of tokens per image and step is a free augmentation against memorising them (the Q-Former's
    cross-attention reads a set of tokens, so fewer tokens need no other change).
    (B, N, C) -> (B, K, C) with K = max(1, round(N * (1 - frac))).
    """
    if frac <= 0:
        return feats
    b, n, c = feats.shape
    k = max(1, round(n * (1 - frac)))
    keep = torch.rand(b, n, generator=generator).argsort(dim=1)[:, :k].sort(dim=1).values  # (B, K)
    return feats.gather(1, keep.to(feats.device)[..., None].expand(b, k, c))


class EpochSampler:
    """Shuffles pair indices once per epoch from (seed, epoch); its state is (epoch, pos).

    The last incomplete batch of an epoch is dropped so every step sees a full batch. With
    `lengths` and `group` > 0, each window of `group` consecutive batches of the shuffle is sorted
    by length before it is cut into batches, and the batches are shuffled again: every batch then
    holds texts of similar length, so padding wastes less compute (random batches of 16 Flickr8k
    captions pad to 1.28x their LLM tokens), while the epoch still visits every pair once in a
    seeded random order.
    """

    def __init__(self, n: int, batch_size: int, seed: int, lengths: list[int] | None = None, group: int = 0):
        if n < batch_size:
            raise ValueError(f"only {n} training pairs for batch size {batch_size}")
        if group and (lengths is None or len(lengths) != n):
            raise ValueError("grouping by length needs one length per pair")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.lengths = torch.tensor(lengths) if group else None
        self.group = group
        self.epoch, self.pos = 0, 0
        self._perm = self._permutation()

    def _permutation(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        perm = torch.randperm(self.n, generator=g)
        if self.lengths is None:
            return perm
        full = self.n // self.batch_size * self.batch_size  # the dropped remainder stays last
        window = self.group * self.batch_size
        chunks = []
        for start in range(0, full, window):
            part = perm[start:min(start + window, full)]
            chunks.append(part[self.lengths[part].argsort(stable=True)])  # ties keep the shuffled order
        batches = torch.cat(chunks).view(-1, self.batch_size)
        batches = batches[torch.randperm(batches.shape[0], generator=g)]
        return torch.cat([batches.flatten(), perm[full:]])

    def next(self) -> torch.Tensor:
        if self.pos + self.batch_size > self.n:
            self.epoch, self.pos = self.epoch + 1, 0
            self._perm = self._permutation()
        idx = self._perm[self.pos:self.pos + self.batch_size]
        self.pos += self.batch_size
        return idx

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state(self, state: dict[str, int]) -> None:
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
        self._perm = self._permutation()


class Pairs:
    """Every (image, prompt, text) pair of the records whose image is usable.

    Captions get `caption_prompt`; with a `qa_template`, each annotated question/answer adds a pair
    (prompt = the template filled with the question, text = the answer). With a `tokenizer` (stage 1)
    batches carry Q-Former token ids; stage 2 tokenizes for its LLM itself.
    With `features` (aligned with `records`) batches carry cached features; without, batches
    carry pixels decoded on the fly (augmented when `augment`, seeded per pair and step) for the
    encoder to run each step. `per_image` keeps one pair per image (its first caption), for an
    objective that reads all of an image's references itself (SCST): an epoch then visits each
    image once.
    """

    def __init__(self, records: list[ImageRecord], tokenizer, max_len: int,
                 features: torch.Tensor | None = None, encoder: FrozenImageEncoder | None = None,
                 augment: bool = False, seed: int = 0, caption_prompt: str = "", qa_template: str | None = None,
                 per_image: bool = False):
        if features is None and encoder is None:
            raise ValueError("Pairs needs cached features or the encoder's preprocessing")
        self.records, self.tokenizer, self.max_len = records, tokenizer, max_len
        self.features, self.encoder, self.augment = features, encoder, augment
        self.seed = seed
        self.pairs = [(i, caption_prompt, clean_caption(c)) for i, r in enumerate(records) for c in r.captions]
        if qa_template:
            self.pairs += [(i, qa_template.format(q.strip()), a.strip()) for i, r in enumerate(records)
                           for q, a in r.qa]
        self.pairs = [(i, p, c) for i, p, c in self.pairs if c]
        if per_image:
            if qa_template:
                raise ValueError("per_image pairs are captions only; drop qa_template")
            first: dict[int, tuple[int, str, str]] = {}
            for pair in self.pairs:
                first.setdefault(pair[0], pair)
            self.pairs = list(first.values())
        if not self.pairs:
            raise ValueError("no usable image-caption pairs")

    def __len__(self) -> int:
        return len(self.pairs)

    def batch(self, indices: torch.Tensor, step: int = 0) -> Batch:
        """The pairs at `indices`; `step` seeds augmentation per pair, so a pair is augmented the same
        way whichever process (or resumed run) draws it at that step."""
        chosen = [self.pairs[int(k)] for k in indices]
        image_idx = torch.tensor([i for i, _, _ in chosen])
        prompts, texts = [p for _, p, _ in chosen], [c for _, _, c in chosen]
        ids, mask = tokenize(self.tokenizer, texts, self.max_len) if self.tokenizer is not None else (None, None)
        if self.features is not None:
            return Batch(ids, mask, image_idx, image_feats=self.features[image_idx].float(), prompts=prompts,
                         texts=texts)
        assert self.encoder is not None
        pre = self.encoder.preprocess
        imgs = [load_rgb(self.records[int(i)].path) for i in image_idx]
        if self.augment:
            rngs = [random.Random((self.seed * 1_000_003 + step) * 10_000_019 + int(k)) for k in indices]
            pixels = torch.stack([train_transform(im, pre, rng) for im, rng in zip(imgs, rngs, strict=True)])
        else:
            pixels = torch.stack([eval_transform(im, pre) for im in imgs])
        return Batch(ids, mask, image_idx, pixels=pixels, prompts=prompts, texts=texts)
