"""Decoding parity with transformers' generate() on tiny random LMs of both kinds."""

from __future__ import annotations

import pytest
import torch

from blip2.config import DecodeConfig, LLMConfig
from blip2.generate import (
    generate_ensemble_ids,
    generate_ids,
    process_scores,
    row_uniforms,
    sample_tokens,
    stream_seed,
)
from blip2.llm import FrozenLM
from conftest import LM_WORDS, tiny_llama, tiny_lm_tokenizer, tiny_opt

PROMPTS = [[3, 4, 5], [], [7]]  # different lengths: exercises padding
# transformers (5.23) skips the first n_left_pads *generated* tokens of a row in its repetition
# penalty when generate() gets inputs_embeds with a left-padded mask (it assumes the pads are in
# input_ids), so settings with a repetition penalty are compared on unpadded prompts.
EQUAL_PROMPTS = [[3, 4], [5, 6], [7, 8]]


def _soft(lm, b: int = 3, q: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, q, lm.hidden_size, generator=torch.Generator().manual_seed(seed))


def _hf_generate(lm, soft, prompts, cfg: DecodeConfig) -> list[list[int]]:
    """transformers' own generate() on the same layout (left padding for decoder-only)."""
    embeds, mask = lm._with_soft(soft, prompts, left_pad=not lm.is_encoder_decoder)
    out = lm.model.generate(inputs_embeds=embeds, attention_mask=mask, do_sample=False, num_beams=cfg.num_beams,
                            max_new_tokens=cfg.max_new_tokens, min_new_tokens=cfg.min_new_tokens,
                            length_penalty=cfg.length_penalty, repetition_penalty=cfg.repetition_penalty,
                            no_repeat_ngram_size=cfg.no_repeat_ngram_size, early_stopping=False,
                            eos_token_id=lm.eos_id, pad_token_id=lm.pad_id, use_cache=True)
    rows = out[:, 1:] if lm.is_encoder_decoder else out  # drop the decoder start token
    res = []
    for r in rows.tolist():
        r = r[: r.index(lm.eos_id)] if lm.eos_id in r else r
        while r and r[-1] == lm.pad_id:
            r = r[:-1]
        res.append(r)
    return res


SETTINGS = [
    dict(num_beams=1, max_new_tokens=12, min_new_tokens=0),
    dict(num_beams=1, max_new_tokens=10, min_new_tokens=4, repetition_penalty=1.5, no_repeat_ngram_size=2),
    dict(num_beams=4, max_new_tokens=10, min_new_tokens=0),
    dict(num_beams=5, max_new_tokens=12, min_new_tokens=3, length_penalty=-1.0),
    dict(num_beams=3, max_new_tokens=9, min_new_tokens=2, length_penalty=2.0, repetition_penalty=1.3,
         no_repeat_ngram_size=3),
]


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: f"beams{s['num_beams']}-min{s['min_new_tokens']}")
def test_matches_transformers_generate(tiny_lm, setting):
    cfg = DecodeConfig(**setting)
    prompts = EQUAL_PROMPTS if cfg.repetition_penalty != 1.0 and not tiny_lm.is_encoder_decoder else PROMPTS
    for seed in range(3):
        soft = _soft(tiny_lm, seed=seed)
        ours = generate_ids(tiny_lm, soft, prompts, cfg)
        assert ours == _hf_generate(tiny_lm, soft, prompts, cfg)
        assert all(len(r) >= cfg.min_new_tokens for r in ours)


@pytest.mark.parametrize("beams", [1, 4])
def test_some_outputs_stop_at_eos(beams):
    """The parity settings must exercise stopping at eos, not only at max length. Checked on the
    causal LM: the search code is shared by both kinds, and the random T5 repeats one token per input."""
    lm = FrozenLM(tiny_llama(), tiny_lm_tokenizer(), LLMConfig())
    cfg = DecodeConfig(num_beams=beams, max_new_tokens=12, min_new_tokens=0)
    lengths = [len(r) for s in range(6) for r in generate_ids(lm, _soft(lm, seed=s), PROMPTS, cfg)]
    assert min(lengths) < cfg.max_new_tokens


@pytest.mark.parametrize("beams", [1, 4])
def test_batched_equals_one_at_a_time(tiny_lm, beams):
    cfg = DecodeConfig(num_beams=beams, max_new_tokens=10, min_new_tokens=2)
    soft = _soft(tiny_lm, seed=5)
    batched = generate_ids(tiny_lm, soft, PROMPTS, cfg)
    single = [generate_ids(tiny_lm, soft[i:i + 1], [p], cfg)[0] for i, p in enumerate(PROMPTS)]
    assert batched == single


