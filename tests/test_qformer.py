"""Q-Former: attention-mask properties, BERT initialisation, parity with transformers."""

import pytest
import torch
from safetensors.torch import load_file
from transformers import BertConfig, BertModel, Blip2QFormerConfig, Blip2QFormerModel

from blip2.qformer import QFormer, load_bert_init, packaged_minilm_dir
from conftest import tiny_qformer


@pytest.fixture
def qf():
    torch.manual_seed(0)
    return QFormer(tiny_qformer()).eval()


def _text(b=2, t=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 2000, (b, t), generator=g)
    ids[:, 0] = 101
    return ids, torch.ones(b, t, dtype=torch.long)


def test_queries_never_see_text_in_causal_pass(qf):
    image = torch.randn(2, 5, 24)
    ids, mask = _text()
    ids2 = ids.clone()
    ids2[:, 2:] = torch.randint(2000, 3000, (2, 4))
    a = qf(ids, mask, image=image, use_queries=True, causal=True).hidden
    b = qf(ids2, mask, image=image, use_queries=True, causal=True).hidden
    torch.testing.assert_close(a[:, :4], b[:, :4])  # query outputs unchanged
    assert not torch.allclose(a[:, 4:], b[:, 4:])  # the text itself did change
    # ... and equal the queries-only (ITC) pass
    q = qf(image=image, use_queries=True).hidden
    torch.testing.assert_close(a[:, :4], q, atol=1e-6, rtol=1e-6)


def test_bidirectional_pass_lets_queries_see_text(qf):
    image = torch.randn(2, 5, 24)
    ids, mask = _text()
    ids2 = ids.clone()
    ids2[:, 3] = 2500
    a = qf(ids, mask, image=image, use_queries=True).hidden
    b = qf(ids2, mask, image=image, use_queries=True).hidden
    assert not torch.allclose(a[:, :4], b[:, :4])


def test_causal_text_is_unaffected_by_later_tokens(qf):
    image = torch.randn(2, 5, 24)
    ids, mask = _text(t=7)
    past = qf(image=image, use_queries=True).past
    full = qf(ids, mask, use_queries=False, causal=True, past=past).hidden
    for cut in (1, 3, 5):
        prefix = qf(ids[:, :cut], mask[:, :cut], use_queries=False, causal=True, past=past).hidden
        torch.testing.assert_close(full[:, :cut], prefix, atol=1e-6, rtol=1e-6)
    changed = ids.clone()
    changed[:, 5] = 2999
    other = qf(changed, mask, use_queries=False, causal=True, past=past).hidden
    torch.testing.assert_close(full[:, :5], other[:, :5], atol=1e-6, rtol=1e-6)


def test_cached_query_kv_equals_one_pass_causal(qf):
    # ITG uses the query pass's cached K/V; that must equal running queries + text in one causal pass.
    image = torch.randn(2, 5, 24)
    ids, mask = _text()
    past = qf(image=image, use_queries=True).past
    cached = qf(ids, mask, use_queries=False, causal=True, past=past).hidden
    joint = qf(ids, mask, image=image, use_queries=True, causal=True).hidden[:, 4:]
    torch.testing.assert_close(cached, joint, atol=1e-5, rtol=1e-5)


def test_padding_does_not_change_real_tokens(qf):
    image = torch.randn(1, 5, 24)
    ids, mask = _text(b=1, t=5)
    padded = torch.cat([ids, torch.zeros(1, 3, dtype=torch.long)], 1)
    pmask = torch.cat([mask, torch.zeros(1, 3, dtype=torch.long)], 1)
    for kw in (dict(use_queries=False), dict(image=image, use_queries=True)):
        a = qf(ids, mask, **kw).hidden
        b = qf(padded, pmask, **kw).hidden[:, : a.shape[1]]
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_cross_attention_layers_and_query_only(qf):
    assert [i for i, l in enumerate(qf.layer) if l.crossattention is not None] == [0]
    # text-only pass ignores the image entirely
    ids, mask = _text()
    a = qf(ids, mask, use_queries=False).hidden
    b = qf(ids, mask, image=torch.randn(2, 5, 24), use_queries=False).hidden
    torch.testing.assert_close(a, b)


