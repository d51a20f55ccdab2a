"""Retrieval: recall@K by hand, similarity by loops, re-ranking against direct ITM scoring."""

import pytest
import torch

from blip2.retrieval import embed_gallery, evaluate_retrieval, itc_similarity, recall_at_k, rerank


def test_recall_at_k_hand_example():
    # 2 images, 4 texts: texts 0,1 -> image 0; texts 2,3 -> image 1
    txt2img = torch.tensor([0, 0, 1, 1])
    i2t = torch.tensor([[0.1, 0.9, 0.5, 0.2],    # image 0: best text 1 (correct) -> rank 0
                        [0.8, 0.7, 0.1, 0.6]])   # image 1: texts 0,1 first, its best gt (3) at rank 2
    t2i = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.3, 0.4], [0.7, 0.6]])  # ranks: 0, 1, 0, 1
    r = recall_at_k(i2t, t2i, txt2img, ks=(1, 2, 3))
    assert (r["tr_r1"], r["tr_r2"], r["tr_r3"]) == (50.0, 50.0, 100.0)
    assert (r["ir_r1"], r["ir_r2"], r["ir_r3"]) == (50.0, 100.0, 100.0)


def test_itc_similarity_is_max_over_queries():
    img = torch.randn(3, 4, 8)
    txt = torch.randn(5, 8)
    sim = itc_similarity(img, txt)
    for i in range(3):
        for t in range(5):
            assert sim[i, t].item() == pytest.approx(max((img[i, q] @ txt[t]).item() for q in range(4)), rel=1e-5)


def test_rerank_scores_equal_direct_itm_plus_itc(tiny_model):
    tiny_model.eval()
    feats = torch.randn(4, 5, 24)
    caps = ["a red circle", "a blue square", "two stars", "a black triangle", "green", "white circle left"]
    gallery = embed_gallery(tiny_model, feats, caps, batch_size=3)
    sim = itc_similarity(gallery.image_itc, gallery.text_itc)
    s_i2t, s_t2i = rerank(tiny_model, sim, feats, gallery, k=2, batch_size=5, progress=False)
    with torch.no_grad():
        direct = torch.empty(4, 6)
        for i in range(4):
            for t in range(6):
                ids, mask = tiny_model.tokenize([caps[t]])
                direct[i, t] = tiny_model.itm_logits(tiny_model.ln_vision(feats[i:i + 1]), ids, mask)[0, 1]
        direct += sim
    for i in range(4):
        top = sim[i].topk(2).indices
        assert torch.isinf(s_i2t[i]).sum() == 6 - 2  # only candidates are scored
        torch.testing.assert_close(s_i2t[i, top], direct[i, top], rtol=1e-4, atol=1e-5)
    for t in range(6):
        top = sim[:, t].topk(2).indices
        assert torch.isinf(s_t2i[t]).sum() == 4 - 2
        torch.testing.assert_close(s_t2i[t, top], direct[top, t], rtol=1e-4, atol=1e-5)


def test_evaluate_retrieval_reports_both_protocols(tiny_model):
    feats = torch.randn(3, 5, 24)
    r = evaluate_retrieval(tiny_model, feats, [["a", "b"], ["c", "d"], ["e", "f"]], k=2, progress=False)
    assert r["num_images"] == 3 and r["num_texts"] == 6 and r["k_test"] == 2
    for key in ("tr_r1", "ir_r10", "itc_tr_r1", "itc_ir_r5"):
        assert 0.0 <= r[key] <= 100.0
    assert r["tr_r10"] == 100.0  # only 3 images: everything is within 10
