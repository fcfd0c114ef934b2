"""Teachers from the checkpoints people have: arcface_torch backbones (+ Partial FC
shards), facekd checkpoints, ONNX files.

A :class:`Teacher` is frozen and stays in eval mode whatever its parent does. It gives
embeddings, margin-free logits against its class centres (when it has a classifier) and
named intermediate feature maps through forward hooks, without editing the model code.
When only a backbone exists, :func:`compute_class_centres` (``facekd teacher centres``)
rebuilds the classifier as normalised class centres of teacher embeddings.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from facekd.errors import CheckpointError, ConfigError, first_line

log = logging.getLogger(__name__)

_SHARD_RE = re.compile(r"^checkpoint_gpu_(\d+)\.pt$")
# Older arcface_torch (PartialFC v1) saved each rank's rows as a bare tensor.
_OLD_SHARD_RE = re.compile(r"^rank_(\d+)_softmax_weight\.pt$")
_BACKBONE_NAMES = ("model.pt", "backbone.pth", "backbone.pt", "student.pt")  # last: facekd


# ----------------------------------------------------------------------------- classifier
def find_partial_fc_shards(folder: str | os.PathLike) -> dict[int, Path]:
    """``{rank: path}`` of arcface_torch ``checkpoint_gpu_{rank}.pt`` files in ``folder``
    (or, failing those, PartialFC v1's ``rank_{rank}_softmax_weight.pt``)."""
    for pattern in (_SHARD_RE, _OLD_SHARD_RE):
        found = {}
        for path in Path(folder).iterdir():
            match = pattern.match(path.name)
            if match:
                found[int(match.group(1))] = path
        if found:
            return dict(sorted(found.items()))
    return {}


def _shard_weight(obj: Any, path: Path) -> torch.Tensor:
    if isinstance(obj, torch.Tensor):  # PartialFC v1: the rows themselves
        obj = {"weight": obj}
    state = obj.get("state_dict_softmax_fc", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: no 'state_dict_softmax_fc' (Partial FC) entry")
    weight = state.get("weight")
    if not isinstance(weight, torch.Tensor):
        mats = [v for v in state.values() if isinstance(v, torch.Tensor) and v.dim() == 2]
        if len(mats) != 1:
            raise CheckpointError(f"{path}: 'state_dict_softmax_fc' has no 2-D 'weight'")
        weight = mats[0]
    if weight.dim() != 2:
        raise CheckpointError(f"{path}: Partial FC weight is {list(weight.shape)}, not 2-D")
    return weight.float()


def merge_partial_fc_shards(shards: str | os.PathLike | dict[int, str | os.PathLike],
                            num_classes: int | None = None,
                            embedding_size: int | None = None) -> torch.Tensor:
    """One normalised C x D class-centre matrix from arcface_torch's per-rank shards.

    Rank r holds classes ``[C//W*r + min(r, C%W), ...)`` (its first C % W ranks one row
    more). A missing rank, a shard whose row count breaks that pattern, a row total other
    than ``num_classes`` or a width other than ``embedding_size`` is a CheckpointError.
    """
    from facekd.models.checkpoint import read_checkpoint
    from facekd.models.partial_fc import shard_range

    if not isinstance(shards, dict):
        folder = Path(shards)
        shards = find_partial_fc_shards(folder)
        if not shards:
            raise CheckpointError(f"{folder}: no checkpoint_gpu_*.pt (or rank_*_softmax_weight.pt)"
                                  " Partial FC files")
    paths = {int(r): Path(p) for r, p in shards.items()}
    world = max(paths) + 1
    missing = [r for r in range(world) if r not in paths]
    if missing:
        where = paths[min(paths)].parent
        raise CheckpointError(f"{where}: Partial FC shard of rank {missing[0]} is missing "
                              f"(found ranks {sorted(paths)}; expected 0..{world - 1})")
    weights = [_shard_weight(read_checkpoint(paths[r]), paths[r]) for r in range(world)]
    widths = {w.shape[1] for w in weights}
    if len(widths) != 1:
        raise CheckpointError(f"{paths[0].parent}: Partial FC shards differ in width {widths}")
    total = sum(w.shape[0] for w in weights)
    if num_classes is not None and total != num_classes:
        raise CheckpointError(f"{paths[0].parent}: Partial FC shards hold {total} rows in all, "
                              f"expected {num_classes} classes")
    for rank, weight in enumerate(weights):
        expected = shard_range(total, rank, world)[1]
        if weight.shape[0] != expected:
            raise CheckpointError(f"{paths[rank]}: rank {rank} holds {weight.shape[0]} rows; "
                                  f"{total} classes over {world} ranks give it {expected} "
                                  f"(shards from different runs, or a rank missing at the end?)")
    dim = widths.pop()
    if embedding_size is not None and dim != embedding_size:
        raise CheckpointError(f"{paths[0].parent}: Partial FC rows are {dim}-d, the teacher "
                              f"embeds {embedding_size}-d")
    return F.normalize(torch.cat(weights), dim=1)


def load_classifier(spec: str | os.PathLike, embedding_size: int | None = None
                    ) -> tuple[torch.Tensor, float | None]:
    """(normalised C x D centres, scale or None) from a centres file or Partial FC shards.

    Accepts ``.npy`` (C x D), ``.pt`` from ``facekd teacher centres``, a facekd checkpoint
    with a head, a folder of ``checkpoint_gpu_*.pt`` or one such file (its siblings merged).
    """
    from facekd.models.checkpoint import is_facekd_checkpoint, read_checkpoint

    path = Path(spec)
    scale = None
    if path.is_dir() or _SHARD_RE.match(path.name) or _OLD_SHARD_RE.match(path.name):
        folder = path if path.is_dir() else path.parent
        centres = merge_partial_fc_shards(folder, embedding_size=embedding_size)
        return centres, None
    if not path.is_file():
        raise CheckpointError(f"{path}: no such classifier file")
    if path.suffix.lower() == ".npy":
        try:
            array = np.load(path, allow_pickle=False)
        except MemoryError:
            raise   # a large valid file on a small machine is not a damaged one
        except Exception as exc:  # a damaged header can raise anything
            raise CheckpointError(f"{path}: not a readable .npy matrix: "
                                  f"{first_line(exc)}") from exc
        if not np.issubdtype(array.dtype, np.number):
            raise CheckpointError(f"{path}: class centres must be numbers, not {array.dtype}")
        matrix = torch.from_numpy(array.astype(np.float32))
    else:
        obj = read_checkpoint(path)
        if isinstance(obj, torch.Tensor):
            matrix = obj
        elif is_facekd_checkpoint(obj):
            head = obj.get("head")
            if not isinstance(head, dict) or not isinstance(head.get("weight"), torch.Tensor):
                raise CheckpointError(f"{path}: facekd checkpoint has no head weight")
            matrix, scale = head["weight"], (head.get("config") or {}).get("scale")
        elif isinstance(obj, dict) and isinstance(obj.get("centres"), torch.Tensor):
            matrix, scale = obj["centres"], obj.get("scale")
        elif isinstance(obj, dict) and isinstance(obj.get("state_dict_softmax_fc"), dict):
            return merge_partial_fc_shards(path.parent, embedding_size=embedding_size), None
        else:
            raise CheckpointError(f"{path}: no class centres in it (expected a C x D tensor, "
                                  f"'centres', a facekd head or Partial FC shards)")
    if matrix.dim() != 2:
        raise CheckpointError(f"{path}: class centres are {list(matrix.shape)}, not C x D")
    if embedding_size is not None and matrix.shape[1] != embedding_size:
        raise CheckpointError(f"{path}: class centres are {matrix.shape[1]}-d, the teacher "
                              f"embeds {embedding_size}-d")
    return F.normalize(matrix.float(), dim=1), (float(scale) if scale else None)


# ----------------------------------------------------------------------------- teacher
class Teacher(nn.Module):
    """Frozen teacher: ``embed``, ``centres``, ``scale``, ``cos_logits``, ``features``."""

    def __init__(self, model: nn.Module | None, *, name: str = "teacher",
                 centres: torch.Tensor | None = None, scale: float = 64.0,
                 feature_layers: Sequence[str] = (), onnx_session: Any = None,
                 embedding_size: int | None = None, device: torch.device | None = None):
        super().__init__()
        from facekd.devices import pick_device

        self.name = name
        self.scale = float(scale)
        self.device = pick_device(device)
        self.model = model
        self.onnx = onnx_session
        self.feature_layers = list(feature_layers)
        self.features: dict[str, torch.Tensor] = {}
        self._hooks = None
        if model is not None:
            model.to(self.device)
            for p in model.parameters():
                p.requires_grad_(False)
            if self.feature_layers:
                from facekd.models.hooks import FeatureHooks

                self._hooks = FeatureHooks(model, self.feature_layers, detach=True)
                self.features = self._hooks.features
            embedding_size = embedding_size or getattr(model, "num_features", None)
        elif self.feature_layers:
            raise ConfigError(f"{name}: an ONNX teacher gives embeddings only; feature_layers "
                              f"{self.feature_layers} need a torch checkpoint")
        self.embedding_size = embedding_size
        self.register_buffer("_centres", None if centres is None
                             else F.normalize(centres.float(), dim=1).to(self.device),
                             persistent=False)
        super().train(False)

    def train(self, mode: bool = True) -> Teacher:
        """Always eval: BN statistics and dropout of a teacher must never change."""
        return super().train(False)

    @property
    def centres(self) -> torch.Tensor | None:
        return self._centres

    def set_centres(self, centres: torch.Tensor | None, scale: float | None = None) -> None:
        self._centres = None if centres is None else F.normalize(
            centres.float(), dim=1).to(self.device)
        if scale:
            self.scale = float(scale)

    @property
    def input_device(self) -> torch.device:
        """Where ``embed`` runs: a loader batch normalised there is not copied again."""
        if self.model is None:
            return torch.device("cpu")  # onnxruntime takes host arrays
        return next(self.model.parameters()).device

    @torch.no_grad()
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Float32 embeddings of an NCHW batch in [-1, 1]; on the input's device."""
        if self.onnx is not None:
            out = self.onnx(x)
            return torch.from_numpy(out).to(x.device if isinstance(x, torch.Tensor) else "cpu")
        device = next(self.model.parameters()).device  # follows a later .to(device)
        x_dev = x.to(device, non_blocking=True)
        out = self.model(x_dev).float()
        return out.to(x.device) if isinstance(x, torch.Tensor) else out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embed(x)

    def cos_logits(self, emb: torch.Tensor, class_idx: torch.Tensor | None = None
                   ) -> torch.Tensor:
        """``scale * cos(emb, centre)`` over all classes or ``class_idx``; margin-free."""
        if self._centres is None:
            raise ConfigError(f"{self.name} has no classifier: give its Partial FC files or "
                              f"class centres from 'facekd teacher centres'")
        centres = self._centres if class_idx is None else self._centres[class_idx]
        centres = centres.to(emb.device)
        return self.scale * F.linear(F.normalize(emb.float(), dim=1), centres)

    def extra_repr(self) -> str:
        classes = "no classifier" if self._centres is None else f"{self._centres.shape[0]} classes"
        return f"{self.name}: {self.embedding_size}-d, {classes}, s={self.scale}"


def load_teacher(spec: str | os.PathLike, *, arch: str | None = None,
                 classifier: str | os.PathLike | None = None,
                 device: str | torch.device | None = None,
                 feature_layers: Sequence[str] = (), scale: float | None = None) -> Teacher:
    """A frozen teacher from an arcface_torch backbone / run folder, a facekd checkpoint
    or ``.onnx``.

    Partial FC shards ``checkpoint_gpu_*.pt`` beside the backbone (or in the run folder)
    are merged into the classifier unless ``classifier`` names another source.
    """
    from facekd.models.checkpoint import (
        backbone_from_object,
        extract_state_dict,
        is_facekd_checkpoint,
        read_checkpoint,
    )

    path = Path(spec)
    if not path.exists():
        raise CheckpointError(f"{path}: no such teacher checkpoint")
    if path.suffix.lower() == ".onnx":
        from facekd.models.embedder import OnnxEmbedder

        session = OnnxEmbedder(path, device=device)
        teacher = Teacher(None, name=path.name, onnx_session=session,
                          embedding_size=session.embedding_size,
                          feature_layers=feature_layers, device=device)
        if classifier is not None:
            teacher.set_centres(*load_classifier(classifier, session.embedding_size))
        if scale:
            teacher.scale = float(scale)
        return teacher

    folder = path if path.is_dir() else path.parent
    if path.is_dir():
        candidates = [path / n for n in _BACKBONE_NAMES if (path / n).is_file()]
        shards = find_partial_fc_shards(path)
        if candidates:
            path = candidates[0]
        elif shards:
            path = shards[min(shards)]  # its state_dict_backbone
        else:
            raise CheckpointError(f"{folder}: no model.pt, backbone.pth or checkpoint_gpu_0.pt")
    obj = read_checkpoint(path)
    if _SHARD_RE.match(path.name) and isinstance(obj, dict) and "state_dict_backbone" in obj:
        obj = extract_state_dict(obj["state_dict_backbone"], path)
    model, info = backbone_from_object(obj, path, arch)
    centres, head_scale = None, None
    if classifier is not None:
        centres, head_scale = load_classifier(classifier, info["arch_kwargs"].get(
            "num_features", getattr(model, "num_features", None)))
    elif is_facekd_checkpoint(obj) and isinstance(obj.get("head"), dict):
        head = obj["head"]
        if isinstance(head.get("weight"), torch.Tensor):
            centres = head["weight"]
            head_scale = (head.get("config") or {}).get("scale")
    elif find_partial_fc_shards(folder):
        centres = merge_partial_fc_shards(folder, embedding_size=model.num_features)
        log.info("teacher classifier: merged %d Partial FC shards from %s",
                 len(find_partial_fc_shards(folder)), folder)
    teacher = Teacher(model, name=f"{path.name} ({info['arch']})", centres=centres,
                      scale=scale or head_scale or 64.0, feature_layers=feature_layers,
                      device=device)
    teacher.arch, teacher.arch_kwargs = info["arch"], info["arch_kwargs"]
    return teacher


# ----------------------------------------------------------------------------- centres
def add_class_sums(teacher: Teacher, images: torch.Tensor, labels: torch.Tensor,
                   sums: torch.Tensor, counts: torch.Tensor) -> None:
    """Add, per labelled row of a [-1, 1] batch, ``normalise(emb(x) + emb(flip(x)))`` to
    its class row (the teacher sees the labelled rows, then their mirrors)."""
    num_classes = sums.shape[0]
    labels = labels.long().cpu()
    keep = labels >= 0
    if bool(keep.any()):
        if int(labels.max()) >= num_classes:
            raise ConfigError(f"label {int(labels.max())} >= num_classes {num_classes}")
        images = images[keep]
        emb = teacher.embed(images).float() + teacher.embed(images.flip(3)).float()
        feats = F.normalize(emb, dim=1).cpu().double()
        sums.index_add_(0, labels[keep], feats)
        counts.index_add_(0, labels[keep], torch.ones(int(keep.sum()), dtype=torch.long))


def accumulate_class_sums(teacher: Teacher, batches: Iterable[dict[str, Any]],
                          sums: torch.Tensor, counts: torch.Tensor) -> None:
    """:func:`add_class_sums` over loader batches (uint8 images, scaled here)."""
    from facekd.data.loader import normalise_batch

    for batch in batches:
        images = normalise_batch(batch["image"], getattr(teacher, "input_device", None))
        add_class_sums(teacher, images, batch["label"], sums, counts)


def finish_centres(sums: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Normalised centres; classes never seen get a zero row (cosine 0 to everything)."""
    centres = F.normalize(sums.float(), dim=1)
    centres[counts == 0] = 0.0
    return centres


def compute_class_centres(teacher: Teacher, batches: Iterable[dict[str, Any]],
                          num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(C x D normalised centres, per-class sample counts) over ``batches``."""
    dim = teacher.embedding_size
    if dim is None:
        probe = teacher.embed(torch.zeros(1, 3, 112, 112))
        dim = probe.shape[1]
    sums = torch.zeros(num_classes, dim, dtype=torch.float64)
    counts = torch.zeros(num_classes, dtype=torch.long)
    accumulate_class_sums(teacher, batches, sums, counts)
    return finish_centres(sums, counts), counts


def write_centres(out: str | os.PathLike, centres: torch.Tensor, counts: torch.Tensor,
                  meta: dict[str, Any]) -> Path:
    """``.npy``: the C x D float32 matrix; anything else: a torch dict with counts + meta."""
    from facekd.fileio import atomic_path

    out = Path(out)
    if out.suffix.lower() == ".npy":
        with atomic_path(out, suffix=".npy") as tmp:
            np.save(tmp, centres.numpy().astype(np.float32))
    else:
        with atomic_path(out) as tmp, open(tmp, "wb") as f:
            torch.save({"format": "facekd-centres", "centres": centres, "counts": counts,
                        **meta}, f)
    return out


def teacher_centres(teacher_spec: str | os.PathLike, data: str | os.PathLike,
                    out: str | os.PathLike, *, arch: str | None = None, batch_size: int = 128,
                    device: str | None = None, num_workers: int = 0, save_every: int = 50,
                    progress: bool = True, teacher: Teacher | None = None,
                    loader_factory: Callable[..., Any] | None = None) -> Path:
    """`facekd teacher centres`: class centres of teacher embeddings over a training set.

    Resumable (:class:`~facekd.models.teacher_pass.TeacherPass`, the teacher cache's
    pass too): running sums, counts and the loader position are saved every
    ``save_every`` batches to ``OUT.partial.pt`` and picked up by the next run.
    """
    from facekd.fileio import atomic_path
    from facekd.logs import add_file_log
    from facekd.models.teacher_pass import TeacherPass, check_pass_sizes

    check_pass_sizes(batch_size, save_every, "--batch-size and --save-every")
    out = Path(out)
    partial = out.with_name(out.name + ".partial.pt")
    out.parent.mkdir(parents=True, exist_ok=True)
    handler = add_file_log(out.with_name(out.name + ".log"))
    try:
        if teacher is None:
            teacher = load_teacher(teacher_spec, arch=arch, device=device)
        teacher_pass = TeacherPass(loader_factory, data, batch_size, num_workers=num_workers,
                                   save_every=save_every, desc="teacher centres",
                                   input_device=getattr(teacher, "input_device", None),
                                   progress=progress)
        num_classes = int(teacher_pass.loader.num_classes)
        dim = teacher.embedding_size or int(teacher.embed(torch.zeros(1, 3, 112, 112)).shape[1])
        settings = {"teacher": str(teacher_spec), "data": str(data), "batch_size": batch_size,
                    "num_classes": num_classes, "dim": dim}
        sums = torch.zeros(num_classes, dim, dtype=torch.float64)
        counts = torch.zeros(num_classes, dtype=torch.long)
        if partial.exists():
            state = torch.load(partial, map_location="cpu", weights_only=True)
            if state.get("settings") != settings:
                raise ConfigError(f"{partial}: left by a run with other settings "
                                  f"({state.get('settings')}); delete it to start over")
            sums, counts = state["sums"], state["counts"]
            teacher_pass.resume(state["loader"], partial)

        def add_batch(images: torch.Tensor, batch: dict[str, Any]) -> None:
            add_class_sums(teacher, images, batch["label"], sums, counts)

        def save() -> None:
            with atomic_path(partial) as tmp, open(tmp, "wb") as f:
                torch.save({"settings": settings, "sums": sums, "counts": counts,
                            "loader": teacher_pass.position()}, f)

        teacher_pass.run(add_batch, save)
        centres = finish_centres(sums, counts)
        empty = int((counts == 0).sum())
        if empty:
            log.warning("%d of %d classes had no labelled image; their centres are zero",
                        empty, num_classes)
        write_centres(out, centres, counts, {"teacher": str(teacher_spec), "data": str(data),
                                             "scale": teacher.scale})
        partial.unlink(missing_ok=True)
        log.info("wrote %d class centres (%d-d) to %s", num_classes, dim, out)
        return out
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()
