"""Distributed set-up from torchrun's environment (one node or many; gloo on CPU, NCCL on GPU).

torchrun exports ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT`` on every node; reading only those keeps ``facekd distill`` launchable by
plain ``torchrun --nnodes N --nproc-per-node G -m facekd distill RECIPE``.

The process group lives as long as the process: the first call that needs it creates it,
later ones (REFILLED's second stage, a training after a teacher cache in one script)
reuse it, and it is destroyed at exit. Creating a new one after
``destroy_process_group`` hung gloo's rendezvous under torchrun, or aborted a rank at
exit ("terminate called without an active exception").
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from facekd.devices import pick_device
from facekd.errors import ConfigError


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"environment variable {name}={raw!r} is not an integer") from None


TIMEOUT_ENV = "FACEKD_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 3600


def dist_timeout() -> timedelta:
    """How long a collective may wait (``FACEKD_DIST_TIMEOUT`` seconds, default 1 hour).

    Ranks wait at a barrier while rank 0 alone writes a checkpoint or merges the teacher
    cache; at WebFace42M size those take minutes, and NCCL's own default (10 minutes)
    then killed every other rank of a healthy job.
    """
    seconds = _env_int(TIMEOUT_ENV, DEFAULT_TIMEOUT_S)
    if seconds <= 0:
        raise ConfigError(f"environment variable {TIMEOUT_ENV}={seconds} must be positive "
                          "(seconds)")
    return timedelta(seconds=seconds)


def launched_world_size() -> int:
    """The number of ranks torchrun launched (1 without torchrun)."""
    return _env_int("WORLD_SIZE", 1)


def init_distributed(device_choice: str = "auto") -> tuple[DistInfo, torch.device]:
    """Join the process group described by torchrun's variables (no-op when WORLD_SIZE<=1)."""
    world_size = launched_world_size()
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", rank if world_size > 1 else 0)
    device = pick_device(device_choice, local_rank, option="run.device")
    if world_size <= 1:
        return DistInfo(), device
    if dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank,
                        dist.get_backend()), device
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if not os.environ.get(name):
            raise ConfigError(f"WORLD_SIZE={world_size} but {name} is not set; "
                              "launch with torchrun")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend, rank=rank, world_size=world_size,
                            timeout=dist_timeout())
    atexit.register(_destroy_at_exit)
    return DistInfo(rank, world_size, local_rank, backend), device


def _destroy_at_exit() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def all_reduce_grads(params: Iterable[torch.nn.Parameter], info: DistInfo) -> None:
    """Average gradients of parameters replicated outside DDP (connectors, small heads).

    Every rank reduces one buffer of the same layout: a parameter without a gradient on
    this rank (a connector its batch did not use, under ``zero_grad(set_to_none=True)``)
    contributes zeros, and a presence count travels in the same buffer. Skipping such
    parameters instead gave the ranks buffers of different lengths: a hang, or gradients
    added to the wrong parameters. A parameter no rank touched keeps ``grad=None``, as in
    one process (so the optimiser leaves it alone).
    """
    if not info.enabled:
        return
    params = list(params)
    if not params:
        return
    device = params[0].device
    dtype = torch.float32
    for p in params:
        if p.grad is not None:
            dtype = torch.promote_types(dtype, p.grad.dtype)
    parts = [p.grad.reshape(-1).to(dtype) if p.grad is not None
             else torch.zeros(p.numel(), dtype=dtype, device=device) for p in params]
    present = torch.tensor([p.grad is not None for p in params], dtype=dtype, device=device)
    flat = torch.cat([*parts, present])
    dist.all_reduce(flat)
    counts = flat[-len(params):]
    flat = flat[:-len(params)] / info.world_size
    local = [p.grad is not None for p in params]
    # Only a rank missing some gradient must ask which ones another rank had: a host read
    # (one sync) in that case alone, none in the usual all-present step.
    any_grad = local if all(local) else (counts > 0).tolist()
    offset = 0
    for p, used in zip(params, any_grad, strict=True):
        n = p.numel()
        if not used:
            p.grad = None
        elif p.grad is None:
            p.grad = flat[offset:offset + n].view_as(p).to(p.dtype).clone()
        else:
            p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
        offset += n


def mean_scalar(value: float, info: DistInfo, device: torch.device) -> float:
    """Mean of a per-rank scalar over ranks (for logging)."""
    if not info.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item()) / info.world_size


def gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    """Every rank's ``obj`` as a list indexed by rank (RNG states, per-rank loader state)."""
    if not info.enabled:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, info: DistInfo, src: int = 0) -> Any:
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
