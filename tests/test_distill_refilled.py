"""REFILLED: tuple relationship matching and the local classifier, by hand; other identities."""

from __future__ import annotations

import math

import pytest
import torch
from distill_support import CosHead

from facekd.distill import StudentOutput, TeacherOutput, create_method
from facekd.errors import ConfigError


def _unit(v):
    n = math.sqrt(sum(x * x for x in v))
    return [x / n for x in v]


def _softmax(row):
    m = max(row)
    e = [math.exp(x - m) for x in row]
    return [x / sum(e) for x in e]


def _kl(p, q):
    return sum(a * (math.log(a) - math.log(b)) for a, b in zip(p, q, strict=True) if a > 0)


def _refilled(stage, num_classes=3, dim_s=2, dim_t=2, **params):
    return create_method("refilled", student_dim=dim_s, teacher_dim=dim_t,
                         num_classes=num_classes, params={"stage": stage, **params})


def test_relation_matches_hand_computation():
    s = [[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [-1.0, 0.2]]
    t = [[1.0, 1.0], [1.0, 0.0], [-1.0, 1.0], [0.0, -1.0]]
    labels = [0, 0, 1, 2]
    tau = 4.0
    out = _refilled(1)(StudentOutput(torch.tensor(s)), TeacherOutput(torch.tensor(t)),
                       torch.tensor(labels))
    us, ut = [_unit(v) for v in s], [_unit(v) for v in t]
    total = 0.0
    for a, p in [(0, 1), (1, 0)]:     # the anchor-positive pairs; negatives are rows 2, 3
        tuple_cols = [p, 2, 3]
        p_s = _softmax([-math.dist(us[a], us[c]) / tau for c in tuple_cols])
        p_t = _softmax([-math.dist(ut[a], ut[c]) / tau for c in tuple_cols])
        total += _kl(p_t, p_s)
    assert set(out) == {"relation"}
    assert out["relation"].item() == pytest.approx(total / 2, rel=1e-5)


def test_relation_without_pairs_is_zero_but_connected():
    emb = torch.randn(3, 2, requires_grad=True)
    out = _refilled(1)(StudentOutput(emb), TeacherOutput(torch.randn(3, 2)),
                       torch.tensor([0, 1, 2]))
    assert out["relation"].item() == 0.0
    out["relation"].backward()
    assert emb.grad is not None


def test_local_classifier_matches_hand_computation():
    torch.manual_seed(0)
    head = CosHead(4, 2, scale=8.0)
    emb = torch.tensor([[1.0, 0.2], [0.1, 1.0], [0.5, 0.5]])
    t = torch.tensor([[0.9, 0.1, 0.3], [0.0, 1.0, -0.2], [1.0, 1.0, 1.0]])
    centres = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0],
                            [1.0, 1.0, 0.0]])
    labels = torch.tensor([3, 1, -1])         # classes in the batch: 1 and 3
    method = _refilled(2, num_classes=4, dim_t=3, tau2=2.0)
    out = method(StudentOutput(emb, head=head), TeacherOutput(t, centres, scale=8.0), labels)
    classes = [1, 3]
    w = head.weight.detach()
    total = 0.0
    for row in (0, 1):
        t_logits = [8.0 * sum(a * b for a, b in zip(_unit(t[row].tolist()),
                                                      _unit(centres[c].tolist()), strict=True))
                    for c in classes]
        s_logits = [8.0 * sum(a * b for a, b in zip(_unit(emb[row].tolist()),
                                                      _unit(w[c].tolist()), strict=True))
                    for c in classes]
        total += _kl(_softmax([z / 2 for z in t_logits]), _softmax([z / 2 for z in s_logits]))
    assert set(out) == {"local_kd"}
    assert out["local_kd"].item() == pytest.approx(total / 2, rel=1e-5)


def test_unlabelled_rows_do_not_change_either_stage():
    torch.manual_seed(1)
    head = CosHead(3, 4)
    emb, t = torch.randn(6, 4), torch.randn(6, 5)
    centres = torch.randn(3, 5)
    labels = torch.tensor([0, 0, 1, 1, 2, -1])
    method = _refilled("both", dim_s=4, dim_t=5)
    full = method(StudentOutput(emb, head=head), TeacherOutput(t, centres), labels)
    labelled = method(StudentOutput(emb[:5], head=head), TeacherOutput(t[:5], centres),
                      labels[:5])
    for key in ("relation", "local_kd"):
        assert full[key].item() == pytest.approx(labelled[key].item(), rel=1e-6)
    none = method(StudentOutput(emb, head=head), TeacherOutput(t, centres),
                  torch.full((6,), -1))
    assert none["relation"].item() == 0.0 and none["local_kd"].item() == 0.0


def test_teacher_never_saw_student_identities():
    # teacher 5-d, student 3-d; centres are mean teacher embeddings of the student's 4 classes
    torch.manual_seed(2)
    head = CosHead(4, 3)
    emb = torch.randn(6, 3, requires_grad=True)
    t = torch.randn(6, 5, requires_grad=True)
    centres = torch.randn(4, 5, requires_grad=True)
    method = _refilled("both", num_classes=4, dim_s=3, dim_t=5)
    out = method(StudentOutput(emb, head=head), TeacherOutput(t, centres),
                 torch.tensor([0, 0, 3, 3, 2, -1]))
    sum(out.values()).backward()
    assert emb.grad.abs().sum() > 0 and head.weight.grad is not None
    assert t.grad is None and centres.grad is None
    with pytest.raises(ConfigError, match="label 5 has no teacher centre"):
        method(StudentOutput(emb, head=head), TeacherOutput(t, centres), torch.tensor([5, 0]))


def test_stage_one_needs_no_centres_but_stage_two_does():
    emb, t = torch.randn(4, 2), torch.randn(4, 2)
    labels = torch.tensor([0, 0, 1, 1])
    assert "relation" in _refilled(1)(StudentOutput(emb), TeacherOutput(t), labels)
    with pytest.raises(ConfigError, match="class centres"):
        _refilled(2)(StudentOutput(emb, head=CosHead(3, 2)), TeacherOutput(t), labels)


def test_int32_labels_are_accepted():
    torch.manual_seed(3)
    head = CosHead(3, 2)
    emb, t, centres = torch.randn(4, 2), torch.randn(4, 2), torch.randn(3, 2)
    labels = torch.tensor([0, 0, 2, -1])
    method = _refilled("both")
    as_long = method(StudentOutput(emb, head=head), TeacherOutput(t, centres), labels)
    as_int = method(StudentOutput(emb, head=head), TeacherOutput(t, centres),
                    labels.to(torch.int32))
    for key in as_long:
        assert as_int[key].item() == pytest.approx(as_long[key].item())
    srd = create_method("srd", student_dim=2, teacher_dim=2, num_classes=3,
                        params={"num_negatives": 1, "margin_on_labelled": True})
    assert torch.isfinite(srd(StudentOutput(emb), TeacherOutput(t, centres),
                              labels.to(torch.int32))["srd"])
