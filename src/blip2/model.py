"""Blip2: frozen image encoder + Q-Former + stage-1 heads (ITC projections, ITM head, ITG head),
and for stage 2 a projection into a frozen LLM that turns the queries into a soft visual prompt.

Building from a config creates randomly initialised trainable parts and never reads a network;
initialisation from BERT (`load_bert_init`) and loading trained weights (`Blip2.from_dir`) are
separate, explicit steps with strict key and shape checks.
"""

from __future__ import annotations

import logging
import os
import platform
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from blip2.config import Blip2Config, DecodeConfig, from_dict, to_dict
from blip2.io import atomic_dir, read_json, write_json
from blip2.llm import FrozenLM
from blip2.qformer import KV, QFormer, mean_query_cosine
from blip2.vision import FrozenImageEncoder, build_vision_encoder

log = logging.getLogger(__name__)

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
FROZEN_PREFIXES = ("vision.", "llm.")  # weights that come from their own sources, never saved with ours
# Q-Former parts only the text branch uses (stage-1 heads included); stage 2 leaves them untouched.
TEXT_ONLY = ("qformer.embeddings.word_embeddings.", "qformer.embeddings.position_embeddings.", "qformer.lm_head.",
             "vision_proj.", "text_proj.", "itm_head.", "temp")


def require_model_dir(directory: Path, hint: str = "") -> None:
    """Refuse a directory without our config.json + model.safetensors, naming what is missing."""
    if not (directory / CONFIG).is_file() or not (directory / WEIGHTS).is_file():
        raise FileNotFoundError(f"{directory} is not a blip2 model directory (needs {CONFIG} + {WEIGHTS})" + hint)


def resolve_device(name: str) -> torch.device:
    """A device name ("cpu", "cuda", "cuda:N", "mps", "auto") -> torch.device, checked to exist.

    "auto" picks CUDA when torch sees a GPU; a bare "cuda" under torchrun means this process's GPU
    (LOCAL_RANK), which is also made the current one so that NCCL and new tensors land on it.
    """
    import os

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        name = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} requested but torch sees no GPU (torch.cuda.is_available() is "
                             "False): install a CUDA build of torch, or use --device cpu / train.device=cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {name!r}: only {torch.cuda.device_count()} GPU(s) are visible")
        torch.cuda.set_device(device)
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError("device 'mps' requested but torch.backends.mps.is_available() is False")
    return device


def native_half(precision: str) -> bool:
    """Whether this CPU computes `precision` ("bf16"/"fp16") in hardware.

    oneDNN's own flag (`_is_mkldnn_bf16_supported`) is true on any AVX-512 CPU because oneDNN can
    emulate bf16 there; on an AVX-512 Xeon without AVX512-BF16 that emulation made a stage-2 step
    2.6x slower than fp32 (docs/RESULTS.md). So bf16 counts as native only with AVX512-BF16 or AMX.
    """
    if precision == "bf16":
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    if precision == "fp16":
        return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    raise ValueError(f"native_half asks about bf16 or fp16, not {precision!r}")


def auto_half(device: torch.device) -> str | None:
    """The half precision `device` computes natively: "bf16" (a CPU with AVX512-BF16 or AMX, a GPU
    since Ampere), "fp16" (an older GPU), or None (fp32 is faster: emulated bf16 on a CPU runs a
    stage-2 step 2.6x slower than fp32)."""
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"
    if device.type == "cpu":
        return "bf16" if native_half("bf16") else None
    return None


def resolve_precision(precision: str, device: torch.device) -> str:
    """A frozen part's precision with "auto" replaced by auto_half(device) (fp32 without one)."""
    return (auto_half(device) or "fp32") if precision == "auto" else precision


