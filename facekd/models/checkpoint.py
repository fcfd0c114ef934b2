"""facekd checkpoints, and loading the arcface_torch state dicts people already have.

A facekd checkpoint is ``torch.save`` of ``{"format": "facekd", "version": 1, "arch",
"arch_kwargs", "state_dict", "head", "meta"}``: everything needed to rebuild the backbone
from the registry. Every load uses ``weights_only=True`` so a crafted pickle cannot run
code, and a key mismatch names the first missing/unexpected keys and the architecture
whose keys do fit.
"""

from __future__ import annotations

import functools
import os
import pickle
from pathlib import Path
from typing import Any

import torch
from torch import nn

from facekd.errors import CheckpointError, first_line
from facekd.fileio import atomic_path

FORMAT = "facekd"
VERSION = 1
# Keys under which training scripts nest a backbone state dict.
_NESTED_BACKBONE_KEYS = ("state_dict_backbone", "state_dict", "model", "backbone")


def unwrap(model: nn.Module) -> nn.Module:
    """The bare module behind DDP / torch.compile wrappers."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def save_checkpoint(path: str | os.PathLike, model: nn.Module, arch: str,
                    arch_kwargs: dict[str, Any] | None = None, head: Any = None,
                    meta: dict[str, Any] | None = None) -> Path:
    """Write a facekd checkpoint atomically. ``head`` is a module with ``export_state()``
    (margin head, Partial FC: the full merged class matrix) or a ready dict.

    A sharded Partial FC must be exported on every rank first (``head.export_state()`` is
    a collective); pass that dict here from rank 0.
    """
    state = {k: v.detach().cpu().clone() for k, v in unwrap(model).state_dict().items()}
    if head is not None and hasattr(head, "export_state"):
        if getattr(head, "world_size", 1) > 1:
            raise RuntimeError("save_checkpoint: call head.export_state() on every rank and "
                               "pass the dict; exporting here from one rank would hang")
        head = head.export_state()
    obj = {"format": FORMAT, "version": VERSION, "arch": arch,
           "arch_kwargs": dict(arch_kwargs or {}), "state_dict": state,
           "head": head, "meta": dict(meta or {})}
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)  # a file object: a full disk is an OSError, not a RuntimeError
    return path


def read_checkpoint(path: str | os.PathLike) -> Any:
    """``torch.load(weights_only=True)`` on CPU; unreadable or unsafe files -> CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's first paragraph advises weights_only=False; the reason is further down
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        first = next((line for line in lines if "GLOBAL" in line or "Unsupported" in line),
                     lines[0] if lines else type(exc).__name__)
        raise CheckpointError(f"{path}: refused to load (not a plain-weights checkpoint; "
                              f"weights_only=True): {first}") from exc
    except MemoryError:
        raise   # a large valid file on a small machine is not a damaged one
    except Exception as exc:  # garbage makes the unpickler raise anything (seen in
        # CI: IndexError "pop from empty list" from torch's weights_only unpickler)
        raise CheckpointError(f"{path}: not a readable torch checkpoint: "
                              f"{first_line(exc)}") from exc


def is_facekd_checkpoint(obj: Any) -> bool:
    return isinstance(obj, dict) and obj.get("format") == FORMAT


def _is_tensor_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def extract_state_dict(obj: Any, path: str | os.PathLike = "checkpoint") -> dict[str, torch.Tensor]:
    """The backbone state dict inside a loaded object, ``module.`` prefixes stripped."""
    if is_facekd_checkpoint(obj):
        obj = obj.get("state_dict")
    elif isinstance(obj, dict) and not _is_tensor_dict(obj):
        for key in _NESTED_BACKBONE_KEYS:
            if _is_tensor_dict(obj.get(key)):
                obj = obj[key]
                break
    if not _is_tensor_dict(obj):
        raise CheckpointError(f"{path}: no backbone state dict found (expected a facekd "
                              f"checkpoint or a dict of tensors)")
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return dict(obj)


@functools.cache
def _signature(arch: str) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """(name, shape) of arch's state dict with default kwargs, built on the meta device."""
    from facekd.models.registry import create_model

    with torch.device("meta"):
        model = create_model(arch)
    return tuple((k, tuple(v.shape)) for k, v in model.state_dict().items())


def _infer_kwargs(arch: str, state: dict[str, torch.Tensor]) -> dict[str, Any] | None:
    """Kwargs under which ``arch`` has exactly ``state``'s keys and shapes, or None.

    Only the embedding size is inferred: tensors whose shapes differ must all differ in
    their first dimension and agree on one value.
    """
    sig = dict(_signature(arch))
    if set(sig) != set(state):
        return None
    sizes = {int(state[k].shape[0]) for k, shape in sig.items()
             if tuple(state[k].shape) != shape and state[k].dim() >= 1
             and tuple(state[k].shape)[1:] == shape[1:]}
    bad = [k for k, shape in sig.items() if tuple(state[k].shape) != shape
           and not (state[k].dim() >= 1 and tuple(state[k].shape)[1:] == shape[1:])]
    if bad or len(sizes) > 1:
        return None
    return {"num_features": sizes.pop()} if sizes else {}


