"""Resume state of a training run: one file per checkpoint, written atomically.

A training checkpoint holds everything needed to continue bit-for-bit after a kill:
student, head (the full class-centre matrix, never per-rank shards, so a run can resume
at another world size; its optimiser slots are merged the same way), method (connectors,
self-teacher), optimiser, schedule, loader position, RNG states of every rank and the
step counter. Loading uses ``torch.load(weights_only=True, mmap=True)``: RNG states are
stored as tensors and plain tuples.
"""

from __future__ import annotations

import logging
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from facekd.errors import CheckpointError
from facekd.fileio import atomic_path

log = logging.getLogger(__name__)

STATE_FORMAT = "facekd-train-state"
STATE_VERSION = 1
_NAME = re.compile(r"^step-(\d{8,})\.pt$")


def _cuda_index(device: Any) -> int | None:
    """The CUDA device index a run trains on, or None for CPU (and other) devices."""
    if device is None:
        return None
    device = torch.device(device)
    if device.type != "cuda":
        return None
    return device.index if device.index is not None else torch.cuda.current_device()


def capture_rng(device: Any = None) -> dict[str, Any]:
    """Python, NumPy, torch and the training GPU's RNG states, weights_only-loadable.

    Only ``device``'s CUDA generator is saved: ``torch.cuda.get_rng_state_all()`` would
    open a CUDA context on every visible GPU from every rank (8 ranks -> 8 contexts per
    GPU), and a rank only ever draws from its own GPU.
    """
    kind, mt, pos, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "mt": torch.from_numpy(np.asarray(mt, dtype=np.int64)),
                  "pos": int(pos), "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "torch": torch.get_rng_state(),
    }
    index = _cuda_index(device)
    if index is not None:
        state["cuda"] = torch.cuda.get_rng_state(index)
    return state


def _host_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """An RNG state as the CPU ByteTensor torch's setters demand, wherever it was loaded."""
    return tensor.detach().to("cpu", torch.uint8)


def restore_rng(state: dict[str, Any], device: Any = None) -> None:
    """Inverse of :func:`capture_rng`; the CUDA state goes to ``device``'s generator only."""
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    npst = state["numpy"]
    mt = npst["mt"].detach().cpu().numpy().astype(np.uint32)
    np.random.set_state((npst["kind"], mt, npst["pos"], npst["has_gauss"], npst["gauss"]))
    torch.set_rng_state(_host_bytes(state["torch"]))
    index = _cuda_index(device)
    saved = state.get("cuda")
    if index is None or saved is None:
        return
    if isinstance(saved, (list, tuple)):  # older checkpoints: every visible GPU's state
        if index >= len(saved):
            log.warning("checkpoint has no CUDA RNG state for GPU %d; it restarts", index)
            return
        saved = saved[index]
    torch.cuda.set_rng_state(_host_bytes(saved), index)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices) from one integer."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Training checkpoints of a run, oldest first."""
    folder = checkpoint_dir(run_dir)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def save_state(run_dir: str | Path, step: int, state: dict[str, Any], keep: int = 2) -> Path:
    """Write ``checkpoints/step-XXXXXXXX.pt`` atomically; keep only the newest ``keep``."""
    path = checkpoint_dir(run_dir) / f"step-{step:08d}.pt"
    payload = {"format": STATE_FORMAT, "version": STATE_VERSION, "step": step, **state}
    with atomic_path(path, suffix=".pt") as tmp, open(tmp, "wb") as f:
        torch.save(payload, f)  # a file object: a full disk is an OSError, not a RuntimeError
    if keep > 0:
        for old in list_checkpoints(run_dir)[:-keep]:
            old.unlink(missing_ok=True)
    return path


def _load_mapped(path: Path) -> Any:
    """``torch.load`` memory-mapped: every rank of a node opens the same file, and a rank
    copies only its own Partial FC rows out of the merged matrix (2.06M x 512 classes:
    4.2 GB per tensor), so the pages are read once into the shared page cache instead of
    once per rank into private memory. Files torch cannot map load the plain way."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as exc:
        if "mmap" not in str(exc):
            raise
        return torch.load(path, map_location="cpu", weights_only=True)


def load_state(path: str | Path) -> dict[str, Any]:
    """Read a training checkpoint safely (weights_only) and check its format.

    Always to the host, whatever the training device: its RNG states must be CPU tensors
    (``torch.set_rng_state``, ``.numpy()``), and ``load_state_dict`` copies weights into
    modules that already live on the device. The tensors are memory-mapped (read-only
    use: copy before changing one in place).
    """
    path = Path(path)
    try:
        state = _load_mapped(path)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such checkpoint") from None
    except Exception as exc:  # truncated file, foreign pickle, ...
        raise CheckpointError(f"{path}: cannot load training checkpoint "
                              f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"{path}: not a facekd training checkpoint (format {found!r})")
    if state.get("version") != STATE_VERSION:
        raise CheckpointError(f"{path}: training checkpoint version {state.get('version')} "
                              f"is not supported (expected {STATE_VERSION})")
    return state
