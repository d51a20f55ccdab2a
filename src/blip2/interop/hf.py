"""transformers-format BLIP-2 checkpoints <-> our Blip2.

transformers keeps BLIP-2 in two classes: `Blip2ForConditionalGeneration` (ViT + Q-Former without a
text branch + projection + LM) and `Blip2ForImageTextRetrieval` (ViT + Q-Former with its text
branch + ITC/ITM heads, no LM). Both map onto one Blip2 of ours through `KEY_MAP`, our parameter
name -> theirs, applied in both directions. Layout facts the map encodes:

    ours                                    transformers
    qformer.query_tokens                    query_tokens
    qformer.embeddings.LayerNorm            qformer.layernorm      (on [queries ; text] in both)
    qformer.embeddings.word/position_emb.   embeddings.*           (retrieval only)
    qformer.layer.i.attention.self.*        qformer.encoder.layer.i.attention.attention.*
    qformer.layer.i.crossattention.self.*   qformer.encoder.layer.i.crossattention.attention.*
    ln_vision                               vision_model.post_layernorm
    vision_proj / text_proj / llm_proj      vision_projection / text_projection / language_projection

The vision tower (`vision_model.*`, read by `blip2.vision.hf`) and the LM (`language_model.*`,
`load_language_model`) are loaded from the same directory. transformers has no ITG head and no
learned temperature: imported models keep those freshly initialised (listed in `model.meta`).
`to_transformers` builds transformers' class from ours in memory (`save_hf` writes it); with
`any_encoder=True` it also takes models whose encoder is not transformers' ViT.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from blip2.config import PACKAGED, Blip2Config, LLMConfig, QFormerConfig, VisionConfig
from blip2.io import atomic_dir

log = logging.getLogger(__name__)

HF_MODEL_TYPE = "blip-2"
IMAGE_TOKEN = "<image>"
VISION, LM = "vision_model.", "language_model."
# Ours -> transformers, first match wins; None = transformers has no such weight.
KEY_MAP: list[tuple[str, str | None]] = [
    (r"^qformer\.query_tokens$", "query_tokens"),
    (r"^qformer\.embeddings\.LayerNorm\.(.*)$", r"qformer.layernorm.\1"),
    (r"^qformer\.embeddings\.(word_embeddings|position_embeddings)\.(.*)$", r"embeddings.\1.\2"),
    (r"^qformer\.layer\.(\d+)\.(attention|crossattention)\.self\.(.*)$", r"qformer.encoder.layer.\1.\2.attention.\3"),
    (r"^qformer\.layer\.(\d+)\.(.*)$", r"qformer.encoder.layer.\1.\2"),
    (r"^qformer\.lm_head\..*$", None),
    (r"^temp$", None),
    (r"^ln_vision\.(.*)$", r"vision_model.post_layernorm.\1"),
    (r"^vision_proj\.(.*)$", r"vision_projection.\1"),
    (r"^text_proj\.(.*)$", r"text_projection.\1"),
    (r"^itm_head\.(.*)$", r"itm_head.\1"),
    (r"^llm_proj\.(.*)$", r"language_projection.\1"),
]
NOT_IN_HF = ("qformer.lm_head.", "temp")  # ours only: keep their fresh initialisation on import


def hf_key(ours: str) -> str | None:
    """Our trainable parameter name -> its transformers name (None: transformers has none)."""
    for pattern, repl in KEY_MAP:
        if re.match(pattern, ours):
            return None if repl is None else re.sub(pattern, repl, ours)
    raise KeyError(f"no transformers name for parameter {ours!r}; extend blip2.interop.hf.KEY_MAP")


def is_hf_dir(path: str | Path) -> bool:
    """Whether `path` holds a transformers BLIP-2 checkpoint (config.json with model_type blip-2)."""
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    try:
        return json.loads(cfg.read_text()).get("model_type") == HF_MODEL_TYPE
    except json.JSONDecodeError:
        return False


@contextlib.contextmanager
def open_safetensors(f: str | Path) -> Iterator[Any]:
    """safe_open that turns a truncated or corrupt file into a ValueError naming it."""
    try:
        with safe_open(str(f), framework="pt") as st:
            yield st
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{f} is not a readable safetensors file ({e}); re-download or re-export it") from e


def read_safetensors(path: str | Path, prefix: str = "", exclude: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """Tensors whose names start with `prefix` (prefix removed) from every *.safetensors in a directory.

    Files are opened lazily, so reading the Q-Former part of a 4B-parameter checkpoint stays cheap.
    """
    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {path} (pickled .bin checkpoints are not loaded: "
                                "convert them with transformers' save_pretrained(safe_serialization=True))")
    out: dict[str, torch.Tensor] = {}
    for f in files:
        with open_safetensors(f) as st:
            for k in st.keys():  # noqa: SIM118 (safe_open is not a mapping)
                if k.startswith(prefix) and not k.startswith(exclude):
                    out[k[len(prefix):]] = st.get_tensor(k)
    return out


def safetensors_keys(path: str | Path) -> list[str]:
    """Tensor names of every *.safetensors in a directory, without reading the tensors."""
    names: list[str] = []
    for f in sorted(Path(path).glob("*.safetensors")):
        with open_safetensors(f) as st:
            names.extend(st.keys())  # noqa: SIM118
    return names


def _hf_config(path: Path):
    from transformers import Blip2Config as HFBlip2Config

    return HFBlip2Config.from_pretrained(path, local_files_only=True)


def config_from_hf(hf: Any, path: str | Path, text_branch: bool, has_llm: bool, precision: str = "fp32",
                   suppress: list[int] | None = None) -> Blip2Config:
    """Our Blip2Config for a transformers BLIP-2 directory (the vision tower and LM stay in it)."""
    vc, qc = hf.vision_config, hf.qformer_config
    vision = VisionConfig(name="hf", path=str(path), drop_last_layers=0, image_size=_int(vc.image_size),
                          precision=precision)
    qformer = QFormerConfig(
        init="none", tokenizer=str(path) if text_branch else PACKAGED, num_layers=qc.num_hidden_layers,
        hidden_size=qc.hidden_size, num_heads=qc.num_attention_heads, intermediate_size=qc.intermediate_size,
        num_queries=hf.num_query_tokens, cross_attention_freq=qc.cross_attention_frequency,
        vision_width=vc.hidden_size, vocab_size=qc.vocab_size, max_position_embeddings=qc.max_position_embeddings,
        max_text_len=min(32, qc.max_position_embeddings), embed_dim=hf.image_text_hidden_size,
        layer_norm_eps=qc.layer_norm_eps, hidden_dropout=qc.hidden_dropout_prob,
        attention_dropout=qc.attention_probs_dropout_prob, initializer_range=qc.initializer_range,
        text_pool="cls", text_branch=text_branch, ln_vision_eps=vc.layer_norm_eps)
    llm = LLMConfig(path=str(path), precision=precision, prompt_special_tokens=True,
                    suppress_token_ids=list(suppress or [])) if has_llm else None
    return Blip2Config(vision=vision, qformer=qformer, llm=llm)


def _int(size: Any) -> int:
    return int(size[0] if isinstance(size, (list, tuple)) else size)


def _generation_suppress(path: Path) -> list[int]:
    gen = path / "generation_config.json"
    if not gen.is_file():
        return []
    return [int(t) for t in (json.loads(gen.read_text()).get("suppress_tokens") or [])]


def load_hf(path: str | Path, with_vision: bool = True, precision: str = "fp32"):
    """Build our Blip2 from a transformers BLIP-2 directory, with strict key and shape checks."""
    from blip2.model import Blip2

    path = Path(path)
    if not is_hf_dir(path):
        raise ValueError(f"{path} is not a transformers BLIP-2 directory (config.json model_type != 'blip-2')")
    hf = _hf_config(path)
    theirs = read_safetensors(path, exclude=(VISION, LM))
    for k, v in read_safetensors(path, prefix=VISION + "post_layernorm.").items():
        theirs[VISION + "post_layernorm." + k] = v
    has_llm = any(k.startswith(LM) for k in safetensors_keys(path))
    text_branch = "embeddings.word_embeddings.weight" in theirs
    if not has_llm and not text_branch:
        raise ValueError(f"{path}: neither language_model.* nor the Q-Former text embeddings are present; "
                         "expected a Blip2ForConditionalGeneration or Blip2ForImageTextRetrieval checkpoint")
    cfg = config_from_hf(hf, path, text_branch, has_llm, precision, _generation_suppress(path))
    model = Blip2.build(cfg, with_vision=with_vision)
    state, fresh = map_from_hf(model, theirs, str(path))
    model.load_trainable(state, source=str(path), allow_missing=NOT_IN_HF)
    model.meta = {"source": "transformers", "path": str(path), "fresh": fresh}
    if fresh:
        log.info("%s: %s not in transformers' BLIP-2; kept freshly initialised", path, ", ".join(fresh))
    return model.eval()


def map_from_hf(model: nn.Module, theirs: dict[str, torch.Tensor], source: str
                ) -> tuple[dict[str, torch.Tensor], list[str]]:
    """transformers tensors -> our trainable state; unknown or missing keys and bad shapes raise."""
    state: dict[str, torch.Tensor] = {}
    fresh, missing = [], []
    for ours, t in model.trainable_state_dict().items():
        name = hf_key(ours)
        if name is None:
            fresh.append(ours)
        elif name not in theirs:
            missing.append(name)
        elif theirs[name].shape != t.shape:
            raise ValueError(f"{source}: {name} has shape {tuple(theirs[name].shape)} but {ours} needs "
                             f"{tuple(t.shape)}; the checkpoint does not match its config.json")
        else:
            state[ours] = theirs[name]
    missing.sort()
    unknown = sorted(set(theirs) - {hf_key(k) for k in state})
    if missing or unknown:
        raise KeyError(f"{source}: {len(missing)} missing keys {missing[:8]}, {len(unknown)} unknown keys "
                       f"{unknown[:8]} (not a BLIP-2 checkpoint of the kind its config.json describes)")
    return state, fresh


def load_language_model(path: str | Path, text_config: Any, dtype: torch.dtype) -> nn.Module:
    """The LM of a Blip2ForConditionalGeneration checkpoint: transformers' own loader (memory-mapped,
    no random init of billions of weights) reads `language_model.*` as the LM's weights; a missing,
    misshapen or unknown LM weight raises."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM
    from transformers.utils import logging as hf_logging

    auto = AutoModelForSeq2SeqLM if text_config.is_encoder_decoder else AutoModelForCausalLM
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its report lists every non-LM tensor as unexpected; we check below
    try:
        lm, info = auto.from_pretrained(path, config=text_config, dtype=dtype, local_files_only=True,
                                        trust_remote_code=False, key_mapping={r"^language_model\.": ""},
                                        output_loading_info=True)
    finally:
        hf_logging.set_verbosity(verbosity)
    others = (VISION, "qformer.", "query_tokens", "language_projection.", "embeddings.", "vision_projection.",
              "text_projection.", "itm_head.")
    unknown = [k for k in info.get("unexpected_keys", []) if not k.startswith(others)]
    missing = list(info.get("missing_keys", []))
    mismatched = list(info.get("mismatched_keys", []))
    if missing or unknown or mismatched:
        raise KeyError(f"{path}: language model weights do not match its text_config: {len(missing)} missing "
                       f"{sorted(missing)[:8]}, {len(unknown)} unexpected {sorted(unknown)[:8]}, "
                       f"{len(mismatched)} with other shapes {mismatched[:4]}")
    return lm.eval()


