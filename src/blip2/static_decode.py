"""Decoding over a preallocated KV cache, one CUDA graph per step (decoder-only LMs).

Why: on a GPU, a decode step of a small LM costs kernel launches, not arithmetic. The H200 profile
of our eager beam search (beam 5, batch 8, 30 tokens) spent 231 ms on the host against 32 ms on the
device, in 4,568 launches (docs/RESULTS.md, "On a GPU"). When every tensor a step touches lives at
a fixed address, the step can be captured once as a CUDA graph and replayed with a single launch.

What that takes:
  * the KV cache is preallocated (all layers in one tensor, so a beam reorder is one gather) and
    written in place; transformers' `StaticLayer` advances its write position on the device, so a
    replay needs no host arguments;
  * the attention mask is passed as a ready 4-D mask, so transformers builds none (its mask
    helpers may ask the host whether a mask can be skipped, which a capture forbids);
  * the number of rows is fixed: an input that has finished keeps its rows, which compute but are
    never read (transformers' generate does the same). On a GPU those rows are nearly free; on a
    CPU they are not, so there the static path runs eagerly and is meant for testing;
  * beam search runs as one graph per step, its bookkeeping included (`blip2.generate._BeamStep`:
    the step counter lives on the device, finished inputs freeze their hypotheses instead of
    leaving the batch, and the host reads one flag per step, a step late). Greedy search and
    ensembles replay the LM step alone and keep their bookkeeping on the host.

Capturing costs about three eager steps, so the buffers and their graph are kept on the FrozenLM,
keyed by (rows, cache length), and reused by the next call of the same shape: an evaluation loop
captures once per batch size. The two most recently used sets are kept (the full and the last,
smaller batch of a loop); each holds a KV cache as large as one call's, and
`lm.static_buffers.clear()` frees them. Cache lengths are rounded up to a multiple of 16 so that
prompts of different lengths share one graph (the unused positions are masked).

The tokens equal those of the dynamic-cache path up to floating-point rounding of attention over
a longer, masked key range (tests/test_static_decode.py checks token equality on tiny LMs).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from blip2.llm import DecodeState, FrozenLM

LENGTH_STEP = 16  # cache lengths are rounded up to a multiple of this (more shapes share a graph)
POOL_SIZE = 2  # free buffer sets kept per FrozenLM, the most recently used (each: a KV cache and a graph)


def unsupported(lm: FrozenLM) -> str | None:
    """Why `lm` cannot decode over a static cache, or None when it can."""
    from transformers import StaticCache
    from transformers.cache_utils import StaticLayer

    if lm.is_encoder_decoder or not lm._takes_positions:
        return "it needs a decoder-only LM whose forward takes position_ids"
    layers = StaticCache(config=lm.model.config, max_cache_len=1).layers  # lazy: allocates nothing
    if any(type(layer) is not StaticLayer for layer in layers):
        return "it supports full-attention layers only (this LM has sliding-window or other cache layers)"
    return None


def use_static_cache(lm: FrozenLM, mode: str) -> bool:
    """decode.static_cache: "on" (refuses an LM it cannot serve), "off", or "auto" (on for a
    supported LM on a CUDA device, where it is faster)."""
    if mode == "off" or (mode == "auto" and lm.model.device.type != "cuda"):
        return False
    reason = unsupported(lm)
    if mode == "on" and reason:
        raise ValueError(f"decode.static_cache=on: {reason}; set decode.static_cache=off (or auto) for this model")
    return reason is None


class _Buffers:
    """A preallocated cache for `n` rows x `length` positions, its step inputs and (CUDA) graph."""

    def __init__(self, lm: FrozenLM, n: int, length: int, kv_shape: tuple[int, int], graphs: bool,
                 device: torch.device):
        from transformers import StaticCache

        self.lm, self.graphs, self.device = lm, graphs, device
        self.cache = StaticCache(config=lm.model.config, max_cache_len=length)
        heads, dim = kv_shape
        layers = len(self.cache.layers)
        self.keys = torch.zeros(layers, n, heads, length, dim, dtype=lm.dtype, device=device)  # (layers, N, H, L, D)
        self.values = torch.zeros_like(self.keys)
        probe = self.keys[0, :, :, :1]
        for i, layer in enumerate(self.cache.layers):
            layer.lazy_initialization(probe, probe)  # sets dtype/device/shape fields, allocates (N, H, L, D)...
            layer.keys, layer.values = self.keys[i], self.values[i]  # ...which these views replace
        self.mask = torch.zeros(n, length, dtype=torch.long, device=device)  # (N, L) 1 = real position
        self.tokens = torch.zeros(n, 1, dtype=torch.long, device=device)  # (N, 1) step input
        self.out: torch.Tensor  # (N, V) logits of the last step (a static buffer once graphed)
        self.step: StepGraph | None = None  # one LM step (`forward`), graphed on CUDA
        self.beam: Any = None  # a whole beam-search step over these buffers (blip2.generate), graphed on CUDA

    def rewind(self, t: int) -> None:
        """Set every layer's write position to t."""
        for layer in self.cache.layers:
            layer.cumulative_length.fill_(t)

    def positions(self) -> list[torch.Tensor]:
        """The layers' write positions (0-d tensors on the device), which every step advances."""
        return [layer.cumulative_length for layer in self.cache.layers]

    def forward(self) -> None:
        """One step over all N rows: reads tokens, mask and the cache; writes `out` and the cache."""
        pos = self.mask.sum(-1, keepdim=True) - 1  # (N, 1) position of the new token
        allowed = self.mask.bool()[:, None, None, :]  # (N, 1, 1, L) True = may attend
        if self.lm.model.config._attn_implementation == "eager":  # eager attention adds a float mask
            dtype = self.lm.dtype
            allowed = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
                ~allowed, torch.finfo(dtype).min)
        out = self.lm.model(input_ids=self.tokens, attention_mask=allowed, position_ids=pos,
                            past_key_values=self.cache, use_cache=True)
        self.out = out.logits[:, -1].float()

    def run(self) -> None:
        """The step at the cache's current write position: eagerly, or by replaying its graph."""
        if self.step is None:
            self.step = StepGraph(self.forward, self.positions(), self.graphs, self.device)
        self.step()


