"""FRSKD: the self-teacher's fusion, attention and soft targets; gradients go where they should."""

from __future__ import annotations

import importlib
import math
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from distill_support import SpyHead

from facekd.distill import StudentOutput, create_method
from facekd.distill.frskd import SelfTeacher, WeightedFusion, attention_loss, attention_map
from facekd.errors import ConfigError

CHANNELS = [4, 6, 8]
SIZES = [8, 4, 2]


def _maps(batch: int = 4, requires_grad: bool = True) -> list[torch.Tensor]:
    return [torch.randn(batch, c, s, s, requires_grad=requires_grad)
            for c, s in zip(CHANNELS, SIZES, strict=True)]


class _StandInHead(torch.nn.Module):
    """ArcFace-like head for when facekd.models.heads is not there yet (same interface)."""

    def __init__(self, kind, embedding_size, num_classes, scale=64.0, margin=0.5, **_):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(num_classes, embedding_size))
        self.scale, self.margin = scale, margin

    def cos_logits(self, emb, class_idx=None):
        w = self.weight if class_idx is None else self.weight[class_idx]
        return self.scale * F.normalize(emb, dim=1) @ F.normalize(w, dim=1).t()

    def forward(self, emb, labels):
        cos = self.cos_logits(emb) / self.scale
        theta = torch.acos(cos.clamp(-1 + 1e-7, 1 - 1e-7))
        target = F.one_hot(labels.clamp_min(0), cos.shape[1]).bool() & (labels[:, None] >= 0)
        return self.scale * torch.where(target, torch.cos(theta + self.margin), cos)


@pytest.fixture(autouse=True)
def _margin_heads(monkeypatch):
    try:
        importlib.import_module("facekd.models.heads")
    except ModuleNotFoundError:
        stand_in = types.ModuleType("facekd.models.heads")
        stand_in.create_head = _StandInHead
        monkeypatch.setitem(sys.modules, "facekd.models.heads", stand_in)


def _frskd(**params):
    params = {"gdc_size": 2, "scale": 16.0, **params}
    return create_method("frskd", student_dim=6, teacher_dim=None, num_classes=5,
                         params=params, student_feature_channels=CHANNELS)


def test_attention_map_and_loss_by_hand():
    x = torch.tensor([[[[1.0, 2.0], [0.0, 1.0]], [[3.0, 0.0], [1.0, 1.0]]]])   # 1 x 2 x 2 x 2
    y = torch.tensor([[[[0.0, 1.0], [1.0, 1.0]]]])                           # 1 x 1 x 2 x 2
    mean_sq = [(1 + 9) / 2, (4 + 0) / 2, (0 + 1) / 2, (1 + 1) / 2]
    norm = math.sqrt(sum(v * v for v in mean_sq))
    expected_x = [v / norm for v in mean_sq]
    assert attention_map(x)[0].tolist() == pytest.approx(expected_x, rel=1e-6)
    expected_y = [0.0, 1 / math.sqrt(3), 1 / math.sqrt(3), 1 / math.sqrt(3)]
    loss = attention_loss([x, x], [y, x])
    by_hand = sum((a - b) ** 2 for a, b in zip(expected_x, expected_y, strict=True)) / 4
    assert loss.item() == pytest.approx(by_hand, rel=1e-5)   # second level contributes 0


def test_fusion_weights_are_normalised():
    fusion = WeightedFusion(2)
    with torch.no_grad():
        fusion.weight.copy_(torch.tensor([3.0, -1.0]))  # relu drops the negative one
    a, b = torch.ones(1, 1, 2, 2), torch.full((1, 1, 2, 2), 5.0)
    torch.testing.assert_close(fusion([a, b]), a * 3.0 / (3.0 + 1e-4))


def test_self_teacher_keeps_map_sizes_at_twice_the_width_of_every_level():
    # official BiFPNc (--width 2): each level's channels doubled, the deepest one included
    teacher = SelfTeacher(CHANNELS, multiplier=2, embedding_size=6, pool="gdc", gdc_size=2)
    refined, emb = teacher(_maps(3, requires_grad=False))
    assert [tuple(r.shape) for r in refined] == [(3, 2 * c, s, s)
                                                 for c, s in zip(CHANNELS, SIZES, strict=True)]
    assert emb.shape == (3, 6)
    assert _frskd().self_teacher.widths == [8, 12, 16]
    # --depth 2: two depthwise-separable layers in every fusion block
    block = _frskd().self_teacher.td_block[0]
    assert sum(isinstance(m, torch.nn.Conv2d) and m.groups > 1 for m in block.modules()) == 2
    wrong = SelfTeacher(CHANNELS, multiplier=2, embedding_size=6, pool="gdc", gdc_size=3)
    with pytest.raises(ConfigError, match="gdc_size"):
        wrong(_maps(3, requires_grad=False))


