"""The one device picker: every stage turns a user's ``--device`` / ``run.device`` into a
``torch.device`` here, so ``auto``, ``cpu``, ``cuda`` and ``cuda:N`` mean the same thing in
training, caching, evaluation and export, and asking for a GPU that is not there is one
clear line (exit 2), not a CUDA traceback from deep inside a model move.
"""

from __future__ import annotations

from typing import Any

from facekd.errors import FacekdError

CHOICES = "auto, cpu, cuda or cuda:N"


def _cuda_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def pick_device(choice: Any = None, local_rank: int = 0, *, option: str = "device") -> Any:
    """``auto``/None -> the local rank's GPU when CUDA is present, else CPU.

    ``cuda`` means the local rank's GPU (``cuda:local_rank``, what torchrun expects);
    ``cuda:N`` that GPU exactly. ``option`` names the setting in the error message
    (``run.device``, ``--device``).
    """
    import torch

    if isinstance(choice, torch.device):
        choice = str(choice)
    text = "auto" if choice is None else str(choice).strip().lower()
    if text == "cpu":
        return torch.device("cpu")
    count = _cuda_count()
    if text == "auto":
        return torch.device(f"cuda:{local_rank % count}") if count else torch.device("cpu")
    if text != "cuda" and not text.startswith("cuda:"):
        raise FacekdError(f"{option}: expected {CHOICES}, got {choice!r}")
    if not count:
        raise FacekdError(f"{option}: '{choice}' requested but CUDA is not available on this "
                          "machine (no GPU or driver); use cpu or auto")
    if text == "cuda":
        index = local_rank
    else:
        raw = text.split(":", 1)[1]
        if not raw.isdigit():
            raise FacekdError(f"{option}: expected {CHOICES}, got {choice!r}")
        index = int(raw)
    if index >= count:
        raise FacekdError(f"{option}: '{choice}' asks for GPU {index} but this machine has "
                          f"{count} (cuda:0..cuda:{count - 1})")
    return torch.device(f"cuda:{index}")