@pytest.mark.slow
def test_minilm_init_loads_every_weight_it_should():
    from blip2.config import QFormerConfig

    qf = QFormer(QFormerConfig(vision_width=1280))
    report = load_bert_init(qf, "packaged")
    state = load_file(str(packaged_minilm_dir() / "model.safetensors"))
    # every BERT tensor except token types and the pooler is used
    assert sorted(report["unused"]) == ["embeddings.token_type_embeddings.weight", "pooler.dense.bias",
                                        "pooler.dense.weight"]
    new = set(report["new"])
    assert new == {n for n, _ in qf.named_parameters()
                   if "crossattention" in n or n.startswith("lm_head") or n == "query_tokens"}
    for i in range(6):
        bert = f"encoder.layer.{i}."
        for ours, theirs in [(f"layer.{i}.attention.self.query.weight", bert + "attention.self.query.weight"),
                             (f"layer.{i}.output.dense.weight", bert + "output.dense.weight"),
                             (f"layer.{i}.output_query.dense.weight", bert + "output.dense.weight"),
                             (f"layer.{i}.intermediate_query.dense.bias", bert + "intermediate.dense.bias")]:
            assert torch.equal(qf.get_parameter(ours), state[theirs])
    emb = qf.embeddings.word_embeddings.weight
    assert emb.shape == (30523, 384) and torch.equal(emb[:30522], state["embeddings.word_embeddings.weight"])


@pytest.mark.slow
def test_text_pass_matches_transformers_bert():
    # With token-type embeddings zeroed (the Q-Former has none), a text-only pass is plain BERT.
    from blip2.config import QFormerConfig

    d = packaged_minilm_dir()
    qf = QFormer(QFormerConfig(vision_width=1280)).eval()
    load_bert_init(qf, "packaged")
    bert = BertModel.from_pretrained(str(d), local_files_only=True).eval()
    bert.embeddings.token_type_embeddings.weight.data.zero_()
    ids, mask = _text(b=3, t=9)
    mask[1, 6:] = 0
    ref = bert(input_ids=ids, attention_mask=mask).last_hidden_state
    ours = qf(ids, mask, use_queries=False).hidden
    keep = mask.bool()
    torch.testing.assert_close(ours[keep], ref[keep], atol=2e-5, rtol=1e-4)


def test_query_pass_matches_transformers_blip2_qformer():
    torch.manual_seed(0)
    cfg = tiny_qformer(num_layers=4)
    ours = QFormer(cfg).eval()
    ref = Blip2QFormerModel(Blip2QFormerConfig(
        hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64,
        encoder_hidden_size=24, cross_attention_frequency=2, layer_norm_eps=1e-12)).eval()
    state = {}
    for k in ref.state_dict():
        src = k.replace("encoder.layer.", "layer.").replace(".attention.attention.", ".attention.self.")
        src = src.replace("crossattention.attention.", "crossattention.self.")
        src = "embeddings.LayerNorm." + k.split(".")[-1] if k.startswith("layernorm.") else src
        state[k] = ours.state_dict()[src]
    ref.load_state_dict(state, strict=True)
    image = torch.randn(3, 7, 24)
    expect = ref(query_embeds=ours.query_tokens.expand(3, -1, -1), encoder_hidden_states=image).last_hidden_state
    got = ours(image=image, use_queries=True).hidden
    torch.testing.assert_close(got, expect, atol=1e-5, rtol=1e-5)


def test_init_shape_mismatch_is_explained(tmp_path):
    cfg = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48)
    BertModel(cfg).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="intermediate"):
        load_bert_init(QFormer(tiny_qformer()), str(tmp_path))
