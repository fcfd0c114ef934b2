"""FRSKD: a self-teacher refines the student's own multi-scale maps; no external teacher.

Ji et al., "Refine Myself by Teaching Myself: Feature Refinement via Self-Knowledge
Distillation" (CVPR 2021); authors' code MingiJi/FRSKD. The self-teacher is the official
``BiFPNc``: a top-down + bottom-up fusion of the student's stage outputs at *twice the
student's width at every level* (``--width 2``), depthwise-separable conv blocks of two
layers (``--depth 2``), learned
normalised fusion weights, ending here in its own GDC + embedding + margin head (the
official ends in avg-pool + fc over the same classes). The student learns the refined
maps' attention (AT, beta = 100) and the self-teacher's detached logits by KD at T = 4
(alpha = 2, ``DistillKL``: ``KL * T^2``); the self-teacher learns from the labels.

Gradient clipping (a kept deviation): the official code clips nothing. facekd clips the
backbone as arcface_torch does and the method's parts (self-teacher and its head) as a
group of their own (``Trainer._build_optimizer``), so the self-teacher's own gradients
are not counted in the backbone's norm. Its CE still reaches the backbone through the
student's maps (as in the official code, ``detach_input: false``), and there it
outweighs the student's own CE: 5.2x the CE's gradient norm at initialisation (one
backward of mbf_tiny on noise images), most of it entering at the 56 px map. The
official no-clipping setting is worse here, not better: on the embedded benchmark's
validation identities (``bench.methods``' tuning seed and recipe setting, 88 steps)
TAR@FAR=1e-3 is 1.07 [0.34, 2.55] unclipped against 8.43 [5.32, 12.60] clipped, final
student CE 19.8 / 19.6 (these and the 5.2x: ``python -m bench.frskd_clipping``,
bench/results/frskd_clipping.md) against 15.2 for the student trained alone (its
``tune/none`` run in ``bench.methods``).
MobileFaceNet's 56/28/14/7 px stages halve cleanly, which the fusion needs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

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
from facekd.distill.connectors import kd_kl
from facekd.errors import ConfigError


@dataclass
class FRSKDParams:
    """Defaults from the authors' code: BiFPNc width 2x per level, KD soft target at T = 4.

    ``soft_target: cosine`` (1 - cos between student and self-teacher embeddings) is kept
    as an option only: the two embeddings live in unrelated spaces, so it is not the
    paper's method. Set ``scale`` to the student head's scale, so KD compares logits of
    one scale (the recipes do).
    """

    width_multiplier: int = 2                     # self-teacher channels = 2 x the student's
    depth: int = 2                                # separable convs per fusion block
    pool: Literal["gdc", "avg"] = "gdc"
    gdc_size: int = 7                             # side of the last map (112 px input: 7)
    soft_target: Literal["kd", "cosine"] = "kd"
    temperature: float = 4.0                      # for soft_target: kd
    head: Literal["arcface", "cosface", "combined", "softmax"] = "arcface"
    scale: float = 64.0
    margin: float = 0.5
    detach_input: bool = False                    # True: self_ce does not reach the student

    def validate(self, path: str = "") -> None:
        if min(self.width_multiplier, self.depth, self.gdc_size) <= 0 or \
                self.temperature <= 0:
            raise ConfigError(f"{path}: width_multiplier, depth, gdc_size and temperature "
                              "must be positive")


class SeparableConvBlock(nn.Module):
    """``depth`` x (depthwise 3x3 + pointwise 1x1 + BN), ReLU between and after.

    The official 3x3 ``DepthConvBlock`` at the authors' ``--depth 2``.
    """

    def __init__(self, channels: int, depth: int = 2) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1, groups=channels,
                                    bias=False),
                          nn.Conv2d(channels, channels, 1, bias=False),
                          nn.BatchNorm2d(channels))
            for _ in range(depth))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(F.relu(x) if i else x)
        return F.relu(x)


class WeightedFusion(nn.Module):
    """BiFPN's fast normalised fusion: sum_i relu(w_i) x_i / (sum_j relu(w_j) + eps)."""

    def __init__(self, num_inputs: int, eps: float = 1e-4) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_inputs))
        self.eps = eps

    def forward(self, inputs: list[Tensor]) -> Tensor:
        w = F.relu(self.weight)
        w = w / (w.sum() + self.eps)
        out = w[0] * inputs[0]
        for i in range(1, len(inputs)):
            out = out + w[i] * inputs[i]
        return out


