"""Stage-1 losses against hand computations on tiny tensors."""

import math

import pytest
import torch
import torch.nn.functional as F

from blip2.config import Stage1LossConfig
from blip2.losses import ITCLoss, ITGLoss, ITMLoss, Stage1Loss, query_similarity, sample_hard_negatives


def _smoothed_ce(logits: list[float], target: list[float], ls: float) -> float:
    """-sum_j q_j log softmax(logits)_j with q = (1 - ls) * target + ls / N, by hand."""
    n = len(logits)
    m = max(logits)
    logz = m + math.log(sum(math.exp(x - m) for x in logits))
    return -sum(((1 - ls) * t + ls / n) * (x - logz) for x, t in zip(logits, target, strict=True))


def _hand_itc(img, txt, temp, targets, ls=0.1):
    b, q, _ = img.shape
    i2t = [[max(float(img[i, k] @ txt[j]) for k in range(q)) / temp for j in range(b)] for i in range(b)]
    t2i = [[max(float(txt[i] @ img[j, k]) for k in range(q)) / temp for j in range(b)] for i in range(b)]
    a = sum(_smoothed_ce(i2t[i], targets[i], ls) for i in range(b)) / b
    c = sum(_smoothed_ce(t2i[i], targets[i], ls) for i in range(b)) / b
    return (a + c) / 2


def _feats(b=3, q=2, e=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(b, q, e, generator=g), dim=-1)
    txt = F.normalize(torch.randn(b, e, generator=g), dim=-1)
    return img, txt


@pytest.mark.parametrize("grad", ["reference", "full"])
def test_itc_matches_hand_computation(grad):
    img, txt = _feats()
    temp = torch.tensor(0.1)
    out = ITCLoss(0.1, grad, "soft")(img, txt, temp, torch.arange(3))
    eye = [[1.0 if i == j else 0.0 for j in range(3)] for i in range(3)]
    assert out.loss.item() == pytest.approx(_hand_itc(img, txt, 0.1, eye), rel=1e-5)
    # diagonal targets give the same loss when every image id is distinct
    out2 = ITCLoss(0.1, grad, "diagonal")(img, txt, temp, torch.arange(3))
    assert out2.loss.item() == pytest.approx(out.loss.item(), rel=1e-6)


def test_itc_soft_targets_for_shared_images():
    img, txt = _feats()
    ids = torch.tensor([7, 7, 3])  # captions 0 and 1 describe the same image
    out = ITCLoss(0.1, "full", "soft")(img, txt, torch.tensor(0.1), ids)
    targets = [[0.5, 0.5, 0.0], [0.5, 0.5, 0.0], [0.0, 0.0, 1.0]]
    assert out.loss.item() == pytest.approx(_hand_itc(img, txt, 0.1, targets), rel=1e-5)
    assert out.positives.tolist() == [[True, True, False], [True, True, False], [False, False, True]]


def test_itc_reference_gradients_are_half_detached():
    img, txt = _feats()
    temp = torch.tensor(0.1, requires_grad=True)
    grads = {}
    for mode in ("reference", "full"):
        i, t = img.clone().requires_grad_(), txt.clone().requires_grad_()
        ITCLoss(0.1, mode, "soft")(i, t, temp, torch.arange(3)).loss.backward()
        grads[mode] = (i.grad, t.grad)
    # reference: image features get gradient only from the image->text direction
    i, t = img.clone().requires_grad_(), txt.clone()
    sim = torch.einsum("bqe,ne->bnq", i, t).amax(-1) / 0.1
    (F.cross_entropy(sim, torch.arange(3), label_smoothing=0.1) / 2).backward()
    torch.testing.assert_close(grads["reference"][0], i.grad)
    # text features only from text->image
    i, t = img.clone(), txt.clone().requires_grad_()
    sim = torch.einsum("be,nqe->bnq", t, i).amax(-1) / 0.1
    (F.cross_entropy(sim, torch.arange(3), label_smoothing=0.1) / 2).backward()
    torch.testing.assert_close(grads["reference"][1], t.grad)
    assert not torch.allclose(grads["reference"][0], grads["full"][0])


