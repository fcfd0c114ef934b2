"""REFILLED: relationship matching alone, then a local classifier from teacher class centres.

Ye, Lu, Zhan, "Generalized Knowledge Distillation via Relationship Matching" (TPAMI,
arXiv 2205.01915); authors' code njulus/REFILLED (``Train.py``, ``utils/triplet.py``).
As the authors run it (``stage: two_stage``, split into two trainer runs by
:mod:`facekd.train.stages`):

- **Stage 1 alone**: no CE. Semi-hard triplets are mined on the student's normalised
  embeddings (``TripletMarginMiner(margin=0.2, type_of_triplets="semihard")``:
  ``0 < d_an - d_ap <= 0.2``), merged into tuples (one per anchor-positive pair, its
  semi-hard negatives), and each tuple's ``softmax([-d_ap, -d_an...] / tau1)`` of the
  student is matched to the teacher's by KL (x 1000). Batches of K images per identity.
- The stage-1 student is reloaded (the *last* one: the authors keep the best by a
  nearest-class-mean validation accuracy every 10 epochs; facekd's trainer keeps no
  best checkpoint and the recipe's ``val_bins`` are verification pairs, not a class
  split, so the last is what a run without a validation split can pick).
- **Stage 2**: CE + lambda * KL(softmax(t / tau2) || softmax(s / tau2)) over the batch's
  classes, t the teacher's local classifier (its embedding against the class centres),
  s the student head's margin-free logits. The authors' logits are unscaled
  (embedding . unit centre); with ArcFace-scaled cosines the effective scale s / tau2 is
  a hyper-parameter, which bench/methods.py tunes (over tau2) on validation identities.

Neither stage needs the teacher to know the student's identities: stage 1 uses only
distances, stage 2 only centres indexed by the student's labels. Both stages use
labelled rows only. The epochs of the two stages add up to ``optim.epochs`` (the
authors give each stage a full schedule; equal total compute keeps comparisons fair).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from facekd.distill.base import (
    DistillMethod,
    Stage,
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
    """Defaults from the authors' code: tau1 = 4, tau2 = 2, semi-hard margin 0.2."""

    stage: int | Literal["two_stage"] = "two_stage"
    tau1: float = 4.0
    tau2: float = 2.0
    mining: Literal["semihard", "all"] = "semihard"   # all: every batch negative (ablation)
    mining_margin: float = 0.2
    logit_scale: float | None = None   # teacher local-classifier scale; None: teacher's s
    stage1_epochs: int = 1             # of optim.epochs; stage 2 gets the rest
    stage1_images_per_identity: int = 4

    def validate(self, path: str = "") -> None:
        if self.stage not in (1, 2, "two_stage"):
            raise ConfigError(f"{path}.stage must be 1, 2 or 'two_stage', got {self.stage!r}")
        if self.tau1 <= 0 or self.tau2 <= 0 or self.mining_margin <= 0:
            raise ConfigError(f"{path}.tau1, tau2 and mining_margin must be positive")
        if self.stage1_epochs < 1 or self.stage1_images_per_identity < 2:
            raise ConfigError(f"{path}.stage1_epochs must be >= 1 and "
                              "stage1_images_per_identity >= 2 (stage 1 needs pairs)")


def _distances(x: Tensor) -> Tensor:
    """Euclidean distances between L2-normalised rows (finite gradients at zero)."""
    with full_precision(x):
        x = F.normalize(x.float(), dim=1)
        return (2.0 - 2.0 * x @ x.t()).clamp_min(1e-12).sqrt()


def tuple_members(d_student: Tensor, labels: Tensor, anchors: Tensor, positives: Tensor,
                  mining: str, margin: float) -> Tensor:
    """P x B mask of each (anchor, positive) tuple's negatives.

    ``semihard``: negatives k with ``0 < d_ak - d_ap <= margin`` on the student (the
    authors' miner, then ``merge``); ``all``: every other-identity row.
    """
    negative = labels[anchors][:, None] != labels[None, :]
    if mining == "all":
        return negative
    d = d_student.detach()
    gap = d[anchors] - d[anchors, positives][:, None]
    return negative & (gap > 0) & (gap <= margin)


def relation_loss(student_emb: Tensor, teacher_emb: Tensor, labels: Tensor, tau: float,
                  mining: str = "semihard", margin: float = 0.2) -> Tensor:
    """Mean over tuples of KL(teacher || student) softmaxes over ``[-d_ap, -d_an...] / tau``.

    A tuple is an anchor-positive pair with its mined negatives (:func:`tuple_members`);
    pairs without a mined negative form no tuple, as in the authors' code.
    """
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(labels.numel(), dtype=torch.bool, device=labels.device)
    anchors, positives = (same & ~eye).nonzero(as_tuple=True)
    if anchors.numel() == 0:
        return zero_loss(student_emb)
    d_all = _distances(student_emb)
    member = tuple_members(d_all, labels, anchors, positives, mining, margin)
    keep = member.any(dim=1)
    if not bool(keep.any()):
        return zero_loss(student_emb)
    anchors, positives, member = anchors[keep], positives[keep], member[keep]
    d_s = d_all[anchors]                                   # P x B
    d_t = _distances(teacher_emb.detach())[anchors]
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
    KL is orders of magnitude larger, so 100 drowns the CE (bench.methods, previous
    protocol, seed 0: TAR@1e-3 42 % vs 83 % alone); bench/methods.py tunes it.
    ``stage: two_stage`` is run as two trainer runs (:meth:`stages`); an instance
    computes one stage.
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

    @classmethod
    def reads_student_head(cls, params: REFILLEDParams) -> bool:
        return params.stage != 1   # stage 2's local classifier KL

    @classmethod
    def stages(cls, params: REFILLEDParams, recipe: Any) -> list[Stage]:
        """Stage 1 alone (no CE, K images per identity), then stage 2 from its student."""
        if params.stage != "two_stage":
            return []
        epochs = int(recipe.optim.epochs)
        first = int(params.stage1_epochs)
        if first >= epochs:
            raise ConfigError(f"method.params.stage1_epochs ({first}) must be below "
                              f"optim.epochs ({epochs}): stage 2 gets the rest")
        warmup = float(recipe.optim.warmup_epochs)
        one = Stage("stage1", {
            "method.params.stage": 1, "method.weights.ce": 0.0,
            "data.images_per_identity": params.stage1_images_per_identity,
            "optim.epochs": first, "optim.warmup_epochs": min(warmup, first)})
        two = Stage("stage2", {
            "method.params.stage": 2, "optim.epochs": epochs - first,
            "optim.warmup_epochs": min(warmup, epochs - first)}, init_from="stage1")
        return [one, two]

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
        if stage == "two_stage":
            raise ConfigError("method 'refilled' with stage: two_stage runs as two trainer "
                              "runs (facekd distill / facekd.train.train); a single "
                              "Trainer needs method.params.stage: 1 or 2")
        teacher = self._require_teacher(teacher, centres=stage != 1)
        rows = (labels >= 0).nonzero(as_tuple=True)[0]
        out: dict[str, Tensor] = {}
        if stage == 1:
            out["relation"] = relation_loss(student.embedding[rows], teacher.embedding[rows],
                                            labels[rows], self.params.tau1,
                                            self.params.mining, self.params.mining_margin)
        else:
            if rows.numel() == 0:
                out["local_kd"] = zero_loss(student.embedding)
            else:
                s_logits, t_logits = self.local_logits(student, teacher, labels, rows)
                out["local_kd"] = kd_kl(s_logits, t_logits, self.params.tau2,
                                        scale_by_t2=False)
        return out
