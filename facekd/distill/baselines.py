"""The baselines users compare SRD against: KD, feature matching, RKD and the student alone."""

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
)
from facekd.distill.connectors import (
    EmbeddingConnector,
    full_precision,
    kd_kl,
    sample_classes,
    scaled_cos,
    select_centres,
)
from facekd.errors import ConfigError


@dataclass
class NoneParams:
    """The student alone takes no parameters."""


@register_method("none")
class NoDistillation(DistillMethod):
    """The student alone: no distillation terms; the trainer's ``ce`` is the whole loss."""

    Params = NoneParams
    needs_teacher = False
    default_weights: ClassVar[dict[str, float]] = {}

    def forward(self, student: StudentOutput, teacher: TeacherOutput | None,
                labels: Tensor) -> dict[str, Tensor]:
        return {}


@dataclass
class KDParams:
    """Hinton KD over the margin-free cosine logits of both heads."""

    temperature: float = 4.0
    num_negatives: int | None = None   # None: all classes; else positives + sampled negatives

    def validate(self, path: str = "") -> None:
        if self.temperature <= 0:
            raise ConfigError(f"{path}.temperature must be positive, got {self.temperature}")
        if self.num_negatives is not None and self.num_negatives < 0:
            raise ConfigError(f"{path}.num_negatives must be >= 0 or null")


@register_method("kd")
class KD(DistillMethod):
    """Loss ``kd`` = KL(softmax(z_t/T) || softmax(z_s/T)) * T^2 (default weight 1).

    z_s is the student head's ``cos_logits`` and z_t the teacher's ``s * cos`` with its
    class centres, over the same classes, so both networks must share one identity list.
    Every row takes part, labelled or not.
    """

    Params = KDParams
    needs_teacher = True
    needs_teacher_classifier = True
    default_weights: ClassVar[dict[str, float]] = {"kd": 1.0}

    @classmethod
    def reads_student_head(cls, params: KDParams) -> bool:
        return True

    def forward(self, student: StudentOutput, teacher: TeacherOutput | None,
                labels: Tensor) -> dict[str, Tensor]:
        teacher = self._require_teacher(teacher, centres=True)
        if student.head is None:
            raise ConfigError("method 'kd' needs the student's margin head")
        if teacher.centres.shape[0] != self.num_classes:
            raise ConfigError(f"method 'kd': the teacher has {teacher.centres.shape[0]} "
                              f"classes but the student head has {self.num_classes}; "
                              "KD needs one identity list (use srd or refilled instead)")
        class_idx = sample_classes(labels, self.num_classes, self.params.num_negatives,
                                   device=teacher.centres.device)
        teacher_logits = scaled_cos(teacher.embedding.detach(),
                                    select_centres(teacher.centres, class_idx),
                                    float(teacher.scale))
        student_logits = student.head.cos_logits(student.embedding, class_idx)
        return {"kd": kd_kl(student_logits, teacher_logits, self.params.temperature)}


@dataclass
class FeatureParams:
    """FitNet-style embedding matching; cosine is what users try first.

    Keys spelt as SRD's: ``feature_loss`` (was ``loss``) and ``connector`` by name
    (``embedding``: linear + BN to the teacher's size; ``none``: equal sizes only; was
    ``true`` / ``false``). The old spellings still load, with a deprecation note.
    """

    feature_loss: Literal["cosine", "mse"] = "cosine"
    connector: Literal["embedding", "none"] = "embedding"

    old_keys: ClassVar[dict[str, str]] = {"loss": "feature_loss"}
    old_values: ClassVar[dict[str, dict[Any, Any]]] = {
        "connector": {True: "embedding", False: "none"}}


