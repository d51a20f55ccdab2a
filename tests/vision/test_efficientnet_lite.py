"""The packaged EfficientNet-Lite0: TF padding, real ImageNet predictions, frozen behaviour."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from blip2.config import VisionConfig
from blip2.vision import build_vision_encoder
from blip2.vision.efficientnet_lite import Conv2dSame
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