class StepGraph:
    """`fn`, a step that touches only tensors at fixed addresses, run eagerly or (graphs) captured
    once as a CUDA graph on first use and replayed after that.

    A capture is preceded by two warm-up runs, as torch asks; they change real buffers, so `restore`
    (the tensors that a step changes and that the first real step reads) is copied before them and put
    back after. A step that writes a tensor before it reads it need not list it."""

    def __init__(self, fn: Callable[[], None], restore: list[torch.Tensor], graphs: bool, device: torch.device):
        self.fn, self.restore, self.device = fn, restore, device
        self.graphs = graphs
        self.graph: torch.cuda.CUDAGraph | None = None

    def __call__(self) -> None:
        if not self.graphs:
            self.fn()
            return
        with torch.cuda.device(self.device):  # the model's GPU, which need not be the current one
            if self.graph is None:
                saved = [x.clone() for x in self.restore]
                side = torch.cuda.Stream()  # warm up on a side stream, as torch asks before a capture
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    for _ in range(2):
                        self.fn()
                        for x, y in zip(self.restore, saved, strict=True):
                            x.copy_(y)
                torch.cuda.current_stream().wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    self.fn()  # recorded, not run
                self.graph = graph
            self.graph.replay()


class StaticDecodeState:
    """A `DecodeState` (same `logits`, `history`, `step`, `select`) over a preallocated cache.

    Built from a started (and, for beam search, expanded) dynamic state; rows are fixed from then
    on: `select` packs the chosen rows at the front and the rest become padding. `release` hands
    the buffers back to the LM for the next call of the same shape."""

    def __init__(self, state: DecodeState, max_new_tokens: int, graphs: bool | None = None):
        lm = state.lm
        reason = unsupported(lm)
        if reason:
            raise ValueError(f"decode.static_cache: {reason}; set decode.static_cache=off for this model")
        device = state.mask.device
        graphs = device.type == "cuda" if graphs is None else graphs
        if graphs and device.type != "cuda":
            raise ValueError("CUDA graphs need the model on a CUDA device")
        self.lm: FrozenLM = lm
        self.logits, self.history = state.logits, state.history  # (N, V), (N, t)
        n, prefix = state.mask.shape
        past = state.past.layers
        k0 = past[0].keys  # (N, H_kv, P, D)
        if any(p.keys.shape != k0.shape or p.values.shape != k0.shape for p in past):
            raise ValueError("decode.static_cache needs one key/value shape in every layer; "
                             "set decode.static_cache=off for this model")
        length = -(-(prefix + max_new_tokens) // LENGTH_STEP) * LENGTH_STEP
        self._key = (n, length, k0.shape[1], k0.shape[3], lm.dtype, device, graphs)
        free = lm.static_buffers.get(self._key)  # free sets of this shape, kept on the LM
        self.buf = free.pop() if free else _Buffers(lm, n, length, (k0.shape[1], k0.shape[3]), graphs, device)
        for i, p in enumerate(past):
            self.buf.keys[i, :, :, :prefix] = p.keys
            self.buf.values[i, :, :, :prefix] = p.values
        self.buf.mask.zero_()
        self.buf.mask[:, :prefix] = state.mask
        self.t = prefix  # cache position the next token is written to
        self.buf.rewind(self.t)

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> None:
        """Feed one token per live row (N',), updating logits (N', V) and history."""
        live, buf = tokens.shape[0], self.buf
        buf.mask[:, self.t] = 1
        buf.tokens[:live, 0] = tokens
        buf.run()
        self.t += 1
        self.logits = buf.out[:live].clone()  # a replay overwrites `out`
        self.history = torch.cat([self.history, tokens[:, None]], dim=1)

    def expand(self, k: int) -> None:
        raise RuntimeError("expand the dynamic state before building a StaticDecodeState (its rows are fixed)")

    @torch.no_grad()
    def select(self, rows: torch.Tensor) -> None:
        """Keep/reorder live rows (N',): they move to the first N' slots; the cache is gathered in place."""
        n, t, buf = rows.shape[0], self.t, self.buf
        buf.keys[:, :n, :, :t] = buf.keys[:, rows, :, :t]
        buf.values[:, :n, :, :t] = buf.values[:, rows, :, :t]
        buf.mask[:n] = buf.mask[rows]
        self.logits, self.history = self.logits[rows], self.history[rows]

    def release(self) -> None:
        """Return the buffers (and graph) to the LM's pool; this state must not step again."""
        pool = self.lm.static_buffers
        pool[self._key] = [*pool.pop(self._key, []), self.buf]  # re-inserted: most recent last
        while sum(map(len, pool.values())) > POOL_SIZE:  # drop the least recently used
            oldest = next(iter(pool))
            pool[oldest].pop(0)
            if not pool[oldest]:
                del pool[oldest]
        del self.buf