# --------------------------------------------------------------------------- export


def save_hf(model, out: str | Path) -> str:
    """Write `model` as a transformers BLIP-2 directory; returns the class written.

    With an LLM: Blip2ForConditionalGeneration (the Q-Former's text branch is not part of that
    class and is left out), its tokenizer gaining the <image> placeholder token that transformers
    needs (never generated: listed in generation_config.suppress_tokens). Without: the retrieval
    class. The vision tower must be transformers' BLIP-2 ViT; nothing is written on any error.
    """
    import transformers as tf

    hf_model, tokenizer = to_transformers(model)
    image_processor = tf.BlipImageProcessor(
        size={"height": model.cfg.vision.image_size, "width": model.cfg.vision.image_size},
        image_mean=list(model.vision.preprocess.mean), image_std=list(model.vision.preprocess.std),
        do_convert_rgb=True)
    processor = tf.Blip2Processor(image_processor, tokenizer, num_query_tokens=model.cfg.qformer.num_queries)
    with atomic_dir(out) as tmp:
        hf_model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
    return type(hf_model).__name__


def to_transformers(model, any_encoder: bool = False) -> tuple[nn.Module, Any]:
    """Our model as transformers' own BLIP-2 class, in memory, with the same weights: (model, tokenizer).

    transformers' classes take only their BLIP-2 ViT. With `any_encoder=True` another frozen encoder
    of ours (EfficientNet-Lite0, a CLIP tower, ...) is put where that ViT goes (`EncoderAsVisionModel`),
    so transformers' own Q-Former, projection, LM and `generate` run on our encoder's features: the
    reference for parity checks and benchmarks of models transformers could not otherwise load.
    Such a model cannot be saved in transformers' format (`save_hf` refuses it).
    """
    import transformers as tf

    cfg, cls_name, tokenizer = _export_config(model, any_encoder)
    hf_model = getattr(tf, cls_name)(cfg)
    if not _is_hf_vit(model.vision):
        hf_model.vision_model = EncoderAsVisionModel(model.vision, model.cfg.qformer.ln_vision_eps)
    missing, unexpected = hf_model.load_state_dict(_export_state(model, hf_model), strict=False)
    if unexpected or missing:
        raise KeyError(f"export to {cls_name}: {len(missing)} missing {missing[:8]}, {len(unexpected)} "
                       f"unexpected {unexpected[:8]}")
    if model.llm is not None:
        _check_lm_kept(model.llm.model, hf_model.language_model)
        hf_model.generation_config.suppress_tokens = [cfg.image_token_index]
    return hf_model.eval(), tokenizer