def test_sampling_is_seeded_and_respects_top_k(tiny_lm):
    soft = _soft(tiny_lm, seed=1)
    cfg = DecodeConfig(num_beams=1, do_sample=True, top_p=0.9, max_new_tokens=8, min_new_tokens=0, seed=3)
    a = generate_ids(tiny_lm, soft, PROMPTS, cfg)
    assert a == generate_ids(tiny_lm, soft, PROMPTS, cfg)
    # top_k = 1 is greedy
    greedy = generate_ids(tiny_lm, soft, PROMPTS, DecodeConfig(num_beams=1, max_new_tokens=8, min_new_tokens=0))
    topk1 = generate_ids(tiny_lm, soft, PROMPTS, DecodeConfig(num_beams=1, do_sample=True, top_k=1, top_p=1.0,
                                                              max_new_tokens=8, min_new_tokens=0))
    assert topk1 == greedy


def test_several_samples_per_input_share_its_prefix(tiny_lm):
    """n samples per input from one prefix pass = sampling from the input repeated n times with the
    seeds the samples get (sample j of input i: stream_seed(seed_i, j)), and they differ."""
    soft = _soft(tiny_lm, seed=2)
    cfg = DecodeConfig(num_beams=1, do_sample=True, top_p=1.0, max_new_tokens=8, min_new_tokens=0, seed=4)
    shared = generate_ids(tiny_lm, soft, PROMPTS, cfg, num_return_sequences=3)
    row_seeds = [stream_seed(stream_seed(4, i), j) for i in range(3) for j in range(3)]
    repeated = generate_ids(tiny_lm, soft.repeat_interleave(3, 0), [p for p in PROMPTS for _ in range(3)], cfg,
                            seeds=row_seeds)
    assert shared == repeated and len(shared) == 9
    if not tiny_lm.is_encoder_decoder:  # the random T5 repeats one token per input, near-deterministically
        assert len({tuple(r) for r in shared}) > 3
    with pytest.raises(ValueError, match="do_sample"):
        generate_ids(tiny_lm, soft, PROMPTS, DecodeConfig(num_beams=1), num_return_sequences=2)


def test_sampled_rows_do_not_depend_on_the_batch(tiny_lm):
    """A sampled row draws from its own seed: alone, in another order or beside other rows (which
    stop at other times) it gives the same tokens; another seed gives other tokens."""
    soft = _soft(tiny_lm, b=3, seed=6)
    cfg = DecodeConfig(num_beams=1, do_sample=True, top_p=0.95, temperature=1.5, max_new_tokens=10,
                       min_new_tokens=0, seed=11)
    batched = generate_ids(tiny_lm, soft, PROMPTS, cfg)
    seeds = [stream_seed(11, i) for i in range(3)]
    alone = [generate_ids(tiny_lm, soft[i:i + 1], [PROMPTS[i]], cfg, seeds=[seeds[i]])[0] for i in range(3)]
    reordered = generate_ids(tiny_lm, soft.flip(0), PROMPTS[::-1], cfg, seeds=seeds[::-1])
    assert batched == alone == reordered[::-1]
    if tiny_lm.model.config.model_type in ("llama", "opt"):  # here rows leave the batch at different steps
        assert len({len(r) for r in batched}) > 1
    others = generate_ids(tiny_lm, soft, PROMPTS, cfg, seeds=[s + 1 for s in seeds])
    assert others != batched
    with pytest.raises(ValueError, match="one seed per input"):
        generate_ids(tiny_lm, soft, PROMPTS, cfg, seeds=seeds[:2])


@pytest.mark.parametrize("beams", [1, 4])
def test_an_ensemble_of_one_model_twice_decodes_as_the_model(tiny_lm, beams):
    """The mean of two identical distributions is that distribution: greedy and beam outputs unchanged."""
    cfg = DecodeConfig(num_beams=beams, max_new_tokens=10, min_new_tokens=2, no_repeat_ngram_size=2)
    soft = _soft(tiny_lm, seed=8)
    assert generate_ensemble_ids([(tiny_lm, soft), (tiny_lm, soft)], PROMPTS, cfg) == \
        generate_ids(tiny_lm, soft, PROMPTS, cfg)


