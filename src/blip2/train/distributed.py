"""torch.distributed plumbing for the training loop: who this process is, which slice of the global
batch it trains on, and the gradient average that makes N processes take the step one process would.

Launch with torchrun (`torchrun --nproc-per-node 2 --no-python blip2 train stage1 ...`): the loop
reads RANK / WORLD_SIZE from the environment and joins the process group (gloo for CPU tensors,
NCCL for CUDA ones). Without those variables nothing here touches torch.distributed.

Why a hand-written gradient all-reduce instead of wrapping the model in DistributedDataParallel:
the objectives call several model entry points per step (Q-Former passes for ITC, ITM and ITG,
the LLM bridge), not one `forward`, which DDP's hooks assume; and only parameters that require
gradient enter the reduction, so a frozen LLM or image encoder is never synchronised.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class World:
    """This process's place in the job (rank 0 of 1 when not launched by torchrun)."""

    rank: int = 0
    world_size: int = 1
    # Where this process's parameters (and so its collectives' tensors) live.
    device: str = "cpu"

    @property
    def is_main(self) -> bool:
        """Only the main process writes checkpoints, logs, the final model and evaluates."""
        return self.rank == 0

    @classmethod
    def from_env(cls, device: torch.device | str = "cpu") -> World:
        """Join the process group torchrun describes in the environment (a no-op without one);
        `device` is where the trained parameters live, which decides the backend."""
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size == 1:
            return cls(device=str(device))
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if torch.device(device).type == "cuda" else "gloo")
        return cls(dist.get_rank(), dist.get_world_size(), str(device))

    def shard(self, global_indices: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous slice of the global batch (B,) -> (B / world_size,).

        Contiguous, in rank order, because the loss gathers concatenate ranks in that order: the
        gathered batch is then exactly the global batch a single process would see.
        """
        b = global_indices.shape[0]
        if b % self.world_size:
            raise ValueError(f"global batch {b} does not split over {self.world_size} processes; "
                             f"set train.batch_size to a multiple of {self.world_size}")
        per = b // self.world_size
        return global_indices[self.rank * per:(self.rank + 1) * per]

    def barrier(self) -> None:
        if self.world_size > 1:
            import torch.distributed as dist

            dist.barrier()

    def broadcast_(self, params: list[torch.Tensor]) -> None:
        """Overwrite every rank's copy with rank 0's (start from identical weights, as DDP does)."""
        if self.world_size == 1 or not params:
            return
        import torch.distributed as dist

        flat = torch.cat([p.detach().reshape(-1) for p in params])
        dist.broadcast(flat, src=0)
        _unflatten_into(flat, params)

    def average_gradients_(self, params: list[torch.Tensor]) -> None:
        """grad <- mean over ranks, one flat all-reduce; parameters without a gradient are skipped
        consistently because every rank runs the same objective on the same parameters."""
        if self.world_size == 1:
            return
        import torch.distributed as dist

        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= self.world_size
        _unflatten_into(flat, grads)

    def from_main(self, value: float) -> float:
        """Rank 0's `value` on every rank (a decision that must not differ between processes)."""
        if self.world_size == 1:
            return value
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.broadcast(t, src=0)
        return float(t.item())

    def mean(self, values: dict[str, float]) -> dict[str, float]:
        """Average logged scalars over ranks (every rank must pass the same keys)."""
        if self.world_size == 1 or not values:
            return values
        import torch.distributed as dist

        keys = sorted(values)
        t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return {k: float(v) / self.world_size for k, v in zip(keys, t.tolist(), strict=True)}


def _unflatten_into(flat: torch.Tensor, tensors: list[torch.Tensor]) -> None:
    offset = 0
    for t in tensors:
        n = t.numel()
        t.data.copy_(flat[offset:offset + n].view_as(t))
        offset += n