def test_hard_negatives_never_pick_a_positive_and_follow_softmax():
    g = torch.Generator().manual_seed(0)
    sim = torch.randn(4, 6, generator=g) * 2
    ids_row = torch.tensor([0, 0, 1, 2])
    ids_col = torch.tensor([0, 0, 1, 2, 3, 3])
    pos = ids_row[:, None] == ids_col[None, :]
    counts = torch.zeros(4, 6)
    n = 20000
    for _ in range(n // 500):
        u = 1.0 - torch.rand(500, 4, generator=g)
        for k in range(500):
            idx = sample_hard_negatives(sim, pos, u[k])
            counts[torch.arange(4), idx] += 1
    assert counts[pos].sum() == 0
    expect = torch.softmax(sim.masked_fill(pos, float("-inf")), 1)
    torch.testing.assert_close(counts / n, expect, atol=0.015, rtol=0)


def test_hard_negatives_refuse_a_batch_of_one_image():
    with pytest.raises(ValueError, match="no negative"):
        sample_hard_negatives(torch.zeros(2, 2), torch.ones(2, 2, dtype=torch.bool), torch.ones(2))


def test_itm_batch_composition_and_loss(tiny_model):
    b = 4
    g = torch.Generator().manual_seed(1)
    image = torch.randn(b, 5, 24, generator=g)
    ids = torch.randint(1000, 2000, (b, 6), generator=g)
    mask = torch.ones_like(ids)
    ids_img = torch.tensor([0, 0, 1, 2])
    img_itc, txt_itc = _feats(b=b, q=4, e=16)
    itc = ITCLoss()(img_itc, txt_itc, torch.tensor(0.1), ids_img)
    seen = {}
    real = tiny_model.itm_logits

    def record(img, i, m):
        seen.update(img=img, ids=i)
        seen["logits"] = real(img, i, m)
        return seen["logits"]

    tiny_model.itm_logits = record
    loss = ITMLoss()(tiny_model, image, ids, mask, itc, torch.Generator().manual_seed(0))
    img3, ids3 = seen["img"], seen["ids"]
    assert img3.shape[0] == ids3.shape[0] == 3 * b
    torch.testing.assert_close(img3[:b], image)
    torch.testing.assert_close(img3[2 * b:], image)
    assert torch.equal(ids3[:b], ids) and torch.equal(ids3[b:2 * b], ids)
    for k in range(b):  # negatives never show the caption's own image
        neg_img = next(j for j in range(b) if torch.equal(img3[b + k], image[j]))
        assert ids_img[neg_img] != ids_img[k]
        neg_txt = next(j for j in range(b) if torch.equal(ids3[2 * b + k], ids[j]))
        assert ids_img[neg_txt] != ids_img[k]
    labels = torch.tensor([1] * b + [0] * 2 * b)
    logp = seen["logits"].log_softmax(-1)
    assert loss.item() == pytest.approx(-logp[torch.arange(3 * b), labels].mean().item(), rel=1e-5)


def test_itg_matches_hand_computation(tiny_model):
    ids = torch.tensor([[101, 2000, 2001, 102, 0], [101, 2002, 102, 0, 0]])
    mask = (ids != 0).long()
    v = tiny_model.cfg.qformer.vocab_size
    logits = torch.randn(2, 5, v, generator=torch.Generator().manual_seed(0))
    seen = {}

    def fake(dec_ids, m, past, select):
        seen["dec"] = dec_ids
        return logits[select]

    tiny_model.itg_logits = fake
    loss = ITGLoss(0.1)(tiny_model, ids, mask, [])
    assert seen["dec"][:, 0].tolist() == [tiny_model.dec_id] * 2 == [30522] * 2
    assert torch.equal(seen["dec"][:, 1:], ids[:, 1:])
    terms = []
    for b in range(2):
        for t in range(4):
            if mask[b, t + 1]:  # predict token t+1 from position t; pads ignored
                onehot = [0.0] * v
                onehot[int(ids[b, t + 1])] = 1.0
                terms.append(_smoothed_ce(logits[b, t].tolist(), onehot, 0.1))
    assert len(terms) == 5
    assert loss.item() == pytest.approx(sum(terms) / len(terms), rel=1e-5)


def test_stage1_total_and_pad_row_gradient(tiny_model):
    tiny_model.train()
    ids, mask = tiny_model.tokenize(["a red circle", "two blue squares on the left", "a star"])
    feats = torch.randn(3, 5, 24)
    out = Stage1Loss()(tiny_model, feats, ids, mask, torch.arange(3), torch.Generator().manual_seed(0))
    assert out["loss"].item() == pytest.approx((out["itc"] + out["itm"] + out["itg"]).item(), rel=1e-6)
    out["loss"].backward()
    # tied LM head, no padding index: the [PAD] row of the word embeddings receives gradient too
    assert tiny_model.qformer.embeddings.word_embeddings.weight.grad[0].abs().sum() > 0
    assert tiny_model.temp.grad is not None and tiny_model.ln_vision.weight.grad.abs().sum() > 0


def test_itg_ramp_weights_only_itg_and_reaches_full_weight(tiny_model):
    # eval mode: no dropout, so every call sees the same terms; the ramp must scale ITG alone,
    # by (step + 1) / N, log ITG unweighted, and equal the plain total from step N - 1 on.
    tiny_model.eval()
    ids, mask = tiny_model.tokenize(["a red circle", "two blue squares on the left", "a star"])
    feats = torch.randn(3, 5, 24)

    def run(objective, step):
        return objective(tiny_model, feats, ids, mask, torch.arange(3), torch.Generator().manual_seed(0), step)

    plain = run(Stage1Loss(), 0)
    ramp = Stage1Loss(itg_ramp_steps=4)
    for step, weight in ((0, 0.25), (1, 0.5), (3, 1.0), (10, 1.0)):
        out = run(ramp, step)
        assert out["itg"].item() == plain["itg"].item()
        want = plain["itc"] + plain["itm"] + weight * plain["itg"]
        assert out["loss"].item() == pytest.approx(want.item(), rel=1e-6)
    with pytest.raises(ValueError, match="itg_ramp_steps"):
        Stage1LossConfig(itg_ramp_steps=-1)


def test_query_similarity_matches_hand_computation():
    # image 0: e1, e2, e1 + e2 -> squared cosines 0, 1/2, 1/2 over the 3 pairs; image 1: three copies -> 1
    q = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]],
                      [[2.0, 1.0], [2.0, 1.0], [4.0, 2.0]]])
    assert query_similarity(q).item() == pytest.approx((1 / 3 + 1) / 2, rel=1e-6)
    assert query_similarity(q[:, :1]).item() == 0.0  # one query: no pairs


