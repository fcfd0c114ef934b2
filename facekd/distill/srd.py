"""SRD: the student's representation judged by the teacher's frozen margin classifier.

Yang et al., "Knowledge Distillation Meets Open-Set Semi-supervised Learning" (IJCV 2025)
and "Knowledge distillation via softmax regression representation learning" (ICLR 2021).
A connector maps the student into the teacher's space; its output goes through the
teacher's class centres without margin (the *cross-network logits*) and is regressed
onto the teacher's own logits with MSE on raw logits, plus a feature-matching term.
Both terms use every row, labelled or not (label -1): each row's targets come from that
row's own teacher embedding, never from another batch (the authors' separate-batch code
reused the labelled teacher logits for unlabelled images).

Effective weight. With unit connector output u, teacher embedding t and C unit centres
w_c, ``srd = mean_{b,c} s^2 ((u - t) . w_c)^2``; for near-isotropic centres
(``sum_c w_c w_c^T ~ (C / D) I``) that is ``(s^2 / D) |u - t|^2 = (2 s^2 / D)(1 - cos(u, t))``:
a cosine embedding loss of weight ``2 s^2 / D`` (8 for s = 32, D = 256; 16 for s = 64,
D = 512), checked in tests/test_distill_srd.py. A ``feature`` baseline at weight 1 is
therefore ~8x lighter; bench/methods.py runs a ``feature`` control at this weight
(:func:`effective_cosine_weight`), so "SRD beats feature" is not loss weight alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch.nn.functional as F
from torch import Tensor

from facekd.distill.base import (
    DistillMethod,
    StudentOutput,
    TeacherOutput,
    register_method,
)
from facekd.distill.connectors import (
    EmbeddingConnector,
    FeatureConnector,
    add_arc_margin,
    positions_in,
    sample_classes,
    scaled_cos,
    select_centres,
)
from facekd.errors import ConfigError


@dataclass
class SRDParams:
    """SRD hyper-parameters; defaults follow the authors' SRD runs (beta = 1, no KL).

    ``connector`` and ``feature_loss`` are spelt as in the feature baseline's params.
    """

    # feature: 1x1 conv + BN on the last map, pooled. No final ReLU (the authors' has one,
    # for a post-ReLU CIFAR teacher feature): a face embedding is signed, so a
    # non-negative output could never match it.
    connector: Literal["embedding", "feature"] = "embedding"
    feature_loss: Literal["mse", "mse_normalised", "cosine"] = "mse"
    num_negatives: int | None = None        # None: logits over all classes
    margin_on_labelled: bool = False        # ablation: ArcFace margin on labelled rows
    margin: float = 0.5                     # the teacher head's additive angular margin
    # Do batch labels index the teacher's classes? auto: yes when the class counts agree.
    teacher_classes: Literal["auto", "shared", "disjoint"] = "auto"

    def validate(self, path: str = "") -> None:
        where = f"{path}." if path else ""
        if self.num_negatives is not None and self.num_negatives < 0:
            raise ConfigError(f"{where}num_negatives must be >= 0 or null, "
                              f"got {self.num_negatives}")
        if not 0.0 <= self.margin < 3.14159:
            raise ConfigError(f"{where}margin must be in [0, pi) radians, got {self.margin}")


def effective_cosine_weight(scale: float, dim: int) -> float:
    """``2 s^2 / D``: the weight of the cosine embedding loss the SRD term amounts to."""
    return 2.0 * float(scale) ** 2 / int(dim)


@register_method("srd")
class SRD(DistillMethod):
    """Losses ``srd`` (MSE of cross-network vs teacher logits) and ``feat`` (feature term).

    Default weights 1 and 1 (the authors' beta = 1 on both); the trainer adds ``ce``.
    """

    Params = SRDParams
    needs_teacher = True
    needs_teacher_classifier = True
    needs_features = False
    default_weights: ClassVar[dict[str, float]] = {"srd": 1.0, "feat": 1.0}

    def __init__(self, *, student_dim: int, teacher_dim: int | None, num_classes: int,
                 params: SRDParams, student_feature_channels: list[int] | None = None) -> None:
        super().__init__(student_dim=student_dim, teacher_dim=teacher_dim,
                         num_classes=num_classes, params=params,
                         student_feature_channels=student_feature_channels)
        if teacher_dim is None:
            raise ConfigError("method 'srd' needs the teacher's embedding size (teacher_dim)")
        if params.connector == "feature":
            if not student_feature_channels:
                raise ConfigError("method.params.connector: 'feature' needs the student's "
                                  "feature-map channels (student_feature_channels)")
            self.needs_features = True
            self.connector = FeatureConnector(student_feature_channels[-1], teacher_dim)
        else:
            self.connector = EmbeddingConnector(student_dim, teacher_dim)

    def connect(self, student: StudentOutput) -> Tensor:
        """The student's representation in the teacher's space: B x D_t."""
        if self.params.connector == "feature":
            if not student.features:
                raise ConfigError("method 'srd' with connector 'feature' got no student "
                                  "feature maps (set teacher/student feature layers)")
            return self.connector(student.features[-1])
        return self.connector(student.embedding)

    def logits(self, connected: Tensor, teacher: TeacherOutput, labels: Tensor,
               class_idx: Tensor | None) -> tuple[Tensor, Tensor]:
        """Cross-network and teacher logits over ``class_idx`` (all classes when None)."""
        centres = select_centres(teacher.centres, class_idx)
        scale = float(teacher.scale)
        cross = scaled_cos(connected, centres, scale)
        target = scaled_cos(teacher.embedding.detach(), centres, scale)
        if self.params.margin_on_labelled:
            rows = (labels >= 0).nonzero(as_tuple=True)[0]
            columns = positions_in(class_idx, labels[rows])
            cross = add_arc_margin(cross, columns, rows, scale, self.params.margin)
            target = add_arc_margin(target, columns, rows, scale, self.params.margin)
        return cross, target

    def _labels_index_centres(self, teacher: TeacherOutput) -> bool:
        # Batch labels name teacher classes only when both share one identity list.
        if self.params.teacher_classes != "auto":
            return self.params.teacher_classes == "shared"
        return teacher.centres.shape[0] == self.num_classes

    def forward(self, student: StudentOutput, teacher: TeacherOutput | None,
                labels: Tensor) -> dict[str, Tensor]:
        labels = labels.long()  # loaders may hand int32
        teacher = self._require_teacher(teacher, centres=True)
        num_centres = teacher.centres.shape[0]
        shared = self._labels_index_centres(teacher)
        if self.params.margin_on_labelled and not shared:
            raise ConfigError(f"method.params.margin_on_labelled: the teacher has "
                              f"{num_centres} classes, the student data "
                              f"{self.num_classes} (teacher_classes: "
                              f"{self.params.teacher_classes}); a margin needs shared labels")
        if shared and num_centres < self.num_classes:
            raise ConfigError(f"method.params.teacher_classes: 'shared' but the teacher has "
                              f"{num_centres} classes and the student data "
                              f"{self.num_classes}")
        # Positives only mean something when labels index the teacher's classes.
        label_rows = labels if shared else labels.new_full(labels.shape, -1)
        class_idx = sample_classes(label_rows, num_centres, self.params.num_negatives,
                                   device=teacher.centres.device)
        connected = self.connect(student).float()
        cross, target = self.logits(connected, teacher, label_rows, class_idx)
        t_emb = teacher.embedding.detach().float()
        if self.params.feature_loss == "mse":
            feat = F.mse_loss(connected, t_emb)
        elif self.params.feature_loss == "mse_normalised":
            feat = F.mse_loss(F.normalize(connected, dim=1), F.normalize(t_emb, dim=1))
        else:
            feat = (1.0 - F.cosine_similarity(connected, t_emb, dim=1)).mean()
        return {"srd": F.mse_loss(cross, target), "feat": feat}
