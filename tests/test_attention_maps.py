"""Cross-attention maps: they are the probabilities the forward pass really used, they respond to a
planted key, and `blip2 attention` draws them."""

import math

import pytest
import torch

from blip2.attention_maps import attention_stats, cross_attention, token_grid
from blip2.cli import main
from blip2.config import Blip2Config, VisionConfig
from blip2.model import Blip2
from conftest import tiny_qformer, write_images


def test_maps_are_the_probabilities_the_forward_pass_used(tiny_model):
    """maps @ values must reproduce the attention context that went into the output projection."""
    tiny_model.eval()
    feats = torch.randn(3, 9, 24)
    attn = tiny_model.qformer.layer[0].crossattention  # freq 2: layer 0 has cross-attention, layer 1 not
    seen = {}
    h1 = attn.self.value.register_forward_hook(lambda m, i, o: seen.setdefault("v", o))
    h2 = attn.output.dense.register_forward_pre_hook(lambda m, i: seen.setdefault("ctx", i[0]))
    maps = cross_attention(tiny_model, feats)
    h1.remove(), h2.remove()
    assert maps.shape == (1, 3, 4, 4, 9)  # (layers with cross-attention, B, H, Q, N)
    torch.testing.assert_close(maps.sum(-1), torch.ones(1, 3, 4, 4))
    ctx = (maps[0] @ attn._split(seen["v"])).transpose(1, 2).flatten(2)  # (B, Q, D)
    torch.testing.assert_close(ctx, seen["ctx"], atol=1e-6, rtol=1e-5)


def test_a_planted_key_draws_every_query(tiny_model):
    """Keys that respond to one feature channel only: the token where that channel is large gets the
    attention; with the channel off everywhere, attention is uniform."""
    tiny_model.eval()
    key = tiny_model.qformer.layer[0].crossattention.self.key
    with torch.no_grad():
        key.weight.zero_(), key.bias.zero_()
        tiny_model.ln_vision.weight.fill_(1.0), tiny_model.ln_vision.bias.zero_()
    feats = torch.zeros(1, 9, 24)
    uniform = cross_attention(tiny_model, feats)
    torch.testing.assert_close(uniform, torch.full_like(uniform, 1 / 9))
    q = tiny_model.qformer.layer[0].crossattention.self.query
    with torch.no_grad():  # keys read feature channel 0 only
        key.weight[:, 0] = 1.0
    feats[0, 4, 0] = 20.0  # the centre token of a 3x3 grid
    maps = cross_attention(tiny_model, feats)[0, 0]  # (H, Q, N)
    # after ln_vision the planted token's key is c * ones (c > 0) and every other key is 0, so its score
    # is c * (sum of the head's query slice): queries whose slice sums to > 0 look at the centre
    seen = {}
    h = q.register_forward_hook(lambda m, i, o: seen.setdefault("q", o))
    tiny_model.encode_image(feats)
    h.remove()
    sign = tiny_model.qformer.layer[0].crossattention._split(seen["q"])[0].sum(-1)  # (H, Q)
    assert (sign > 0).any() and (sign < 0).any()
    assert (maps[..., 4][sign > 0] > 1 / 9).all() and (maps[..., 4][sign < 0] < 1 / 9).all()
    others = torch.cat([maps[..., :4], maps[..., 5:]], -1)  # the 8 unplanted tokens share the rest equally
    torch.testing.assert_close(others, ((1 - maps[..., 4]) / 8).unsqueeze(-1).expand_as(others))


def test_token_grid():
    assert token_grid(49) == (0, 7)  # EfficientNet head
    assert token_grid(257) == (1, 16)  # ViT-L/14 at 224 with a class token
    with pytest.raises(ValueError, match="square grid"):
        token_grid(51)


def test_cli_writes_one_plot_per_image(tmp_path, capsys):
    torch.manual_seed(0)
    cfg = Blip2Config(vision=VisionConfig(image_size=64), qformer=tiny_qformer(vision_width=None))
    Blip2.build(cfg).save(tmp_path / "model")
    images = write_images(tmp_path / "img", 2, size=48)
    assert main(["attention", "--model", str(tmp_path / "model"), *images, "--out", str(tmp_path / "maps")]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    from PIL import Image

    for image, line in zip(images, lines, strict=True):
        src, png, stats = line.split("\t")
        assert stats.startswith("entropy ") and "queries correlate" in stats
        assert src == image and Image.open(png).size[0] > 100
    with pytest.raises(SystemExit, match="has 1 cross-attention layers"):
        main(["attention", "--model", str(tmp_path / "model"), images[0], "--layer", "3", "--out", str(tmp_path)])


def test_works_without_retrieval_heads(tokenizer):
    """Captioning-only models (a transformers Blip2ForConditionalGeneration) have no ITC heads."""
    torch.manual_seed(0)
    model = Blip2(Blip2Config(qformer=tiny_qformer(text_branch=False)), None, tokenizer).eval()
    assert cross_attention(model, torch.randn(2, 16, 24)).shape == (1, 2, 4, 4, 16)


def test_attention_stats_by_hand():
    uniform = torch.full((2, 3, 4), 0.25)  # (H, Q, N)
    assert attention_stats(uniform)["entropy"] == pytest.approx(math.log(4))
    one_hot = torch.zeros(1, 2, 4)
    one_hot[0, :, 1] = 1.0  # both queries on token 1: entropy 0, identical maps
    assert attention_stats(one_hot) == pytest.approx({"entropy": 0.0, "uniform_entropy": math.log(4),
                                                      "query_correlation": 1.0})
    apart = torch.tensor([[[0.5, 0.5, 0.0, 0.0], [0.0, 0.0, 0.5, 0.5]]])  # complementary halves
    stats = attention_stats(apart)
    assert stats["entropy"] == pytest.approx(math.log(2)) and stats["query_correlation"] == pytest.approx(-1.0)