def _two_members():
    """A Llama and an OPT that share the word-level vocabulary, with soft prompts of 4 and 6 queries."""
    a = FrozenLM(tiny_llama(seed=1), tiny_lm_tokenizer(), LLMConfig())
    b = FrozenLM(tiny_opt(seed=2), tiny_lm_tokenizer(), LLMConfig())
    return [(a, _soft(a, q=4, seed=3)), (b, _soft(b, q=6, seed=4))]


def test_ensemble_greedy_follows_the_members_mean_probability_by_hand():
    """Greedy ensemble decoding (batched, left-padded, cached) against a by-hand loop: per input, full
    uncached forward passes of each member, mean of the softmaxes, argmax, until eos."""
    members, cfg = _two_members(), DecodeConfig(num_beams=1, max_new_tokens=10, min_new_tokens=0)
    ours = generate_ensemble_ids(members, PROMPTS, cfg)
    for i, prompt in enumerate(PROMPTS):
        gen: list[int] = []
        for _ in range(cfg.max_new_tokens):
            probs = []
            for lm, soft in members:
                embeds, mask = lm._with_soft(soft[i:i + 1], [prompt + gen], left_pad=True)
                probs.append(lm.model(inputs_embeds=embeds, attention_mask=mask).logits[0, -1].softmax(-1))
            tok = int(torch.stack(probs).mean(0).argmax())
            if tok == members[0][0].eos_id:
                break
            gen.append(tok)
        assert ours[i] == gen, i
    # and the ensemble is neither member alone
    singles = [generate_ids(lm, soft, PROMPTS, cfg) for lm, soft in members]
    assert ours != singles[0] and ours != singles[1]


@pytest.mark.parametrize("beams", [1, 4])
def test_ensemble_batched_equals_one_at_a_time(beams):
    members = _two_members()
    cfg = DecodeConfig(num_beams=beams, max_new_tokens=10, min_new_tokens=2)
    batched = generate_ensemble_ids(members, PROMPTS, cfg)
    single = [generate_ensemble_ids([(lm, soft[i:i + 1]) for lm, soft in members], [p], cfg)[0]
              for i, p in enumerate(PROMPTS)]
    assert batched == single


