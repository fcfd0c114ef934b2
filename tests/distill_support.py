"""Shared stand-ins for the distillation tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class CosHead(nn.Module):
    """Stand-in for a margin head: only ``cos_logits`` (s * cos over a class subset)."""

    def __init__(self, num_classes: int, dim: int, scale: float = 64.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num_classes, dim))
        self.scale = scale

    def cos_logits(self, emb, class_idx=None):
        w = self.weight if class_idx is None else self.weight[class_idx]
        return self.scale * F.normalize(emb, dim=1) @ F.normalize(w, dim=1).t()


class SpyHead:
    """Wraps a head and records whether a method read any of it (``read``)."""

    def __init__(self, inner) -> None:
        self.inner, self.read = inner, False

    def __getattr__(self, name):
        self.read = True
        return getattr(self.inner, name)