def test_query_div_adds_the_weighted_similarity_and_logs_it_unweighted(tiny_model):
    tiny_model.eval()  # no dropout: both objectives see the same query outputs
    ids, mask = tiny_model.tokenize(["a red circle", "two blue squares on the left", "a star"])
    feats = torch.randn(3, 5, 24)

    def run(objective):
        return objective(tiny_model, feats, ids, mask, torch.arange(3), torch.Generator().manual_seed(0), 0)

    plain, div = run(Stage1Loss()), run(Stage1Loss(query_div=0.5))
    sim = query_similarity(tiny_model.qformer(image=tiny_model.vision_input(feats), use_queries=True).hidden)
    assert "query_div" not in plain and div["query_div"].item() == pytest.approx(sim.item(), rel=1e-6)
    assert div["loss"].item() == pytest.approx(plain["loss"].item() + 0.5 * sim.item(), rel=1e-6)
    with pytest.raises(ValueError, match="query_div"):
        Stage1LossConfig(query_div=-1.0)


def test_itm_weight_scales_only_itm_and_logs_it_unweighted(tiny_model):
    tiny_model.eval()  # no dropout: both objectives see the same terms
    ids, mask = tiny_model.tokenize(["a red circle", "two blue squares on the left", "a star"])
    feats = torch.randn(3, 5, 24)

    def run(objective):
        return objective(tiny_model, feats, ids, mask, torch.arange(3), torch.Generator().manual_seed(0), 0)

    plain, heavy = run(Stage1Loss()), run(Stage1Loss(itm_weight=5.0))
    for term in ("itc", "itm", "itg"):
        assert heavy[term].item() == plain[term].item()
    want = plain["itc"] + 5.0 * plain["itm"] + plain["itg"]
    assert heavy["loss"].item() == pytest.approx(want.item(), rel=1e-6)
    with pytest.raises(ValueError, match="itm_weight"):
        Stage1LossConfig(itm_weight=0.0)


