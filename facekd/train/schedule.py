"""Learning-rate schedules stepped per optimiser step: linear warm-up, then poly/cosine decay.

arcface_torch steps its ``PolyScheduler`` every iteration (not every epoch); stepping per
step keeps the curve identical when the world size (and so the steps per epoch) changes on
resume, because it is a pure function of the global step.
"""

from __future__ import annotations

import math

import torch


def lr_factor(step: int, total_steps: int, warmup_steps: int, kind: str,
              power: float = 2.0, min_factor: float = 0.0) -> float:
    """Multiplier of the base lr at ``step`` (0-based), in [0, 1]."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if kind == "constant":
        return 1.0
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, max(0.0, (step - warmup_steps) / decay_steps))
    if kind == "poly":
        factor = (1.0 - progress) ** power
    elif kind == "cosine":
        factor = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        raise ValueError(f"unknown schedule {kind!r}")
    return min_factor + (1.0 - min_factor) * factor


class StepSchedule:
    """Sets every param group's lr to ``base_lr * lr_factor(step)``; resumable by state."""

    def __init__(self, optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int,
                 kind: str, power: float = 2.0, min_factor: float = 0.0) -> None:
        self.optimizer = optimizer
        self.total_steps = total_steps
        self.warmup_steps = warmup_steps
        self.kind = kind
        self.power = power
        self.min_factor = min_factor
        self.base_lrs = [group.get("initial_lr", group["lr"]) for group in optimizer.param_groups]
        for group, base in zip(optimizer.param_groups, self.base_lrs, strict=True):
            group["initial_lr"] = base
        self.step_index = 0
        self._apply()

    def _apply(self) -> None:
        factor = lr_factor(self.step_index, self.total_steps, self.warmup_steps, self.kind,
                           self.power, self.min_factor)
        for group, base in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
            group["lr"] = base * factor

    def step(self) -> None:
        self.step_index += 1
        self._apply()

    def get_last_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        return {"step_index": self.step_index, "total_steps": self.total_steps,
                "warmup_steps": self.warmup_steps, "kind": self.kind}

    def load_state_dict(self, state: dict) -> None:
        # total/warm-up come from the recipe (they may change with the world size); the
        # step index is what defines the position on the curve.
        self.step_index = int(state["step_index"])
        self._apply()
