"""Image-text retrieval: ITC similarities over a whole gallery, top-k ITM re-ranking, recall@K.

Score of a pair = ITC cosine similarity (max over queries, no temperature), re-ranked for the k
best ITC candidates of each query by ITM positive logit + ITC (the reference's final score).
Pairs that are candidates in both directions are scored by ITM once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm import tqdm

from blip2.model import Blip2


@dataclass
class Gallery:
    image_itc: torch.Tensor  # (N_img, Q, E) normalised per-query image embeddings
    text_itc: torch.Tensor  # (N_txt, E) normalised text embeddings
    text_ids: torch.Tensor  # (N_txt, T)
    text_mask: torch.Tensor  # (N_txt, T)


@torch.no_grad()
def embed_gallery(model: Blip2, image_feats: torch.Tensor, captions: list[str],
                  batch_size: int = 64) -> Gallery:
    """image_feats: (N_img, N, C) frozen features; captions: N_txt strings."""
    model.eval()
    image_itc = torch.cat([model.encode_image(image_feats[i:i + batch_size].float())[1].cpu()
                           for i in range(0, len(image_feats), batch_size)])
    ids, mask = model.tokenize(captions)  # padded to the gallery's longest caption
    text_itc = torch.cat([model.text_itc_feats(ids[i:i + batch_size], mask[i:i + batch_size]).cpu()
                          for i in range(0, len(ids), batch_size)])
    return Gallery(image_itc, text_itc, ids.cpu(), mask.cpu())  # on the CPU whatever the model's device


def itc_similarity(image_itc: torch.Tensor, text_itc: torch.Tensor) -> torch.Tensor:
    """(N_img, Q, E) x (N_txt, E) -> (N_img, N_txt), max over queries."""
    return torch.einsum("iqe,te->itq", image_itc, text_itc).amax(-1)


@torch.no_grad()
def rerank(model: Blip2, sim: torch.Tensor, image_feats: torch.Tensor, gallery: Gallery, k: int,
           batch_size: int = 64, progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """ITM re-ranking of each query's top-k ITC candidates.

    Returns (score_i2t (N_img, N_txt), score_t2i (N_txt, N_img)); non-candidates get -inf.
    """
    n_img, n_txt = sim.shape
    k_i2t, k_t2i = min(k, n_txt), min(k, n_img)
    top_t = sim.topk(k_i2t, dim=1).indices  # (N_img, k)
    top_i = sim.t().topk(k_t2i, dim=1).indices  # (N_txt, k)
    pairs_i2t = torch.stack([torch.arange(n_img).repeat_interleave(k_i2t), top_t.flatten()], 1)
    pairs_t2i = torch.stack([top_i.flatten(), torch.arange(n_txt).repeat_interleave(k_t2i)], 1)
    pairs = torch.unique(torch.cat([pairs_i2t, pairs_t2i]), dim=0)  # (P, 2) image, text; sorted by image
    itm = torch.empty(len(pairs))
    for s in tqdm(range(0, len(pairs), batch_size), desc="ITM re-rank", unit="batch", disable=not progress):
        p = pairs[s:s + batch_size]
        img = model.vision_input(image_feats[p[:, 0]].float())
        ids, mask = gallery.text_ids[p[:, 1]], gallery.text_mask[p[:, 1]]
        width = int(mask.sum(1).max())
        ids, mask = ids[:, :width].to(model.device), mask[:, :width].to(model.device)
        itm[s:s + batch_size] = model.itm_logits(img, ids, mask)[:, 1].cpu()
    full = torch.full((n_img, n_txt), float("-inf"))
    full[pairs[:, 0], pairs[:, 1]] = itm + sim[pairs[:, 0], pairs[:, 1]]
    score_i2t = torch.full_like(full, float("-inf"))
    rows = torch.arange(n_img)[:, None]
    score_i2t[rows, top_t] = full[rows, top_t]
    score_t2i = torch.full((n_txt, n_img), float("-inf"))
    rows = torch.arange(n_txt)[:, None]
    score_t2i[rows, top_i] = full.t()[rows, top_i]
    return score_i2t, score_t2i


def recall_at_k(score_i2t: torch.Tensor, score_t2i: torch.Tensor, txt2img: torch.Tensor,
                ks: tuple[int, ...] = (1, 5, 10)) -> dict[str, float]:
    """Recall@K in percent. score_i2t: (N_img, N_txt); score_t2i: (N_txt, N_img); txt2img: (N_txt,).

    Text retrieval (TR): an image counts as found at K if any of its captions ranks within K.
    Image retrieval (IR): a caption counts if its image ranks within K.
    """
    n_img = score_i2t.shape[0]
    # rank of the best ground-truth caption for each image
    order = score_i2t.argsort(dim=1, descending=True)  # (N_img, N_txt)
    is_gt = txt2img[order] == torch.arange(n_img)[:, None]
    tr_rank = is_gt.float().argmax(dim=1)  # first position holding a ground-truth caption
    order_t = score_t2i.argsort(dim=1, descending=True)  # (N_txt, N_img)
    ir_rank = (order_t == txt2img[:, None]).float().argmax(dim=1)
    out = {}
    for k in ks:
        out[f"tr_r{k}"] = 100.0 * (tr_rank < k).float().mean().item()
    for k in ks:
        out[f"ir_r{k}"] = 100.0 * (ir_rank < k).float().mean().item()
    out["tr_mean"] = sum(out[f"tr_r{k}"] for k in ks) / len(ks)
    out["ir_mean"] = sum(out[f"ir_r{k}"] for k in ks) / len(ks)
    return out


def evaluate_retrieval(model: Blip2, image_feats: torch.Tensor, captions_per_image: list[list[str]],
                       k: int = 128, batch_size: int = 64, progress: bool = True) -> dict[str, float]:
    """Full protocol on a gallery: ITC recall, and (k > 0) ITC top-k + ITM re-rank recall."""
    captions = [c for caps in captions_per_image for c in caps]
    txt2img = torch.tensor([i for i, caps in enumerate(captions_per_image) for _ in caps])
    gallery = embed_gallery(model, image_feats, captions, batch_size)
    sim = itc_similarity(gallery.image_itc, gallery.text_itc)
    result = {f"itc_{m}": v for m, v in recall_at_k(sim, sim.t(), txt2img).items()}
    if k > 0:
        s_i2t, s_t2i = rerank(model, sim, image_feats, gallery, k, batch_size, progress)
        result.update(recall_at_k(s_i2t, s_t2i, txt2img))
    else:
        result.update({m[len("itc_"):]: v for m, v in list(result.items())})
    result.update({"num_images": len(captions_per_image), "num_texts": len(captions), "k_test": k})
    return result
