"""The few collectives the contrastive backends need: a ring of ranks and an all-gather with grad.

Shapes: b local batch, W world size (ranks in the group), D feature dim.

This module (and the backends built on it) is the only place in vlp that calls
`torch.distributed` directly (STYLE H6). Everything works on gloo (CPU) and NCCL (GPU), and
degrades to a one-rank "ring" when no process group is initialised.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed import ProcessGroup


@dataclass(frozen=True)
class Transfer:
    """Point-to-point transfers in flight; `wait()` returns the received tensors."""

    received: list[Tensor]
    works: list
    sent: Sequence[Tensor]  # kept alive until the sends complete

    def wait(self) -> list[Tensor]:
        for work in self.works:
            work.wait()
        return self.received


@dataclass(frozen=True)
class Ring:
    """The ranks of a process group arranged in a ring: rank r sends to r+1, receives from r-1."""

    group: ProcessGroup | None
    rank: int
    size: int

    @classmethod
    def of(cls, group: ProcessGroup | None = None) -> Ring:
        """The ring of `group` (default group), or a one-rank ring when none is initialised."""
        if not (dist.is_available() and dist.is_initialized()):
            return cls(group=None, rank=0, size=1)
        return cls(group=group, rank=dist.get_rank(group), size=dist.get_world_size(group))

    def process_group(self) -> ProcessGroup | None:
        """The group itself (the default group when `group` is None; None without one)."""
        if self.group is not None or not dist.is_initialized():
            return self.group
        return dist.group.WORLD

    def _global_rank(self, group_rank: int) -> int:
        if self.group is None:
            return group_rank
        return dist.get_global_rank(self.group, group_rank)

    def shift(self, tensors: Sequence[Tensor], *, tag: int) -> Transfer:
        """Start sending `tensors` to the next rank and receiving the previous rank's.

        All sends and receives of one shift are posted as one `batch_isend_irecv`, so on NCCL
        every rank's group holds a matching send and receive (no deadlock whatever the sizes).
        Every rank must call shift in the same order with tensors of the same shapes.
        """
        tensors = [t.contiguous() for t in tensors]
        received = [torch.empty_like(t) for t in tensors]
        send_to = self._global_rank((self.rank + 1) % self.size)
        recv_from = self._global_rank((self.rank - 1) % self.size)
        ops = [
            dist.P2POp(dist.isend, t, send_to, self.group, tag + i) for i, t in enumerate(tensors)
        ] + [
            dist.P2POp(dist.irecv, r, recv_from, self.group, tag + i)
            for i, r in enumerate(received)
        ]
        return Transfer(received=received, works=dist.batch_isend_irecv(ops), sent=tensors)

    def all_reduce_sum(self, tensor: Tensor) -> Tensor:
        """Sum of `tensor` over the ranks (a new tensor; no autograd)."""
        if self.size == 1:
            return tensor.clone()
        total = tensor.detach().clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=self.group)
        return total

    def all_gather_ints(self, values: Sequence[int], *, device: torch.device) -> list[list[int]]:
        """Every rank's `values` (a few ints), in rank order."""
        local = torch.tensor(list(values), dtype=torch.int64, device=device)
        if self.size == 1:
            return [local.tolist()]
        gathered = [torch.empty_like(local) for _ in range(self.size)]
        dist.all_gather(gathered, local, group=self.group)
        return [g.tolist() for g in gathered]


def global_value(rank_loss: Tensor, ring: Ring) -> Tensor:
    """`rank_loss` whose value is replaced by its mean over ranks; gradient unchanged."""
    mean = ring.all_reduce_sum(rank_loss.detach()) / ring.size
    return rank_loss + (mean - rank_loss.detach())


class _AllGatherWithGrad(torch.autograd.Function):
    """Concatenate every rank's (b, D) tensor into (W·b, D); backward sums the gradients.

    The gradient of rank r's slice is the sum over ranks of the gradient each rank's loss sends
    it, i.e. all_reduce(grad)[r·b:(r+1)·b]. (An all_reduce rather than a reduce_scatter because
    gloo has no reduce_scatter; the gather backend holds B×D tensors anyway.)
    """

    @staticmethod
    def forward(ctx, tensor: Tensor, ring: Ring) -> Tensor:
        ctx.ring = ring
        tensor = tensor.contiguous()
        gathered = [torch.empty_like(tensor) for _ in range(ring.size)]
        dist.all_gather(gathered, tensor, group=ring.group)
        return torch.cat(gathered)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        ring: Ring = ctx.ring
        total = ring.all_reduce_sum(grad.contiguous())
        return total.chunk(ring.size)[ring.rank], None


def all_gather_with_grad(tensor: Tensor, ring: Ring) -> Tensor:
    """(b, ...) on every rank -> (W·b, ...) in rank order, differentiable (gradients summed)."""
    if ring.size == 1:
        return tensor
    return _AllGatherWithGrad.apply(tensor, ring)