def test_itg_gradient_flows_through_cached_query_keys_values(tiny_model):
    tiny_model.train()
    ids, mask = tiny_model.tokenize(["a red circle at the top", "a star"])
    past = tiny_model.qformer(image=tiny_model.ln_vision(torch.randn(2, 5, 24)), use_queries=True).past
    ITGLoss()(tiny_model, ids, mask, past).backward()
    # the caption's loss reaches the queries and the image cross-attention only through the K/V cache
    assert tiny_model.qformer.query_tokens.grad.abs().sum() > 0
    assert tiny_model.qformer.layer[0].crossattention.self.value.weight.grad.abs().sum() > 0


def test_itm_and_itc_can_fit_a_small_batch(tokenizer):
    # A property, not a value: with distinct images and captions both objectives must be learnable.
    # ITM sits at its prior (0.636) for ~300 steps here before it drops (docs/RESULTS.md), hence 500.
    from blip2.config import Blip2Config, TrainConfig
    from blip2.model import Blip2
    from blip2.train.optim import build_optimizer
    from conftest import tiny_qformer

    torch.manual_seed(0)
    model = Blip2(Blip2Config(qformer=tiny_qformer(text_pool="mean")), None, tokenizer)
    feats = torch.randn(8, 5, 24) * 2
    caps = ["red circle", "blue square", "green star", "black triangle", "white ring", "orange box",
            "purple moon", "yellow sun"]
    ids, mask = model.tokenize(caps)
    opt = build_optimizer(model, TrainConfig(lr=1e-3, weight_decay=0.0))
    objective = Stage1Loss(itg=False)
    first = None
    for step in range(500):
        out = objective(model, feats, ids, mask, torch.arange(8), torch.Generator().manual_seed(step))
        out["loss"].backward()
        opt.step()
        opt.zero_grad()
        first = first or {k: v.item() for k, v in out.items()}
    assert out["itc"].item() < 0.5 * first["itc"]
    assert out["itm"].item() < 0.3 < first["itm"]


# --------------------------------------------------------------------------- SCST


def _scst_model(seed: int = 0):
    """A tiny Blip2 with a tiny frozen Llama (word-level vocabulary of 32, conftest.LM_WORDS)."""
    from blip2.config import Blip2Config, LLMConfig
    from blip2.llm import FrozenLM
    from blip2.model import Blip2
    from conftest import tiny_llama, tiny_lm_tokenizer, tiny_qformer

    cfg = LLMConfig(max_prompt_len=8, max_text_len=12)
    lm = FrozenLM(tiny_llama(seed), tiny_lm_tokenizer(), cfg)
    torch.manual_seed(seed)
    return Blip2(Blip2Config(qformer=tiny_qformer(text_branch=False), llm=cfg), None, None, lm)


class CountWord:
    """Reward = how often `word` occurs in the text, divided by its length; records its calls."""

    def __init__(self, word: str):
        self.word, self.calls = word, []

    def __call__(self, texts: list[str], images: list[int]) -> list[float]:
        self.calls.append((list(texts), list(images)))
        return [t.split().count(self.word) / max(1, len(t.split())) for t in texts]


