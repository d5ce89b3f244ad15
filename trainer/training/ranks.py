"""This process's place in a data-parallel job (`Rank`) and the few collectives the training loop uses.

Kept apart from the launcher (`trainer.training.distributed`, which imports the loop) so the loop
(`trainer.training.job`) can import it. With one rank (`Rank.single()`) there is no process group and every
collective is the identity, so the loop is the same code on one device and on W.
"""
from __future__ import annotations

import io
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Rank:
    """This process's place in the job: rank `rank` of `world_size`, each training `per_rank_batch` samples of
    a full micro-batch, on box `node` (0 unless the job spans boxes). World size 1 (`Rank.single()`): no process
    group, every collective is the identity."""

    rank: int = 0
    world_size: int = 1
    per_rank_batch: int = 0
    node: int = 0

    @classmethod
    def single(cls) -> "Rank":
        return cls()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def share(self, positions: list[int]) -> list[int]:
        """This rank's contiguous share of a micro-batch (positions within it); may be empty for a short batch."""
        if self.world_size == 1:
            return positions
        return positions[self.rank * self.per_rank_batch:(self.rank + 1) * self.per_rank_batch]

    def reduce_gradients(self, params: list[torch.nn.Parameter], extras: list[float]) -> list[float]:
        """Sum every rank's gradients of `params` (each rank weighted its loss already) and `extras`, in one
        flat all-reduce; a parameter without a gradient (an empty share) counts as zeros."""
        if self.world_size == 1:
            return extras
        import torch.distributed as dist

        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1).float() for g in grads]
                         + [torch.tensor(extras, dtype=torch.float32, device=params[0].device)])
        dist.all_reduce(flat)
        at = 0
        for p, g in zip(params, grads):
            n = g.numel()
            p.grad = flat[at:at + n].view_as(g).to(g.dtype)
            at += n
        return flat[at:].tolist()

    def any_flags(self, flags: list[bool]) -> list[bool]:
        """Each flag set on every rank when any rank set it: rank 0's early stop, and a stop or pause that came to
        any box's daemon (one box: all its ranks see the same launcher's flags)."""
        if self.world_size == 1:
            return flags
        import torch.distributed as dist

        t = torch.tensor([int(f) for f in flags], dtype=torch.int64, device=_collective_device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return [bool(v) for v in t.tolist()]

    def broadcast_object(self, obj):
        """Rank 0's `obj` (picklable) on every rank."""
        if self.world_size == 1:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, 0, device=_collective_device())
        return box[0]

    def broadcast_tensors(self, obj):
        """Rank 0's `obj` (tensors, numbers, strings: what torch.load(weights_only) reads) on every rank, sent as
        torch.save bytes (see gather_object); the others pass None."""
        if self.world_size == 1:
            return obj
        buf = io.BytesIO()
        if self.is_main:
            torch.save(obj, buf)
        data = self.broadcast_object(buf.getvalue() if self.is_main else None)
        return torch.load(io.BytesIO(data), weights_only=True)

    def gather_object(self, obj) -> list | None:
        """Every rank's `obj` (tensors, numbers, strings: what torch.load(weights_only) reads) on rank 0, in
        rank order; None on the others."""
        if self.world_size == 1:
            return [obj]
        import torch.distributed as dist

        # Tensors travel as torch.save bytes: torch's own pickling of tensors inside gather_object fails to
        # load on the receiving side ("UntypedStorage has no attribute dtype", torch 2.x).
        buf = io.BytesIO()
        torch.save(obj, buf)
        out = [None] * self.world_size if self.is_main else None
        dist.gather_object(buf.getvalue(), out, dst=0)
        return [torch.load(io.BytesIO(b), weights_only=True) for b in out] if self.is_main else None


def _collective_device() -> torch.device:
    """NCCL moves tensors between GPUs only; gloo works on the CPU."""
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
