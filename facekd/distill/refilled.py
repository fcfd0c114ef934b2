"""REFILLED: relationship matching, then a local classifier from teacher class centres.

Ye, Lu, Zhan, "Generalized Knowledge Distillation via Relationship Matching" (TPAMI,
arXiv 2205.01915). Stage 1 matches the teacher's *relative* distances within grouped
tuples (an anchor-positive pair with all the batch's negatives); stage 2 turns teacher
class centres into a local classifier over the batch's classes and matches softmaxes.
Neither stage needs the teacher to know the student's identities: stage 1 uses only
distances and stage 2 only centres indexed by the student's labels (e.g. mean teacher
embeddings of the student's dataset from ``facekd teacher centres``). Both stages use
labelled rows only; stage 1 needs batches with several images per identity.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from facekd.distill.base import (
    DistillMethod,
    StudentOutput,
    TeacherOutput,
    register_method,
    zero_loss,
)
from facekd.distill.connectors import full_precision, kd_kl, scaled_cos, select_centres
from facekd.errors import ConfigError

_MASKED = -1e9  # finite "minus infinity": exp() is exactly 0 and 0 * log stays 0


@dataclass
class REFILLEDParams:
    """Defaults from the paper: tau1 = 4 (relations), tau2 = 2 (local classifier)."""

    stage: int | Literal["both"] = "both"
    tau1: float = 4.0
    tau2: float = 2.0
    logit_scale: float | None = None   # teacher local-classifier scale; None: teacher's s

    def validate(self, path: str = "") -> None:
        if self.stage not in (1, 2, "both"):
            raise ConfigError(f"{path}.stage must be 1, 2 or 'both', got {self.stage!r}")
        if self.tau1 <= 0 or self.tau2 <= 0:
            raise ConfigError(f"{path}.tau1 and tau2 must be positive")


def _distances(x: Tensor) -> Tensor:
    """Euclidean distances between L2-normalised rows (finite gradients at zero)."""
    with full_precision(x):
        x = F.normalize(x.float(), dim=1)
        return (2.0 - 2.0 * x @ x.t()).clamp_min(1e-12).sqrt()


def relation_loss(student_emb: Tensor, teacher_emb: Tensor, labels: Tensor,
                  tau: float) -> Tensor:
    """Mean over anchor-positive pairs of KL(teacher || student) tuple softmaxes.

    For pair (a, p) the tuple is p and every k with label != label[a]; its distribution
    is softmax([-d_ap, -d_ak ...] / tau) on each network's normalised embeddings.
    """
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(labels.numel(), dtype=torch.bool, device=labels.device)
    anchors, positives = (same & ~eye).nonzero(as_tuple=True)
    if anchors.numel() == 0:
        return zero_loss(student_emb)
    d_s = _distances(student_emb)[anchors]            # P x B
    d_t = _distances(teacher_emb.detach())[anchors]
    member = ~same[anchors]                           # the negatives of each anchor
    member[torch.arange(anchors.numel(), device=labels.device), positives] = True
    log_p_s = F.log_softmax((-d_s / tau).masked_fill(~member, _MASKED), dim=1)
    log_p_t = F.log_softmax((-d_t / tau).masked_fill(~member, _MASKED), dim=1)
    kl = torch.where(member, log_p_t.exp() * (log_p_t - log_p_s), torch.zeros_like(d_s))
    return kl.sum(dim=1).mean()


@register_method("refilled")
class REFILLED(DistillMethod):
    """Losses ``relation`` (stage 1) and ``local_kd`` (stage 2).

    ``local_kd`` is KL(softmax(t/tau2) || softmax(s/tau2)) over the batch's classes, with t
    the teacher's scaled cosine to the centres and s the student head's ``cos_logits`` on
    those classes. Default weights: relation 1000 (the authors' code) and local_kd 1, not
    their lambda = 100: they compare unscaled logits, and with ArcFace-scaled cosines the
    KL is orders of magnitude larger, so 100 drowns the CE (see recipes/refilled_*.yaml).
    """

    Params = REFILLEDParams
    needs_teacher = True
    needs_teacher_classifier = True
    default_weights: ClassVar[dict[str, float]] = {"relation": 1000.0, "local_kd": 1.0}

    def __init__(self, *, student_dim: int, teacher_dim: int | None, num_classes: int,
                 params: REFILLEDParams, student_feature_channels: list[int] | None = None,
                 ) -> None:
        super().__init__(student_dim=student_dim, teacher_dim=teacher_dim,
                         num_classes=num_classes, params=params,
                         student_feature_channels=student_feature_channels)
        self.needs_teacher_classifier = params.stage != 1

    @property
    def loss_names(self) -> list[str]:
        return {1: ["relation"], 2: ["local_kd"]}.get(self.params.stage,
                                                      ["relation", "local_kd"])

    def local_logits(self, student: StudentOutput, teacher: TeacherOutput,
                     labels: Tensor, rows: Tensor) -> tuple[Tensor, Tensor]:
        """(student, teacher) logits of ``rows`` over the sorted classes in ``labels[rows]``."""
        classes = torch.unique(labels[rows])
        if student.head is None:
            raise ConfigError("method 'refilled' stage 2 needs the student's margin head")
        if int(classes.max()) >= teacher.centres.shape[0]:
            raise ConfigError(f"method 'refilled': label {int(classes.max())} has no teacher "
                              f"centre (the centres file has {teacher.centres.shape[0]} rows)")
        scale = self.params.logit_scale or float(teacher.scale)
        centres = select_centres(teacher.centres, classes.to(teacher.centres.device))
        teacher_logits = scaled_cos(teacher.embedding.detach()[rows], centres.to(rows.device),
                                    scale)
        student_logits = student.head.cos_logits(student.embedding[rows], classes)
        return student_logits, teacher_logits

    def forward(self, student: StudentOutput, teacher: TeacherOutput | None,
                labels: Tensor) -> dict[str, Tensor]:
        labels = labels.long()  # loaders may hand int32
        stage = self.params.stage
        teacher = self._require_teacher(teacher, centres=stage != 1)
        rows = (labels >= 0).nonzero(as_tuple=True)[0]
        out: dict[str, Tensor] = {}
        if stage in (1, "both"):
            out["relation"] = relation_loss(student.embedding[rows], teacher.embedding[rows],
                                            labels[rows], self.params.tau1)
        if stage in (2, "both"):
            if rows.numel() == 0:
                out["local_kd"] = zero_loss(student.embedding)
            else:
                s_logits, t_logits = self.local_logits(student, teacher, labels, rows)
                out["local_kd"] = kd_kl(s_logits, t_logits, self.params.tau2,
                                        scale_by_t2=False)
        return out
