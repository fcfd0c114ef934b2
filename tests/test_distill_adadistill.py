"""AdaDistill: adaptive centre update and ArcFace on the centres, by hand."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from facekd.distill import StudentOutput, TeacherOutput, create_method
from facekd.errors import ConfigError


def _unit(v):
    n = math.sqrt(sum(x * x for x in v))
    return [x / n for x in v]


def _dot(a, b):
    return sum(x * y for x, y in zip(a, b, strict=True))


def _ada(num_classes=3, dim_s=2, dim_t=2, **params):
    return create_method("adadistill", student_dim=dim_s, teacher_dim=dim_t,
                         num_classes=num_classes, params={"scale": 8.0, "margin": 0.45,
                                                          **params})


def test_update_and_loss_match_hand_computation():
    method = _ada()
    w0 = [[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]]
    with torch.no_grad():
        method.centres.copy_(torch.tensor(w0))
    s = [[1.0, 0.0], [1.0, 1.0]]
    t = [[0.6, 0.8], [0.0, 2.0]]
    labels = [0, 1]
    out = method(StudentOutput(torch.tensor(s)), TeacherOutput(torch.tensor(t)),
                 torch.tensor(labels))
    us, ut = [_unit(v) for v in s], [_unit(v) for v in t]
    centres = [list(row) for row in w0]
    for i, y in enumerate(labels):
        lam = min(max(_dot(_unit(w0[y]), ut[i]), 1e-6), 1.0)
        alpha = min(max(_dot(us[i], ut[i]) * lam, 1e-6), 1.0)
        centres[y] = [alpha * a + (1 - alpha) * b for a, b in zip(w0[y], ut[i], strict=True)]
    # row 0: cos(s, t) 0.6, lam cos(W_0, t) 0.6 -> alpha 0.36 -> W_0 = (0.744, 0.512)
    assert centres[0] == pytest.approx([0.744, 0.512])
    torch.testing.assert_close(method.centres, torch.tensor(centres), rtol=1e-6, atol=1e-6)
    total = 0.0
    for i, y in enumerate(labels):
        cos = [_dot(us[i], _unit(c)) for c in centres]
        logits = [8.0 * c for c in cos]
        logits[y] = 8.0 * math.cos(math.acos(cos[y]) + 0.45)
        m = max(logits)
        total += -(logits[y] - m - math.log(sum(math.exp(z - m) for z in logits)))
    assert set(out) == {"adadistill"}
    assert out["adadistill"].item() == pytest.approx(total / 2, rel=1e-5)


def test_alpha_is_small_when_student_is_far_from_teacher():
    method = _ada()
    with torch.no_grad():
        method.centres.copy_(torch.tensor([[0.0, 1.0], [0.0, 1.0], [1.0, 0.0]]))
    # student opposite to the teacher: cos < 0 -> alpha clamps to 1e-6 -> W_y ~ t
    method(StudentOutput(torch.tensor([[-1.0, 0.0]])), TeacherOutput(torch.tensor([[2.0, 0.0]])),
           torch.tensor([0]))
    torch.testing.assert_close(method.centres[0], torch.tensor([1.0, 1e-6]), atol=1e-5,
                               rtol=0)
    torch.testing.assert_close(method.centres[1], torch.tensor([0.0, 1.0]))   # untouched


def test_duplicate_labels_keep_the_last_rows_update_and_unlabelled_rows_are_skipped():
    method = _ada()
    start = method.centres.clone()
    s = torch.tensor([[1.0, 0.2], [0.3, 1.0], [1.0, 1.0]])
    t = torch.tensor([[1.0, 0.0], [0.0, 1.0], [5.0, 5.0]])
    method(StudentOutput(s), TeacherOutput(t), torch.tensor([2, 2, -1]))
    last = _ada()
    with torch.no_grad():
        last.centres.copy_(start)
    last(StudentOutput(s[1:2]), TeacherOutput(t[1:2]), torch.tensor([2]))
    torch.testing.assert_close(method.centres, last.centres)
    torch.testing.assert_close(method.centres[:2], start[:2])


def test_gradients_reach_the_student_not_the_centres_and_eval_freezes_them():
    torch.manual_seed(0)
    method = _ada(num_classes=4, dim_s=3, dim_t=5)          # sizes differ: a connector
    assert "centres" in dict(method.named_buffers())
    assert not any(n.startswith("centres") for n, _ in method.named_parameters())
    emb = torch.randn(6, 3, requires_grad=True)
    out = method(StudentOutput(emb), TeacherOutput(torch.randn(6, 5)),
                 torch.tensor([0, 1, 2, 3, 0, -1]))
    out["adadistill"].backward()
    assert emb.grad.abs().sum() > 0
    assert all(p.grad is not None for p in method.connector.parameters())
    frozen = method.centres.clone()
    method.eval()(StudentOutput(emb.detach()), TeacherOutput(torch.randn(6, 5)),
                  torch.tensor([0, 1, 2, 3, 0, 1]))
    assert torch.equal(frozen, method.centres)


def test_it_replaces_the_head_ce_and_checks_labels():
    from facekd.distill import resolve_weights

    method = _ada()
    assert resolve_weights(method, {}) == {"adadistill": 1.0, "ce": 0.0}
    assert method.loss_names == ["adadistill"]
    with pytest.raises(ConfigError, match="label 7"):
        method(StudentOutput(torch.randn(1, 2)), TeacherOutput(torch.randn(1, 2)),
               torch.tensor([7]))
    none = method(StudentOutput(torch.randn(2, 2, requires_grad=True)),
                  TeacherOutput(torch.randn(2, 2)), torch.tensor([-1, -1]))
    assert none["adadistill"].item() == 0.0
    assert F.normalize(method.centres, dim=1).shape == (3, 2)


@pytest.mark.parametrize("method", ["adadistill", "ekd"])
def test_trains_and_resumes_exactly_with_its_buffers(tmp_path, method):
    # the adaptive centres (EKD: the threshold EMAs) are method state: a killed run
    # resumes them from its checkpoint and ends where an uninterrupted run ends
    from train_support import StandInTeacher, memory_loader_factory, tiny_recipe

    from facekd.train.trainer import train

    overrides = ("optim.epochs=1",)
    full = train(tiny_recipe(tmp_path / "full", method, overrides),
                 loader_factory=memory_loader_factory(), teacher=StandInTeacher())
    killed = tmp_path / "killed"
    train(tiny_recipe(killed, method, (*overrides, "run.max_steps=2")),
          loader_factory=memory_loader_factory(), teacher=StandInTeacher())
    train(tiny_recipe(killed, method, overrides), loader_factory=memory_loader_factory(),
          teacher=StandInTeacher())
    a = torch.load(full / "full.pt", weights_only=True)
    b = torch.load(killed / "full.pt", weights_only=True)
    buffers = {"adadistill": ["centres"],
               "ekd": ["student_thresholds", "teacher_thresholds"]}[method]
    for key in buffers:
        start = a["meta"]["method_state"][key]
        assert torch.equal(start, b["meta"]["method_state"][key]), key
        assert start.abs().sum() > 0
    for key, value in a["state_dict"].items():
        torch.testing.assert_close(value, b["state_dict"][key], rtol=0, atol=1e-6)
