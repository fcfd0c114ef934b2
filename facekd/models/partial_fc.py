"""Partial FC: the class-centre matrix sharded across ranks, negative-class sampling, and
the distributed cross-entropy (An et al., arcface_torch's ``PartialFC_V2``).

Differences from arcface_torch, on purpose:

* Sampling draws one random score per *global* class from a generator seeded by
  ``(seed, step)``; each rank keeps its slice. The sampled set therefore does not depend
  on the world size, and 1 GPU reproduces N GPUs exactly.
* ``export_state()`` gathers the **full merged** matrix (rank order = class order), and
  ``load_export_state()`` slices it for the current rank, so a run resumes at any world
  size (arcface_torch's per-rank ``checkpoint_gpu_{rank}.pt`` ties resume to GPU count).
  With ``main_only=True`` (what the trainer uses) the rows travel to rank 0 alone, one
  shard at a time (:func:`gather_rows_to_main`): at 2.06M classes x 512 the merged matrix
  is 4.2 GB, and an all-gather put one copy on every rank (64 ranks: 64 copies).

Gradient convention (as arcface_torch): the embedding gradient returned to each rank is
``world_size`` x its share, so DDP's averaging of backbone gradients yields the gradient
of the global-batch mean loss. Do not wrap this module in DDP.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from facekd.errors import CheckpointError, ConfigError
from facekd.models.heads import apply_margin, resolve_margins


def shard_range(num_classes: int, rank: int, world_size: int) -> tuple[int, int]:
    """(first class, number of classes) owned by ``rank``: the first C % W ranks get one more."""
    base, extra = divmod(num_classes, world_size)
    return base * rank + min(rank, extra), base + (1 if rank < extra else 0)


def _dist_ready() -> bool:
    return dist.is_available() and dist.is_initialized()


def _gather_sizes(n: int, device: torch.device) -> list[int]:
    sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor([n], dtype=torch.long, device=device))
    return [int(s.item()) for s in sizes]


def _all_gather_rows(x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Concatenate every rank's rows (row counts may differ); no autograd."""
    longest = max(sizes)
    padded = x.new_zeros((longest, *x.shape[1:]))
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([p[:n] for p, n in zip(parts, sizes, strict=True)])


def gather_rows_to_main(x: torch.Tensor, num_rows: int) -> torch.Tensor | None:
    """The row shards of every rank (``shard_range`` order) as one host tensor on rank 0.

    Rank 0 allocates the ``num_rows`` x ... result on the host and receives one shard at
    a time into a device buffer of one shard's size (point-to-point, NCCL; gloo receives
    into the result itself), so no rank
    holds more than one foreign shard on its device and the other ranks hold nothing
    extra; every rank must call it. Returns None on the other ranks. Without a process
    group it is ``x`` on the host.
    """
    x = x.detach()
    if not _dist_ready() or dist.get_world_size() == 1:
        return x.cpu().clone()
    world, rank = dist.get_world_size(), dist.get_rank()
    if rank != 0:
        dist.send(x.contiguous(), dst=0)
        return None
    out = torch.empty((num_rows, *x.shape[1:]), dtype=x.dtype)
    for r in range(world):
        start, count = shard_range(num_rows, r, world)
        if r == 0:
            out[start:start + count].copy_(x)
            continue
        if x.device.type == "cpu":      # gloo receives straight into the result
            dist.recv(out[start:start + count], src=r)
            continue
        buf = x.new_empty((count, *x.shape[1:]))
        dist.recv(buf, src=r)
        out[start:start + count].copy_(buf)
        del buf
    return out


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient and returns this rank's rows
    times world_size (see the module docstring)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        rank = dist.get_rank()
        ctx.offset, ctx.count, ctx.world = sum(sizes[:rank]), sizes[rank], len(sizes)
        return _all_gather_rows(x, sizes)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.offset: ctx.offset + ctx.count] * ctx.world, None


