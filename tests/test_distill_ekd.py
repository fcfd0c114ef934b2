"""EKD: thresholds at the critical FARs, soft ranks and the rank loss, by hand."""

from __future__ import annotations

import math

import pytest
import torch

from facekd.distill import StudentOutput, TeacherOutput, create_method
from facekd.distill.ekd import soft_rank


def _unit(v):
    n = math.sqrt(sum(x * x for x in v))
    return [x / n for x in v]


def _cos(a, b):
    return sum(x * y for x, y in zip(_unit(a), _unit(b), strict=True))


def _sig(x):
    return 1.0 / (1.0 + math.exp(-max(-50.0, min(50.0, x))))


def test_soft_rank_counts_thresholds_passed():
    sim = torch.tensor([0.5, 0.0])
    thr = torch.tensor([0.4, 0.45, 0.6])
    # 0.5 passes 0.4 and 0.45 (sigmoid(10) and sigmoid(5)) and not 0.6 (sigmoid(-10))
    expected = [_sig(10) + _sig(5) + _sig(-10), _sig(-40) + _sig(-45) + _sig(-60)]
    assert soft_rank(sim, thr, 0.01).tolist() == pytest.approx(expected, rel=1e-6)


def test_ekd_matches_hand_computation():
    s = [[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [-0.6, 0.8]]
    t = [[1.0, 0.1], [0.9, 0.3], [0.2, 1.0], [-1.0, 0.1]]
    labels = [0, 0, 1, 2]
    params = {"anchors": [2, 5], "topk": 3, "temperature": 0.1, "momentum": 1.0}
    method = create_method("ekd", student_dim=2, teacher_dim=2, num_classes=3, params=params)
    out = method(StudentOutput(torch.tensor(s)), TeacherOutput(torch.tensor(t)),
                 torch.tensor(labels))
    pairs = [(i, j) for i in range(4) for j in range(i + 1, 4)]
    pos = [(i, j) for i, j in pairs if labels[i] == labels[j]]
    neg = [(i, j) for i, j in pairs if labels[i] != labels[j]]
    neg_s = sorted((_cos(s[i], s[j]) for i, j in neg), reverse=True)
    neg_t = sorted((_cos(t[i], t[j]) for i, j in neg), reverse=True)
    idx = [len(neg) // 2, len(neg) // 5]                  # 5 negatives: indices 2 and 1
    thr_s, thr_t = [neg_s[k] for k in idx], [neg_t[k] for k in idx]
    assert method.student_thresholds.tolist() == pytest.approx(thr_s, rel=1e-6)
    assert method.teacher_thresholds.tolist() == pytest.approx(thr_t, rel=1e-6)

    def rank(sim, thr):
        return sum(_sig((sim - a) / 0.1) for a in thr)

    def mse(items):
        return sum((rank(_cos(s[i], s[j]), thr_s) - rank(_cos(t[i], t[j]), thr_t)) ** 2
                   for i, j in items) / len(items)

    # the 3 negatives the *student* ranks hardest
    hardest = sorted(neg, key=lambda p: _cos(s[p[0]], s[p[1]]), reverse=True)[:3]
    expected = 0.02 * mse(pos) + 0.01 * mse(hardest)
    assert out["ekd"].item() == pytest.approx(expected, rel=1e-5)


def test_thresholds_are_an_ema_from_zero():
    torch.manual_seed(0)
    method = create_method("ekd", student_dim=4, teacher_dim=6, num_classes=4,
                           params={"anchors": [10]})
    emb, t = torch.randn(8, 4), torch.randn(8, 6)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    method(StudentOutput(emb), TeacherOutput(t), labels)
    first = method.student_thresholds.clone()
    method(StudentOutput(emb), TeacherOutput(t), labels)
    # momentum 0.01 from 0: m x, then m x + (1 - m) m x
    torch.testing.assert_close(method.student_thresholds, first * (1 + 0.99))
    frozen = method.teacher_thresholds.clone()
    method.eval()(StudentOutput(emb), TeacherOutput(t), labels)
    assert torch.equal(frozen, method.teacher_thresholds)


def test_gradients_edge_batches_and_unlabelled_rows():
    torch.manual_seed(1)
    method = create_method("ekd", student_dim=3, teacher_dim=3, num_classes=5, params={})
    emb = torch.randn(5, 3, requires_grad=True)
    out = method(StudentOutput(emb), TeacherOutput(torch.randn(5, 3)),
                 torch.tensor([0, 0, 1, 2, -1]))
    out["ekd"].backward()
    assert torch.isfinite(out["ekd"]) and torch.isfinite(emb.grad).all()
    assert emb.grad[4].abs().sum() == 0            # unlabelled row: no pairs
    no_pos = method(StudentOutput(emb), TeacherOutput(torch.randn(5, 3)),
                    torch.tensor([0, 1, 2, 3, 4]))
    assert torch.isfinite(no_pos["ekd"])
    one = method(StudentOutput(emb), TeacherOutput(torch.randn(5, 3)),
                 torch.tensor([0, -1, -1, -1, -1]))
    assert one["ekd"].item() == 0.0
