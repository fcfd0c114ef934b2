"""Small, fast stand-ins for the trainer tests: an in-memory loader and a frozen teacher.

The loader follows ``facekd.data.loader.build_train_loader``'s contract (deterministic
shuffle by (seed, epoch), rank split ``perm[rank::world]``, per-sample flip decided by
(seed, epoch, key), ``state_dict`` for mid-epoch resume) on random images, so trainer
tests check the loop and not JPEG decoding speed.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from facekd.train.recipe import Recipe, load_recipe


def make_images(num_samples: int, num_classes: int, seed: int = 0,
                size: int = 112) -> tuple[torch.Tensor, torch.Tensor]:
    """Class-structured random images in [-1, 1] (a class pattern plus noise)."""
    g = torch.Generator().manual_seed(seed)
    patterns = torch.rand(num_classes, 3, size // 8, size // 8, generator=g) * 2 - 1
    labels = torch.arange(num_samples) % num_classes
    base = F.interpolate(patterns[labels], size=(size, size), mode="bilinear",
                         align_corners=False)
    noise = torch.rand(num_samples, 3, size, size, generator=g) * 0.6 - 0.3
    return (base * 0.7 + noise).clamp(-1, 1), labels


class MemoryLoader:
    """An in-memory stand-in for facekd's training loader (same interface)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, keys: torch.Tensor,
                 batch_size: int, *, seed: int = 0, epoch: int = 0, rank: int = 0,
                 world_size: int = 1, flip: bool = True, drop_last: bool = True,
                 labelled: bool = True, num_classes: int | None = None) -> None:
        self.images, self.labels, self.keys = images, labels, keys
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.flip, self.drop_last, self.labelled = flip, drop_last, labelled
        self.num_classes = int(num_classes if num_classes is not None else labels.max() + 1)
        self.epoch = epoch
        self.position = 0

    def _indices(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1000 + self.epoch)
        perm = torch.randperm(len(self.images), generator=g)
        per_rank = len(perm) // self.world_size
        return perm[self.rank::self.world_size][:per_rank]

    def __len__(self) -> int:
        n = len(self.images) // self.world_size
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.position = 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])

    def __iter__(self):
        idx = self._indices()
        while self.position < len(self):
            b = idx[self.position * self.batch_size:(self.position + 1) * self.batch_size]
            keys = self.keys[b]
            flipped = torch.tensor([self.flip and bool(np.random.default_rng(
                [self.seed, self.epoch, int(k)]).random() < 0.5) for k in keys])
            images = self.images[b].clone()
            images[flipped] = images[flipped].flip(3)
            labels = self.labels[b] if self.labelled else torch.full((len(b),), -1)
            self.position += 1
            yield {"image": images, "label": labels.long(), "key": keys.long(),
                   "flipped": flipped}
        self.position = 0


def memory_loader_factory(num_samples: int = 32, num_classes: int = 4, data_seed: int = 0,
                          key_offset: int = 1):
    """A ``build_train_loader``-compatible factory over one in-memory dataset."""
    images, labels = make_images(num_samples, num_classes, data_seed)
    keys = torch.arange(num_samples) + key_offset

    def factory(source: str, batch_size: int, **kw: Any) -> MemoryLoader:
        kw.pop("num_workers", None)
        return MemoryLoader(images, labels, keys, batch_size, num_classes=num_classes, **kw)

    return factory


class StandInTeacher:
    """A frozen tiny teacher with the ``Teacher`` interface (embed, centres, scale)."""

    def __init__(self, num_classes: int = 4, dim: int = 32, seed: int = 1) -> None:
        torch.manual_seed(seed)
        self.model = nn.Sequential(nn.AdaptiveAvgPool2d(8), nn.Flatten(),
                                   nn.Linear(3 * 64, dim)).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        g = torch.Generator().manual_seed(seed)
        self.centres = F.normalize(torch.randn(num_classes, dim, generator=g), dim=1)
        self.scale = 64.0
        self.features: dict[str, torch.Tensor] = {}

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.model(x.float().cpu())

    def cos_logits(self, emb: torch.Tensor, class_idx: torch.Tensor | None = None):
        centres = self.centres if class_idx is None else self.centres[class_idx]
        return self.scale * F.normalize(emb, dim=1) @ centres.t()


def tiny_recipe(out, method: str = "none", overrides: tuple[str, ...] = ()) -> Recipe:
    """A CPU-seconds recipe: a BN-free tiny student, 4 classes, batch 8, 2 epochs of 32."""
    register_test_models()
    base = [f"run.output={out}", "data.train=memory", "data.batch_size=8",
            "data.num_workers=0", "student.arch=train_test_nobn", "student.embedding_size=32",
            "student.head.scale=16", "optim.epochs=2", "optim.lr=0.05",
            "optim.warmup_epochs=0.5", "run.device=cpu", "run.save_every=3",
            "run.log_every=1", "run.progress=false", "run.tensorboard=false",
            f"method.name={method}"]
    return load_recipe(None, [*base, *overrides])


class NoBatchNormNet(nn.Module):
    """A tiny backbone without BatchNorm: its DDP result equals the single-process one."""

    default_feature_layers = ("stage1", "stage2")

    def __init__(self, num_features: int = 32) -> None:
        super().__init__()
        self.num_features = num_features
        self.stage1 = nn.Sequential(nn.Conv2d(3, 8, 4, stride=4), nn.PReLU(8))
        self.stage2 = nn.Sequential(nn.Conv2d(8, 16, 4, stride=4), nn.PReLU(16))
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(16 * 4, num_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.stage2(self.stage1(x))).flatten(1))


