"""Stage-1 objectives (ITC, ITM, ITG) as modules that take rank / world size explicitly, and the
stage-2 language-modelling objective through the frozen LLM, and self-critical sequence training
(SCST) after it.

Nothing here asks torch.distributed who it is: with world_size == 1 no collective is called, so
single-process training needs no process group. With world_size > 1 the caller's default process
group is used for the gathers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from blip2.config import DecodeConfig
from blip2.qformer import mean_query_cosine
from blip2.reward import Reward

if TYPE_CHECKING:
    from blip2.model import Blip2


# --------------------------------------------------------------------------- collectives


def gather_no_grad(x: torch.Tensor, world_size: int) -> torch.Tensor:
    """Concatenate `x` from all ranks along dim 0, without gradient."""
    if world_size == 1:
        return x.detach()
    import torch.distributed as dist

    out = [torch.empty_like(x) for _ in range(world_size)]
    dist.all_gather(out, x.detach().contiguous())
    return torch.cat(out, dim=0)


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient for each slice and returns the own one."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, world_size: int) -> torch.Tensor:  # type: ignore[override]
        import torch.distributed as dist

        ctx.rank, ctx.b = dist.get_rank(), x.shape[0]
        out = [torch.empty_like(x) for _ in range(world_size)]
        dist.all_gather(out, x.contiguous())
        return torch.cat(out, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        import torch.distributed as dist

        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.b:(ctx.rank + 1) * ctx.b], None


def gather_with_grad(x: torch.Tensor, world_size: int) -> torch.Tensor:
    """Concatenate `x` from all ranks; gradients flow back to the rank that owns each slice."""
    if world_size == 1:
        return x
    return _GatherWithGrad.apply(x, world_size)


def gather_padded(ids: torch.Tensor, mask: torch.Tensor, pad_id: int,
                  world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather (B, T) token ids / masks whose T differs between ranks (right-padded to the max)."""
    if world_size == 1:
        return ids, mask
    import torch.distributed as dist

    t = torch.tensor([ids.shape[1]], device=ids.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    extra = int(t.item()) - ids.shape[1]
    ids = F.pad(ids, (0, extra), value=pad_id)
    mask = F.pad(mask, (0, extra), value=0)
    return gather_no_grad(ids, world_size), gather_no_grad(mask, world_size)


def global_token_mean(total: torch.Tensor, count: int, world_size: int) -> torch.Tensor:
    """Summed per-token loss of this rank -> its share of the mean over every rank's tokens.

    Ranks hold different numbers of target tokens, so averaging per-rank means (what gradient
    averaging does) is not the mean over the global batch. Scaling the local sum by
    world_size / global_count makes the rank average exactly the global token mean.
    """
    if world_size == 1:
        return total / max(count, 1)
    import torch.distributed as dist

    n = torch.tensor([count], dtype=torch.float64, device=total.device)
    dist.all_reduce(n)
    return total * world_size / n.clamp(min=1).to(total.dtype)


# --------------------------------------------------------------------------- ITC


@dataclass
class ITCOutput:
    loss: torch.Tensor
    sim_i2t: torch.Tensor  # (B, N): local images vs all texts, divided by temp
    sim_t2i: torch.Tensor  # (B, N): local texts vs all images, divided by temp
    positives: torch.Tensor  # (B, N) bool: pairs that share an image (never negatives)


class ITCLoss(nn.Module):
    """Image-text contrastive loss with max-over-queries similarity.

    grad="reference": the image->text logits use detached text features and the text->image logits
    detached image features (what LAVIS computes); grad="full": both sides receive gradient.
    targets="soft": every caption of the same image id is a positive (uniform soft target).
    """

    def __init__(self, label_smoothing: float = 0.1, grad: str = "reference", targets: str = "soft",
                 rank: int = 0, world_size: int = 1):
        super().__init__()
        self.label_smoothing, self.grad, self.targets = label_smoothing, grad, targets
        self.rank, self.world_size = rank, world_size

    def forward(self, image_feats: torch.Tensor, text_feats: torch.Tensor, temp: torch.Tensor,
                image_ids: torch.Tensor) -> ITCOutput:
        # image_feats: (B, Q, E) L2-normalised per query; text_feats: (B, E); image_ids: (B,)
        b = image_feats.shape[0]
        if self.grad == "reference":
            image_all = gather_no_grad(image_feats, self.world_size)  # (N, Q, E)
            text_all = gather_no_grad(text_feats, self.world_size)  # (N, E)
        else:
            image_all = gather_with_grad(image_feats, self.world_size)
            text_all = gather_with_grad(text_feats, self.world_size)
        sim_i2t = torch.einsum("bqe,ne->bnq", image_feats, text_all).amax(-1) / temp  # (B, N)
        sim_t2i = torch.einsum("be,nqe->bnq", text_feats, image_all).amax(-1) / temp  # (B, N)

        ids_all = gather_no_grad(image_ids, self.world_size)  # (N,)
        positives = image_ids[:, None] == ids_all[None, :]  # (B, N)
        if self.targets == "soft":
            target = positives.float() / positives.sum(1, keepdim=True)  # rows sum to 1
        else:
            target = torch.arange(b, device=sim_i2t.device) + self.rank * b
        ls = self.label_smoothing
        loss = (F.cross_entropy(sim_i2t, target, label_smoothing=ls)
                + F.cross_entropy(sim_t2i, target, label_smoothing=ls)) / 2
        return ITCOutput(loss, sim_i2t, sim_t2i, positives)


# --------------------------------------------------------------------------- ITM


def sample_hard_negatives(sim: torch.Tensor, positives: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """For each row draw one column with probability softmax(sim) over non-positive columns.

    sim, positives: (B, N); u: (B,) uniforms in (0, 1] (shared across ranks so that sampling is a
    function of the global batch). Inverse-CDF sampling: a positive has zero mass, so it can never be
    drawn. Returns (B,) column indices.
    """
    if bool(positives.all(dim=1).any()):
        raise ValueError("ITM hard negatives: a row has no negative (every sample in the global batch "
                         "shows the same image); use a larger or shuffled batch")
    weights = torch.softmax(sim.float().masked_fill(positives, float("-inf")), dim=1)  # (B, N)
    cdf = weights.cumsum(dim=1)
    target = (u.to(cdf) * cdf[:, -1]).unsqueeze(1)  # (B, 1) in (0, total]
    idx = torch.searchsorted(cdf, target).squeeze(1)
    return idx.clamp_max(sim.shape[1] - 1)


class ITMLoss(nn.Module):
    """Binary image-text matching on B positives + B hard-negative images + B hard-negative texts."""

    def __init__(self, rank: int = 0, world_size: int = 1):
        super().__init__()
        self.rank, self.world_size = rank, world_size

    def forward(self, model: Blip2, image_embeds: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor,
                itc: ITCOutput, generator: torch.Generator | None) -> torch.Tensor:
        # image_embeds: (B, N_img, C) after ln_vision; ids/mask: (B, T)
        b = ids.shape[0]
        image_all = gather_with_grad(image_embeds, self.world_size)  # (N, N_img, C)
        ids_all, mask_all = gather_padded(ids, mask, model.pad_id, self.world_size)  # (N, T')
        # Uniforms for the whole global batch, identical on every rank; take this rank's rows.
        u = 1.0 - torch.rand(2, b * self.world_size, generator=generator)  # a CPU generator on any device
        u = u[:, self.rank * b:(self.rank + 1) * b].to(ids.device)
        with torch.no_grad():
            neg_image = sample_hard_negatives(itc.sim_t2i, itc.positives, u[0])  # texts first
            neg_text = sample_hard_negatives(itc.sim_i2t, itc.positives, u[1])  # then images
        t = ids_all.shape[1]
        ids_pos = F.pad(ids, (0, t - ids.shape[1]), value=model.pad_id)
        mask_pos = F.pad(mask, (0, t - ids.shape[1]), value=0)
        ids_3 = torch.cat([ids_pos, ids_pos, ids_all[neg_text]])  # (3B, T'): pos, pos, neg
        mask_3 = torch.cat([mask_pos, mask_pos, mask_all[neg_text]])
        image_3 = torch.cat([image_embeds, image_all[neg_image], image_embeds])  # pos, neg, pos
        logits = model.itm_logits(image_3, ids_3, mask_3)  # (3B, 2)
        labels = torch.cat([torch.ones(b), torch.zeros(2 * b)]).long().to(logits.device)
        return F.cross_entropy(logits, labels)


# --------------------------------------------------------------------------- ITG


class ITGLoss(nn.Module):
    """Image-grounded text generation: [DEC]-prefixed causal LM over the caption, queries as prefix."""

    def __init__(self, label_smoothing: float = 0.1, world_size: int = 1):
        super().__init__()
        self.label_smoothing, self.world_size = label_smoothing, world_size

    def forward(self, model: Blip2, ids: torch.Tensor, mask: torch.Tensor,
                query_past: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        # ids/mask: (B, T) starting with [CLS]; query_past: per-layer K/V of the ITC query pass
        dec_ids = ids.clone()
        dec_ids[:, 0] = model.dec_id
        targets = dec_ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)  # (B, T-1), pads ignored
        select = torch.zeros_like(mask, dtype=torch.bool)
        select[:, :-1] = targets != -100  # positions that predict a real next token
        logits = model.itg_logits(dec_ids, mask, query_past, select)  # (N, V)
        labels = targets[targets != -100]
        total = F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing, reduction="sum")
        return global_token_mean(total, labels.numel(), self.world_size)


# --------------------------------------------------------------------------- stage 1


def query_similarity(queries: torch.Tensor) -> torch.Tensor:
    """Mean squared cosine between the outputs of different queries of one image (0 = orthogonal, 1 = merged).

    queries: (B, Q, D). Squared, so the push apart is strongest for near-duplicates and vanishes
    at orthogonality; batch-local, so each process computes it on its own shard.
    """
    if queries.shape[1] < 2:
        return queries.new_zeros(())  # one query: nothing to push apart
    return mean_query_cosine(queries, power=2)


class Stage1Loss(nn.Module):
    """ITC + ITM + ITG on one batch; returns the total and each term (detached) for logging."""

    def __init__(self, itc: bool = True, itm: bool = True, itg: bool = True, label_smoothing: float = 0.1,
                 itc_grad: str = "reference", itc_targets: str = "soft", rank: int = 0, world_size: int = 1,
                 itg_ramp_steps: int = 0, query_div: float = 0.0, itm_weight: float = 1.0):
        super().__init__()
        self.use = {"itc": itc, "itm": itm, "itg": itg}
        self.itg_ramp_steps, self.query_div, self.itm_weight = itg_ramp_steps, query_div, itm_weight
        self.itc = ITCLoss(label_smoothing, itc_grad, itc_targets, rank, world_size)
        self.itm = ITMLoss(rank, world_size)
        self.itg = ITGLoss(label_smoothing, world_size)

    def forward(self, model: Blip2, image_feats: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor,
                image_ids: torch.Tensor, generator: torch.Generator | None = None, step: int = 0
                ) -> dict[str, torch.Tensor]:
        # image_feats: (B, N_img, C) frozen encoder output; ids/mask: (B, T); image_ids: (B,)
        # step: 0-based optimizer step, for ITG's ramp (weight (step + 1) / itg_ramp_steps, capped at 1)
        image_embeds = model.vision_input(image_feats)
        query = model.qformer(image=image_embeds, use_queries=True)  # queries only, unimodal
        terms: dict[str, torch.Tensor] = {}
        itc = None
        if self.use["itc"]:
            image_itc = model.image_itc_feats(query.hidden)  # (B, Q, E)
            text_itc = model.text_itc_feats(ids, mask)  # (B, E)
            itc = self.itc(image_itc, text_itc, model.temp, image_ids)
            terms["itc"] = itc.loss
        if self.use["itm"]:
            assert itc is not None
            terms["itm"] = self.itm(model, image_embeds, ids, mask, itc, generator)
        if self.use["itg"]:
            terms["itg"] = self.itg(model, ids, mask, query.past)
        if self.query_div:
            terms["query_div"] = query_similarity(query.hidden)
        out = {k: v.detach() for k, v in terms.items()}  # logged unweighted
        if self.use["itg"] and self.itg_ramp_steps:
            terms["itg"] = terms["itg"] * min(1.0, (step + 1) / self.itg_ramp_steps)
        if self.query_div:
            terms["query_div"] = terms["query_div"] * self.query_div
        if self.use["itm"] and self.itm_weight != 1.0:
            terms["itm"] = terms["itm"] * self.itm_weight
        out["loss"] = sum(terms.values())  # type: ignore[assignment]
        return out


# --------------------------------------------------------------------------- stage 2


def split_prefix(tokens: list[int], generator: torch.Generator) -> tuple[list[int], list[int]]:
    """Prefix-LM split for encoder-decoder LLMs: the split point is drawn uniformly from token 1
    to the middle of the text, so neither side is ever empty (texts of one token are not split)."""
    n = len(tokens)
    if n < 2:
        return [], tokens
    cut = int(torch.randint(1, n // 2 + 1, (1,), generator=generator))  # 1 <= cut <= n // 2 < n
    return tokens[:cut], tokens[cut:]


class Stage2Loss(nn.Module):
    """LM loss of the frozen LLM on the text, conditioned on the soft visual prompt (+ prompt).

    Decoder-only: [queries | prompt | text | eos], loss on text + eos. Encoder-decoder: prompt (or,
    without one, a random prefix of the text when `prefix_split == "random"`) goes to the encoder
    with the queries, the rest of the text is the decoder target.
    """

    def __init__(self, prefix_split: str = "random", world_size: int = 1):
        super().__init__()
        self.prefix_split, self.world_size = prefix_split, world_size

    def forward(self, model: Blip2, image_feats: torch.Tensor, prompts: list[str], texts: list[str],
                generator: torch.Generator) -> dict[str, torch.Tensor]:
        lm, cfg = model.llm, model.cfg.llm
        assert lm is not None and cfg is not None, "stage 2 needs a model with an LLM"
        prompt_ids = lm.encode_prompts(prompts)
        target_ids = lm.encode_targets(prompts, texts, cfg.max_text_len)
        if lm.is_encoder_decoder and self.prefix_split == "random":
            for i, p in enumerate(prompts):
                if not p:
                    prompt_ids[i], target_ids[i] = split_prefix(target_ids[i], generator)
        total, count = lm.loss_sum(model.soft_prompt(image_feats), prompt_ids, target_ids)
        loss = global_token_mean(total, count, self.world_size)
        return {"loss": loss, "lm": loss.detach()}


# --------------------------------------------------------------------------- self-critical fine-tuning


class SCSTLoss(nn.Module):
    """Self-critical sequence training (Rennie et al., 2017): a policy gradient on sampled captions
    with a caption metric as reward (blip2.reward: CIDEr-D, optionally + BLEU-4), after stage 2. Not
    part of BLIP-2; the standard last step of captioning systems that optimise the metric they are
    judged by.

    Each image gets `samples` captions sampled from the model itself (temperature `decode`'s); a
    caption's baseline is the mean reward of the image's other samples (Luo, 2020: no extra greedy
    decode, and the advantages of one image sum to zero). The loss is -advantage x log p(token),
    averaged over every sampled token (eos included) of the global batch, so its gradient flows
    through the frozen LLM into the soft prompt as the LM loss does.
    """

    def __init__(self, reward: Reward, samples: int, decode: DecodeConfig, world_size: int = 1,
                 chunk_rows: int = 10):
        super().__init__()
        if samples < 2:
            raise ValueError("SCST needs >= 2 samples per image: each one's baseline is the mean of the others")
        if not decode.do_sample:
            raise ValueError("SCST samples its captions: decode.do_sample must be true")
        self.reward, self.samples, self.decode, self.world_size = reward, samples, decode, world_size
        self.chunk_rows = chunk_rows

    def forward(self, model: Blip2, image_feats: torch.Tensor, prompts: list[str], images: list[int],
                seed: int) -> dict[str, torch.Tensor]:
        # image_feats: (B, N, C); prompts: one per image; images: corpus index of each image (B,)
        # An image's samples come from stream_seed(seed, image): the same whichever rank, batch
        # position or process count it gets, so a step on several processes draws what one process
        # draws for the global batch.
        from blip2.generate import generate_ids, stream_seed

        lm, k = model.llm, self.samples
        assert lm is not None, "SCST needs a model with an LLM"
        soft = model.soft_prompt(image_feats)  # (B, Q, H), with gradient
        prompt_ids = lm.encode_prompts(prompts)
        with torch.no_grad():  # the same soft prompt (dropout mask included) that the gradient sees
            drawn = generate_ids(lm, soft.detach(), prompt_ids, self.decode, num_return_sequences=k,
                                 seeds=[stream_seed(seed, i) for i in images])
        texts = [lm.decode(x) for x in drawn]  # (B * K,) image by image
        reward = torch.tensor(self.reward(texts, [i for i in images for _ in range(k)]),
                              device=soft.device).view(-1, k)  # (B, K)
        baseline = (reward.sum(1, keepdim=True) - reward) / (k - 1)  # mean of the image's other samples
        advantage = (reward - baseline).flatten()  # (B * K,)
        # [soft prompt | prompt] runs once per image (with gradient) and the samples are scored after
        # it, in chunks of similar length: the LLM pads far less than one batch padded to the
        # longest (80 samples of SmolLM2 in chunks of 10: the whole step 2x faster on the 2-core CPU).
        prefix = lm.prefix(soft, prompt_ids)
        owner = torch.arange(len(images), device=soft.device).repeat_interleave(k)  # (B * K,) image of each sample
        order = sorted(range(len(drawn)), key=lambda i: len(drawn[i]))
        total = soft.new_zeros((), dtype=torch.float32)
        for chunk in torch.tensor(order, device=soft.device).split(self.chunk_rows):
            logp = lm.continuation_logprob(prefix, owner[chunk], [drawn[i] for i in chunk.tolist()])  # (n,)
            total = total - (advantage[chunk] * logp).sum()
        count = sum(len(x) + 1 for x in drawn)
        loss = global_token_mean(total, count, self.world_size)
        return {"loss": loss, "reward": reward.mean(), "sample_tokens": torch.tensor(count / len(drawn))}
