"""KD, feature matching and RKD against hand-written arithmetic; gradients stay on the student."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from distill_support import CosHead

from facekd.distill import StudentOutput, TeacherOutput, create_method
from facekd.errors import ConfigError


def _softmax(row):
    m = max(row)
    e = [math.exp(x - m) for x in row]
    return [x / sum(e) for x in e]


def test_kd_matches_hand_computation():
    torch.manual_seed(0)
    head = CosHead(3, 2, scale=10.0)
    emb = torch.tensor([[1.0, 0.5], [-0.3, 2.0]])
    t = torch.tensor([[0.2, 1.0], [1.0, 1.0]])
    centres = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]])
    kd = create_method("kd", student_dim=2, teacher_dim=2, num_classes=3,
                       params={"temperature": 2.0})
    out = kd(StudentOutput(emb, head=head), TeacherOutput(t, centres, scale=10.0),
             torch.tensor([0, -1]))
    z_s = head.cos_logits(emb).tolist()
    z_t = (10.0 * F.normalize(t, dim=1) @ F.normalize(centres, dim=1).t()).tolist()
    total = 0.0
    for i in range(2):
        p_t = _softmax([z / 2.0 for z in z_t[i]])
        p_s = _softmax([z / 2.0 for z in z_s[i]])
        total += sum(a * (math.log(a) - math.log(b)) for a, b in zip(p_t, p_s, strict=True))
    assert out["kd"].item() == pytest.approx(total / 2 * 4.0, rel=1e-5)


def test_kd_needs_one_identity_list():
    kd = create_method("kd", student_dim=2, teacher_dim=2, num_classes=3, params={})
    with pytest.raises(ConfigError, match="teacher has 4 classes"):
        kd(StudentOutput(torch.randn(2, 2), head=CosHead(3, 2)),
           TeacherOutput(torch.randn(2, 2), torch.randn(4, 2)), torch.tensor([0, 1]))


def test_feature_cosine_and_mse():
    s = torch.tensor([[1.0, 1.0], [2.0, 0.0]])
    t = torch.tensor([[1.0, 0.0], [-1.0, 1.0]])
    mse = create_method("feature", student_dim=2, teacher_dim=2, num_classes=1,
                        params={"feature_loss": "mse", "connector": "none"})
    assert mse(StudentOutput(s), TeacherOutput(t), torch.tensor([0, 0]))["feature"].item() == \
        pytest.approx((0 + 1 + 9 + 1) / 4)
    cos = create_method("feature", student_dim=2, teacher_dim=2, num_classes=1,
                        params={"connector": "none"})
    expected = ((1 - 1 / math.sqrt(2)) + (1 + 1 / math.sqrt(2))) / 2
    assert cos(StudentOutput(s), TeacherOutput(t), torch.tensor([0, 0]))["feature"].item() == \
        pytest.approx(expected, rel=1e-6)
    with pytest.raises(ConfigError, match="equal embedding sizes"):
        create_method("feature", student_dim=2, teacher_dim=3, num_classes=1,
                      params={"connector": "none"})


def _smooth_l1(x):
    return 0.5 * x * x if abs(x) < 1 else abs(x) - 0.5


def _rkd_by_hand(s, t):
    n = len(s)

    def dist(x, i, j):
        return math.dist(x[i], x[j])

    def mean_dist(x):
        return sum(dist(x, i, j) for i in range(n) for j in range(n) if i != j) / (n * n - n)

    ms, mt = mean_dist(s), mean_dist(t)
    d_loss = sum(_smooth_l1(dist(s, i, j) / ms - dist(t, i, j) / mt)
                 for i in range(n) for j in range(n)) / (n * n)

    def cos_angle(x, i, j, k):   # angle at vertex j
        if i == j or k == j:
            return 0.0
        a = [x[i][d] - x[j][d] for d in range(len(x[0]))]
        b = [x[k][d] - x[j][d] for d in range(len(x[0]))]
        return sum(p * q for p, q in zip(a, b, strict=True)) / (math.hypot(*a) * math.hypot(*b))

    a_loss = sum(_smooth_l1(cos_angle(s, i, j, k) - cos_angle(t, i, j, k))
                 for i, j, k in itertools.product(range(n), repeat=3)) / n**3
    return d_loss, a_loss


def test_rkd_matches_hand_computation():
    s = [[0.0, 0.0], [3.0, 0.0], [0.0, 1.0], [1.0, 1.0]]
    t = [[0.0, 0.0], [1.0, 0.0], [0.0, 2.0], [2.0, 2.0]]
    rkd = create_method("rkd", student_dim=2, teacher_dim=2, num_classes=1,
                        params={"normalise": False})
    out = rkd(StudentOutput(torch.tensor(s)), TeacherOutput(torch.tensor(t)),
              torch.tensor([0, 1, 2, 3]))
    d_loss, a_loss = _rkd_by_hand(s, t)
    assert out["rkd_distance"].item() == pytest.approx(d_loss, rel=1e-5)
    assert out["rkd_angle"].item() == pytest.approx(a_loss, rel=1e-5)
    # relations are scale-free: a scaled copy of the teacher costs nothing
    same = rkd(StudentOutput(torch.tensor(t) * 3), TeacherOutput(torch.tensor(t)),
               torch.zeros(4, dtype=torch.long))
    assert same["rkd_distance"].item() == pytest.approx(0.0, abs=1e-6)
    assert same["rkd_angle"].item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("name", ["kd", "feature", "rkd"])
def test_gradients_reach_only_student_side(name):
    torch.manual_seed(1)
    method = create_method(name, student_dim=4, teacher_dim=5, num_classes=6,
                           params={"num_negatives": 2} if name == "kd" else {})
    head = CosHead(6, 4)
    emb = torch.randn(5, 4, requires_grad=True)
    t = torch.randn(5, 5, requires_grad=True)
    centres = torch.randn(6, 5, requires_grad=True)
    out = method(StudentOutput(emb, head=head), TeacherOutput(t, centres),
                 torch.tensor([0, 1, 1, -1, 5]))
    sum(out.values()).backward()
    assert t.grad is None and centres.grad is None
    assert emb.grad is not None and emb.grad.abs().sum() > 0
    for pname, p in method.named_parameters():
        assert p.grad is not None, pname
    if name == "kd":
        assert head.weight.grad is not None


def test_kd_sampled_equals_full_restricted_with_real_head():
    heads = pytest.importorskip("facekd.models.heads")
    from facekd.distill.connectors import kd_kl, sample_classes

    torch.manual_seed(2)
    head = heads.create_head("arcface", 4, 30, scale=16.0)
    emb, t, centres = torch.randn(3, 4), torch.randn(3, 6), torch.randn(30, 6)
    labels = torch.tensor([4, 21, -1])
    kd = create_method("kd", student_dim=4, teacher_dim=6, num_classes=30,
                       params={"num_negatives": 5})
    torch.manual_seed(9)
    idx = sample_classes(labels, 30, 5)
    torch.manual_seed(9)
    sampled = kd(StudentOutput(emb, head=head), TeacherOutput(t, centres, 16.0), labels)["kd"]
    full_t = 16.0 * F.normalize(t, dim=1) @ F.normalize(centres, dim=1).t()
    full_s = head.cos_logits(emb)
    expected = kd_kl(full_s[:, idx], full_t[:, idx], 4.0)
    assert sampled.item() == pytest.approx(expected.item(), rel=1e-5)
