"""SRD: cross-network logits through the teacher's centres, hand-checked, sampled and open-set."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from facekd.distill import StudentOutput, TeacherOutput, create_method
from facekd.distill.connectors import sample_classes
from facekd.errors import ConfigError

SCALE = 64.0


def _identity_srd(dim: int, num_classes: int, **params):
    """SRD whose embedding connector is exactly the identity (eval BN, eps 0)."""
    srd = create_method("srd", student_dim=dim, teacher_dim=dim, num_classes=num_classes,
                        params=params)
    with torch.no_grad():
        srd.connector.linear.weight.copy_(torch.eye(dim))
    srd.connector.bn.eps = 0.0
    return srd.eval()


def _unit(v):
    n = math.sqrt(sum(x * x for x in v))
    return [x / n for x in v]


def _dot(a, b):
    return sum(x * y for x, y in zip(a, b, strict=True))


def test_srd_matches_hand_computation():
    s = [[1.0, 0.0], [0.6, 0.8], [-1.0, 1.0]]
    t = [[2.0, 1.0], [0.0, 3.0], [-1.0, 0.5]]
    w = [[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]]
    srd = _identity_srd(2, 3)
    out = srd(StudentOutput(torch.tensor(s)), TeacherOutput(torch.tensor(t), torch.tensor(w),
                                                           SCALE),
              torch.tensor([0, 2, -1]))
    sq = 0.0
    for i in range(3):
        for j in range(3):
            cross = SCALE * _dot(_unit(s[i]), _unit(w[j]))
            target = SCALE * _dot(_unit(t[i]), _unit(w[j]))
            sq += (cross - target) ** 2
    feat = sum((s[i][k] - t[i][k]) ** 2 for i in range(3) for k in range(2)) / 6
    assert out["srd"].item() == pytest.approx(sq / 9, rel=1e-5)
    assert out["feat"].item() == pytest.approx(feat, rel=1e-6)


def test_srd_feature_loss_variants():
    s = torch.tensor([[1.0, 2.0], [3.0, -1.0]])
    t = torch.tensor([[2.0, 2.0], [1.0, 0.0]])
    w = torch.eye(2)
    labels = torch.tensor([0, 1])
    cos = [_dot(_unit(a), _unit(b)) for a, b in zip(s.tolist(), t.tolist(), strict=True)]
    out = _identity_srd(2, 2, feature_loss="cosine")(StudentOutput(s), TeacherOutput(t, w),
                                                      labels)
    assert out["feat"].item() == pytest.approx(sum(1 - c for c in cos) / 2, rel=1e-6)
    out = _identity_srd(2, 2, feature_loss="mse_normalised")(StudentOutput(s),
                                                              TeacherOutput(t, w), labels)
    diff = [(x - y) ** 2 for a, b in zip(s.tolist(), t.tolist(), strict=True)
            for x, y in zip(_unit(a), _unit(b), strict=True)]
    assert out["feat"].item() == pytest.approx(sum(diff) / 4, rel=1e-6)


def test_margin_on_labelled_rows_only():
    torch.manual_seed(0)
    srd = _identity_srd(4, 5, margin_on_labelled=True, margin=0.5)
    plain = _identity_srd(4, 5)
    s, t = torch.randn(3, 4), torch.randn(3, 4)
    teacher = TeacherOutput(t, F.normalize(torch.randn(5, 4), dim=1), SCALE)
    labels = torch.tensor([2, -1, 4])
    cross_m, target_m = srd.logits(s, teacher, labels, None)
    cross, target = plain.logits(s, teacher, labels, None)
    for row, col in [(0, 2), (2, 4)]:
        for with_m, without in [(cross_m, cross), (target_m, target)]:
            theta = math.acos(without[row, col].item() / SCALE)
            assert with_m[row, col].item() == pytest.approx(SCALE * math.cos(theta + 0.5),
                                                            abs=1e-3)
    changed = torch.zeros(3, 5, dtype=torch.bool)
    changed[0, 2] = changed[2, 4] = True
    assert torch.equal(cross_m[~changed], cross[~changed])   # unlabelled row untouched
    assert torch.equal(target_m[~changed], target[~changed])


def test_sampled_logits_equal_full_restricted():
    torch.manual_seed(1)
    num_classes = 50
    srd = _identity_srd(8, num_classes, num_negatives=6, margin_on_labelled=True)
    s, t = torch.randn(4, 8), torch.randn(4, 8)
    teacher = TeacherOutput(t, torch.randn(num_classes, 8), SCALE)
    labels = torch.tensor([3, 17, 17, -1])
    torch.manual_seed(2)
    idx = sample_classes(labels, num_classes, 6)
    assert idx.numel() == 2 + 6 and {3, 17} <= set(idx.tolist())
    cross_sub, target_sub = srd.logits(s, teacher, labels, idx)
    cross_all, target_all = srd.logits(s, teacher, labels, None)
    torch.testing.assert_close(cross_sub, cross_all[:, idx])
    torch.testing.assert_close(target_sub, target_all[:, idx])
    # forward samples with the same global RNG, so a re-seed reproduces the loss
    torch.manual_seed(2)
    loss = srd(StudentOutput(s), teacher, labels)["srd"]
    assert loss.item() == pytest.approx(F.mse_loss(cross_sub, target_sub).item(), rel=1e-6)


def test_unlabelled_rows_use_their_own_teacher_targets():
    torch.manual_seed(3)
    srd = _identity_srd(4, 6)
    s, t = torch.randn(5, 4), torch.randn(5, 4)
    centres = torch.randn(6, 4)
    labels = torch.tensor([0, 1, -1, -1, 5])
    cross, target = srd.logits(s, TeacherOutput(t, centres), labels, None)
    for row in (2, 3):   # each unlabelled row alone gives the same logits
        c1, t1 = srd.logits(s[row:row + 1], TeacherOutput(t[row:row + 1], centres),
                            labels[row:row + 1], None)
        torch.testing.assert_close(cross[row:row + 1], c1)
        torch.testing.assert_close(target[row:row + 1], t1)
    all_unlabelled = srd(StudentOutput(s), TeacherOutput(t, centres), torch.full((5,), -1))
    assert all(torch.isfinite(v) for v in all_unlabelled.values())


def test_teacher_with_other_identities():
    # open-set: 7 teacher classes, student data has 3; margin needs shared labels.
    s, t = torch.randn(4, 4), torch.randn(4, 6)
    teacher = TeacherOutput(t, torch.randn(7, 6))
    srd = create_method("srd", student_dim=4, teacher_dim=6, num_classes=3, params={})
    out = srd(StudentOutput(s), teacher, torch.tensor([0, 1, 2, -1]))
    assert torch.isfinite(out["srd"])
    srd_m = create_method("srd", student_dim=4, teacher_dim=6, num_classes=3,
                          params={"margin_on_labelled": True})
    with pytest.raises(ConfigError, match="margin needs shared labels"):
        srd_m(StudentOutput(s), teacher, torch.tensor([0, 1, 2, -1]))


@pytest.mark.parametrize("connector", ["embedding", "feature"])
def test_gradients_reach_student_and_connector_only(connector):
    torch.manual_seed(4)
    srd = create_method("srd", student_dim=6, teacher_dim=5, num_classes=4,
                        params={"connector": connector, "num_negatives": 1},
                        student_feature_channels=[3, 6])
    emb = torch.randn(4, 6, requires_grad=True)
    fmap = torch.randn(4, 6, 3, 3, requires_grad=True)
    # teacher tensors that (wrongly) require grad must still receive none
    t = torch.randn(4, 5, requires_grad=True)
    centres = torch.randn(4, 5, requires_grad=True)
    out = srd(StudentOutput(emb, [torch.randn(4, 3, 6, 6), fmap]), TeacherOutput(t, centres),
              torch.tensor([0, 1, -1, 3]))
    sum(out.values()).backward()
    assert t.grad is None and centres.grad is None
    source = emb if connector == "embedding" else fmap
    assert source.grad is not None and source.grad.abs().sum() > 0
    for name, p in srd.named_parameters():
        assert p.grad is not None, name


def test_teacher_classes_switch():
    s, t = torch.randn(3, 4), torch.randn(3, 4)
    labels = torch.tensor([0, 1, 2])
    teacher = TeacherOutput(t, torch.randn(3, 4))
    disjoint = create_method("srd", student_dim=4, teacher_dim=4, num_classes=3,
                             params={"teacher_classes": "disjoint",
                                     "margin_on_labelled": True})
    with pytest.raises(ConfigError, match="teacher_classes: disjoint"):
        disjoint(StudentOutput(s), teacher, labels)
    shared = create_method("srd", student_dim=4, teacher_dim=4, num_classes=5,
                           params={"teacher_classes": "shared"})
    with pytest.raises(ConfigError, match="'shared' but the teacher has 3 classes"):
        shared(StudentOutput(s), teacher, labels)


def test_feature_connector_can_reach_a_signed_embedding():
    # The teacher's embedding is signed: a connector ending in ReLU could never match a
    # negative coordinate; SRD's feature connector must be able to output one.
    torch.manual_seed(5)
    srd = create_method("srd", student_dim=4, teacher_dim=3, num_classes=2,
                        params={"connector": "feature"}, student_feature_channels=[3, 6])
    out = srd.connector(torch.randn(8, 6, 2, 2))
    assert (out < 0).any()


def test_srd_term_is_a_cosine_loss_of_weight_2s2_over_d():
    # Near-isotropic centres: mean_c s^2 ((u - t).w_c)^2 ~ (2 s^2 / D)(1 - cos(u, t)).
    from facekd.distill.srd import effective_cosine_weight

    g = torch.Generator().manual_seed(0)
    dim, classes, scale = 16, 20000, 32.0
    centres = F.normalize(torch.randn(classes, dim, generator=g), dim=1)
    u = F.normalize(torch.randn(64, dim, generator=g), dim=1)
    t = F.normalize(u + 0.5 * torch.randn(64, dim, generator=g), dim=1)
    mse = F.mse_loss(scale * u @ centres.t(), scale * t @ centres.t())
    cosine = (1.0 - (u * t).sum(1)).mean()
    assert effective_cosine_weight(scale, dim) == 2 * scale**2 / dim == 128.0
    assert mse.item() == pytest.approx(effective_cosine_weight(scale, dim) * cosine.item(),
                                       rel=0.03)
