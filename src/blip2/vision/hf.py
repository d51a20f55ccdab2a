"""transformers vision towers (CLIP, SigLIP, ViT, DINOv2, the BLIP-2 EVA ViT-g) from a local directory.

The tower is built from its config with `drop_last_layers` fewer layers (so the dropped layer
costs nothing), then its weights are loaded strictly from the directory's safetensors files; the
dropped layers' and other towers' weights are reported as unused. Features are the last kept
layer's hidden states *before* any final LayerNorm (the Q-Former's `ln_vision` takes that role).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from blip2.config import VisionConfig
from blip2.vision.base import FrozenImageEncoder, file_fingerprint
from blip2.vision.transforms import Preprocess

log = logging.getLogger(__name__)

# Prefixes under which a vision tower's weights appear in full multimodal checkpoints.
PREFIXES = ("", "vision_model.", "model.vision_model.", "vision_tower.", "model.vision_tower.")


def _tower_class(model_type: str):
    import transformers as tf

    table = {
        "clip_vision_model": tf.CLIPVisionModel,
        "siglip_vision_model": tf.SiglipVisionModel,
        "vit": tf.ViTModel,
        "dinov2": tf.Dinov2Model,
        "blip_2_vision_model": tf.Blip2VisionModel,
    }
    if model_type not in table:
        raise ValueError(f"unsupported vision tower type {model_type!r}; supported: {sorted(table)}")
    return table[model_type]


def _vision_config(path: Path):
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    return getattr(cfg, "vision_config", None) or cfg


class HFVisionEncoder(FrozenImageEncoder):
    def __init__(self, cfg: VisionConfig):
        path = Path(cfg.path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"vision.path={path} has no config.json (expected a transformers "
                                    "model directory saved with save_pretrained)")
        weights = sorted(path.glob("*.safetensors"))
        if not weights:
            raise FileNotFoundError(f"no *.safetensors weights in {path}; convert .bin weights with "
                                    "safetensors first (pickled weights are not loaded)")
        super().__init__(cfg.precision, {"kind": "hf", "weights": file_fingerprint(weights),
                                         "drop": cfg.drop_last_layers, "precision": cfg.precision})
        vcfg = _vision_config(path)
        total = vcfg.num_hidden_layers
        if cfg.drop_last_layers >= total:
            raise ValueError(f"vision.drop_last_layers={cfg.drop_last_layers} but the tower has {total}")
        vcfg.num_hidden_layers = total - cfg.drop_last_layers
        self.model = _tower_class(vcfg.model_type)(vcfg)
        self._load(weights, total)
        self.feature_dim = vcfg.hidden_size
        size = getattr(vcfg, "image_size", cfg.image_size)
        self.preprocess = _read_preprocess(path, size)
        self.freeze()
        with torch.no_grad():
            probe = self._features(torch.zeros(1, 3, size, size, dtype=self.dtype))
        self.num_tokens = probe.shape[1]

    def _load(self, weights: list[Path], total_layers: int) -> None:
        from blip2.interop.hf import read_safetensors, safetensors_keys

        names = safetensors_keys(weights[0].parent)  # names only: a BLIP-2 file may hold billions of LLM weights
        target = self.model.state_dict()
        best = max(PREFIXES, key=lambda p: sum(k[len(p):] in target for k in names if k.startswith(p)))
        exclude = tuple(p for p in PREFIXES if p and p != best and p.startswith(best))
        mapped = read_safetensors(weights[0].parent, prefix=best, exclude=exclude)
        missing = [k for k in target if k not in mapped]
        if missing and best == "" and self._load_renamed(weights[0].parent, total_layers):
            return
        if missing:
            raise KeyError(f"vision weights in {weights[0].parent} lack {len(missing)} keys of the tower, "
                           f"e.g. {missing[:5]}")
        for k, t in target.items():
            if mapped[k].shape != t.shape:
                raise ValueError(f"vision weight {k}: checkpoint shape {tuple(mapped[k].shape)} != "
                                 f"model shape {tuple(t.shape)}")
        self.model.load_state_dict({k: mapped[k] for k in target}, strict=True)
        unused = len(mapped) - len(target)
        log.info("loaded vision tower (%d tensors; %d unused incl. %d dropped layer(s))",
                 len(target), unused, total_layers - self.model.config.num_hidden_layers)

    def _load_renamed(self, path: Path, total_layers: int) -> bool:
        """A tower directory saved in transformers' on-disk key layout, which its in-memory modules no
        longer use (transformers 5 renames e.g. ViT's `encoder.layer.N.attention.attention.query` to
        `layers.N.attention.q_proj` while loading): let transformers apply its own renaming, then
        check strictly that every tower weight came from the file. False if it cannot."""
        from transformers.utils import logging as tf_logging

        verbosity = tf_logging.get_verbosity()
        tf_logging.set_verbosity_error()  # its load report lists every dropped layer's weight; we check below
        try:
            model, info = type(self.model).from_pretrained(str(path), config=self.model.config, local_files_only=True,
                                                           output_loading_info=True)
        except (OSError, ValueError) as e:
            log.warning("transformers could not load the tower from %s either: %s", path, e)
            return False
        finally:
            tf_logging.set_verbosity(verbosity)
        missing = sorted(k for k in info["missing_keys"] if not k.startswith("pooler."))  # unused: no pooling here
        if missing or info["mismatched_keys"]:
            raise KeyError(f"vision weights in {path} lack {len(missing)} keys of the tower "
                           f"(e.g. {missing[:5]}) or have other shapes "
                           f"({[k for k, *_ in info['mismatched_keys']][:5]})")
        self.model = model.float()
        log.info("loaded vision tower through transformers' key renaming (%d dropped layer(s))",
                 total_layers - self.model.config.num_hidden_layers)
        return True

    def _features(self, pixels: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values=pixels, output_hidden_states=True)
        return out.hidden_states[-1]  # (B, T, C), before the tower's final norm


def _read_preprocess(path: Path, size: int) -> Preprocess:
    pp = path / "preprocessor_config.json"
    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)  # CLIP
    if pp.is_file():
        d = json.loads(pp.read_text())
        mean = tuple(d.get("image_mean", mean))
        std = tuple(d.get("image_std", std))
    else:
        log.warning("%s has no preprocessor_config.json; using CLIP mean/std", path)
    return Preprocess(size=size, mean=mean, std=std)  # type: ignore[arg-type]