def test_losses_and_where_gradients_go():
    torch.manual_seed(0)
    frskd = _frskd()
    maps = _maps()
    emb = torch.randn(4, 6, requires_grad=True)
    labels = torch.tensor([0, 3, -1, 4])
    head = _StandInHead("arcface", 6, 5, scale=16.0)
    out = frskd(StudentOutput(emb, maps, head=head), None, labels)
    assert set(out) == {"self_ce", "attention", "soft"}
    # attention and soft are the student's lessons: refined maps and self-embedding detached
    (out["attention"] + out["soft"]).backward(retain_graph=True)
    assert emb.grad is not None and all(m.grad is not None for m in maps)
    assert all(p.grad is None for p in frskd.parameters())
    # the self-teacher learns from self_ce (its own margin head on labelled rows)
    out["self_ce"].backward()
    trained = [n for n, p in frskd.named_parameters() if p.grad is not None]
    assert any(n.startswith("self_teacher.") for n in trained)
    assert any(n.startswith("head.") for n in trained)


def test_soft_cosine_by_hand_and_detach_input():
    torch.manual_seed(1)
    frskd = _frskd(detach_input=True, soft_target="cosine").eval()
    maps = _maps()
    emb = torch.randn(4, 6, requires_grad=True)
    out = frskd(StudentOutput(emb, maps), None, torch.tensor([0, 1, 2, 3]))
    _, self_emb = frskd.self_teacher(maps)
    cos = F.cosine_similarity(emb, self_emb, dim=1)
    assert out["soft"].item() == pytest.approx((1 - cos).mean().item(), rel=1e-5)
    out["self_ce"].backward()
    assert all(m.grad is None for m in maps)   # detach_input: self_ce stays off the student


def test_soft_kd_uses_heads_and_unlabelled_batch():
    torch.manual_seed(2)
    frskd = _frskd()
    assert frskd.params.soft_target == "kd" and frskd.params.temperature == 4.0

    class Head(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(5, 6))

        def cos_logits(self, e, class_idx=None):
            return 16.0 * F.normalize(e, dim=1) @ F.normalize(self.weight, dim=1).t()

    head = Head()
    emb = torch.randn(4, 6, requires_grad=True)
    out = frskd(StudentOutput(emb, _maps(), head=head), None, torch.full((4,), -1))
    assert out["self_ce"].item() == 0.0
    assert torch.isfinite(out["soft"]) and out["soft"].item() >= 0
    out["soft"].backward()
    assert head.weight.grad is not None and emb.grad is not None
    with pytest.raises(ConfigError, match="student's head"):
        frskd(StudentOutput(emb, _maps()), None, torch.full((4,), -1))


def test_frskd_needs_feature_channels():
    with pytest.raises(ConfigError, match="at least two student feature maps"):
        create_method("frskd", student_dim=6, teacher_dim=None, num_classes=5, params={})


def test_on_a_real_mobilefacenet_student():
    # The mbf family's 56/28/14/7 px stage maps, read by forward hooks, feed the self-teacher.
    registry = pytest.importorskip("facekd.models.registry")
    from facekd.models.hooks import FeatureHooks

    torch.manual_seed(3)
    student = registry.create_model("mbf_tiny", num_features=16)
    layers = registry.feature_layers(student)
    channels = registry.feature_channels(student, layers)
    frskd = create_method("frskd", student_dim=16, teacher_dim=None, num_classes=7,
                          params={"scale": 16.0}, student_feature_channels=channels)
    with FeatureHooks(student, layers) as hooks:
        emb = student(torch.rand(2, 3, 112, 112) * 2 - 1)
        maps = hooks.ordered()
    assert [m.shape[-1] for m in maps] == [56, 28, 14, 7]
    head = _StandInHead("arcface", 16, 7, scale=16.0)
    out = frskd(StudentOutput(emb, maps, head=head), None, torch.tensor([1, 6]))
    sum(out.values()).backward()
    assert all(torch.isfinite(v) for v in out.values())
    assert all(p.grad is not None for p in student.parameters() if p.requires_grad)


def test_soft_kd_by_hand_at_t4():
    torch.manual_seed(4)
    frskd = _frskd().eval()
    maps = _maps(requires_grad=False)
    emb = torch.randn(4, 6)
    w = torch.randn(5, 6)

    class Head(torch.nn.Module):
        def cos_logits(self, e, class_idx=None):
            return 16.0 * F.normalize(e, dim=1) @ F.normalize(w, dim=1).t()

    out = frskd(StudentOutput(emb, maps, head=Head()), None, torch.tensor([0, 1, 2, 3]))
    _, self_emb = frskd.self_teacher(maps)
    t = (16.0 * F.normalize(self_emb, dim=1) @ F.normalize(frskd.head.weight, dim=1).t())
    s = Head().cos_logits(emb)
    p_t, p_s = (t / 4).softmax(1), (s / 4).softmax(1)
    by_hand = (p_t * (p_t.log() - p_s.log())).sum(1).mean() * 16
    assert out["soft"].item() == pytest.approx(by_hand.item(), rel=1e-5)


@pytest.mark.parametrize("soft_target", ["kd", "cosine"])
def test_reads_student_head_says_what_forward_does(soft_target):
    from facekd.distill import get_method_class
    from facekd.distill.base import parse_params

    torch.manual_seed(0)
    head = SpyHead(_StandInHead("arcface", 6, 5, scale=16.0))
    _frskd(soft_target=soft_target)(StudentOutput(torch.randn(4, 6), _maps(), head=head),
                                    None, torch.tensor([0, 3, -1, 4]))
    cls = get_method_class("frskd")
    assert cls.reads_student_head(parse_params(cls, {"soft_target": soft_target})) is head.read
