"""Margin heads against hand-computed values, including the theta + m > pi guard."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from facekd.errors import ConfigError
from facekd.models.heads import apply_margin, create_head, head_from_state

S = 64.0


def _head_at_angles(kind, angles_deg, **kw):
    """2-D head with centres on the axes and one embedding per angle from class 0."""
    head = create_head(kind, 2, 2, scale=S, **kw)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[3.0, 0.0], [0.0, 2.0]]))  # norms must not matter
    rad = torch.tensor(angles_deg, dtype=torch.float64) * math.pi / 180
    emb = torch.stack([torch.cos(rad), torch.sin(rad)], dim=1).float() * 5.0
    return head, emb


def test_arcface_target_logit_and_other_logits():
    head, emb = _head_at_angles("arcface", [60.0], margin=0.5)
    logits = head(emb, torch.tensor([0]))
    assert logits[0, 0].item() == pytest.approx(S * math.cos(math.pi / 3 + 0.5), abs=1e-4)
    assert logits[0, 1].item() == pytest.approx(S * math.cos(math.pi / 6), abs=1e-4)


def test_arcface_guard_when_theta_plus_m_exceeds_pi():
    head, emb = _head_at_angles("arcface", [170.0], margin=0.5)
    cos = math.cos(170 * math.pi / 180)
    logit = head(emb, torch.tensor([0]))[0, 0].item()
    # theta + m = 2.967 + 0.5 > pi: cos(theta + m) would be -0.94 (better than cos!)
    assert logit == pytest.approx(S * (cos - 0.5 * math.sin(0.5)), abs=1e-4)
    assert logit < S * cos


@pytest.mark.parametrize("kw", [{"kind": "arcface", "margin": 0.5},
                                {"kind": "combined", "m1": 1.0, "m2": 0.3, "m3": 0.2},
                                {"kind": "combined", "m1": 1.35, "m2": 0.2, "m3": 0.0},
                                {"kind": "cosface", "margin": 0.4}])
def test_target_logit_never_rises_with_angle(kw):
    angles = [float(a) for a in range(0, 181)]
    kind = kw.pop("kind")
    head, emb = _head_at_angles(kind, angles, **kw)
    target = head(emb, torch.zeros(len(angles), dtype=torch.long))[:, 0]
    assert torch.all(target[1:] <= target[:-1] + 1e-4)
    assert torch.all(target <= S * torch.cos(torch.tensor(angles) * math.pi / 180) + 1e-3)


def test_cosface_and_combined_values():
    head, emb = _head_at_angles("cosface", [40.0], margin=0.35)
    assert head(emb, torch.tensor([0]))[0, 0].item() == pytest.approx(
        S * (math.cos(math.radians(40)) - 0.35), abs=1e-4)
    head, emb = _head_at_angles("combined", [40.0], m1=1.0, m2=0.3, m3=0.2)
    assert head(emb, torch.tensor([0]))[0, 0].item() == pytest.approx(
        S * (math.cos(math.radians(40) + 0.3) - 0.2), abs=1e-4)
    head, emb = _head_at_angles("combined", [40.0], m1=1.35, m2=0.0, m3=0.0)
    assert head(emb, torch.tensor([0]))[0, 0].item() == pytest.approx(
        S * math.cos(1.35 * math.radians(40)), abs=1e-4)
    # m1 > 1 beyond its limit: continuous fallback, -1 at theta0 = pi / 1.35
    theta0 = math.pi / 1.35
    head, emb = _head_at_angles("combined", [160.0], m1=1.35)
    expected = math.cos(math.radians(160)) - (1 + math.cos(theta0))
    assert head(emb, torch.tensor([0]))[0, 0].item() == pytest.approx(S * expected, abs=1e-4)


def test_matches_arcface_torch_combined_margin_in_range():
    """cos(arccos(c) + m2) as arcface_torch computes it, for angles below pi - m."""
    torch.manual_seed(0)
    cos = torch.empty(64, 10).uniform_(-0.5, 0.999)
    labels = torch.randint(0, 10, (64,))
    labels[::7] = -1
    ours = apply_margin(cos, labels, 1.0, 0.5, 0.0)
    ref = cos.clone()
    rows = torch.nonzero(labels != -1)[:, 0]
    ref[rows, labels[rows]] = torch.cos(torch.arccos(ref[rows, labels[rows]]) + 0.5)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


def test_unlabelled_rows_get_no_margin_and_softmax_has_none():
    head, emb = _head_at_angles("arcface", [30.0, 30.0], margin=0.5)
    logits = head(emb, torch.tensor([-1, 0]))
    torch.testing.assert_close(logits[0], head.cos_logits(emb)[0])
    assert logits[1, 0] < logits[0, 0]
    head, emb = _head_at_angles("softmax", [30.0])
    torch.testing.assert_close(head(emb, torch.tensor([0])), head.cos_logits(emb))


def test_cos_logits_subset_and_centres():
    head = create_head("arcface", 8, 20)
    emb = torch.randn(5, 8)
    idx = torch.tensor([3, 7, 11])
    full = head.cos_logits(emb)
    torch.testing.assert_close(head.cos_logits(emb, idx), full[:, idx])
    torch.testing.assert_close(full, S * F.normalize(emb) @ head.centres().T)
    torch.testing.assert_close(head.centres().norm(dim=1), torch.ones(20))


def test_gradients_finite_at_the_poles():
    head = create_head("arcface", 2, 2)
    with torch.no_grad():
        head.weight.copy_(torch.eye(2))
    emb = torch.tensor([[1.0, 0.0], [-1.0, 0.0]], requires_grad=True)
    loss = F.cross_entropy(head(emb, torch.tensor([0, 0])), torch.tensor([0, 0]))
    loss.backward()
    assert torch.isfinite(emb.grad).all() and torch.isfinite(head.weight.grad).all()
    head = create_head("combined", 2, 2, m1=1.2, m2=0.1)
    emb = torch.tensor([[1.0, 0.0]], requires_grad=True)
    head(emb, torch.tensor([0])).sum().backward()
    assert torch.isfinite(emb.grad).all()


def test_export_state_round_trip_and_bad_kind():
    head = create_head("cosface", 4, 6, margin=0.4, scale=30.0)
    again = head_from_state(head.export_state())
    assert again.config() == head.config() and torch.equal(again.weight, head.weight)
    with pytest.raises(ConfigError, match="unknown head kind"):
        create_head("sphereface", 4, 6)
