"""Properties every method should keep: a perfect student costs nothing; no NaN on edge rows."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from distill_support import SpyHead
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from facekd.distill import StudentOutput, TeacherOutput, create_method


class CosHead(nn.Module):
    def __init__(self, weight: torch.Tensor, scale: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.clone())
        self.scale = scale

    def cos_logits(self, emb, class_idx=None):
        w = self.weight if class_idx is None else self.weight[class_idx]
        return self.scale * F.normalize(emb, dim=1) @ F.normalize(w, dim=1).t()


@settings(max_examples=15, deadline=None)
@given(batch=st.integers(3, 7), dim=st.integers(2, 6), classes=st.integers(2, 9),
       seed=st.integers(0, 10_000))
def test_student_equal_to_teacher_costs_nothing(batch, dim, classes, seed):
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(batch, dim, generator=g)
    centres = F.normalize(torch.randn(classes, dim, generator=g), dim=1)
    labels = torch.randint(-1, classes, (batch,), generator=g)
    teacher = TeacherOutput(emb.clone(), centres, 32.0)
    srd = create_method("srd", student_dim=dim, teacher_dim=dim, num_classes=classes,
                        params={"margin_on_labelled": True})
    with torch.no_grad():
        srd.connector.linear.weight.copy_(torch.eye(dim))
    srd.connector.bn.eps = 0.0
    out = srd.eval()(StudentOutput(emb), teacher, labels)
    assert out["srd"].item() == pytest.approx(0.0, abs=1e-8)
    assert out["feat"].item() == pytest.approx(0.0, abs=1e-12)
    head = CosHead(centres, 32.0)
    kd = create_method("kd", student_dim=dim, teacher_dim=dim, num_classes=classes, params={})
    assert kd(StudentOutput(emb, head=head), teacher, labels)["kd"].item() == \
        pytest.approx(0.0, abs=1e-5)
    out = {}
    for stage in (1, 2):
        refilled = create_method("refilled", student_dim=dim, teacher_dim=dim,
                                 num_classes=classes, params={"stage": stage, "mining": "all"})
        out.update(refilled(StudentOutput(emb * 3.0, head=head), teacher, labels))
    assert out["relation"].item() == pytest.approx(0.0, abs=1e-5)
    assert out["local_kd"].item() == pytest.approx(0.0, abs=1e-5)
    feature = create_method("feature", student_dim=dim, teacher_dim=dim, num_classes=classes,
                            params={"connector": False})
    assert feature(StudentOutput(emb), teacher, labels)["feature"].item() == \
        pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("name", ["srd", "kd", "feature", "rkd", "refilled"])
def test_duplicate_and_zero_rows_keep_gradients_finite(name):
    torch.manual_seed(0)
    base = torch.randn(2, 4)
    # rows 0 and 1 identical (distance 0), row 3 all zeros (no direction)
    emb = torch.cat([base[:1], base[:1], base[1:], torch.zeros(1, 4)]).requires_grad_(True)
    t = torch.cat([base[:1], base[:1], base[1:], torch.zeros(1, 4)]) * 2.0
    centres = torch.randn(3, 4)
    params = {"srd": [{"margin_on_labelled": True}],
              "refilled": [{"stage": 1, "mining": "all"}, {"stage": 2}]}.get(name, [{}])
    out = {}
    for p in params:
        method = create_method(name, student_dim=4, teacher_dim=4, num_classes=3, params=p)
        out.update(method(StudentOutput(emb, head=CosHead(centres, 64.0)),
                          TeacherOutput(t, centres), torch.tensor([0, 0, 1, 2])))
    total = sum(out.values())
    total.backward()
    assert torch.isfinite(total)
    assert torch.isfinite(emb.grad).all()


@pytest.mark.parametrize(("name", "params"), [
    ("none", {}), ("kd", {}), ("feature", {"connector": False}), ("rkd", {}),
    ("srd", {"margin_on_labelled": True}), ("refilled", {"stage": 1, "mining": "all"}),
    ("refilled", {"stage": 2}), ("adadistill", {}), ("ekd", {}),
])
def test_reads_student_head_says_what_forward_does(name, params):
    """The trainer replicates the head for methods that declare they read it (a sharded
    Partial FC has no rank's full class set); the declaration must match forward."""
    from facekd.distill import get_method_class
    from facekd.distill.base import parse_params

    torch.manual_seed(0)
    centres = F.normalize(torch.randn(3, 4), dim=1)
    method = create_method(name, student_dim=4, teacher_dim=4, num_classes=3, params=params)
    head = SpyHead(CosHead(centres, 16.0))
    method(StudentOutput(torch.randn(6, 4), head=head),
           TeacherOutput(torch.randn(6, 4), centres, 16.0), torch.tensor([0, 0, 1, 1, 2, 2]))
    cls = get_method_class(name)
    assert cls.reads_student_head(parse_params(cls, params)) is head.read
