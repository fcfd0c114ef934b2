"""Same command, same seed, same machine -> the same bits: the process settings a run needs.

Seeding alone is not enough. torch sizes its CPU thread pool from the machine's core
count, and the split of a convolution's reductions over threads changes the float sums,
so one recipe trained on a 2-core and an 8-core host drifts apart within a few steps;
on CUDA, cuDNN's autotuner and atomics-based kernels pick different reductions from run
to run. A run therefore fixes its thread count (``run.threads``) and asks for
deterministic kernels (``run.deterministic``); both are recorded in ``summary.json`` and
restored when the run ends, since they are process-global.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class _Saved:
    threads: int
    deterministic: bool
    warn_only: bool
    cudnn_deterministic: bool
    cudnn_benchmark: bool


def apply(device: torch.device, threads: int, deterministic: bool) -> tuple[dict[str, Any], _Saved]:
    """Fix the thread count (``threads > 0``) and deterministic kernels; returns
    (what was set, for the run summary) and the previous settings for :func:`restore`."""
    saved = _Saved(torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(),
                   torch.is_deterministic_algorithms_warn_only_enabled(),
                   torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    if threads > 0:
        torch.set_num_threads(threads)
    if deterministic:
        if device.type == "cuda":
            # cuBLAS is deterministic only with a fixed workspace (set before its first use)
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        # warn_only: an op without a deterministic kernel warns instead of stopping a run
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    settings = {"threads": torch.get_num_threads(), "deterministic": bool(deterministic)}
    return settings, saved


def restore(saved: _Saved) -> None:
    """Put back the process settings :func:`apply` changed."""
    torch.set_num_threads(saved.threads)
    torch.use_deterministic_algorithms(saved.deterministic, warn_only=saved.warn_only)
    torch.backends.cudnn.deterministic = saved.cudnn_deterministic
    torch.backends.cudnn.benchmark = saved.cudnn_benchmark