@register_method("feature")
class FeatureMatch(DistillMethod):
    """Loss ``feature`` = mean(1 - cos(connector(f_s), f_t)) or their MSE (default weight 1)."""

    Params = FeatureParams
    needs_teacher = True
    default_weights: ClassVar[dict[str, float]] = {"feature": 1.0}

    def __init__(self, *, student_dim: int, teacher_dim: int | None, num_classes: int,
                 params: FeatureParams, student_feature_channels: list[int] | None = None,
                 ) -> None:
        super().__init__(student_dim=student_dim, teacher_dim=teacher_dim,
                         num_classes=num_classes, params=params,
                         student_feature_channels=student_feature_channels)
        if teacher_dim is None:
            raise ConfigError("method 'feature' needs the teacher's embedding size")
        if params.connector == "embedding":
            self.connector: nn.Module = EmbeddingConnector(student_dim, teacher_dim)
        elif student_dim != teacher_dim:
            raise ConfigError(f"method.params.connector: none needs equal embedding sizes, "
                              f"student {student_dim} vs teacher {teacher_dim}")
        else:
            self.connector = nn.Identity()

    def forward(self, student: StudentOutput, teacher: TeacherOutput | None,
                labels: Tensor) -> dict[str, Tensor]:
        teacher = self._require_teacher(teacher)
        mapped = self.connector(student.embedding).float()
        target = teacher.embedding.detach().float()
        if self.params.feature_loss == "mse":
            return {"feature": F.mse_loss(mapped, target)}
        return {"feature": (1.0 - F.cosine_similarity(mapped, target, dim=1)).mean()}


@dataclass
class RKDParams:
    """Relational KD; embeddings L2-normalised first (faces are compared by cosine)."""

    normalise: bool = True


def _pairwise_distance(x: Tensor, eps: float = 1e-12) -> Tensor:
    """Euclidean distances with a zero diagonal and finite gradients everywhere."""
    sq = x.pow(2).sum(dim=1)
    d2 = (sq[:, None] + sq[None, :] - 2.0 * x @ x.t()).clamp_min(eps)
    dist = d2.sqrt()
    return dist * (1.0 - torch.eye(x.shape[0], device=x.device, dtype=x.dtype))


def rkd_distance_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """Smooth-L1 between pair distances, each normalised by its mean off-diagonal distance."""
    t_dist = _pairwise_distance(teacher)
    s_dist = _pairwise_distance(student)
    off = ~torch.eye(student.shape[0], dtype=torch.bool, device=student.device)
    t_dist = t_dist / t_dist[off].mean().clamp_min(1e-12)
    s_dist = s_dist / s_dist[off].mean().clamp_min(1e-12)
    return F.smooth_l1_loss(s_dist, t_dist)


def _angles(x: Tensor) -> Tensor:
    # cos of the angle at vertex j between (i - j) and (k - j), for all i, j, k.
    diff = F.normalize(x[None, :, :] - x[:, None, :], p=2, dim=2)   # [j, i] = x_i - x_j
    return torch.bmm(diff, diff.transpose(1, 2)).reshape(-1)


def rkd_angle_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """Smooth-L1 between the cosines of all triplet angles of the two batches."""
    return F.smooth_l1_loss(_angles(student), _angles(teacher))


@register_method("rkd")
class RKD(DistillMethod):
    """Losses ``rkd_distance`` and ``rkd_angle`` (default weights 25 and 50, as in the paper)."""

    Params = RKDParams
    needs_teacher = True
    default_weights: ClassVar[dict[str, float]] = {"rkd_distance": 25.0, "rkd_angle": 50.0}

    def forward(self, student: StudentOutput, teacher: TeacherOutput | None,
                labels: Tensor) -> dict[str, Tensor]:
        teacher = self._require_teacher(teacher)
        s = student.embedding.float()
        t = teacher.embedding.detach().float()
        if self.params.normalise:
            s, t = F.normalize(s, dim=1), F.normalize(t, dim=1)
        if s.shape[0] < 3:
            zero = s.sum() * 0.0
            return {"rkd_distance": zero, "rkd_angle": zero}
        with full_precision(s):
            return {"rkd_distance": rkd_distance_loss(s, t), "rkd_angle": rkd_angle_loss(s, t)}