def register_test_models() -> None:
    """Register ``train_test_nobn`` (idempotent; spawned DDP workers call it too)."""
    from facekd.models.registry import register_model

    def train_test_nobn(num_features: int = 32, **kwargs: Any) -> NoBatchNormNet:
        return NoBatchNormNet(num_features)

    register_model(train_test_nobn)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ddp_worker(rank: int, world_size: int, port: int, out: str, method: str,
               overrides: tuple[str, ...], teacher_dim: int | None) -> None:
    """One torchrun-like process: the trainer reads these variables itself."""
    import os

    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world_size),
                       "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    register_test_models()
    from facekd.train.trainer import train

    teacher = StandInTeacher(dim=teacher_dim) if teacher_dim else None
    train(tiny_recipe(out, method, overrides), loader_factory=memory_loader_factory(),
          teacher=teacher)


def run_ddp(world_size: int, out: str, method: str, overrides: tuple[str, ...] = (),
            teacher_dim: int | None = None, timeout: float = 240.0) -> None:
    """Run ``world_size`` spawned trainer processes on gloo; raise if any fails."""
    run_processes(ddp_worker, world_size, out, method, overrides, teacher_dim,
                  timeout=timeout)


def cache_worker(rank: int, world_size: int, port: int, out: str) -> None:
    """One torchrun-like process of a distributed teacher-cache build."""
    import os

    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world_size),
                       "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    from facekd.train.cache import build_teacher_cache

    build_teacher_cache("", "memory", out, batch_size=4, dtype="float32", device="cpu",
                        teacher=StandInTeacher(), progress=False,
                        loader_factory=memory_loader_factory())


def run_processes(target: Any, world_size: int, *args: Any, timeout: float = 240.0) -> None:
    """Run ``target(rank, world_size, port, *args)`` in spawned processes; raise on failure."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=target, args=(rank, world_size, port, *args))
             for rank in range(world_size)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
    codes = [p.exitcode for p in procs]
    for p in procs:
        if p.is_alive():
            p.kill()
    if any(code != 0 for code in codes):
        raise RuntimeError(f"workers exited with {codes}")


def grad_reduce_worker(rank: int, world_size: int, port: int, out: str) -> None:
    """One gloo rank of ``all_reduce_grads`` where rank 1 never uses ``used_by_rank0``.

    Rank r computes the mean loss over its half of a fixed batch; its half decides whether
    the ``used_by_rank0`` parameter takes part, so on rank 1 its grad stays None.
    """
    import os

    import torch.distributed as dist

    from facekd.train.ddp import DistInfo, all_reduce_grads

    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        model = GradReduceModel()
        x, flags = GradReduceModel.batch()
        half = len(x) // world_size
        mine = slice(rank * half, (rank + 1) * half)
        model.zero_grad(set_to_none=True)
        model(x[mine], flags[mine]).backward()
        all_reduce_grads(list(model.parameters()), DistInfo(rank, world_size, rank, "gloo"))
        if rank == 0:
            torch.save({n: p.grad for n, p in model.named_parameters()}, out)
    finally:
        dist.destroy_process_group()


class GradReduceModel(nn.Module):
    """A shared part, a part only flagged rows use, and a part no row uses."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.shared = nn.Linear(4, 1)
        self.used_by_rank0 = nn.Linear(4, 1)
        self.never_used = nn.Linear(4, 1)

    @staticmethod
    def batch() -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(1)
        x = torch.randn(8, 4, generator=g)
        flags = torch.tensor([True, False, True, False, False, False, False, False])
        return x, flags

    def forward(self, x: torch.Tensor, flags: torch.Tensor) -> torch.Tensor:
        out = self.shared(x).squeeze(1)
        if bool(flags.any()):  # a connector only some batches need
            extra = torch.zeros_like(out)
            extra[flags] = self.used_by_rank0(x[flags]).squeeze(1)
            out = out + extra
        return (out ** 2).mean()


def unshared_worker(rank: int, world_size: int, port: int, root: str) -> None:
    """A rank whose ``OUT`` / ``run.output`` is its own folder, as on nodes without a
    shared filesystem: the teacher cache and a resume must both stop with one line."""
    import os
    from pathlib import Path

    from facekd.errors import ConfigError

    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world_size),
                       "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    register_test_models()
    from facekd.train.cache import build_teacher_cache
    from facekd.train.trainer import train

    node = Path(root) / f"node{rank}"
    errors = []
    # both calls share the process's one process group (facekd.train.ddp)
    try:
        build_teacher_cache("", "memory", node / "cache", batch_size=4, dtype="float32",
                            device="cpu", teacher=StandInTeacher(), progress=False,
                            loader_factory=memory_loader_factory())
    except ConfigError as exc:
        errors.append(str(exc))
    try:
        train(tiny_recipe(node / "run", "none", ("data.batch_size=4",)),
              loader_factory=memory_loader_factory())
    except ConfigError as exc:
        errors.append(str(exc))
    (Path(root) / f"errors{rank}.txt").write_text("\n".join(errors))
