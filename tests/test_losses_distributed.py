"""Two gloo processes on CPU compute the same ITC/ITM/ITG losses and gradients as one process on the
same global batch (gradient averaging), for both ITC gradient modes. The ranks hold different numbers
of caption tokens, which ITG's global token mean must account for."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from blip2.config import Blip2Config
from blip2.losses import Stage1Loss
from blip2.model import Blip2
from conftest import tiny_qformer

GLOBAL_B = 8


def _batch():
    g = torch.Generator().manual_seed(3)
    feats = torch.randn(GLOBAL_B, 5, 24, generator=g)
    lengths = [6, 4, 7, 5, 3, 6, 7, 4]
    ids = torch.zeros(GLOBAL_B, 7, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(1000, 3000, (n,), generator=g)
        ids[i, 0] = 101
        mask[i, :n] = 1
    image_ids = torch.tensor([0, 0, 1, 2, 3, 4, 4, 5])  # shared images inside and across ranks
    return feats, ids, mask, image_ids


def _model():
    torch.manual_seed(0)
    return Blip2(Blip2Config(qformer=tiny_qformer()))


def _run(model, feats, ids, mask, image_ids, grad_mode, rank, world):
    objective = Stage1Loss(itg=True, itc_grad=grad_mode, rank=rank, world_size=world)
    # trim padding to this slice's longest caption so ranks really hold different widths
    width = int(mask.sum(1).max())
    out = objective(model, feats, ids[:, :width], mask[:, :width], image_ids, torch.Generator().manual_seed(5))
    out["loss"].backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return {k: v.item() for k, v in out.items()}, grads


def _worker(rank, world, init_file, grad_mode, result_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    feats, ids, mask, image_ids = _batch()
    b = GLOBAL_B // world
    sl = slice(rank * b, (rank + 1) * b)
    losses, grads = _run(_model(), feats[sl], ids[sl], mask[sl], image_ids[sl], grad_mode, rank, world)
    for g in grads.values():  # what DDP does
        dist.all_reduce(g)
        g /= world
    loss = torch.tensor([losses["loss"], losses["itc"], losses["itm"], losses["itg"]])
    dist.all_reduce(loss)
    if rank == 0:
        torch.save({"loss": loss / world, "grads": grads}, result_file)
    dist.destroy_process_group()


@pytest.mark.parametrize("grad_mode", ["reference", "full"])
def test_two_process_gloo_equals_single_process(tmp_path, grad_mode):
    feats, ids, mask, image_ids = _batch()
    single, grads = _run(_model(), feats, ids, mask, image_ids, grad_mode, 0, 1)
    result = tmp_path / "result.pt"
    os.environ.pop("MASTER_ADDR", None)
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), grad_mode, str(result)), nprocs=2, join=True)
    multi = torch.load(result, weights_only=True)
    got = multi["loss"].tolist()
    assert got == pytest.approx([single["loss"], single["itc"], single["itm"], single["itg"]], rel=1e-5, abs=1e-6)
    assert set(multi["grads"]) == set(grads)
    for name, g in grads.items():
        torch.testing.assert_close(multi["grads"][name], g, atol=2e-6, rtol=1e-4, msg=name)
