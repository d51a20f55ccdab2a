"""Q-Former text helpers."""

import math

import pytest
import torch

from blip2.config import Stage1LossConfig
from blip2.text import caption_token_prior
from blip2.train.loop import set_itg_prior_bias


@pytest.mark.parametrize("ls", [0.0, 0.1])
def test_caption_token_prior_matches_hand_counts(tokenizer, ls):
    # targets are every token after [CLS]: "a" x2, "dog", "cat", [SEP] x2 -> 6 counts, add-one smoothed,
    # then mixed with label smoothing's uniform share
    v = len(tokenizer)
    prior = caption_token_prior(tokenizer, ["A dog.", "a cat"], 16, v, label_smoothing=ls)
    assert prior.shape == (v,)

    def hand(count):
        return math.log((1 - ls) * (count + 1) / (6 + v) + ls / v)

    ids = tokenizer.convert_tokens_to_ids
    for token, count in (("a", 2), ("dog", 1), ("cat", 1), ("[SEP]", 2), ("horse", 0), ("[CLS]", 0)):
        assert prior[ids(token)].item() == pytest.approx(hand(count), rel=1e-5)
    assert prior.exp().sum().item() == pytest.approx(1.0, rel=1e-5)


def test_set_itg_prior_bias_makes_the_bias_alone_predict_the_token_frequencies(tiny_model):
    texts = ["a red circle", "a blue circle", "a star"]
    set_itg_prior_bias(tiny_model, texts, label_smoothing=0.0)
    want = caption_token_prior(tiny_model.tokenizer, texts, 16, 30523).softmax(-1)
    got = tiny_model.qformer.lm_head.bias.detach().softmax(-1)
    assert torch.allclose(got, want, atol=1e-7)
    a, star = tiny_model.tokenizer.convert_tokens_to_ids(["a", "star"])
    assert got[a] / got[star] == pytest.approx(4 / 2, rel=1e-4)  # 3 + 1 vs 1 + 1 add-one counts
    with pytest.raises(ValueError, match="itg_prior_bias"):
        Stage1LossConfig(itg=False, itg_prior_bias=True)