def test_scst_loss_is_the_advantage_weighted_log_likelihood_by_hand():
    from blip2.config import ScstConfig
    from blip2.losses import SCSTLoss

    model = _scst_model()
    lm, k = model.llm, 4
    feats = torch.randn(3, 5, 24, generator=torch.Generator().manual_seed(1))
    reward = CountWord("dog")
    loss = SCSTLoss(reward, k, ScstConfig(max_new_tokens=6).decode(), chunk_rows=5)  # chunks cross images
    out = loss(model, feats, ["", "a photo of", ""], [7, 8, 9], seed=11)
    out["loss"].backward()
    ours = model.llm_proj.weight.grad.clone()
    model.zero_grad()

    [(texts, images)] = reward.calls
    assert images == [7] * k + [8] * k + [9] * k
    # By hand: the same draws (generation has its own tests), each token of a sample and its eos
    # scored after [soft prompt | prompt] by a plain forward pass, one sample at a time.
    from blip2.generate import generate_ids, stream_seed

    soft = model.soft_prompt(feats)  # (3, Q, H)
    prompts = [[], lm.encode(["a photo of"], 8)[0], []]
    # each image samples from stream_seed(seed, image index)
    drawn = generate_ids(lm, soft.detach(), prompts, loss.decode, num_return_sequences=k,
                         seeds=[stream_seed(11, i) for i in (7, 8, 9)])
    assert [lm.decode(x) for x in drawn] == texts
    rewards = reward(texts, images)
    total, tokens = 0.0, 0
    for i, sample in enumerate(drawn):
        img = i // k
        others = [rewards[j] for j in range(img * k, (img + 1) * k) if j != i]
        advantage = rewards[i] - sum(others) / (k - 1)
        ids = sample + [lm.eos_id]
        seq = torch.tensor(prompts[img] + ids)
        embeds = torch.cat([soft[img], lm.embed(seq)])[None]  # (1, Q+P+T, H)
        logp = lm.model(inputs_embeds=embeds).logits[0].float().log_softmax(-1)  # (Q+P+T, V)
        start = soft.shape[1] + len(prompts[img])  # position of the sample's first token
        ll = sum(logp[start - 1 + t, tok] for t, tok in enumerate(ids))
        total = total - advantage * ll
        tokens += len(ids)
    expected = total / tokens
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-4, abs=1e-6)
    expected.backward()
    assert (ours - model.llm_proj.weight.grad).abs().max() < 1e-5 * ours.abs().max()
    assert out["reward"].item() == pytest.approx(sum(rewards) / len(rewards), abs=1e-6)


def test_scst_raises_the_reward_it_is_given():
    """A property of a policy gradient: optimising the soft prompt for "how often is 'dog' said"
    makes the model say 'dog' more (mean reward of fresh samples, before and after)."""
    from blip2.config import ScstConfig, TrainConfig
    from blip2.losses import SCSTLoss
    from blip2.train.optim import build_optimizer

    model = _scst_model(seed=3)
    feats = torch.randn(4, 5, 24, generator=torch.Generator().manual_seed(2))
    loss = SCSTLoss(CountWord("dog"), 6, ScstConfig(max_new_tokens=6).decode())
    opt = build_optimizer(model, TrainConfig(lr=3e-3, weight_decay=0.0))

    def mean_reward(seeds) -> float:
        with torch.no_grad():
            return sum(loss(model, feats, [""] * 4, [0, 1, 2, 3], seed=s)["reward"].item() for s in seeds) / len(seeds)

    before = mean_reward(range(1000, 1005))
    for step in range(40):
        loss(model, feats, [""] * 4, [0, 1, 2, 3], seed=step)["loss"].backward()
        opt.step()
        opt.zero_grad()
    after = mean_reward(range(1000, 1005))
    assert after > before + 0.15, (before, after)


def test_scst_refuses_one_sample_and_search_decoding():
    from blip2.config import DecodeConfig, ScstConfig
    from blip2.losses import SCSTLoss

    with pytest.raises(ValueError, match=">= 2 samples"):
        SCSTLoss(CountWord("dog"), 1, ScstConfig().decode())
    with pytest.raises(ValueError, match="do_sample"):
        SCSTLoss(CountWord("dog"), 4, DecodeConfig())
    with pytest.raises(ValueError, match="scst.samples"):
        ScstConfig(samples=1)
    with pytest.raises(ValueError, match="scst.bleu_weight"):
        ScstConfig(bleu_weight=-0.5)