def _resize(x: Tensor, size: tuple[int, int]) -> Tensor:
    if tuple(x.shape[-2:]) == size:
        return x
    if x.shape[-1] < size[1]:
        return F.interpolate(x, size=size, mode="nearest")
    return F.adaptive_max_pool2d(x, size)


def _pointwise(in_channels: int, out_channels: int) -> nn.Module:
    """The official 1x1 ``DepthConvBlock``: conv + BN + ReLU (changes a level's width)."""
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, bias=False),
                         nn.BatchNorm2d(out_channels), nn.ReLU())


class SelfTeacher(nn.Module):
    """BiFPNc over L maps (high resolution first) at ``multiplier`` x each level's width.

    Top-down: ``td_i = block(w * [lat_i, up(td_{i+1})])``; bottom-up: ``out_i =
    block(w * [lat2_i, td_i (inner levels), down(out_{i-1})])`` with ``up``/``down`` a
    resize plus a 1x1 block to level i's width, as in the authors' ``BiFPN_layer``.
    """

    def __init__(self, in_channels: list[int], multiplier: int, embedding_size: int,
                 pool: str = "gdc", gdc_size: int = 7, depth: int = 2) -> None:
        super().__init__()
        levels = len(in_channels)
        widths = [c * multiplier for c in in_channels]
        self.widths = widths
        self.lateral = nn.ModuleList(_pointwise(c, w) for c, w in zip(in_channels, widths,
                                                                      strict=True))
        self.lateral2 = nn.ModuleList(_pointwise(in_channels[i], widths[i])
                                      for i in range(1, levels))
        # top-down: level i (< L-1) fuses lateral_i with the coarser top-down map
        self.up = nn.ModuleList(_pointwise(widths[i + 1], widths[i]) for i in range(levels - 1))
        self.td_fuse = nn.ModuleList(WeightedFusion(2) for _ in range(levels - 1))
        self.td_block = nn.ModuleList(SeparableConvBlock(widths[i], depth)
                                      for i in range(levels - 1))
        # bottom-up: level i (> 0) fuses lateral2_i, td_i (inner levels) and the finer output
        self.down = nn.ModuleList(_pointwise(widths[i - 1], widths[i]) for i in range(1, levels))
        self.bu_fuse = nn.ModuleList(WeightedFusion(3 if i < levels - 1 else 2)
                                     for i in range(1, levels))
        self.bu_block = nn.ModuleList(SeparableConvBlock(widths[i], depth)
                                      for i in range(1, levels))
        self.pool_kind = pool
        self.gdc_size = gdc_size
        last = widths[-1]
        if pool == "gdc":
            self.pool = nn.Sequential(
                nn.Conv2d(last, last, gdc_size, groups=last, bias=False),
                nn.BatchNorm2d(last))
        else:
            self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.BatchNorm2d(last))
        self.embed = nn.Sequential(nn.Flatten(), nn.Linear(last, embedding_size, bias=False),
                                   nn.BatchNorm1d(embedding_size))

    def forward(self, maps: list[Tensor]) -> tuple[list[Tensor], Tensor]:
        """Refined maps (same sizes as ``maps``, 2x the channels) and the embedding."""
        levels = len(maps)
        lateral = [layer(x) for layer, x in zip(self.lateral, maps, strict=True)]
        sizes = [tuple(x.shape[-2:]) for x in lateral]
        top_down: list[Tensor] = [lateral[-1]] * levels
        for i in range(levels - 2, -1, -1):
            coarser = self.up[i](_resize(top_down[i + 1], sizes[i]))
            top_down[i] = self.td_block[i](self.td_fuse[i]([lateral[i], coarser]))
        refined = [top_down[0]]
        for i in range(1, levels):
            inputs = [self.lateral2[i - 1](maps[i])]
            if i < levels - 1:
                inputs.append(top_down[i])
            inputs.append(self.down[i - 1](_resize(refined[i - 1], sizes[i])))
            refined.append(self.bu_block[i - 1](self.bu_fuse[i - 1](inputs)))
        last = refined[-1]
        if self.pool_kind == "gdc" and tuple(last.shape[-2:]) != (self.gdc_size,) * 2:
            raise ConfigError(f"method.params.gdc_size: the last feature map is "
                              f"{last.shape[-2]}x{last.shape[-1]}, not "
                              f"{self.gdc_size}x{self.gdc_size} (set gdc_size or pool: avg)")
        return refined, self.embed(self.pool(last))


