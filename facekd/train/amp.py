"""Mixed precision and the sync-free optimiser step of the training loop.

arcface_torch users train in fp16 with a GradScaler; bf16 (Ampere and newer) needs no
scaler. Either way a non-finite loss must skip the step and be counted, and on a GPU that
decision must not cost a host read per step (``if not torch.isfinite(loss)`` waits for
the whole step to finish). The check here stays on the device: a 0-d flag, handed to a
*fused* optimiser (``found_inf``, the mechanism GradScaler itself uses), which skips the
update inside its kernel; the flag is summed into a device counter that the loop reads
on logging steps only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from facekd.errors import ConfigError

AMP_CHOICES = ("fp16", "bf16", "none")


@dataclass(frozen=True)
class AmpMode:
    """What ``run.amp`` means on this device."""

    dtype: torch.dtype | None      # autocast dtype; None: full fp32
    scaler: bool                   # a GradScaler (fp16 only)
    name: str                      # "fp16", "bf16" or "none", for logs and summary.json

    @property
    def enabled(self) -> bool:
        return self.dtype is not None

    def autocast(self, device: torch.device) -> Any:
        import contextlib

        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.dtype)


def resolve_amp(choice: bool | str, device: torch.device,
                bf16_supported: bool | None = None) -> AmpMode:
    """``run.amp`` -> :class:`AmpMode`. ``true`` is fp16 (arcface_torch's default).

    fp16 applies on CUDA only (on CPU it is slower than fp32 and torch's CPU autocast is
    bf16); bf16 applies on CUDA GPUs that support it and on CPU, where it is what the
    user asked for explicitly.
    """
    name = {True: "fp16", False: "none"}.get(choice, choice) if isinstance(choice, bool) \
        else str(choice).lower()
    if name not in AMP_CHOICES:
        raise ConfigError(f"run.amp: expected true, false, fp16, bf16 or none, got {choice!r}")
    if name == "fp16" and device.type == "cuda":
        return AmpMode(torch.float16, True, "fp16")
    if name == "bf16" and device.type == "cuda":
        if bf16_supported is None:
            bf16_supported = torch.cuda.is_bf16_supported()
        if not bf16_supported:
            raise ConfigError(f"run.amp: bf16 needs a GPU with bfloat16 support (Ampere or "
                              f"newer); {device} has none: use run.amp=fp16")
        return AmpMode(torch.bfloat16, False, "bf16")
    if name == "bf16" and device.type == "cpu":
        return AmpMode(torch.bfloat16, False, "bf16")
    return AmpMode(None, False, "none")


def nonfinite_flag(loss: torch.Tensor, grads: list[torch.Tensor]) -> torch.Tensor:
    """1.0 when the loss or any gradient is inf/NaN, else 0.0: a 0-d float32 on the loss's
    device, computed without a host read (one fused norm per device group)."""
    bad = ~torch.isfinite(loss.detach().float())
    if grads:
        norms = torch._foreach_norm(grads)
        total = torch.stack([n.to(loss.device, torch.float32) for n in norms]).sum()
        bad = bad | ~torch.isfinite(total)
    return bad.to(torch.float32)


def supports_found_inf(optimizer: torch.optim.Optimizer) -> bool:
    """Fused optimisers take a device-side ``found_inf`` and skip their update in-kernel."""
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False))


def prepare_fused(optimizer: torch.optim.Optimizer) -> None:
    """Zero SGD momentum buffers up front for a fused optimiser.

    torch's fused SGD creates the buffer with ``empty_like`` on the first step and fills it
    inside the kernel; a first step skipped by ``found_inf`` leaves it uninitialised memory
    (seen here: -8e37). A zero buffer gives the same first update (``0 * m + g = g``, no
    dampening) and a well-defined skip.
    """
    if not isinstance(optimizer, torch.optim.SGD):
        return
    for group in optimizer.param_groups:
        if group.get("momentum", 0) and group.get("fused"):
            for p in group["params"]:
                state = optimizer.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)


def step_unless(optimizer: torch.optim.Optimizer, found_inf: torch.Tensor) -> None:
    """``optimizer.step()`` unless ``found_inf`` is set; no host read with a fused optimiser
    (a non-fused one reads the flag: free on CPU, one sync per step on a GPU)."""
    if supports_found_inf(optimizer):
        optimizer.grad_scale = None   # type: ignore[attr-defined]  # grads already unscaled
        optimizer.found_inf = found_inf  # type: ignore[attr-defined]
        try:
            optimizer.step()
        finally:
            del optimizer.grad_scale  # type: ignore[attr-defined]
            del optimizer.found_inf   # type: ignore[attr-defined]
        return
    if not bool(found_inf):
        optimizer.step()