class _DistCrossEntropy(torch.autograd.Function):
    """Softmax cross-entropy over classes split across ranks; mean over valid rows."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, local_labels: torch.Tensor, valid: torch.Tensor,
                distributed: bool) -> torch.Tensor:
        logits = logits.float()
        row_max = logits.max(dim=1, keepdim=True).values
        if distributed:
            dist.all_reduce(row_max, op=dist.ReduceOp.MAX)
        exp = torch.exp(logits - row_max)
        denom = exp.sum(dim=1, keepdim=True)
        if distributed:
            dist.all_reduce(denom, op=dist.ReduceOp.SUM)
        prob = exp / denom
        here = torch.nonzero(local_labels >= 0, as_tuple=True)[0]
        row_loss = torch.zeros(logits.shape[0], device=logits.device)
        # log-sum-exp form: exact even when the target's probability underflows
        log_denom = (torch.log(denom) + row_max).squeeze(1)
        row_loss[here] = log_denom[here] - logits[here, local_labels[here]]
        if distributed:
            dist.all_reduce(row_loss, op=dist.ReduceOp.SUM)
        count = int(valid.sum().item())
        ctx.save_for_backward(prob, local_labels, valid)
        ctx.count = count
        if count == 0:
            return row_loss.sum() * 0.0
        return row_loss[valid].sum() / count

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        prob, local_labels, valid = ctx.saved_tensors
        grad = prob.clone()
        here = torch.nonzero(local_labels >= 0, as_tuple=True)[0]
        grad[here, local_labels[here]] -= 1.0
        grad[~valid] = 0.0
        grad = grad * (grad_out / max(ctx.count, 1))
        return grad, None, None, None


class PartialFC(nn.Module):
    """Sharded margin classifier whose ``forward(embeddings, labels)`` returns the CE loss.

    ``weight`` holds this rank's rows ``[class_start, class_start + num_local)``. Labels of
    -1 (unlabelled images) are gathered but excluded from the loss.
    """

    def __init__(self, embedding_size: int, num_classes: int, *, kind: str = "arcface",
                 scale: float = 64.0, margin: float | None = None, m1: float | None = None,
                 m2: float | None = None, m3: float | None = None, sample_rate: float = 1.0,
                 seed: int = 0, rank: int | None = None, world_size: int | None = None):
        super().__init__()
        if not 0.0 < sample_rate <= 1.0:
            raise ConfigError(f"partial_fc.sample_rate must be in (0, 1], got {sample_rate}")
        if rank is None or world_size is None:
            rank, world_size = ((dist.get_rank(), dist.get_world_size()) if _dist_ready()
                                else (0, 1))
        if num_classes < world_size:
            raise ConfigError(f"{num_classes} classes cannot be sharded over {world_size} ranks")
        self.kind = kind
        self.m1, self.m2, self.m3 = resolve_margins(kind, margin, m1, m2, m3)
        self.embedding_size, self.num_classes = int(embedding_size), int(num_classes)
        self.scale, self.sample_rate, self.seed = float(scale), float(sample_rate), int(seed)
        self.rank, self.world_size = int(rank), int(world_size)
        self.class_start, self.num_local = shard_range(num_classes, rank, world_size)
        self.step = 0
        self.weight = nn.Parameter(torch.normal(0, 0.01, (self.num_local, self.embedding_size)))

    # -- sampling ---------------------------------------------------------------------------
    def sample_local(self, local_labels: torch.Tensor) -> torch.Tensor | None:
        """Sorted local class indices for this step (positives always kept), or None = all."""
        if self.sample_rate >= 1.0 or not self.training:
            return None
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.step)
        scores = torch.rand(self.num_classes, generator=gen)
        scores = scores[self.class_start: self.class_start + self.num_local]
        keep = (scores < self.sample_rate).to(local_labels.device)
        keep[local_labels[local_labels >= 0]] = True
        if not bool(keep.any()):
            keep[int(scores.argmin())] = True
        return torch.nonzero(keep, as_tuple=True)[0]

    # -- forward ----------------------------------------------------------------------------
    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        distributed = self.world_size > 1
        if distributed and not _dist_ready():
            raise RuntimeError("PartialFC built for several ranks but torch.distributed "
                               "is not initialised")
        labels = labels.long().view(-1)
        if distributed:
            sizes = _gather_sizes(embeddings.shape[0], embeddings.device)
            embeddings = _GatherWithGrad.apply(embeddings, sizes)
            labels = _all_gather_rows(labels, sizes)
        valid = labels >= 0
        in_shard = valid & (labels >= self.class_start) & (
            labels < self.class_start + self.num_local)
        local_labels = torch.where(in_shard, labels - self.class_start,
                                   torch.full_like(labels, -1))
        weight = self.weight
        index = self.sample_local(local_labels)
        if index is not None:
            remap = torch.full((self.num_local,), -1, dtype=torch.long, device=labels.device)
            remap[index] = torch.arange(index.numel(), device=labels.device)
            local_labels = torch.where(local_labels >= 0, remap[local_labels.clamp_min(0)],
                                       local_labels)
            weight = weight[index]
        if self.training:
            self.step += 1
        cos = F.linear(F.normalize(embeddings.float(), dim=1),
                       F.normalize(weight.float(), dim=1)).clamp(-1.0, 1.0)
        logits = self.scale * apply_margin(cos, local_labels, self.m1, self.m2, self.m3)
        return _DistCrossEntropy.apply(logits, local_labels, valid, distributed)

    # -- class centres / checkpoints -------------------------------------------------------
    def centres(self) -> torch.Tensor:
        """This rank's normalised class centres (rows ``class_start ..``)."""
        return F.normalize(self.weight.float(), dim=1)

    def config(self) -> dict[str, Any]:
        return {"kind": self.kind, "embedding_size": self.embedding_size,
                "num_classes": self.num_classes, "scale": self.scale, "m1": self.m1,
                "m2": self.m2, "m3": self.m3, "sample_rate": self.sample_rate,
                "seed": self.seed}

    def full_weight(self, main_only: bool = False) -> torch.Tensor | None:
        """The whole C x D matrix on CPU (a collective: call it on every rank).

        ``main_only``: only rank 0 gets it (streamed shard by shard), the others None.
        """
        weight = self.weight.detach().float()
        if main_only:
            return gather_rows_to_main(weight, self.num_classes)
        if self.world_size > 1:
            sizes = [shard_range(self.num_classes, r, self.world_size)[1]
                     for r in range(self.world_size)]
            weight = _all_gather_rows(weight.contiguous(), sizes)
        return weight.cpu().clone()

    def export_state(self, main_only: bool = False) -> dict[str, Any] | None:
        """Merged checkpoint entry, independent of world size (collective); with
        ``main_only`` None on every rank but 0."""
        weight = self.full_weight(main_only=main_only)
        if weight is None:
            return None
        return {"type": "partial_fc", "config": self.config(), "weight": weight,
                "step": self.step}

    def local_rows(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a merged ``num_classes`` x ... tensor (a view)."""
        if full.shape[0] != self.num_classes:
            raise CheckpointError(f"a merged Partial FC tensor has {full.shape[0]} rows, "
                                  f"this run has {self.num_classes} classes")
        return full[self.class_start: self.class_start + self.num_local]

    def load_export_state(self, state: dict[str, Any], source: str = "checkpoint") -> None:
        """Take this rank's rows from a merged matrix saved at any world size."""
        weight = state.get("weight") if isinstance(state, dict) else None
        if not isinstance(weight, torch.Tensor):
            raise CheckpointError(f"{source}: head entry has no 'weight' tensor")
        if tuple(weight.shape) != (self.num_classes, self.embedding_size):
            raise CheckpointError(f"{source}: classifier is {list(weight.shape)}, this run "
                                  f"needs {[self.num_classes, self.embedding_size]}")
        with torch.no_grad():
            self.weight.copy_(self.local_rows(weight).to(self.weight.device, self.weight.dtype))
        self.step = int(state.get("step", 0))

    def extra_repr(self) -> str:
        return (f"rank {self.rank}/{self.world_size}: classes [{self.class_start}, "
                f"{self.class_start + self.num_local}) of {self.num_classes}, "
                f"D={self.embedding_size}, sample_rate={self.sample_rate}")


def init_shard_like_full(head: nn.Module, seed: int, chunk_rows: int = 65536) -> None:
    """Fill this rank's Partial FC rows with the rows a 1-process run would draw.

    The full N(0, 0.01) matrix is drawn chunk by chunk from one seeded generator and only
    the local rows are kept, so any world size starts from the same classifier (in
    bounded memory) and a DDP run can be compared with a single-process run.
    """
    g = torch.Generator().manual_seed(seed * 7919 + 17)
    start, stop = head.class_start, head.class_start + head.num_local
    with torch.no_grad():
        for first in range(0, stop, chunk_rows):
            rows = min(chunk_rows, head.num_classes - first)
            block = torch.normal(0.0, 0.01, (rows, head.embedding_size), generator=g)
            lo, hi = max(first, start), min(first + rows, stop)
            if lo < hi:
                head.weight[lo - start:hi - start].copy_(block[lo - first:hi - first])


class PartialFCView(nn.Module):
    """What a method sees of a Partial FC head: margin-free logits over its rows.

    Only a single-process Partial FC holds every class; sharded rows would give each rank
    a different slice, so methods that read the student's head need a replicated head.
    """

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.pfc = head

    @property
    def weight(self) -> torch.Tensor:
        self._check()
        return self.pfc.weight

    @property
    def scale(self) -> float:
        return self.pfc.scale

    def _check(self) -> None:
        if self.pfc.world_size > 1:
            raise ConfigError("this method reads the student's head, which Partial FC shards "
                              "across ranks; set student.head.partial_fc: false (a replicated "
                              "head) for multi-process runs of it")

    def centres(self) -> torch.Tensor:
        self._check()
        return self.pfc.centres()

    def cos_logits(self, emb: torch.Tensor, class_idx: torch.Tensor | None = None
                   ) -> torch.Tensor:
        centres = self.centres()
        if class_idx is not None:
            centres = centres[class_idx]
        return self.pfc.scale * F.linear(F.normalize(emb.float(), dim=1), centres)