def test_ensemble_refuses_members_that_do_not_share_a_vocabulary():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = list(reversed(LM_WORDS))  # same size, same special ids, other words behind the ids
    tk = Tokenizer(models.WordLevel({"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(words)}},
                                    unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    other = FrozenLM(tiny_llama(seed=5), PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="</s>",
                                                                 pad_token="<pad>", unk_token="<unk>"), LLMConfig())
    (a, soft), _ = _two_members()
    with pytest.raises(ValueError, match="vocabulary"):
        generate_ensemble_ids([(a, soft), (other, _soft(other))], PROMPTS, DecodeConfig())
    with pytest.raises(ValueError, match="same images"):
        generate_ensemble_ids([(a, soft), (a, soft[:2])], PROMPTS, DecodeConfig())


def test_sampled_captions_of_an_eval_do_not_depend_on_its_batch_size():
    """generate_for seeds row r with stream_seed(seed, r): batches of 2 and of 5 give the same texts."""
    from blip2.config import Blip2Config
    from blip2.eval.caption import generate_for
    from blip2.model import Blip2
    from conftest import tiny_qformer

    cfg = LLMConfig(max_prompt_len=8, max_text_len=12)
    torch.manual_seed(0)
    model = Blip2(Blip2Config(qformer=tiny_qformer(text_branch=False), llm=cfg), None, None,
                  FrozenLM(tiny_llama(0), tiny_lm_tokenizer(), cfg))
    feats = torch.randn(5, 5, 24, generator=torch.Generator().manual_seed(2))
    decode = DecodeConfig(num_beams=1, do_sample=True, temperature=2.0, max_new_tokens=8, min_new_tokens=0, seed=5)
    texts = generate_for(model, feats, [""] * 5, decode, batch_size=2)
    assert texts == generate_for(model, feats, [""] * 5, decode, batch_size=5)
    assert len(set(texts)) > 1


def test_inverse_cdf_sampling_gives_each_token_its_probability():
    """Evenly spread uniforms land in each token's interval in proportion to its probability (to
    within one of M draws), never on a zero-probability token, whatever the row's scale."""
    p = torch.tensor([0.5, 0.0, 0.125, 0.25, 0.0, 0.125])
    m = 8000
    u = (torch.arange(m, dtype=torch.float64) + 0.5) / m  # (M,)
    for scale in (1.0, 3.0):  # unnormalised rows sample as their normalised selves
        tok = sample_tokens((p * scale).expand(m, -1), u)
        counts = torch.bincount(tok, minlength=6).double()
        assert (counts - p.double() * m).abs().max() <= 1, counts
    assert sample_tokens(torch.tensor([[0.0, 1.0, 0.0]]), torch.tensor([0.0])).item() == 1
    assert sample_tokens(torch.tensor([[0.3, 0.7, 0.0]]), torch.tensor([1 - 1e-12])).item() == 1


def test_row_streams():
    """row_uniforms: a row's stream depends on its seed alone; stream_seed separates nearby keys."""
    a = row_uniforms([5, 6, 7], 4)
    assert a.shape == (3, 4) and float(a.min()) >= 0 and float(a.max()) < 1
    torch.testing.assert_close(row_uniforms([7], 4)[0], a[2], rtol=0, atol=0)
    keys = [(s, i) for s in range(20) for i in range(20)]
    assert len({stream_seed(*k) for k in keys}) == len(keys)  # (s, i + 1) vs (s + 1, i) and so on
    assert stream_seed(1, 2) != stream_seed(2, 1) and stream_seed(3) == stream_seed(3)
    assert all(0 <= stream_seed(*k) < 2**64 for k in [(-1,), (2**70, 5)])


def test_process_scores_by_hand():
    scores = torch.tensor([[1.0, -2.0, 3.0, 0.5, 0.0]])
    history = torch.tensor([[0, 1, 0, 3]])  # bigrams (0,1), (1,0), (0,3); last token 3
    cfg = DecodeConfig(num_beams=1, repetition_penalty=2.0, no_repeat_ngram_size=2, min_new_tokens=5,
                       max_new_tokens=6)
    out = process_scores(scores, history, n_new=2, cfg=cfg, eos=4)
    # penalised: token 0 (1.0 -> 0.5), 1 (-2 -> -4), 3 (0.5 -> 0.25); eos banned (n_new < min)
    assert out[0, :4].tolist() == [0.5, -4.0, 3.0, 0.25]
    assert out[0, 4] == -float("inf")
    history = torch.tensor([[0, 1, 0]])  # last token 0 was followed by 1 before -> ban 1
    out = process_scores(scores, history, n_new=9, cfg=DecodeConfig(num_beams=1, no_repeat_ngram_size=2), eos=4)
    assert out[0].tolist() == [1.0, -float("inf"), 3.0, 0.5, 0.0]


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_no_repeat_ngram_ban_equals_a_plain_loop(n):
    """The tensorised ban against the definition, on random histories with many repeats."""
    gen = torch.Generator().manual_seed(n)
    cfg = DecodeConfig(num_beams=1, no_repeat_ngram_size=n, min_new_tokens=0)
    for length in range(0, 9):
        history = torch.randint(0, 4, (6, length), generator=gen)  # 4 symbols: n-grams recur
        scores = torch.randn(6, 7, generator=gen)
        expected = scores.clone()
        for row, hist in enumerate(history.tolist()):
            tail = hist[len(hist) - n + 1:] if n > 1 else []
            for i in range(len(hist) - n + 1):
                if hist[i:i + n - 1] == tail:
                    expected[row, hist[i + n - 1]] = -float("inf")
        assert torch.equal(process_scores(scores, history, n_new=length, cfg=cfg, eos=6), expected)


@pytest.mark.parametrize("penalty", [1.0, 1.3, 0.7])
@pytest.mark.parametrize("n", [0, 1, 2, 3])
def test_scores_over_a_filled_buffer_equal_scores_over_the_history(n, penalty):
    """The preallocated-buffer form (`filled`, a device step count) against the plain history: the
    tokens past `filled` are garbage that must change nothing."""
    gen = torch.Generator().manual_seed(17 * n + int(10 * penalty))
    cfg = DecodeConfig(num_beams=1, no_repeat_ngram_size=n, repetition_penalty=penalty, min_new_tokens=3)
    width = 8
    for filled in range(width + 1):
        buffer = torch.randint(0, 5, (6, width), generator=gen)  # 5 symbols: n-grams recur
        scores = torch.randn(6, 7, generator=gen)
        scores[0, 2] = -float("inf")  # a token already ruled out stays out
        expected = process_scores(scores, buffer[:, :filled], n_new=filled, cfg=cfg, eos=6, suppress=[1])
        got = process_scores(scores, buffer, n_new=torch.tensor(filled), cfg=cfg, eos=6,
                             suppress=torch.tensor([1]), filled=torch.tensor(filled))
        assert torch.equal(got, expected), filled