def _check_lm_kept(ours: nn.Module, theirs: nn.Module) -> None:
    """transformers re-ties weights its config declares tied (T5 always ties its embeddings and head
    in transformers 5): an LM whose tied copies differ would change silently, so refuse it."""
    target = theirs.state_dict()
    for k, t in ours.state_dict().items():
        got = target[k][: t.shape[0]] if target[k].shape != t.shape else target[k]  # grown by the <image> row
        if not torch.equal(got.to(t.dtype), t):
            raise ValueError(f"the LM's {k} changes in transformers' {type(theirs).__name__}: its config ties "
                             "weights that differ in this model, so transformers cannot represent it")


class EncoderAsVisionModel(nn.Module):
    """A frozen encoder of ours in the place of transformers' BLIP-2 ViT: pixels (B, 3, S, S) ->
    last_hidden_state = post_layernorm(features) (B, T, C), which is what the ViT hands its Q-Former
    (our `ln_vision` is transformers' `vision_model.post_layernorm`)."""

    def __init__(self, encoder: nn.Module, eps: float):
        import copy

        super().__init__()
        self.encoder = copy.deepcopy(encoder)  # its own copy: moving or casting it leaves ours alone
        self.post_layernorm = nn.LayerNorm(encoder.feature_dim, eps=eps)

    def forward(self, pixel_values: torch.Tensor, **kwargs: Any) -> Any:
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        feats = self.post_layernorm(self.encoder(pixel_values))  # (B, T, C)
        return BaseModelOutputWithPooling(last_hidden_state=feats, pooler_output=feats[:, 0])