def attention_map(x: Tensor) -> Tensor:
    """Zagoruyko's attention: L2-normalised spatial map of channel-mean squared activity."""
    return F.normalize(x.float().pow(2).mean(dim=1).flatten(1), dim=1)


def attention_loss(student_maps: list[Tensor], refined_maps: list[Tensor]) -> Tensor:
    """Sum over levels of the mean squared difference of attention maps (targets detached)."""
    return sum((((attention_map(s) - attention_map(r.detach())) ** 2).mean()
                for s, r in zip(student_maps, refined_maps, strict=True)),
               torch.zeros((), device=student_maps[0].device))


@register_method("frskd")
class FRSKD(DistillMethod):
    """Losses ``self_ce``, ``attention`` and ``soft``.

    Default weights: self_ce 1, attention 100 (beta), soft 2 (alpha), as in the paper's
    classification runs. ``soft`` is KD_T (T = 4, times T^2) between the student head's
    margin-free logits and the self-teacher head's detached ones over the same classes,
    as the official ``DistillKL``; ``soft_target: cosine`` is the non-paper option.
    """

    Params = FRSKDParams
    needs_teacher = False
    needs_teacher_classifier = False
    needs_features = True
    default_weights: ClassVar[dict[str, float]] = {"self_ce": 1.0, "attention": 100.0, "soft": 2.0}

    def __init__(self, *, student_dim: int, teacher_dim: int | None, num_classes: int,
                 params: FRSKDParams, student_feature_channels: list[int] | None = None,
                 ) -> None:
        super().__init__(student_dim=student_dim, teacher_dim=teacher_dim,
                         num_classes=num_classes, params=params,
                         student_feature_channels=student_feature_channels)
        if not student_feature_channels or len(student_feature_channels) < 2:
            raise ConfigError("method 'frskd' needs at least two student feature maps "
                              "(student_feature_channels, e.g. from feature_layers(model))")
        from facekd.models.heads import create_head

        self.self_teacher = SelfTeacher(list(student_feature_channels),
                                        params.width_multiplier, student_dim,
                                        pool=params.pool, gdc_size=params.gdc_size,
                                        depth=params.depth)
        self.head = create_head(params.head, student_dim, num_classes, scale=params.scale,
                                margin=params.margin)

    @classmethod
    def reads_student_head(cls, params: FRSKDParams) -> bool:
        return params.soft_target == "kd"   # KD between the two heads' logits

    def forward(self, student: StudentOutput, teacher: TeacherOutput | None,
                labels: Tensor) -> dict[str, Tensor]:
        labels = labels.long()  # loaders may hand int32
        maps = student.features
        if len(maps) != len(self.student_feature_channels or []):
            raise ConfigError(f"method 'frskd' expected {len(self.student_feature_channels)} "
                              f"student feature maps, got {len(maps)}")
        inputs = [m.detach() for m in maps] if self.params.detach_input else list(maps)
        refined, self_emb = self.self_teacher(inputs)
        rows = (labels >= 0).nonzero(as_tuple=True)[0]
        if rows.numel():
            self_ce = F.cross_entropy(self.head(self_emb[rows], labels[rows]).float(),
                                      labels[rows])
        else:
            self_ce = zero_loss(self_emb)
        if self.params.soft_target == "kd":
            if student.head is None:
                raise ConfigError("method.params.soft_target: 'kd' needs the student's head")
            target = self.head.cos_logits(self_emb.detach()).detach()
            soft = kd_kl(student.head.cos_logits(student.embedding), target,
                         self.params.temperature)
        else:
            soft = (1.0 - F.cosine_similarity(student.embedding.float(),
                                              self_emb.detach().float(), dim=1)).mean()
        return {"self_ce": self_ce, "attention": attention_loss(maps, refined), "soft": soft}