def resolve_auto(cfg: Blip2Config, device: torch.device) -> Blip2Config:
    """`cfg` with each frozen part's precision resolved for `device` (resolve_precision)."""
    cfg = replace(cfg, vision=replace(cfg.vision, precision=resolve_precision(cfg.vision.precision, device)))
    if cfg.llm is not None:
        cfg = replace(cfg, llm=replace(cfg.llm, precision=resolve_precision(cfg.llm.precision, device)))
    return cfg


def machine_info(device: torch.device) -> dict[str, Any]:
    """What a run's timings depend on, saved in its summary: the same recipe ran 2.6x slower in
    stage 2 on an AVX-512 CPU without native bf16 than on one with it, and about 2x slower on a Zen 4
    EPYC than on a Zen 5 one, which both call themselves "AMD EPYC" (hence `cpu_id`)."""
    cpuinfo = Path("/proc/cpuinfo")
    cpu = cpu_identity(cpuinfo.read_text() if cpuinfo.is_file() else "")
    info: dict[str, Any] = {"cpu": cpu.pop("name", None) or platform.processor() or platform.machine(),
                            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                            "native_bf16": native_half("bf16"), "torch": torch.__version__, **cpu}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


# Instruction sets the CPU timings in docs/RESULTS.md turn on (bf16 matmuls, AMX tiles, AVX-512).
TIMING_FLAGS = ("avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16")


def cpu_identity(cpuinfo: str) -> dict[str, Any]:
    """The first processor of a Linux /proc/cpuinfo text: `name`, `cpu_id` ("family F model M",
    which tells apart CPU generations that share a marketing name), `mhz`, and which TIMING_FLAGS
    it has. Empty for an empty text (no /proc/cpuinfo: macOS, Windows)."""
    fields: dict[str, str] = {}
    for line in cpuinfo.split("\n\n", 1)[0].splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip(), value.strip())
    out: dict[str, Any] = {}
    if "model name" in fields:
        out["name"] = fields["model name"]
    if "cpu family" in fields and "model" in fields:
        out["cpu_id"] = f"family {fields['cpu family']} model {fields['model']}"
    if fields.get("cpu MHz"):
        out["mhz"] = round(float(fields["cpu MHz"]))
    if "flags" in fields:
        flags = set(fields["flags"].split())
        out["flags"] = [f for f in TIMING_FLAGS if f in flags]
    return out


def warn_slow_half(device: torch.device, precisions: list[str]) -> bool:
    """Log a warning when bf16/fp16 is asked for on a CPU that emulates it; returns whether it did.

    On CPUs with native bf16 (AVX512-BF16, AMX) bf16 matmuls run 2-4x faster than fp32, and the
    Flickr8k steps 1.3-1.6x; elsewhere oneDNN falls back to slow conversions, so fp32 is faster.
    """
    if device.type != "cpu":
        return False
    slow = sorted({p for p in precisions if p in ("bf16", "fp16") and not native_half(p)})
    if slow:
        log.warning("%s on this CPU is emulated (no native support; capability %s) and slower than fp32: "
                    "use fp32 here (train.amp=none, --precision fp32, *.precision=fp32)",
                    "/".join(slow), torch.backends.cpu.get_cpu_capability())
    return bool(slow)


def is_text_only(name: str) -> bool:
    """Whether a parameter belongs to the text branch (incl. the text FFN of every block)."""
    if name.startswith(TEXT_ONLY):
        return True
    parts = name.split(".")  # qformer.layer.<i>.intermediate.* / qformer.layer.<i>.output.*
    return len(parts) > 3 and parts[1] == "layer" and parts[3] in ("intermediate", "output")


def check_state(own: dict[str, torch.Tensor], state: dict[str, torch.Tensor], source: str,
                allow_missing: tuple[str, ...] = ()) -> None:
    """Refuse `state` (read from `source`) unless it has exactly `own`'s keys, at `own`'s shapes;
    keys starting with an `allow_missing` prefix may be absent."""
    missing = sorted(k for k in set(own) - set(state) if not k.startswith(allow_missing))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise KeyError(f"{source}: {len(missing)} missing keys {missing[:5]}, "
                       f"{len(unexpected)} unexpected keys {unexpected[:5]}")
    for k, v in own.items():
        if k in state and state[k].shape != v.shape:
            raise ValueError(f"{source}: {k} has shape {tuple(state[k].shape)}, model expects {tuple(v.shape)}")


