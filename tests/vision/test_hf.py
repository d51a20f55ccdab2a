"""transformers vision towers from a local directory: layer dropping, strict loading."""

import pytest
import torch
from transformers import CLIPVisionConfig, CLIPVisionModel

from blip2.config import VisionConfig
from blip2.vision import build_vision_encoder


@pytest.fixture
def clip_dir(tmp_path):
    torch.manual_seed(0)
    cfg = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                           image_size=32, patch_size=8)
    model = CLIPVisionModel(cfg).eval()
    model.save_pretrained(tmp_path)
    return tmp_path, model


@pytest.mark.parametrize("drop", [0, 1, 2])
def test_matches_transformers_hidden_state(clip_dir, drop):
    path, ref = clip_dir
    enc = build_vision_encoder(VisionConfig(name="hf", path=str(path), drop_last_layers=drop, image_size=32))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expect = ref(pixel_values=x, output_hidden_states=True).hidden_states[-1 - drop]
    got = enc(x)
    assert got.shape == (2, 17, 32) and enc.num_tokens == 17 and enc.feature_dim == 32
    torch.testing.assert_close(got, expect, atol=1e-5, rtol=1e-5)
    built = {k.split("layers.")[1].split(".")[0] for k in enc.model.state_dict() if "layers." in k}
    assert len(built) == 3 - drop  # dropped layers are never built


def test_frozen_and_fingerprint(clip_dir):
    path, _ = clip_dir
    a = build_vision_encoder(VisionConfig(name="hf", path=str(path), drop_last_layers=1))
    b = build_vision_encoder(VisionConfig(name="hf", path=str(path), drop_last_layers=0))
    assert not any(p.requires_grad for p in a.parameters())
    a.train()
    assert not a.model.training
    assert a.fingerprint() != b.fingerprint()


def test_missing_weights_are_refused(clip_dir, tmp_path_factory):
    path, _ = clip_dir
    from safetensors.torch import load_file, save_file

    state = load_file(str(path / "model.safetensors"))
    state.pop(next(k for k in state if "layers.0.mlp.fc1.weight" in k))
    save_file(state, str(path / "model.safetensors"))
    with pytest.raises(KeyError, match="lack 1 keys"):
        build_vision_encoder(VisionConfig(name="hf", path=str(path)))


def test_bad_path_message(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        build_vision_encoder(VisionConfig(name="hf", path=str(tmp_path)))


def test_blip2_vision_model_and_low_precision(tmp_path):
    from transformers import Blip2VisionConfig, Blip2VisionModel

    torch.manual_seed(0)
    cfg = Blip2VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                            image_size=32, patch_size=8)
    ref = Blip2VisionModel(cfg).eval()
    ref.save_pretrained(tmp_path)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expect = ref(pixel_values=x, output_hidden_states=True).hidden_states[-1]  # before post_layernorm
    enc = build_vision_encoder(VisionConfig(name="hf", path=str(tmp_path), drop_last_layers=0, image_size=32))
    torch.testing.assert_close(enc(x), expect, atol=1e-5, rtol=1e-5)
    low = build_vision_encoder(VisionConfig(name="hf", path=str(tmp_path), drop_last_layers=0, precision="bf16"))
    assert next(low.parameters()).dtype == torch.bfloat16
    out = low(x)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expect, atol=0.1, rtol=0.05)


@pytest.mark.parametrize("kind", ["vit", "dinov2", "siglip"])
def test_towers_saved_in_transformers_disk_layout(tmp_path, kind):
    """ViT and DINOv2 files use transformers' on-disk key names (`encoder.layer.N.attention.attention.query`)
    that differ from its in-memory modules; they must still load strictly and match transformers."""
    import transformers as tf

    cls, cfg_cls = {"vit": (tf.ViTModel, tf.ViTConfig), "dinov2": (tf.Dinov2Model, tf.Dinov2Config),
                    "siglip": (tf.SiglipVisionModel, tf.SiglipVisionConfig)}[kind]
    torch.manual_seed(0)
    ref = cls(cfg_cls(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                      image_size=32, patch_size=8)).eval()
    ref.save_pretrained(tmp_path)
    enc = build_vision_encoder(VisionConfig(name="hf", path=str(tmp_path), drop_last_layers=1, image_size=32))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expect = ref(pixel_values=x, output_hidden_states=True).hidden_states[-2]
    torch.testing.assert_close(enc(x), expect, atol=1e-5, rtol=1e-5)
    assert enc.model.config.num_hidden_layers == 2


def test_renamed_tower_with_a_missing_weight_is_refused(tmp_path):
    import transformers as tf
    from safetensors.torch import load_file, save_file

    tf.ViTModel(tf.ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                             image_size=32, patch_size=8), add_pooling_layer=False).save_pretrained(tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    state.pop(next(k for k in state if "layer.0.attention.attention.query.weight" in k))
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(KeyError, match="lack 1 keys"):
        build_vision_encoder(VisionConfig(name="hf", path=str(tmp_path), drop_last_layers=0, image_size=32))
