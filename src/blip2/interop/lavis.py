"""LAVIS checkpoints (salesforce/LAVIS `blip2_models`) -> our Blip2.

LAVIS saves one state dict per model: the stage-1 `blip2_pretrained.pth` (EVA ViT + Q-Former with
its text branch and heads) and the stage-2 OPT / FlanT5 models (Q-Former without its text branch,
`opt_proj` / `t5_proj`; the LLM itself is not in the file). The map, LAVIS name -> ours:

    query_tokens                                  qformer.query_tokens
    Qformer.bert.embeddings.*                     qformer.embeddings.*       (same BERT names)
    Qformer.bert.encoder.layer.i.*                qformer.layer.i.*          (query FFN: *_query)
    Qformer.cls.predictions.{transform.*,bias}    qformer.lm_head.*          (decoder tied to words)
    ln_vision, vision_proj, text_proj,            the same names
      itm_head, temp
    opt_proj / t5_proj / llm_proj                 llm_proj
    visual_encoder.*  (EVA ViT)                   a transformers Blip2VisionModel directory

The EVA attention has q and v biases but no k bias; transformers' BLIP-2 ViT stores the three as
one qkv bias with zeros in the middle, which is how it is written here. Loading never unpickles
code: `.pth` files are read with `torch.load(weights_only=True)` (or pass a `.safetensors` file).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import torch

from blip2.config import PACKAGED, Blip2Config, LLMConfig, QFormerConfig, VisionConfig
from blip2.io import atomic_dir

log = logging.getLogger(__name__)

# LAVIS -> ours for the Q-Former and heads, first match wins; None = dropped (after a check).
KEY_MAP: list[tuple[str, str | None]] = [
    (r"^query_tokens$", "qformer.query_tokens"),
    (r"^Qformer\.bert\.embeddings\.position_ids$", None),
    (r"^Qformer\.bert\.embeddings\.(.*)$", r"qformer.embeddings.\1"),
    (r"^Qformer\.bert\.encoder\.layer\.(\d+)\.(.*)$", r"qformer.layer.\1.\2"),
    (r"^Qformer\.cls\.predictions\.transform\.(.*)$", r"qformer.lm_head.transform.\1"),
    (r"^Qformer\.cls\.predictions\.bias$", "qformer.lm_head.bias"),
    (r"^Qformer\.cls\.predictions\.decoder\.(weight|bias)$", None),  # tied: checked, not stored
    (r"^(ln_vision|vision_proj|text_proj|itm_head)\.(weight|bias)$", r"\1.\2"),
    (r"^temp$", "temp"),
    (r"^(opt_proj|t5_proj|llm_proj)\.(weight|bias)$", r"llm_proj.\2"),
]
VISUAL, LLM_PREFIXES = "visual_encoder.", ("opt_model.", "t5_model.", "llm_model.")


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict of a LAVIS checkpoint (.pth with {"model": ...} or a bare dict, or .safetensors)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LAVIS checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        from blip2.interop.hf import open_safetensors

        with open_safetensors(path) as st:
            return {k: st.get_tensor(k) for k in st.keys()}  # noqa: SIM118
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure gets the same advice
        raise ValueError(f"{path} cannot be read as a weights-only checkpoint ({type(e).__name__}: {e}). It is "
                         "truncated, corrupt, or holds pickled Python objects (optimizer state, OmegaConf "
                         "configs) that are never unpickled here: re-save just the state dict, e.g. as "
                         ".safetensors, where you trust the file") from e
    state = obj.get("model", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} holds no state dict of tensors (expected {{'model': state_dict}})")
    return state


def map_qformer(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """LAVIS names -> ours for everything but the vision tower and LLM; unknown keys raise."""
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for k, v in state.items():
        if k.startswith(VISUAL) or k.startswith(LLM_PREFIXES):
            continue
        for pattern, repl in KEY_MAP:
            if re.match(pattern, k):
                if repl is not None:
                    out[re.sub(pattern, repl, k)] = v
                break
        else:
            unknown.append(k)
    if unknown:
        raise KeyError(f"{len(unknown)} keys of no known LAVIS BLIP-2 layout: {sorted(unknown)[:8]}")
    dec = state.get("Qformer.cls.predictions.decoder.weight")
    if dec is not None and not torch.equal(dec, state["Qformer.bert.embeddings.word_embeddings.weight"]):
        raise ValueError("Qformer.cls.predictions.decoder.weight differs from the word embeddings; LAVIS ties "
                         "them, so this checkpoint is not in the layout this importer reads")
    return out


def qformer_config(state: dict[str, torch.Tensor], tokenizer: str = PACKAGED, num_heads: int | None = None
                   ) -> QFormerConfig:
    """Q-Former sizes read off the tensor shapes (heads: BERT's hidden/64 unless given)."""
    q = state["qformer.query_tokens"]
    hidden = q.shape[-1]
    layers = sorted({int(m.group(1)) for k in state if (m := re.match(r"qformer\.layer\.(\d+)\.", k))})
    cross = [i for i in layers if f"qformer.layer.{i}.crossattention.self.key.weight" in state]
    if not layers or not cross:
        raise KeyError("no Q-Former layers / cross-attention found (Qformer.bert.encoder.layer.*)")
    freq = cross[1] - cross[0] if len(cross) > 1 else len(layers)
    if cross != list(range(0, len(layers), freq)):
        raise ValueError(f"cross-attention in layers {cross}: not every {freq}th layer from 0")
    text_branch = "qformer.embeddings.word_embeddings.weight" in state
    words = state.get("qformer.embeddings.word_embeddings.weight")
    pos = state.get("qformer.embeddings.position_embeddings.weight")
    proj = state.get("vision_proj.weight")
    return QFormerConfig(
        init="none", tokenizer=tokenizer, num_layers=len(layers), hidden_size=hidden,
        num_heads=num_heads or max(1, hidden // 64),
        intermediate_size=state["qformer.layer.0.intermediate_query.dense.weight"].shape[0],
        num_queries=q.shape[1], cross_attention_freq=freq,
        vision_width=state["qformer.layer.0.crossattention.self.key.weight"].shape[1],
        vocab_size=words.shape[0] if words is not None else 30523,
        max_position_embeddings=pos.shape[0] if pos is not None else 512,
        embed_dim=proj.shape[0] if proj is not None else 256, text_pool="cls", text_branch=text_branch)


def eva_to_hf_vision(state: dict[str, torch.Tensor], ln_vision: dict[str, torch.Tensor]
                     ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """LAVIS EVA ViT (`visual_encoder.*`) -> transformers Blip2VisionModel weights + config kwargs."""
    v = {k[len(VISUAL):]: t for k, t in state.items() if k.startswith(VISUAL)}
    blocks = sorted({int(m.group(1)) for k in v if (m := re.match(r"blocks\.(\d+)\.", k))})
    out = {
        "embeddings.class_embedding": v.pop("cls_token"),
        "embeddings.position_embedding": v.pop("pos_embed"),
        "embeddings.patch_embedding.weight": v.pop("patch_embed.proj.weight"),
        "embeddings.patch_embedding.bias": v.pop("patch_embed.proj.bias"),
        "post_layernorm.weight": ln_vision["weight"], "post_layernorm.bias": ln_vision["bias"],
    }
    names = {"norm1": "layer_norm1", "norm2": "layer_norm2", "attn.proj": "self_attn.projection",
             "attn.qkv": "self_attn.qkv", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
    for i in blocks:
        src, dst = f"blocks.{i}.", f"encoder.layers.{i}."
        q_bias, v_bias = v.pop(src + "attn.q_bias"), v.pop(src + "attn.v_bias")
        out[dst + "self_attn.qkv.bias"] = torch.cat([q_bias, torch.zeros_like(v_bias), v_bias])
        for a, b in names.items():
            for kind in ("weight", "bias"):
                if src + f"{a}.{kind}" in v:
                    out[dst + f"{b}.{kind}"] = v.pop(src + f"{a}.{kind}")
    if v:
        raise KeyError(f"visual_encoder keys with no transformers counterpart (relative position bias or a "
                       f"final norm are not supported): {sorted(v)[:8]}")
    patch = out["embeddings.patch_embedding.weight"]
    width, patch_size = patch.shape[0], patch.shape[-1]
    n_pos = out["embeddings.position_embedding"].shape[1] - 1
    cfg = {"hidden_size": width, "intermediate_size": out["encoder.layers.0.mlp.fc1.weight"].shape[0],
           # heads are not in the shapes: EVA ViT-g (1408 wide) has 16, most other ViTs 64-wide heads
           "num_hidden_layers": len(blocks), "num_attention_heads": 16 if width == 1408 else max(1, width // 64),
           "image_size": int(round(n_pos ** 0.5)) * patch_size, "patch_size": patch_size,
           "layer_norm_eps": 1e-6, "qkv_bias": True}
    return out, cfg


def eva_checkpoint(path: str | Path, drop_last: int = 1) -> dict[str, torch.Tensor]:
    """An EVA ViT weight file as LAVIS uses it: the last `drop_last` blocks and the final norm/head
    are not part of BLIP-2's encoder (LAVIS builds EVA ViT-g with 39 of its 40 blocks)."""
    raw = read_checkpoint(path)
    raw = {k[len(VISUAL):] if k.startswith(VISUAL) else k: v for k, v in raw.items()}
    blocks = sorted({int(m.group(1)) for k in raw if (m := re.match(r"blocks\.(\d+)\.", k))})
    if len(blocks) <= drop_last:
        raise ValueError(f"{path} has {len(blocks)} ViT blocks; cannot drop the last {drop_last}")
    dropped = {f"blocks.{i}." for i in blocks[len(blocks) - drop_last:]}
    return {VISUAL + k: v for k, v in raw.items()
            if not k.startswith(("norm.", "fc_norm.", "head.", "rope.")) and not k.startswith(tuple(dropped))}


def convert_lavis(ckpt: str | Path, out: str | Path, llm: str | None = None, vision: str | None = None,
                  tokenizer: str = PACKAGED, vision_heads: int | None = None, qformer_heads: int | None = None):
    """Convert a LAVIS checkpoint into our model directory `out` (plus `out/vision` for its EVA ViT).

    llm: local transformers directory of the LM a stage-2 checkpoint was trained with (LAVIS files
    do not contain it). vision: needed when the checkpoint has no `visual_encoder.*` (LAVIS saves
    only trained weights): an EVA weight file (converted, its last block dropped as LAVIS does) or a
    transformers vision tower / BLIP-2 directory. Nothing is written unless every key maps and every
    shape fits.
    """
    import transformers as tf

    from blip2.model import Blip2

    state = read_checkpoint(ckpt)
    ours = map_qformer(state)
    qc = qformer_config(ours, tokenizer, qformer_heads)
    has_proj = "llm_proj.weight" in ours
    if has_proj and llm is None:
        raise ValueError(f"{ckpt} is a stage-2 checkpoint (it has {'opt' if 'opt_proj.weight' in state else 't5'}"
                         "_proj): pass the directory of the LLM it was trained with (--llm)")
    llm_cfg = LLMConfig(path=str(llm), prompt_special_tokens=True) if has_proj else None
    out = Path(out)
    tower_state = None
    eva = {k: v for k, v in state.items() if k.startswith(VISUAL)}
    if not eva and vision is not None and Path(vision).is_file():  # the EVA weights LAVIS downloads
        eva = eva_checkpoint(vision)
    if eva:
        ln = {"weight": ours["ln_vision.weight"], "bias": ours["ln_vision.bias"]}
        tower_state, vkw = eva_to_hf_vision(eva, ln)
        if vision_heads:
            vkw["num_attention_heads"] = vision_heads
        tower = tf.Blip2VisionModel(tf.Blip2VisionConfig(**vkw))
        tower.load_state_dict(tower_state, strict=True)
        vision_path = out / "vision"
    elif vision is None:
        raise ValueError(f"{ckpt} has no visual_encoder.* weights (LAVIS saves only trained weights): pass the "
                         "encoder it was trained with as --vision, either its EVA .pth (e.g. eva_vit_g.pth) or a "
                         "transformers BLIP-2 / vision tower directory")
    else:
        vision_path = Path(vision)
    with atomic_dir(out) as tmp:
        if tower_state is not None:
            tower.save_pretrained(tmp / "vision")
            tf.BlipImageProcessor(size={"height": vkw["image_size"], "width": vkw["image_size"]},
                                  image_mean=[0.48145466, 0.4578275, 0.40821073],
                                  image_std=[0.26862954, 0.26130258, 0.27577711]).save_pretrained(tmp / "vision")
            build_vision = str(tmp / "vision")
        else:
            build_vision = str(vision_path)
        cfg = Blip2Config(vision=VisionConfig(name="hf", path=build_vision, drop_last_layers=0), qformer=qc,
                          llm=llm_cfg)
        model = Blip2.build(cfg)
        model.load_trainable(ours, source=str(ckpt))
        model.cfg.vision.path = str(vision_path.resolve() if tower_state is None else (out / "vision").resolve())
        model.save(tmp / "model", meta={"converted_from": f"lavis:{ckpt}"})
    return Blip2.from_dir(out / "model")