class Blip2(nn.Module):
    def __init__(self, cfg: Blip2Config, vision: FrozenImageEncoder | None = None, tokenizer: Any = None,
                 llm: FrozenLM | None = None):
        super().__init__()
        qc = cfg.qformer
        if vision is not None:
            if qc.vision_width not in (None, vision.feature_dim):
                raise ValueError(f"qformer.vision_width={qc.vision_width} but the encoder yields "
                                 f"{vision.feature_dim}-wide features")
            qc.vision_width = vision.feature_dim
        if qc.vision_width is None:
            raise ValueError("qformer.vision_width is unknown: pass the vision encoder or set it")
        self.cfg = cfg
        self.vision = vision
        self.tokenizer = tokenizer
        self.pad_id = tokenizer.pad_token_id if tokenizer is not None else 0
        self.dec_id = tokenizer.bos_token_id if tokenizer is not None else qc.vocab_size - 1
        self.meta: dict[str, Any] = {}
        self.ln_vision = nn.LayerNorm(qc.vision_width, eps=qc.ln_vision_eps)
        self.qformer = QFormer(qc)
        # Stage-1 heads (absent without a text branch)
        self.vision_proj = nn.Linear(qc.hidden_size, qc.embed_dim) if qc.text_branch else None
        self.text_proj = nn.Linear(qc.hidden_size, qc.embed_dim) if qc.text_branch else None
        self.itm_head = nn.Linear(qc.hidden_size, 2) if qc.text_branch else None
        self.temp = nn.Parameter(torch.tensor(qc.temp_init)) if qc.text_branch else None
        if (cfg.llm is None) != (llm is None):
            raise ValueError("model.llm is set but no LLM was given (or the reverse): build with Blip2.build")
        self.llm = llm
        self.llm_proj = nn.Linear(qc.hidden_size, llm.hidden_size) if llm is not None else None
        for head in (self.vision_proj, self.text_proj, self.itm_head, self.llm_proj):
            if head is not None:
                nn.init.normal_(head.weight, std=qc.initializer_range)
                nn.init.zeros_(head.bias)

    # ------------------------------------------------------------------ building blocks

    @property
    def device(self) -> torch.device:
        """Where the trainable parts live; every entry point moves its inputs here."""
        return self.qformer.query_tokens.device

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """Frozen encoder: (B, 3, S, S) -> (B, N, C) on the encoder's device."""
        if self.vision is None:
            raise RuntimeError("this Blip2 was built without a vision encoder (cached-feature mode)")
        return self.vision(pixels)

    def vision_input(self, image_feats: torch.Tensor) -> torch.Tensor:
        """Frozen features (B, N, C) from any device (e.g. a CPU feature cache) -> ln_vision on ours."""
        return self.ln_vision(image_feats.to(self.device))

    def image_itc_feats(self, query_hidden: torch.Tensor) -> torch.Tensor:
        """(B, Q, D) query outputs -> (B, Q, E) L2-normalised ITC embeddings."""
        if self.vision_proj is None:
            raise RuntimeError("this model has no retrieval heads (qformer.text_branch=false, e.g. a transformers "
                               "Blip2ForConditionalGeneration checkpoint); use a Blip2ForImageTextRetrieval one")
        return F.normalize(self.vision_proj(query_hidden), dim=-1)

    def text_itc_feats(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, T) text -> (B, E) L2-normalised embedding ([CLS] or mean-pooled) from a text-only pass."""
        hidden = self.qformer(ids, mask, use_queries=False).hidden  # (B, T, D)
        if self.cfg.qformer.text_pool == "cls":
            pooled = hidden[:, 0]
        else:
            m = mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
            pooled = (hidden * m).sum(1) / m.sum(1)
        return F.normalize(self.text_proj(pooled), dim=-1)

    def itm_logits(self, image_embeds: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Matching logits (B, 2) averaged over query positions of a bidirectional pass."""
        hidden = self.qformer(ids, mask, image=image_embeds, use_queries=True).hidden  # (B, Q+T, D)
        return self.itm_head(hidden[:, : self.cfg.qformer.num_queries]).mean(dim=1)

    def itg_logits(self, dec_ids: torch.Tensor, mask: torch.Tensor, query_past: list[KV],
                   select: torch.Tensor | None = None) -> torch.Tensor:
        """Causal text pass attending to cached query keys/values -> next-token logits.

        Returns (B, T, V), or (N, V) for the N positions where the bool mask `select` (B, T) is set
        (the vocabulary projection is the costliest matmul of ITG, so skip positions without a target).
        """
        hidden = self.qformer(dec_ids, mask, use_queries=False, causal=True, past=query_past).hidden
        return self.qformer.lm_logits(hidden if select is None else hidden[select])

    # ------------------------------------------------------------------ feature-extraction API

    def encode_image(self, image_feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Frozen features (B, N, C) -> (query outputs (B, Q, D), ITC embeddings (B, Q, E))."""
        query = self.qformer(image=self.vision_input(image_feats), use_queries=True).hidden
        return query, self.image_itc_feats(query)

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """Captions -> (B, E) L2-normalised ITC text embeddings."""
        ids, mask = self.tokenize(texts)
        return self.text_itc_feats(ids, mask)

    def encode_multimodal(self, image_feats: torch.Tensor, texts: list[str]) -> torch.Tensor:
        """Image + text -> (B, Q, D) query outputs of the bidirectional (ITM) pass."""
        ids, mask = self.tokenize(texts)
        hidden = self.qformer(ids, mask, image=self.vision_input(image_feats), use_queries=True).hidden
        return hidden[:, : self.cfg.qformer.num_queries]

    def itm(self, image_feats: torch.Tensor, texts: list[str]) -> torch.Tensor:
        """Probability (B,) that caption i matches image i, from the ITM head."""
        ids, mask = self.tokenize(texts)
        return self.itm_logits(self.vision_input(image_feats), ids, mask).softmax(-1)[:, 1]

    @torch.no_grad()
    def query_diversity(self, image_feats: torch.Tensor) -> float:
        """Mean off-diagonal cosine between the query outputs of one image (1.0 = all queries identical).

        A training diagnostic: collapsed queries hand the LLM Q copies of one vector (docs/RESULTS.md).
        """
        if self.cfg.qformer.num_queries < 2:
            return 1.0
        was_training = self.training
        self.eval()
        hidden = self.qformer(image=self.vision_input(image_feats), use_queries=True).hidden  # (B, Q, D)
        self.train(was_training)
        return float(mean_query_cosine(hidden))

    # ------------------------------------------------------------------ stage 2: the LLM bridge

    def soft_prompt(self, image_feats: torch.Tensor) -> torch.Tensor:
        """Frozen features (B, N, C) -> (B, Q, H_llm) query outputs projected into the LLM's input space."""
        if self.llm_proj is None:
            raise RuntimeError("this is a stage-1 model (no LLM): train stage 2 first")
        query = self.qformer(image=self.vision_input(image_feats), use_queries=True).hidden  # (B, Q, D)
        return self.llm_proj(query)

    def freeze_text_branch(self) -> list[str]:
        """Stage 2 trains only what the query path uses; returns the names it froze."""
        frozen = []
        for name, p in self.named_parameters():
            if not name.startswith(FROZEN_PREFIXES) and is_text_only(name):
                p.requires_grad_(False)
                frozen.append(name)
        return frozen

    @torch.no_grad()
    def generate(self, image_feats: torch.Tensor, prompts: list[str] | None = None,
                 cfg: DecodeConfig | None = None, seeds: list[int] | None = None) -> list[str]:
        """Frozen features (B, N, C) [+ one prompt per image] -> generated text per image (`seeds`:
        one sampling seed per image, see blip2.generate.generate_ids)."""
        from blip2.generate import generate_ids

        assert self.llm is not None, "this is a stage-1 model (no LLM): train stage 2 first"
        prompts = prompts if prompts is not None else [""] * image_feats.shape[0]
        if len(prompts) != image_feats.shape[0]:
            raise ValueError(f"{len(prompts)} prompts for {image_feats.shape[0]} images")
        ids = self.llm.encode_prompts(prompts)
        out = generate_ids(self.llm, self.soft_prompt(image_feats), ids, cfg or DecodeConfig(), seeds=seeds)
        return [self.llm.decode(x) for x in out]

    def tokenize(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        from blip2.text import clean_caption, tokenize

        if self.tokenizer is None:
            raise RuntimeError("this Blip2 has no Q-Former tokenizer (built without one, or a model without "
                               "a text branch); build it with Blip2.build")
        ids, mask = tokenize(self.tokenizer, [clean_caption(t) for t in texts], self.cfg.qformer.max_text_len)
        return ids.to(self.device), mask.to(self.device)

    # ------------------------------------------------------------------ construction and I/O

    @classmethod
    def build(cls, cfg: Blip2Config, with_vision: bool = True) -> Blip2:
        """Frozen encoder and LLM (loaded from local files) + random trainable parts + tokenizer."""
        if "auto" in cfg.frozen_precisions:
            raise ValueError("precision 'auto' depends on the device: resolve it first with "
                             "blip2.model.resolve_auto(cfg, device) (training does), or name fp32, fp16 or bf16")
        from blip2.llm import load_llm
        from blip2.text import load_tokenizer

        vision = build_vision_encoder(cfg.vision) if with_vision else None
        tok = load_tokenizer(cfg.qformer.tokenizer, cfg.qformer.vocab_size) if cfg.qformer.text_branch else None
        llm = load_llm(cfg.llm) if cfg.llm is not None else None
        return cls(cfg, vision, tok, llm)

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Everything except the frozen encoder and LLM (whose weights come from their own sources)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith(FROZEN_PREFIXES)}

    def load_trainable(self, state: dict[str, torch.Tensor], source: str = "state",
                       allow_missing: tuple[str, ...] = ()) -> None:
        """Strict load of the trainable weights: every key present, no extras, same shapes.

        `allow_missing`: key prefixes that may be absent and keep their fresh initialisation
        (`llm_proj.` when a stage-2 model starts from a stage-1 checkpoint).
        """
        check_state(self.trainable_state_dict(), state, source, allow_missing)
        self.load_state_dict(state, strict=False)

    def save(self, directory: str | Path, meta: dict[str, Any] | None = None) -> None:
        """Atomically write model.safetensors (trainable weights) + config.json."""
        doc = {"model": to_dict(self.cfg), "meta": dict(meta or {})}
        if self.vision is not None:
            doc["meta"]["vision_fingerprint"] = self.vision.fingerprint()
        state = {k: v.detach().contiguous().cpu() for k, v in self.trainable_state_dict().items()}
        with atomic_dir(directory) as tmp:
            save_file(state, str(tmp / WEIGHTS))
            write_json(tmp / CONFIG, doc)

    @classmethod
    def from_dir(cls, directory: str | Path, with_vision: bool = True, precision: str | None = None) -> Blip2:
        """Rebuild from config.json and load model.safetensors strictly (or import a transformers
        BLIP-2 directory); returned in eval mode. `precision` (fp32, fp16, bf16) replaces the saved
        precision of the frozen image encoder and LLM, e.g. to halve their memory on a GPU; the
        Q-Former always runs in fp32."""
        directory = Path(directory)
        from blip2.interop.hf import is_hf_dir, load_hf

        if is_hf_dir(directory):  # a transformers BLIP-2 checkpoint directory
            return load_hf(directory, with_vision=with_vision, precision=precision or "fp32")
        require_model_dir(directory)
        doc = read_json(directory / CONFIG)
        cfg = from_dict(Blip2Config, doc["model"])
        trained_precision = cfg.vision.precision
        if precision is not None:  # replace() re-validates the value
            cfg.vision = replace(cfg.vision, precision=precision)
            cfg.llm = replace(cfg.llm, precision=precision) if cfg.llm is not None else None
        model = cls.build(cfg, with_vision=with_vision)
        model.load_trainable(load_file(str(directory / WEIGHTS)), source=str(directory / WEIGHTS))
        saved = doc.get("meta", {}).get("vision_fingerprint")
        current = model.vision.fingerprint(trained_precision) if model.vision is not None else None
        if current and saved and saved != current:
            log.warning("the frozen encoder differs from the one this model was trained with "
                        "(fingerprint %s != %s): features will not match training", current, saved)
        model.meta = doc.get("meta", {})
        return model.eval()  # inference mode, as transformers' from_pretrained; training calls .train()


class Blip2Ensemble:
    """Stage-2 models decoded as one (`blip2 eval caption --ensemble`): every member reads its own
    encoder's features into its own soft prompt, and each decoding step follows the members' mean
    next-token probability (blip2.generate.EnsembleState). Members may differ in encoder, Q-Former and
    LLM weights, but not in the LLM's vocabulary."""

    def __init__(self, members: list[Blip2]):
        if len(members) < 2:
            raise ValueError(f"an ensemble needs at least two models, got {len(members)}")
        for i, m in enumerate(members):
            if m.llm is None:
                raise ValueError(f"ensemble member {i} is a stage-1 model (no LLM): only stage-2 models generate")
            if not m.llm.same_vocabulary(members[0].llm):
                raise ValueError(f"ensemble member {i}'s LLM has another vocabulary than member 0's: members must "
                                 "share one tokenizer, since their next-token probabilities are averaged")
        self.members = members

    @property
    def llm(self) -> FrozenLM:
        """Member 0's LLM, which tokenises prompts and decodes outputs for all (one vocabulary)."""
        assert self.members[0].llm is not None
        return self.members[0].llm

    def eval(self) -> Blip2Ensemble:
        for m in self.members:
            m.eval()
        return self

    @torch.no_grad()
    def generate(self, image_feats: list[torch.Tensor], prompts: list[str] | None = None,
                 cfg: DecodeConfig | None = None, seeds: list[int] | None = None) -> list[str]:
        """One (B, N_m, C_m) feature tensor per member (from its own encoder) -> text per image."""
        from blip2.generate import generate_ensemble_ids

        if len(image_feats) != len(self.members):
            raise ValueError(f"{len(image_feats)} feature tensors for {len(self.members)} members: one per member")
        b = image_feats[0].shape[0]
        prompts = prompts if prompts is not None else [""] * b
        if len(prompts) != b:
            raise ValueError(f"{len(prompts)} prompts for {b} images")
        ids = self.llm.encode_prompts(prompts)
        for i, m in enumerate(self.members[1:], 1):
            assert m.llm is not None
            if m.llm.encode_prompts(prompts) != ids:
                raise ValueError(f"ensemble member {i} formats prompts differently from member 0 (llm settings such "
                                 "as prompt_special_tokens differ): members must see the same prompt tokens")
        members = [(m.llm, m.soft_prompt(f)) for m, f in zip(self.members, image_feats, strict=True)]
        out = generate_ensemble_ids(members, ids, cfg or DecodeConfig(), seeds=seeds)  # type: ignore[misc]
        return [self.llm.decode(x) for x in out]