def _is_hf_vit(vision: nn.Module | None) -> bool:
    from blip2.vision.hf import HFVisionEncoder

    return isinstance(vision, HFVisionEncoder) and vision.model.config.model_type == "blip_2_vision_model"


def _export_config(model, any_encoder: bool = False) -> tuple[Any, str, Any]:
    import copy

    import transformers as tf

    vision, qc = model.vision, model.cfg.qformer
    if _is_hf_vit(vision):
        vcfg = copy.deepcopy(vision.model.config)  # kept layers only: our features are the last kept layer's
        if qc.ln_vision_eps != vcfg.layer_norm_eps:  # transformers has one epsilon for all of its ViT's norms
            log.warning("ln_vision eps %g becomes %g (post_layernorm shares the ViT's epsilon in transformers); "
                        "outputs change by rounding only", qc.ln_vision_eps, vcfg.layer_norm_eps)
    elif any_encoder and vision is not None:  # a placeholder the size of our features, replaced after building
        vcfg = tf.Blip2VisionConfig(hidden_size=vision.feature_dim, intermediate_size=1, num_hidden_layers=0,
                                    num_attention_heads=1, image_size=16, patch_size=16,
                                    layer_norm_eps=qc.ln_vision_eps)
    else:
        from blip2.vision.hf import HFVisionEncoder

        kind = vision.model.config.model_type if isinstance(vision, HFVisionEncoder) else model.cfg.vision.name
        hint = (" or was built without its vision tower (build it with_vision=True)" if vision is None else
                "; to run it with transformers' classes in memory: to_transformers(model, any_encoder=True)")
        raise ValueError(f"transformers' BLIP-2 classes take only their own ViT (blip_2_vision_model); this model's "
                         f"frozen encoder is {kind!r}{hint}")
    qformer_cfg = tf.Blip2QFormerConfig(
        vocab_size=qc.vocab_size, hidden_size=qc.hidden_size, num_hidden_layers=qc.num_layers,
        num_attention_heads=qc.num_heads, intermediate_size=qc.intermediate_size,
        hidden_dropout_prob=qc.hidden_dropout, attention_probs_dropout_prob=qc.attention_dropout,
        max_position_embeddings=qc.max_position_embeddings, initializer_range=qc.initializer_range,
        layer_norm_eps=qc.layer_norm_eps, cross_attention_frequency=qc.cross_attention_freq,
        encoder_hidden_size=vcfg.hidden_size, use_qformer_text_input=model.llm is None)
    common = {"vision_config": vcfg.to_dict(), "qformer_config": qformer_cfg.to_dict(),
              "num_query_tokens": qc.num_queries, "image_text_hidden_size": qc.embed_dim}
    if model.llm is None:
        if not qc.text_branch:
            raise ValueError("this model has neither an LLM nor a Q-Former text branch: nothing to export")
        if qc.text_pool != "cls":
            raise ValueError(f"Blip2ForImageTextRetrieval embeds text by its [CLS] output; this model uses "
                             f"qformer.text_pool={qc.text_pool!r}, so its ITC scores would change in transformers")
        text_cfg = tf.OPTConfig(vocab_size=8, hidden_size=8, num_hidden_layers=1, ffn_dim=8, num_attention_heads=1)
        return tf.Blip2Config(text_config=text_cfg.to_dict(), **common), "Blip2ForImageTextRetrieval", model.tokenizer
    tokenizer = copy.deepcopy(model.llm.tokenizer)
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    text_cfg = copy.deepcopy(model.llm.model.config)
    rows = model.llm.model.get_input_embeddings().weight.shape[0]
    text_cfg.vocab_size = max(rows, image_id + 1)
    cfg = tf.Blip2Config(text_config=text_cfg.to_dict(), image_token_index=image_id, **common)
    return cfg, "Blip2ForConditionalGeneration", tokenizer


def _export_state(model, hf_model: nn.Module) -> dict[str, torch.Tensor]:
    target = hf_model.state_dict()
    state: dict[str, torch.Tensor] = {}
    for ours, t in model.trainable_state_dict().items():
        name = hf_key(ours)
        if name is not None and name in target:
            state[name] = t
    if isinstance(hf_model.vision_model, EncoderAsVisionModel):
        for k, t in model.vision.state_dict().items():
            state[VISION + "encoder." + k] = t
    else:
        for k, t in model.vision.model.state_dict().items():
            if not k.startswith("post_layernorm."):
                state[VISION + k] = t
    if model.llm is not None:
        for k, t in model.llm.model.state_dict().items():
            want = target[LM + k].shape
            if t.shape != want:  # one new row for <image>: zeros (it is replaced before the LM sees it)
                grown = torch.zeros(want, dtype=t.dtype)
                grown[: t.shape[0]] = t
                t = grown
            state[LM + k] = t
    return state
