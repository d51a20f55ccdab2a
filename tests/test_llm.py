"""The frozen-LLM bridge: training layouts by hand, loss vs an independent computation, frozen
weights, the prefix-LM split, a T5 that learns through the soft prompt, and the attention kernel."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from blip2.config import DecodeConfig, LLMConfig
from blip2.generate import generate_ids
from blip2.llm import FrozenLM, load_llm, packaged_llm_dir
from blip2.losses import split_prefix
from conftest import save_tiny_llm, tiny_gemma3, tiny_llama, tiny_lm_tokenizer, tiny_opt, tiny_t5


def test_decoder_only_layout_by_hand(tiny_lm):
    if tiny_lm.is_encoder_decoder:
        x = tiny_lm.layout(torch.zeros(2, 2, tiny_lm.hidden_size), [[3, 4], []], [[5], [6, 7]])
        assert x.mask.tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]  # encoder: queries + prompt
        assert x.labels.tolist() == [[5, 1, -100], [6, 7, 1]]  # target + eos
        assert x.decoder_ids.tolist() == [[0, 5, 0], [0, 6, 7]]  # start token, then shifted targets
        return
    x = tiny_lm.layout(torch.zeros(2, 2, tiny_lm.hidden_size), [[3, 4], []], [[5], [6, 7]])
    # rows: [q q 3 4 5 eos] and [q q 6 7 eos pad]; loss only on the text and its eos
    assert x.mask.tolist() == [[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0]]
    assert x.labels.tolist() == [[-100, -100, -100, -100, 5, 1], [-100, -100, 6, 7, 1, -100]]


def test_loss_matches_full_logits_cross_entropy(tiny_lm):
    """Our loss (vocab projection only where a target follows) == CE over all shifted positions."""
    soft = torch.randn(3, 4, tiny_lm.hidden_size)
    prompts, targets = [[3, 4], [], [9]], [[5, 6, 7], [8], [10, 11]]
    ours = tiny_lm.loss(soft, prompts, targets)
    x = tiny_lm.layout(soft, prompts, targets)
    if tiny_lm.is_encoder_decoder:
        logits = tiny_lm.model(inputs_embeds=x.embeds, attention_mask=x.mask, labels=x.labels).logits
        ref = F.cross_entropy(logits.flatten(0, 1), x.labels.flatten(), ignore_index=-100)
        assert torch.allclose(ours, tiny_lm.model(inputs_embeds=x.embeds, attention_mask=x.mask,
                                                  labels=x.labels).loss, atol=1e-6)
    else:
        logits = tiny_lm.model(inputs_embeds=x.embeds, attention_mask=x.mask).logits
        ref = F.cross_entropy(logits[:, :-1].flatten(0, 1), x.labels[:, 1:].flatten(), ignore_index=-100)
    assert torch.allclose(ours, ref, atol=1e-6)


def test_continuation_after_a_shared_prefix_is_the_per_row_loss(tiny_lm):
    """Scoring several targets after one run of each [soft | prompt] (SCST's samples, closed-set
    options) gives each row's summed loss and its gradient, as one full sequence per row does;
    prompts of different lengths (left-padded prefix) and rows out of input order included."""
    torch.manual_seed(0)
    soft = torch.randn(3, 4, tiny_lm.hidden_size, requires_grad=True)
    prompts = [[3, 4], [], [9, 12, 13]]
    owner = [2, 0, 0, 1, 2, 1]
    targets = [[5, 6, 7], [8], [10, 11], [], [14, 15, 16, 17], [6]]
    shared = tiny_lm.continuation_logprob(tiny_lm.prefix(soft, prompts), torch.tensor(owner), targets)  # (6,)
    weights = torch.randn(len(owner))
    (weights * shared).sum().backward()
    ours = soft.grad.clone()
    soft.grad = None
    total = soft.new_zeros(())
    for r, (i, t) in enumerate(zip(owner, targets, strict=True)):
        nll, count = tiny_lm.loss_sum(soft[i:i + 1], [prompts[i]], [t])
        assert count == len(t) + 1  # the target and its eos
        assert shared[r].item() == pytest.approx(-nll.item(), abs=1e-4)
        total = total - weights[r] * nll
    total.backward()
    assert (ours - soft.grad).abs().max() < 1e-5 * soft.grad.abs().max()  # float32 rounding only


@pytest.mark.parametrize("make", [tiny_llama, tiny_opt, tiny_gemma3, tiny_t5], ids=["llama", "opt", "gemma3", "t5"])
def test_eager_attention_gives_what_sdpa_gives(make):
    """llm.attn_implementation changes the kernel only: the training loss and its gradient into the
    soft prompt (right-padded rows), the scores after a left-padded shared prefix, and greedy tokens."""
    lms = {a: FrozenLM(make(), tiny_lm_tokenizer(), LLMConfig(max_prompt_len=8, max_text_len=8, attn_implementation=a))
           for a in ("sdpa", "eager")}
    assert [lm.model.config._attn_implementation for lm in lms.values()] == ["sdpa", "eager"]
    torch.manual_seed(0)
    soft0 = torch.randn(3, 4, lms["sdpa"].hidden_size)
    prompts, targets = [[3, 4], [], [9, 12, 13]], [[5, 6, 7], [8], [10, 11]]
    out = {}
    for a, lm in lms.items():
        soft = soft0.clone().requires_grad_(True)
        loss = lm.loss(soft, prompts, targets)
        loss.backward()
        scores = lm.continuation_logprob(lm.prefix(soft0, prompts), torch.tensor([2, 0, 1, 0]), [[5], [6, 7], [], [8]])
        greedy = generate_ids(lm, soft0, prompts, DecodeConfig(num_beams=1, max_new_tokens=6, min_new_tokens=6))
        out[a] = (loss.detach(), soft.grad, scores.detach(), greedy)
    (l_s, g_s, s_s, t_s), (l_e, g_e, s_e, t_e) = out["sdpa"], out["eager"]
    assert torch.allclose(l_s, l_e, atol=1e-5)
    assert (g_s - g_e).abs().max() < 1e-4 * g_s.abs().max()
    assert torch.allclose(s_s, s_e, atol=1e-4)
    assert t_s == t_e and all(len(t) == 6 for t in t_s)


def test_load_llm_loads_the_configured_attention_kernel(tmp_path):
    path = str(save_tiny_llm(tmp_path / "lm"))
    assert load_llm(LLMConfig(path=path)).model.config._attn_implementation == "sdpa"  # auto: transformers' pick
    assert load_llm(LLMConfig(path=path, attn_implementation="eager")).model.config._attn_implementation == "eager"


def test_an_attention_implementation_the_model_cannot_switch_to_is_refused(monkeypatch):
    """transformers only logs a warning when a model cannot switch kernels; we refuse instead."""
    model = tiny_llama()
    monkeypatch.setattr(type(model), "_can_set_attn_implementation", classmethod(lambda cls: False))
    with pytest.raises(ValueError, match="attn_implementation=auto"):
        FrozenLM(model, tiny_lm_tokenizer(), LLMConfig(attn_implementation="eager"))
    with pytest.raises(ValueError, match="llm.attn_implementation"):
        LLMConfig(attn_implementation="flash_attention_2")


def test_llm_is_frozen_but_passes_gradient_to_the_soft_prompt(tiny_lm):
    tiny_lm.train()
    assert not tiny_lm.model.training
    soft = torch.randn(2, 4, tiny_lm.hidden_size, requires_grad=True)
    tiny_lm.loss(soft, [[3], [4, 5]], [[6, 7], [8]]).backward()
    assert soft.grad is not None and soft.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in tiny_lm.model.parameters())


def test_prefix_split_never_empty():
    g = torch.Generator().manual_seed(0)
    for n in range(2, 40):
        cuts = set()
        for _ in range(50):
            pre, suf = split_prefix(list(range(n)), g)
            assert pre and suf and pre + suf == list(range(n))
            assert len(pre) <= n // 2
            cuts.add(len(pre))
        assert cuts == set(range(1, n // 2 + 1)) or n > 20  # every allowed point is drawn
    assert split_prefix([7], g) == ([], [7])


def test_t5_path_trains_through_the_soft_prompt():
    """A tiny random T5 learns to emit a fixed caption from a trained soft prompt (loss falls)."""
    lm = FrozenLM(tiny_t5(), tiny_lm_tokenizer(), LLMConfig())
    torch.manual_seed(0)
    proj = torch.nn.Linear(8, lm.hidden_size)
    feats = torch.randn(4, 3, 8)  # 4 "images", 3 query vectors each
    prompts, targets = [[], [], [20], []], [[3, 4, 5], [6, 7], [8], [9, 10, 11]]
    opt = torch.optim.Adam(proj.parameters(), lr=3e-2)
    losses = []
    for _ in range(300):
        loss = lm.loss(proj(feats), prompts, targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    # from a peaky random start (~19 nats) to well below uniform guessing (ln 32 = 3.47 nats)
    assert losses[-1] < 0.8 * math.log(32) and losses[-1] < 0.2 * losses[0], (losses[0], losses[-1])


def test_prefill_projects_the_last_positions_as_one_matrix(tiny_lm):
    """`start` keeps only the last position's logits; the vocabulary projection must get them as a
    contiguous (B, 1, H) block (a strided view makes torch run B separate products over the whole
    weight), and the logits must equal a full forward's at each row's last real position."""
    seen = []
    head = tiny_lm.model.get_output_embeddings()
    handle = head.register_forward_pre_hook(lambda m, args: seen.append(args[0].is_contiguous()))
    soft = torch.randn(3, 2, tiny_lm.hidden_size)
    prompts = [[3, 4, 5], [6], []]
    state = tiny_lm.start(soft, prompts)
    handle.remove()
    assert seen and all(seen)
    for i, p in enumerate(prompts):  # one row at a time, no padding, every position's logits
        if tiny_lm.is_encoder_decoder:
            embeds, mask = tiny_lm._with_soft(soft[i:i + 1], [p], left_pad=False)
            full = tiny_lm.model(inputs_embeds=embeds, attention_mask=mask,
                                 decoder_input_ids=torch.tensor([[tiny_lm.start_id]])).logits[0, -1]
        else:
            embeds = torch.cat([soft[i:i + 1], tiny_lm.embed(torch.tensor([p], dtype=torch.long))], dim=1)
            full = tiny_lm.model(inputs_embeds=embeds).logits[0, -1]
        assert torch.allclose(state.logits[i], full.float(), atol=1e-5, rtol=0)


def _fake_chunked_lm(tmp_path, monkeypatch, sha256: str) -> str:
    """A packaged-LM entry whose two chunks live in throwaway packages on sys.path."""
    from blip2 import llm as llm_mod

    for i in range(2):
        pkg = tmp_path / "site" / f"fakechunk{i}"
        (pkg / "data").mkdir(parents=True)
        (pkg / "__init__.py").write_text("")
        (pkg / "data" / f"m.gguf.part{i}").write_bytes(bytes([i]) * 100)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    spec = llm_mod.PackagedLM("fake", (("fakechunk0", "data/m.gguf.part0"), ("fakechunk1", "data/m.gguf.part1")),
                              "pip install fakechunk0 fakechunk1", sha256=sha256)
    monkeypatch.setitem(llm_mod.PACKAGED_LMS, "packaged:fake", spec)
    return "packaged:fake"


def test_chunked_packaged_lm_with_a_wrong_checksum_is_refused_and_leaves_no_cache(tmp_path, monkeypatch):
    name = _fake_chunked_lm(tmp_path, monkeypatch, sha256="0" * 64)
    cache = tmp_path / "cache"
    with pytest.raises(ValueError, match="sha256 .* reinstall the wheels: pip install fakechunk0"):
        packaged_llm_dir(cache, which=name)
    assert not cache.exists() or not any(cache.iterdir())  # nothing half-written is left to be reused


def test_missing_chunk_package_names_the_install_line(tmp_path, monkeypatch):
    import hashlib

    name = _fake_chunked_lm(tmp_path, monkeypatch, sha256=hashlib.sha256(b"").hexdigest())
    (tmp_path / "site" / "fakechunk1" / "data" / "m.gguf.part1").unlink()
    with pytest.raises(FileNotFoundError, match="needs fakechunk1 .* pip install fakechunk0 fakechunk1"):
        packaged_llm_dir(tmp_path / "cache", which=name)


def test_a_local_directory_whose_name_starts_with_packaged_is_a_directory(tmp_path, monkeypatch):
    save_tiny_llm(tmp_path / "packaged-llms")
    monkeypatch.chdir(tmp_path)
    lm = load_llm(LLMConfig(path="packaged-llms"))  # relative path, not a packaged:NAME choice
    assert lm.hidden_size == 32 and lm.eos_id == 1
