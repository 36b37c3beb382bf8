"""The learner's data-parallel group (torch.distributed): NCCL between GPUs, gloo between CPUs.

Rank 0 leads: it samples batches, computes advantages, checkpoints and publishes. Before each
gradient step it broadcasts the step's rows to the followers; every rank computes the same
micro-batch plan, runs its share, and the LoRA gradients are summed with one all-reduce (each
micro-batch's loss is already divided by the whole batch's row count), so every rank takes the
same AdamW step and the weights never drift apart. LoRA gradients are small (MBs), so one flat
all-reduce per step is all the communication there is.

World size 1 is the single-process learner: no process group, every method a no-op.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Optional

import torch


@dataclass
class DistSpec:
    """Where a learner process sits in its group."""

    rank: int
    world_size: int
    init_method: str  # tcp://host:port of rank 0's rendezvous
    backend: str  # "nccl" (CUDA) or "gloo" (CPU)
    timeout_s: float = 1800.0  # a follower waits this long for rank 0's next step


class Group:
    def __init__(self, spec: Optional[DistSpec] = None, device: Optional[torch.device] = None):
        self.rank = spec.rank if spec else 0
        self.world_size = spec.world_size if spec else 1
        self.device = device or torch.device("cpu")
        self._pg = None
        if spec is not None and spec.world_size > 1:
            import torch.distributed as dist

            if spec.backend == "nccl":
                torch.cuda.set_device(self.device)
            dist.init_process_group(spec.backend, init_method=spec.init_method, rank=spec.rank,
                                    world_size=spec.world_size, timeout=timedelta(seconds=spec.timeout_s))
            self._pg = dist.group.WORLD

    @property
    def is_leader(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self._pg is not None

    def all_reduce_sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        if self._pg is not None:
            import torch.distributed as dist

            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def all_reduce_grads_(self, params: list[torch.Tensor]) -> None:
        """Sum every parameter's gradient over the ranks (missing gradients count as 0)."""
        if self._pg is None:
            return
        grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
        flat = self.all_reduce_sum_(torch.cat([g.reshape(-1) for g in grads]))
        offset = 0
        for p, g in zip(params, grads):
            p.grad = flat[offset: offset + g.numel()].view_as(g).clone()
            offset += g.numel()

    def broadcast(self, obj: Any = None) -> Any:
        """Rank 0's `obj` on every rank (in-memory pickling between the group's processes)."""
        if self._pg is None:
            return obj
        import torch.distributed as dist

        box = [obj if self.is_leader else None]
        dist.broadcast_object_list(box, src=0, device=self.device if self.device.type == "cuda" else None)
        return box[0]

    def close(self) -> None:
        if self._pg is not None:
            import torch.distributed as dist

            dist.destroy_process_group()
            self._pg = None
