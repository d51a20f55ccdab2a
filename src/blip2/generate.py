"""Decoding: greedy, beam search and nucleus sampling over a `DecodeState` (see blip2.llm).

The visual prefix (soft prompt + prompt) is run once per input by `FrozenLM.start`; beam search
then repeats that cache across beams instead of recomputing it. Scores follow transformers'
conventions so that outputs match `generate()` token for token on the same model and inputs:
logits processors (repetition penalty, no-repeat n-gram, minimum length) see raw logits in greedy
and sampling and log-probabilities in beam search; beam hypotheses are ranked by summed
log-probability / generated_length ** length_penalty, with the same early-stopping rule
(`early_stopping=False`).

Sampling gives every row its own random stream (`stream_seed`): a row's tokens depend on its seed and
its probabilities only, not on the other rows of the batch, on when they stop, or on the device. So a
sampled caption is the same batched and alone, and an SCST step draws the same samples on any number
of processes.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from blip2.config import DecodeConfig
from blip2.llm import DecodeState, FrozenLM
from blip2.static_decode import StaticDecodeState, StepGraph, use_static_cache

NEG = -1.0e9
_MASK64 = (1 << 64) - 1


def stream_seed(*keys: int) -> int:
    """Integers -> one 64-bit seed (a splitmix64-style mix): nearby keys such as (seed, 0) and
    (seed, 1), or (s, i + 1) and (s + 1, i), give unrelated streams, unlike sums of keys."""
    h = 0x9E3779B97F4A7C15
    for k in keys:
        h = ((h ^ (k & _MASK64)) * 0xBF58476D1CE4E5B9) & _MASK64
        h = ((h ^ (h >> 31)) * 0x94D049BB133111EB) & _MASK64
        h ^= h >> 29
    return h


def generate_ids(lm: FrozenLM, soft: torch.Tensor, prompts: list[list[int]], cfg: DecodeConfig,
                 num_return_sequences: int = 1, seeds: list[int] | None = None) -> list[list[int]]:
    """Soft prompts (B, Q, H) + prompt ids -> generated ids per input (eos and padding removed).

    `num_return_sequences` > 1 (sampling only) draws that many texts per input, returned input by
    input (B * n rows); the prefix is computed once per input and shared by its samples.
    `seeds` (sampling only): one per input, default `stream_seed(cfg.seed, i)` for input i. Input i
    samples from its seed alone (sample j of several from `stream_seed(seeds[i], j)`), so passing the
    seeds an input had in one batch reproduces its text in any other.
    """
    return generate_ensemble_ids([(lm, soft)], prompts, cfg, num_return_sequences, seeds)


def generate_ensemble_ids(members: list[tuple[FrozenLM, torch.Tensor]], prompts: list[list[int]],
                          cfg: DecodeConfig, num_return_sequences: int = 1,
                          seeds: list[int] | None = None) -> list[list[int]]:
    """`generate_ids` for several (LM, soft prompts (B, Q_m, H_m)) members decoded as one: every
    step's next-token distribution is the mean of the members' (see `EnsembleState`). The members
    must share one vocabulary and eos/pad ids; their LMs, widths and query counts may differ. One
    member is exactly `generate_ids`."""
    if not members:
        raise ValueError("an ensemble needs at least one member")
    lm, b = members[0][0], members[0][1].shape[0]
    for other, soft in members[1:]:
        if soft.shape[0] != b:
            raise ValueError(f"ensemble members got {soft.shape[0]} and {b} inputs: give each member the same images")
        if not other.same_vocabulary(lm):
            raise ValueError("ensemble members must share one LLM vocabulary (tokenizer, eos and pad ids, output "
                             "width): average only models whose frozen LLMs use the same tokenizer")
    if num_return_sequences > 1 and not cfg.do_sample:
        raise ValueError("num_return_sequences > 1 needs decode.do_sample=true: greedy search would return "
                         "the same text n times (and beam search returns its best hypothesis only)")
    if seeds is not None and len(seeds) != b:
        raise ValueError(f"{len(seeds)} seeds for {b} inputs: pass one seed per input")
    row_seeds: list[int] = []
    if cfg.do_sample:
        seeds = seeds if seeds is not None else [stream_seed(cfg.seed, i) for i in range(b)]
        row_seeds = (seeds if num_return_sequences == 1
                     else [stream_seed(s, j) for s in seeds for j in range(num_return_sequences)])
    states: list[DecodeState | StaticDecodeState] = []
    for member_lm, soft in members:
        state: DecodeState | StaticDecodeState = member_lm.start(soft, prompts)
        if cfg.num_beams > 1 or num_return_sequences > 1:
            state.expand(max(cfg.num_beams, num_return_sequences))  # the prefix was computed once per input
        if use_static_cache(member_lm, cfg.static_cache):
            state = StaticDecodeState(state, cfg.max_new_tokens)
        states.append(state)
    run: AnyState = states[0] if len(states) == 1 else EnsembleState(states)
    if cfg.num_beams > 1 and isinstance(run, StaticDecodeState):
        out = _static_beam_search(run, cfg, lm.eos_id, lm.pad_id)
    elif cfg.num_beams > 1:
        out = _beam_search(run, cfg, lm.eos_id, lm.pad_id)
    else:
        out = _greedy_or_sample(run, cfg, lm.eos_id, lm.pad_id, row_seeds)
    for state in states:
        if isinstance(state, StaticDecodeState):
            state.release()  # only after a clean run: the next call of this shape reuses cache and graph
    return [_strip(row, lm.eos_id) for row in out.tolist()]


class EnsembleState:
    """Several members' decode states stepped together as one (same rows, same tokens fed).

    `logits` are the log of the members' mean next-token probability, log(1/M sum_m softmax(l_m)):
    already normalised, so beam search's log_softmax leaves them unchanged and greedy search picks the
    token the members together find most likely. Averaging probabilities rather than logits is the
    usual captioning ensemble: a member that rules a token out cannot veto the others.
    """

    def __init__(self, states: list[DecodeState | StaticDecodeState]):
        self.states = states
        self.lm = states[0].lm  # eos, pad and suppressed ids (shared by construction)

    @property
    def logits(self) -> torch.Tensor:
        logp = torch.stack([s.logits.float().log_softmax(-1) for s in self.states])  # (M, N, V)
        return logp.logsumexp(0) - math.log(len(self.states))  # (N, V)

    @property
    def history(self) -> torch.Tensor:
        return self.states[0].history  # (N, t): every member was fed the same tokens

    def expand(self, k: int) -> None:
        for s in self.states:
            s.expand(k)

    def select(self, rows: torch.Tensor) -> None:
        for s in self.states:
            s.select(rows)

    def step(self, tokens: torch.Tensor) -> None:
        for s in self.states:
            s.step(tokens)


AnyState = DecodeState | StaticDecodeState | EnsembleState


def _strip(ids: list[int], eos: int) -> list[int]:
    return ids[: ids.index(eos)] if eos in ids else ids


def process_scores(scores: torch.Tensor, history: torch.Tensor, n_new: int | torch.Tensor, cfg: DecodeConfig,
                   eos: int, suppress: list[int] | tuple[int, ...] | torch.Tensor = (), inplace: bool = False,
                   filled: torch.Tensor | None = None) -> torch.Tensor:
    """Repetition penalty, no-repeat n-gram ban, minimum length and suppressed tokens on (N, V) scores
    (`inplace` skips the copy when the caller owns `scores`: (N, V) is 31 MB at 160 rows of SmolLM2).

    `filled` (a 0-d tensor) says only history[:, :filled] is real, and `n_new` may then be a tensor
    too: the form a preallocated buffer and a step captured as one CUDA graph need. Every op has a
    fixed shape and reads nothing back to the host (no boolean indexing, no `.item()`)."""
    scores = scores if inplace else scores.clone()
    if isinstance(suppress, torch.Tensor) or suppress:
        index = suppress if isinstance(suppress, torch.Tensor) else torch.tensor(suppress, device=scores.device)
        scores.index_fill_(1, index, -float("inf"))
    width = history.shape[1]
    cols = torch.arange(width, device=history.device)  # (W,)
    penalty = cfg.repetition_penalty
    if penalty != 1.0 and width:
        seen = scores.gather(1, history)  # (N, W)
        seen = torch.where(seen < 0, seen * penalty, seen / penalty)
        if filled is None:
            scores.scatter_(1, history, seen)
        else:  # positions past `filled` write nothing: min (or max) with +inf (-inf) keeps the score
            lower = penalty > 1.0  # a penalty above 1 only ever lowers a score
            inert = float("inf") if lower else -float("inf")
            seen = torch.where(cols < filled, seen, inert)
            scores.scatter_reduce_(1, history, seen, reduce="amin" if lower else "amax")
    n = cfg.no_repeat_ngram_size
    if n and width >= n:
        # Every earlier n-gram whose first n-1 tokens equal the last n-1 generated bans its last
        # token; tensor ops, not a Python loop over rows (~1.5 ms of host time at 160 rows, about one
        # replayed decode step of the tiny model on an H200).
        end = width if filled is None else filled
        grams = history.unfold(1, n, 1)  # (N, W-n+1, n) all n-grams in the buffer
        tail = history[:, (end - n + 1 + cols[: n - 1]).clamp(min=0)]  # (N, n-1) the last n-1 tokens
        hit = (grams[:, :, : n - 1] == tail[:, None, :]).all(-1)  # (N, W-n+1)
        if filled is not None:
            hit &= cols[: grams.shape[1]] <= filled - n  # the n-gram lies inside the filled part
        ban = torch.full_like(hit, float("inf"), dtype=scores.dtype).masked_fill_(hit, -float("inf"))
        scores.scatter_reduce_(1, grams[:, :, -1], ban, reduce="amin")  # min(score, +inf) keeps it
    if isinstance(n_new, torch.Tensor):
        scores[:, eos] = scores[:, eos].masked_fill(n_new < cfg.min_new_tokens, -float("inf"))
    elif n_new < cfg.min_new_tokens:
        scores[:, eos] = -float("inf")
    return scores


def _warp(scores: torch.Tensor, cfg: DecodeConfig) -> torch.Tensor:
    """Temperature, top-k and top-p (nucleus) filtering of (N, V) scores before sampling."""
    scores = scores / cfg.temperature
    if cfg.top_k:
        kth = scores.topk(min(cfg.top_k, scores.shape[-1]), dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, -float("inf"))
    if cfg.top_p < 1.0:
        sorted_scores, order = scores.sort(dim=-1)  # ascending
        cum = sorted_scores.softmax(-1).cumsum(-1)
        drop = cum <= 1 - cfg.top_p
        drop[:, -1] = False  # always keep the most likely token
        scores = scores.masked_fill(drop.scatter(1, order, drop), -float("inf"))
    return scores


def sample_tokens(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling: probabilities (N, V) and uniforms in [0, 1) (N,) -> tokens (N,).

    Row r takes the first token whose cumulative probability exceeds u[r] x its total, so a token
    with probability p owns an interval of length p (zero-probability tokens none) and the draw
    depends on that row alone.
    """
    cum = probs.float().cumsum(-1)  # (N, V)
    total = cum[:, -1:]  # (N, 1)
    # strictly below the total (u near 1 rounds to 1.0 in float32): the first cum > x then has p > 0
    x = torch.minimum(u.to(cum.dtype)[:, None] * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cum, x, right=True).squeeze(1)