def guess_arch(state: dict[str, torch.Tensor]) -> tuple[str, dict[str, Any]] | None:
    """The registered architecture (and embedding size) whose state dict ``state`` is."""
    from facekd.models.registry import list_models

    for arch in list_models():
        kwargs = _infer_kwargs(arch, state)
        if kwargs is not None:
            return arch, kwargs
    return None


def _nearest_arch(state: dict[str, torch.Tensor]) -> str | None:
    from facekd.models.registry import list_models

    keys = set(state)
    best, best_score = None, 0.0
    for arch in list_models():
        names = {k for k, _ in _signature(arch)}
        score = len(names & keys) / len(names | keys)
        if score > best_score:
            best, best_score = arch, score
    return best if best_score > 0.5 else None


def mismatch_message(model: nn.Module, state: dict[str, torch.Tensor], arch: str,
                     path: str | os.PathLike) -> str | None:
    """One line naming the first missing / unexpected / wrongly shaped keys, or None."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    if not (missing or unexpected or shapes):
        return None
    parts = []
    if missing:
        parts.append(f"missing key '{missing[0]}' ({len(missing)} missing)")
    if unexpected:
        parts.append(f"unexpected key '{unexpected[0]}' ({len(unexpected)} unexpected)")
    if shapes:
        k = shapes[0]
        parts.append(f"'{k}' has shape {list(state[k].shape)}, {arch} expects "
                     f"{list(own[k].shape)}")
    guess = guess_arch(state)
    if guess is not None:
        name, kwargs = guess
        extra = f" with num_features={kwargs['num_features']}" if kwargs else ""
        hint = f"; its keys fit '{name}'{extra} (pass --arch {name})"
    else:
        near = _nearest_arch(state)
        hint = f"; nearest registered architecture: '{near}'" if near else ""
    return f"{path}: checkpoint does not fit '{arch}': {'; '.join(parts)}{hint}"


def load_state_into(model: nn.Module, state: dict[str, torch.Tensor], arch: str,
                    path: str | os.PathLike = "checkpoint") -> nn.Module:
    """Strict load that turns any key/shape mismatch into one clear CheckpointError."""
    message = mismatch_message(model, state, arch, path)
    if message:
        raise CheckpointError(message)
    model.load_state_dict(state, strict=True)
    return model


RUN_FOLDER_CHECKPOINTS = ("student.pt", "checkpoint_last.pt", "last.pt")  # in this order


def resolve_model_file(path: str | os.PathLike) -> Path:
    """A model argument as a file: a facekd run folder stands for its ``student.pt`` (or
    its last checkpoint), so every command that takes a model takes a run folder too."""
    path = Path(path)
    if path.is_dir():
        found = [path / name for name in RUN_FOLDER_CHECKPOINTS if (path / name).is_file()]
        if not found:
            names = " or ".join(RUN_FOLDER_CHECKPOINTS)
            raise CheckpointError(f"{path}: run folder has no {names}")
        return found[0]
    if not path.is_file():
        raise CheckpointError(f"{path}: no such model file or run folder")
    return path


def load_backbone(path: str | os.PathLike, arch: str | None = None, device=None,
                  **kwargs: Any) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a backbone from a facekd checkpoint or a plain (arcface_torch) state dict.

    ``arch`` is required only when it cannot be guessed from the keys. ``kwargs`` override
    the architecture kwargs (e.g. ``fp16``). Returns the model in eval mode and an info
    dict: arch, arch_kwargs, format, head, meta, path.
    """
    return backbone_from_object(read_checkpoint(path), path, arch, device, **kwargs)


def backbone_from_object(obj: Any, path: str | os.PathLike, arch: str | None = None,
                         device=None, **kwargs: Any) -> tuple[nn.Module, dict[str, Any]]:
    """:func:`load_backbone` on an already loaded checkpoint object (read once, use twice)."""
    from facekd.models.registry import create_model, list_models

    state = extract_state_dict(obj, path)
    if is_facekd_checkpoint(obj):
        fmt, stored_arch = "facekd", obj.get("arch")
        arch_kwargs = dict(obj.get("arch_kwargs") or {})
        if arch is not None and arch != stored_arch:
            raise CheckpointError(f"{path}: is a '{stored_arch}' checkpoint, not '{arch}'")
        arch = stored_arch
        head, meta = obj.get("head"), obj.get("meta") or {}
    else:
        fmt, head, meta = "state_dict", None, {}
        if arch is None:
            guess = guess_arch(state)
            if guess is None:
                near = _nearest_arch(state)
                hint = f" (nearest: '{near}')" if near else ""
                raise CheckpointError(f"{path}: cannot tell the architecture from its keys"
                                      f"{hint}; pass --arch")
            arch, arch_kwargs = guess
        else:
            arch_kwargs = _infer_kwargs(arch, state) if arch in list_models() else None
            arch_kwargs = arch_kwargs or {}
    arch_kwargs.update(kwargs)
    model = create_model(arch, **arch_kwargs)
    load_state_into(model, state, arch, path)
    model.eval()
    if device is not None:
        model.to(device)
    info = {"arch": arch, "arch_kwargs": arch_kwargs, "format": fmt, "head": head,
            "meta": meta, "path": str(path)}
    return model, info
