"""Margin heads: ArcFace, CosFace, the combined (m1, m2, m3) margin, normalised softmax.

The target logit is ``s * (cos(m1 * theta + m2) - m3)`` as in arcface_torch's
``CombinedMarginLoss``; every other logit is ``s * cos(theta)``. Rows labelled -1 get no
margin. When ``m1 * theta + m2`` would pass pi, ``cos`` turns back up and would *reward*
a worse angle, so the target logit falls back to a monotone continuation instead:
``cos(theta) - m2 * sin(m2) - m3`` for m1 = 1 (insightface's ArcFace rule), and the
continuous shift ``cos(theta) - (1 + cos(theta_0)) - m3`` with ``theta_0 = (pi - m2) / m1``
otherwise. The distillation methods need the margin-free ``s * cos`` (``cos_logits``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from facekd.errors import CheckpointError, ConfigError

HEAD_KINDS = ("arcface", "cosface", "combined", "softmax")
# The margin each kind gets when none is given (arcface_torch's configs: ArcFace m2 = 0.5,
# CosFace m3 = 0.4), so a CosFace head never inherits ArcFace's angle.
DEFAULT_MARGIN = {"arcface": 0.5, "cosface": 0.4}


def resolve_margins(kind: str, margin: float | None = None, m1: float | None = None,
                    m2: float | None = None, m3: float | None = None
                    ) -> tuple[float, float, float]:
    """(m1, m2, m3) for a head kind; ``margin`` is m2 for ArcFace and m3 for CosFace
    (None: :data:`DEFAULT_MARGIN`); m1/m2/m3 are read for ``combined`` only."""
    if kind in DEFAULT_MARGIN:
        value = DEFAULT_MARGIN[kind] if margin is None else float(margin)
        return (1.0, value, 0.0) if kind == "arcface" else (1.0, 0.0, value)
    if kind == "combined":
        return (1.0 if m1 is None else float(m1), 0.0 if m2 is None else float(m2),
                0.0 if m3 is None else float(m3))
    if kind == "softmax":
        return 1.0, 0.0, 0.0
    raise ConfigError(f"unknown head kind '{kind}'; known: {', '.join(HEAD_KINDS)}")


def apply_margin(cos: torch.Tensor, labels: torch.Tensor, m1: float = 1.0, m2: float = 0.0,
                 m3: float = 0.0) -> torch.Tensor:
    """``cos`` (B x C, in [-1, 1]) with the margin on each row's target column.

    ``labels`` index columns of ``cos``; -1 leaves the row unchanged. Differentiable.
    """
    if m1 == 1.0 and m2 == 0.0 and m3 == 0.0:
        return cos
    rows = torch.nonzero(labels >= 0, as_tuple=True)[0]
    if rows.numel() == 0:
        return cos
    cols = labels[rows]
    target = cos[rows, cols]
    if m1 == 1.0 and m2 == 0.0:
        final = target - m3
    elif m1 == 1.0:
        sin = torch.sqrt(torch.clamp(1.0 - target * target, min=1e-7))
        with_margin = target * math.cos(m2) - sin * math.sin(m2) - m3
        fallback = target - m2 * math.sin(m2) - m3
        final = torch.where(target > math.cos(math.pi - m2), with_margin, fallback)
    else:
        theta = torch.acos(torch.clamp(target, -1.0 + 1e-7, 1.0 - 1e-7))
        theta0 = (math.pi - m2) / m1
        with_margin = torch.cos(m1 * theta + m2) - m3
        fallback = target - (1.0 + math.cos(theta0)) - m3
        final = torch.where(theta <= theta0, with_margin, fallback)
    out = cos.clone()
    out[rows, cols] = final.to(out.dtype)
    return out


class MarginHead(nn.Module):
    """Class-centre matrix ``weight`` (C x D) and a margin; logits come out scaled by ``s``."""

    def __init__(self, embedding_size: int, num_classes: int, scale: float = 64.0,
                 m1: float = 1.0, m2: float = 0.0, m3: float = 0.0, kind: str = "combined"):
        super().__init__()
        self.kind = kind
        self.embedding_size, self.num_classes = int(embedding_size), int(num_classes)
        self.scale, self.m1, self.m2, self.m3 = float(scale), float(m1), float(m2), float(m3)
        self.weight = nn.Parameter(torch.normal(0, 0.01, (self.num_classes,
                                                          self.embedding_size)))

    def centres(self) -> torch.Tensor:
        """L2-normalised class centres (C x D)."""
        return F.normalize(self.weight.float(), dim=1)

    def cos(self, embeddings: torch.Tensor, class_idx: torch.Tensor | None = None) -> torch.Tensor:
        centres = self.centres() if class_idx is None else self.centres()[class_idx]
        return F.linear(F.normalize(embeddings.float(), dim=1), centres).clamp(-1.0, 1.0)

    def cos_logits(self, embeddings: torch.Tensor,
                   class_idx: torch.Tensor | None = None) -> torch.Tensor:
        """Margin-free ``s * cos`` over all classes or the subset ``class_idx``."""
        return self.scale * self.cos(embeddings, class_idx)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Logits with the margin on labelled rows (feed them to cross-entropy)."""
        cos = apply_margin(self.cos(embeddings), labels, self.m1, self.m2, self.m3)
        return self.scale * cos

    def config(self) -> dict[str, Any]:
        return {"kind": self.kind, "embedding_size": self.embedding_size,
                "num_classes": self.num_classes, "scale": self.scale,
                "m1": self.m1, "m2": self.m2, "m3": self.m3}

    def export_state(self) -> dict[str, Any]:
        """What a facekd checkpoint stores under ``"head"``."""
        return {"type": "margin_head", "config": self.config(),
                "weight": self.weight.detach().float().cpu().clone()}

    def extra_repr(self) -> str:
        return (f"kind={self.kind}, {self.num_classes} classes x {self.embedding_size}, "
                f"s={self.scale}, m=({self.m1}, {self.m2}, {self.m3})")


def create_head(kind: str, embedding_size: int, num_classes: int, scale: float = 64.0,
                margin: float | None = None, m1: float | None = None, m2: float | None = None,
                m3: float | None = None) -> MarginHead:
    """A margin head: ``arcface`` (m2 = margin, default 0.5), ``cosface`` (m3 = margin,
    default 0.4), ``combined`` (m1, m2, m3 as given), ``softmax`` (no margin)."""
    m1, m2, m3 = resolve_margins(kind, margin, m1, m2, m3)
    return MarginHead(embedding_size, num_classes, scale, m1, m2, m3, kind=kind)


def head_from_state(state: dict[str, Any], source: str = "checkpoint") -> MarginHead:
    """Rebuild a full-matrix head from ``export_state()`` of a MarginHead or PartialFC."""
    try:
        cfg, weight = state["config"], state["weight"]
        head = MarginHead(cfg["embedding_size"], cfg["num_classes"], cfg.get("scale", 64.0),
                          cfg.get("m1", 1.0), cfg.get("m2", 0.0), cfg.get("m3", 0.0),
                          kind=cfg.get("kind", "combined"))
    except (KeyError, TypeError) as exc:
        raise CheckpointError(f"{source}: head entry lacks {exc}") from exc
    if tuple(weight.shape) != (head.num_classes, head.embedding_size):
        raise CheckpointError(f"{source}: head weight has shape {list(weight.shape)}, config "
                              f"says {[head.num_classes, head.embedding_size]}")
    with torch.no_grad():
        head.weight.copy_(weight)
    return head