def row_uniforms(seeds: list[int], steps: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(N, steps) uniforms in [0, 1), row r from a CPU generator seeded seeds[r]: identical on every
    device and for every batch the row is part of."""
    rows = [torch.rand(steps, generator=torch.Generator().manual_seed(s & _MASK64), dtype=torch.float64) for s in seeds]
    return torch.stack(rows).to(device) if rows else torch.zeros(0, steps, dtype=torch.float64, device=device)


def _greedy_or_sample(state: AnyState, cfg: DecodeConfig, eos: int, pad: int,
                      row_seeds: list[int]) -> torch.Tensor:
    """Greedy or sampled decoding (row r from its seed row_seeds[r]); rows that emitted eos leave the
    batch (their LM work stops)."""
    n, dev = state.logits.shape[0], state.logits.device
    u = row_uniforms(row_seeds, cfg.max_new_tokens, dev) if cfg.do_sample else None  # (N, T)
    start_len = state.history.shape[1]
    out = torch.full((n, cfg.max_new_tokens), pad, dtype=torch.long, device=dev)
    active = torch.arange(n, device=dev)  # original row of every row still in `state`
    for t in range(cfg.max_new_tokens):
        scores = process_scores(state.logits, state.history, state.history.shape[1] - start_len, cfg, eos,
                                state.lm.suppress)
        if cfg.do_sample:
            assert u is not None
            tok = sample_tokens(_warp(scores, cfg).softmax(-1), u[active, t])
        else:
            tok = scores.argmax(-1)  # (N_active,)
        out[active, t] = tok
        going = tok != eos
        if not going.any() or t == cfg.max_new_tokens - 1:
            return out[:, : t + 1]
        if not going.all():
            keep = going.nonzero().squeeze(1)
            active, tok = active[keep], tok[keep]
            state.select(keep)
        state.step(tok)
    return out


class _Step(NamedTuple):
    """One beam-search step's result for B inputs x K beams."""

    run_seqs: torch.Tensor  # (B, K, T) the beams that go on
    run_scores: torch.Tensor  # (B, K) their summed log-probabilities
    src_beam: torch.Tensor  # (B, K) the beam each of them continues
    fin_seqs: torch.Tensor  # (B, K, T) finished hypotheses, best first
    fin_scores: torch.Tensor  # (B, K) their length-normalised scores
    fin_flag: torch.Tensor  # (B, K) which of them are real
    improvable: torch.Tensor  # (B,) whether a running beam can still beat the worst finished one


def _beam_step(logp: torch.Tensor, run_scores: torch.Tensor, run_seqs: torch.Tensor, fin_seqs: torch.Tensor,
               fin_scores: torch.Tensor, fin_flag: torch.Tensor, t: int | torch.Tensor, eos: int,
               norm: float | torch.Tensor, last: bool | torch.Tensor, top_k_mask: torch.Tensor) -> _Step:
    """The bookkeeping of beam search for token t (transformers' semantics), shared by the host loop
    (`t`, `norm` and `last` Python values) and the graphed step (0-d / (1,) tensors on the device).
    `logp` (B*K, V) are the processed log-probabilities (changed in place); `norm` is
    (t + 1) ** length_penalty, `last` whether t is the final token."""
    b, k = run_scores.shape
    vocab = logp.shape[-1]
    total = logp.view(b, k, vocab).add_(run_scores[:, :, None]).view(b, k * vocab)
    cand_scores, cand_idx = total.topk(2 * k, dim=-1)  # (B, 2K)
    cand_beam, cand_tok = cand_idx // vocab, cand_idx % vocab
    cand_seqs = _take(run_seqs, cand_beam)  # (B, 2K, T), a new tensor (gather)
    if isinstance(t, torch.Tensor):  # token t of every candidate, t on the device
        cand_seqs.scatter_(2, t.expand(b, 2 * k, 1), cand_tok[:, :, None])
    else:
        cand_seqs[:, :, t] = cand_tok
    hits = (cand_tok == eos) | last  # (B, 2K) stopping criteria

    # Beams that continue: the best k candidates that did not stop.
    going = cand_scores + hits.float() * NEG  # (B, 2K) stopped candidates pushed out
    keep = going.topk(k, dim=-1).indices  # (B, K)
    run_scores = going.gather(1, keep)

    # Hypotheses that finish now, length-normalised, merged with the ones finished before.
    just = hits & top_k_mask[None, :]
    pool = torch.cat([fin_scores, cand_scores / norm + (~just).float() * NEG], dim=1)  # (B, 3K)
    merged = pool.topk(k, dim=-1).indices  # (B, K) into 3K
    fin_scores = pool.gather(1, merged)
    fin_flag = torch.cat([fin_flag, just], dim=1).gather(1, merged)

    # Can a running beam still beat the worst finished one (at its current length)?
    worst = torch.where(fin_flag, fin_scores.min(dim=1, keepdim=True).values, torch.full_like(fin_scores, NEG))
    improvable = (run_scores[:, :1] / norm > worst).any(dim=-1)  # (B,)
    return _Step(_take(cand_seqs, keep), run_scores, cand_beam.gather(1, keep),
                 _take(torch.cat([fin_seqs, cand_seqs], dim=1), merged), fin_scores, fin_flag, improvable)


def _beam_search(state: AnyState, cfg: DecodeConfig, eos: int, pad: int) -> torch.Tensor:
    """Beam search (transformers' semantics) over a state already expanded to B * num_beams rows;
    returns the best finished hypothesis per input (B, T),
    padded with `pad`. An input whose running beams can no longer beat its finished ones leaves
    the batch, so the LM stops working for it (transformers keeps computing it until all are done)."""
    k, lp = cfg.num_beams, cfg.length_penalty
    b, dev = state.logits.shape[0] // k, state.logits.device
    start_len = state.history.shape[1]
    top_k_mask = torch.arange(2 * k, device=dev) < k  # only the best k candidates may finish
    result = torch.full((b, cfg.max_new_tokens), pad, dtype=torch.long, device=dev)
    active = torch.arange(b, device=dev)  # original input of every input still decoding
    run_scores = torch.full((b, k), NEG, device=dev)
    run_scores[:, 0] = 0.0  # all beams start identical: expand only the first
    run_seqs = torch.full((b, k, cfg.max_new_tokens), pad, dtype=torch.long, device=dev)
    fin_seqs = run_seqs.clone()
    fin_scores = torch.full((b, k), NEG, device=dev)
    fin_flag = torch.zeros(b, k, dtype=torch.bool, device=dev)
    for t in range(cfg.max_new_tokens):
        n = active.shape[0]
        logp = process_scores(state.logits.log_softmax(-1), state.history, state.history.shape[1] - start_len,
                              cfg, eos, state.lm.suppress, inplace=True)  # (N*K, V)
        step = _beam_step(logp, run_scores, run_seqs, fin_seqs, fin_scores, fin_flag, t, eos,
                          float(t + 1) ** lp, t + 1 >= cfg.max_new_tokens, top_k_mask)
        run_seqs, run_scores, src_beam, fin_seqs, fin_scores, fin_flag, improvable = step
        go = improvable.nonzero().squeeze(1)  # (N',) inputs that keep decoding (one host sync)
        if go.shape[0] == 0 or t == cfg.max_new_tokens - 1:
            result[active] = fin_seqs[:, 0]
            break
        if go.shape[0] < n:  # finished inputs leave the batch
            result[active[~improvable]] = fin_seqs[~improvable, 0]
            active, run_seqs, run_scores, src_beam = active[go], run_seqs[go], run_scores[go], src_beam[go]
            fin_seqs, fin_scores, fin_flag = fin_seqs[go], fin_scores[go], fin_flag[go]
        state.select((go[:, None] * k + src_beam).flatten())
        state.step(run_seqs[:, :, t].flatten())
    return result


class _BeamStep:
    """Beam search of B inputs x K beams over fixed buffers: one step is the search's bookkeeping
    (scores, top-k, finished hypotheses) followed by the LM step over the preallocated cache, with
    the step counter on the device, so that the whole step is one CUDA graph (`StepGraph`).

    Semantics are `_beam_search`'s; what differs is that no input leaves the batch: a finished input
    keeps its rows, which compute but whose hypotheses are frozen (as in transformers' generate).
    The host asks one thing per step, whether every input is done, and on a GPU it reads the answer
    of the step before, so the device never waits for the host."""

    def __init__(self, state: StaticDecodeState, cfg: DecodeConfig, eos: int, pad: int):
        buf = state.buf
        n, dev = state.logits.shape[0], state.logits.device
        k, steps = cfg.num_beams, cfg.max_new_tokens
        b = n // k
        self.buf, self.cfg, self.eos, self.pad, self.b, self.k, self.steps = buf, cfg, eos, pad, b, k, steps
        self.key = (cfg, eos, pad)  # everything the graph bakes in besides the buffers' shapes
        self.suppress = torch.tensor(list(state.lm.suppress), dtype=torch.long, device=dev)
        # generated_length ** length_penalty for lengths 1..T, rounded as the host loop's Python floats
        self.norms = torch.tensor([float(t + 1) ** cfg.length_penalty for t in range(steps)], device=dev)
        self.top_k_mask = torch.arange(2 * k, device=dev) < k  # only the best k candidates may finish
        self.t = torch.zeros((), dtype=torch.long, device=dev)  # tokens generated so far
        self.prefix = torch.zeros((), dtype=torch.long, device=dev)  # cache positions before them
        self.logits = torch.zeros(n, state.logits.shape[1], device=dev)  # (N, V) next-token logits
        self.run_scores = torch.zeros(b, k, device=dev)
        self.run_seqs = torch.zeros(b, k, steps, dtype=torch.long, device=dev)  # (B, K, T) running beams
        self.fin_seqs = torch.zeros_like(self.run_seqs)  # (B, K, T) finished hypotheses, best first
        self.fin_scores = torch.zeros(b, k, device=dev)
        self.fin_flag = torch.zeros(b, k, dtype=torch.bool, device=dev)
        self.done = torch.zeros(b, dtype=torch.bool, device=dev)  # (B,) no running beam can win any more
        self.all_done = torch.zeros((), dtype=torch.bool, device=dev)
        changed = [self.t, self.logits, self.run_scores, self.run_seqs, self.fin_seqs, self.fin_scores,
                   self.fin_flag, self.done, buf.keys, buf.values, buf.mask, *buf.positions()]
        self.graph = StepGraph(self._step, changed, buf.graphs, dev)

    def load(self, state: StaticDecodeState) -> None:
        """Start a search from `state` (prefix cached, first logits computed, beams expanded)."""
        self.t.zero_()
        self.prefix.fill_(state.t)
        self.logits.copy_(state.logits)
        self.run_scores.fill_(NEG)
        self.run_scores[:, 0] = 0.0  # all beams start identical: expand only the first
        self.run_seqs.fill_(self.pad)
        self.fin_seqs.fill_(self.pad)
        self.fin_scores.fill_(NEG)
        self.fin_flag.zero_()
        self.done.zero_()
        self.all_done.zero_()

    def _step(self) -> None:
        self._feed(self._search())

    def _search(self) -> torch.Tensor:
        """The search's bookkeeping for token t; returns the cache row each kept beam continues (N,)."""
        b, k, steps, t = self.b, self.k, self.steps, self.t
        history = self.run_seqs.view(b * k, steps)  # (N, T) generated tokens, the first t real
        logp = process_scores(self.logits.log_softmax(-1), history, t, self.cfg, self.eos, self.suppress,
                              inplace=True, filled=t)  # (N, V)
        last = t + 1 >= steps  # 0-d
        norm = self.norms.gather(0, t.view(1))  # (1,) (indexing with a 0-d tensor would read it to the host)
        step = _beam_step(logp, self.run_scores, self.run_seqs, self.fin_seqs, self.fin_scores, self.fin_flag,
                          t, self.eos, norm, last, self.top_k_mask)
        frozen = self.done[:, None]  # (B, 1) a done input keeps its finished hypotheses
        self.fin_seqs.copy_(torch.where(frozen[:, :, None], self.fin_seqs, step.fin_seqs))
        self.fin_scores.copy_(torch.where(frozen, self.fin_scores, step.fin_scores))
        self.fin_flag.copy_(torch.where(frozen, self.fin_flag, step.fin_flag))
        self.done |= ~step.improvable | last
        self.all_done.copy_(self.done.all())
        self.run_seqs.copy_(step.run_seqs)
        self.run_scores.copy_(step.run_scores)
        return (torch.arange(b, device=t.device)[:, None] * k + step.src_beam).flatten()

    def _feed(self, rows: torch.Tensor) -> None:
        """The LM step: reorder the cache to the kept beams' rows (N,) (within each input, whose mask
        rows are equal, so the mask needs no reorder), then feed token t of every beam."""
        b, k, t, buf = self.b, self.k, self.t, self.buf
        buf.keys.copy_(buf.keys.index_select(1, rows))
        buf.values.copy_(buf.values.index_select(1, rows))
        buf.tokens.copy_(self.run_seqs.gather(2, t.expand(b, k, 1)).view(b * k, 1))
        buf.mask.scatter_(1, (self.prefix + t).expand(b * k, 1), 1)
        buf.forward()
        self.logits.copy_(buf.out)
        self.t.add_(1)


def _static_beam_search(state: StaticDecodeState, cfg: DecodeConfig, eos: int, pad: int) -> torch.Tensor:
    """`_beam_search` over a `StaticDecodeState`, each step one `_BeamStep` (a CUDA graph on a GPU);
    returns the best finished hypothesis per input (B, T), padded with `pad`."""
    if state.history.shape[1]:
        raise ValueError("the static beam search starts from a fresh decoder-only state (no tokens fed yet)")
    buf = state.buf
    search = buf.beam
    if search is None or search.key != (cfg, eos, pad):  # the buffers' shape is already the pool's key
        search = buf.beam = _BeamStep(state, cfg, eos, pad)
    search.load(state)
    cuda = state.logits.device.type == "cuda"
    if not cuda:
        for _ in range(cfg.max_new_tokens):
            search.graph()
            if search.all_done:
                break
        return search.fin_seqs[:, 0].clone()
    # On a GPU each step's `all_done` is copied to pinned host memory behind the step, and the host
    # waits only for the previous step's copy, so the next step is already queued meanwhile.
    with torch.cuda.device(state.logits.device):  # events on the model's GPU, which need not be the current one
        flags = torch.zeros(2, dtype=torch.bool, pin_memory=True)
        copied = [torch.cuda.Event(), torch.cuda.Event()]
        for t in range(cfg.max_new_tokens):
            search.graph()
            flags[t % 2].copy_(search.all_done, non_blocking=True)
            copied[t % 2].record()
            if t:
                copied[(t - 1) % 2].synchronize()
                if flags[(t - 1) % 2]:
                    break  # done a step ago: the step queued since froze every hypothesis it could change
    return search.fin_seqs[:, 0].clone()


def _take(seqs: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """seqs (B, M, T), idx (B, K) -> (B, K, T): the chosen hypotheses of every input."""
    return seqs.gather(1, idx[:, :, None].expand(-1, -1, seqs.shape[2]))
