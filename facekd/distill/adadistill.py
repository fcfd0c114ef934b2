"""AdaDistill: ArcFace against class centres pulled toward the teacher with an adaptive momentum.

Boutros, Štruc, Damer, "AdaDistill: Adaptive Knowledge Distillation for Deep Face
Recognition" (ECCV 2024); authors' code fdbtrs/AdaDistill (``utils/losses.py``
``AdaptiveAArcFace``, ``train/train_AdaDistill.py``). The margin head's class centres are
not learned by gradient: before each step, for every labelled row i of class y,

    alpha_i = clamp(cos(s_i, t_i) * clamp(cos(W_y, t_i), 1e-6, 1), 1e-6, 1)
    W_y    <- alpha_i * W_y + (1 - alpha_i) * t_i                 (s, t L2-normalised)

so a class centre follows the teacher's embeddings quickly while the student is far
from the teacher and slowly once it is close. The student then trains with ArcFace
(s = 64, m = 0.45 in the authors' config) on those centres; the loss is the student's
only classification loss, so the trainer's own head CE is off (``ce`` weight 0).

As in the authors' code: centres start N(0, 0.01) (the official kernel init) and are
never normalised in place (only for the logits), the update uses the pre-step centres
of the batch, gradients never reach them (they are a buffer here; the official keeps a
Parameter outside the optimiser). Where facekd differs, and why:

- duplicate labels in a batch: the official ``kernel[:, label] = ...`` keeps one row's
  update, which one depending on the device; here the last row's, on every device, so
  runs are deterministic (same rule as the official on CPU);
- student and teacher embedding sizes may differ (synthetic benchmark: 128 vs 256): then
  a linear + BN connector maps the student into the teacher's space (trained with the
  student, dropped at export), as SRD's; the authors' student and teacher are both
  512-d and need none (``connector: auto`` uses none when the sizes agree);
- under DDP each rank updates its copy from its own rows, as the official does (its
  kernel is not synchronised either); single-process runs are unaffected.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from facekd.distill.base import (
    DistillMethod,
    StudentOutput,
    TeacherOutput,
    register_method,
    zero_loss,
)
from facekd.distill.connectors import EmbeddingConnector, add_arc_margin, full_precision
from facekd.errors import ConfigError


@dataclass
class AdaDistillParams:
    """Defaults from the authors' config: ArcFace s = 64, m = 0.45, adaptive alpha."""

    scale: float = 64.0
    margin: float = 0.45
    # auto: none when sizes agree; embedding: linear + BN always (the name SRD and
    # feature use for it; the old spelling ``linear`` still loads)
    connector: Literal["auto", "embedding"] = "auto"

    old_values: ClassVar[dict[str, dict[Any, Any]]] = {"connector": {"linear": "embedding"}}

    def validate(self, path: str = "") -> None:
        if self.scale <= 0 or not 0.0 <= self.margin < 3.14159:
            raise ConfigError(f"{path}: scale must be positive and margin in [0, pi)")


def adaptive_alpha(student: Tensor, teacher: Tensor, centres: Tensor) -> Tensor:
    """Per row: clamp(cos(s, t) * clamp(cos(W_y, t), 1e-6, 1), 1e-6, 1)."""
    cos_st = F.cosine_similarity(student, teacher, dim=1).clamp(-1.0, 1.0)
    lam = F.cosine_similarity(centres, teacher, dim=1).clamp(1e-6, 1.0)
    return (cos_st * lam).clamp(1e-6, 1.0)


def _last_occurrence(labels: Tensor) -> Tensor:
    """Row indices keeping only the last row of each label (deterministic scatter)."""
    n = labels.numel()
    order = torch.arange(n, device=labels.device)
    last = torch.full((int(labels.max()) + 1,), -1, dtype=torch.long, device=labels.device)
    last.scatter_reduce_(0, labels, order, reduce="amax")
    return last[labels].eq(order).nonzero(as_tuple=True)[0]


@register_method("adadistill")
class AdaDistill(DistillMethod):
    """Loss ``adadistill``: ArcFace CE of the student against the adaptive centres.

    Default weights: adadistill 1 and the trainer's ``ce`` 0 (this loss replaces the
    student head's CE, as in the authors' training script).
    """

    Params = AdaDistillParams
    needs_teacher = True
    needs_teacher_classifier = False
    default_weights: ClassVar[dict[str, float]] = {"adadistill": 1.0, "ce": 0.0}

    def __init__(self, *, student_dim: int, teacher_dim: int | None, num_classes: int,
                 params: AdaDistillParams, student_feature_channels: list[int] | None = None,
                 ) -> None:
        super().__init__(student_dim=student_dim, teacher_dim=teacher_dim,
                         num_classes=num_classes, params=params,
                         student_feature_channels=student_feature_channels)
        if teacher_dim is None:
            raise ConfigError("method 'adadistill' needs the teacher's embedding size")
        if params.connector == "embedding" or student_dim != teacher_dim:
            self.connector: nn.Module = EmbeddingConnector(student_dim, teacher_dim)
        else:
            self.connector = nn.Identity()
        self.register_buffer("centres", torch.normal(0.0, 0.01, (num_classes, teacher_dim)))

    @property
    def loss_names(self) -> list[str]:
        return ["adadistill"]

    @torch.no_grad()
    def update_centres(self, student: Tensor, teacher: Tensor, labels: Tensor) -> Tensor:
        """Pull each batch class's centre toward its rows' teacher embeddings; the alphas."""
        current = self.centres[labels]
        alpha = adaptive_alpha(student, teacher, current)[:, None]
        moved = alpha * current + (1.0 - alpha) * teacher
        keep = _last_occurrence(labels)
        self.centres[labels[keep]] = moved[keep].to(self.centres.dtype)
        return alpha.squeeze(1)

    def forward(self, student: StudentOutput, teacher: TeacherOutput | None,
                labels: Tensor) -> dict[str, Tensor]:
        labels = labels.long()  # loaders may hand int32
        teacher = self._require_teacher(teacher)
        rows = (labels >= 0).nonzero(as_tuple=True)[0]
        if rows.numel() == 0:
            return {"adadistill": zero_loss(student.embedding)}
        if int(labels[rows].max()) >= self.num_classes:
            raise ConfigError(f"method 'adadistill': label {int(labels[rows].max())} is "
                              f"outside the {self.num_classes} classes")
        y = labels[rows]
        with full_precision(student.embedding):
            s = F.normalize(self.connector(student.embedding[rows]).float(), dim=1)
            t = F.normalize(teacher.embedding.detach()[rows].float(), dim=1)
            if self.training:
                self.update_centres(s.detach(), t, y)
            cos = (s @ F.normalize(self.centres.float(), dim=1).t()).clamp(-1.0, 1.0)
            scale = float(self.params.scale)
            logits = add_arc_margin(scale * cos, y, torch.arange(y.numel(), device=y.device),
                                    scale, self.params.margin)
            return {"adadistill": F.cross_entropy(logits, y)}
