"""Pieces several methods share: connectors, class sampling and logit helpers.

Connectors map the student's representation into the teacher's space; they are trained
with the student and dropped at export. The logit helpers keep the cosine-logit
arithmetic (``s * cos``) in one place so SRD, KD and REFILLED agree on it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class EmbeddingConnector(nn.Module):
    """Linear + BatchNorm1d from the student's embedding to the teacher's dimension."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_dim, out_dim, bias=False)
        self.bn = nn.BatchNorm1d(out_dim)

    def forward(self, embedding: Tensor) -> Tensor:
        return self.bn(self.linear(embedding))


class FeatureConnector(nn.Module):
    """1x1 conv + BN on a spatial map, then global average pooling.

    SRD's connector for networks whose last feature map is the representation; the
    pooled output has the teacher's embedding dimension. No ReLU: it is compared with a
    signed face embedding, which a non-negative output could never match.
    """

    def __init__(self, in_channels: int, out_dim: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_dim, kernel_size=1, bias=False)
        self.bn = nn.BatchNorm2d(out_dim)

    def forward(self, feature_map: Tensor) -> Tensor:
        return self.bn(self.conv(feature_map)).mean(dim=(2, 3))


def sample_classes(labels: Tensor, num_classes: int, num_negatives: int | None,
                   device: torch.device | None = None) -> Tensor | None:
    """Sorted class indices: the batch's positives plus ``num_negatives`` random others.

    Returns None ("all classes") when sampling would keep every class anyway. Uses
    torch's global RNG on ``device`` (like Partial FC), so a seeded run samples the same
    classes, and one call serves teacher and student logits alike.
    """
    if num_negatives is None:
        return None
    device = device if device is not None else labels.device
    labels = labels.to(device=device, dtype=torch.long)
    positives = torch.unique(labels[(labels >= 0) & (labels < num_classes)])
    keep = min(num_classes, positives.numel() + int(num_negatives))
    if keep >= num_classes:
        return None
    score = torch.rand(num_classes, device=device)
    score[positives] = 2.0  # positives always win the top-k
    return torch.topk(score, keep, sorted=False).indices.sort().values


def select_centres(centres: Tensor, class_idx: Tensor | None) -> Tensor:
    """Rows ``class_idx`` of ``centres`` (all when None), L2-normalised in float32."""
    rows = centres if class_idx is None else centres.index_select(0, class_idx)
    return F.normalize(rows.detach().float(), dim=1)


def full_precision(ref: Tensor) -> torch.autocast:
    """Switch autocast off: s = 64 cosine logits and distances lose too much in fp16."""
    return torch.autocast(device_type=ref.device.type, enabled=False)


def scaled_cos(embedding: Tensor, centres_normalised: Tensor, scale: float) -> Tensor:
    """``scale * cos(embedding, centre)`` for every row and centre: B x C, in float32."""
    with full_precision(embedding):
        return scale * F.normalize(embedding.float(), dim=1) @ centres_normalised.float().t()


def positions_in(class_idx: Tensor | None, labels: Tensor) -> Tensor:
    """Column of each label in the (sorted) ``class_idx`` subset; labels itself when all."""
    if class_idx is None:
        return labels
    return torch.searchsorted(class_idx, labels)


def add_arc_margin(logits: Tensor, columns: Tensor, rows: Tensor, scale: float,
                   margin: float) -> Tensor:
    """ArcFace's ``s * cos(theta + m)`` at (rows, columns) of ``s * cos`` logits."""
    if rows.numel() == 0:
        return logits
    cos = (logits[rows, columns] / scale).clamp(-1.0 + 1e-7, 1.0 - 1e-7)
    with_margin = scale * torch.cos(torch.acos(cos) + margin)
    out = logits.clone()
    out[rows, columns] = with_margin
    return out


def kd_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float,
          scale_by_t2: bool = True) -> Tensor:
    """Hinton's ``KL(softmax(t/T) || softmax(s/T))``, batch mean, times T^2 if asked."""
    log_p_student = F.log_softmax(student_logits.float() / temperature, dim=1)
    log_p_teacher = F.log_softmax(teacher_logits.detach().float() / temperature, dim=1)
    kl = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
    return kl * temperature**2 if scale_by_t2 else kl
