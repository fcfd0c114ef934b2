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
    out = _refilled(1, mining="all")(StudentOutput(torch.tensor(s)),
                                     TeacherOutput(torch.tensor(t)), torch.tensor(labels))
    us, ut = [_unit(v) for v in s], [_unit(v) for v in t]
    total = 0.0
    for a, p in [(0, 1), (1, 0)]:     # the anchor-positive pairs; negatives are rows 2, 3
        tuple_cols = [p, 2, 3]
        p_s = _softmax([-math.dist(us[a], us[c]) / tau for c in tuple_cols])
        p_t = _softmax([-math.dist(ut[a], ut[c]) / tau for c in tuple_cols])
        total += _kl(p_t, p_s)
    assert set(out) == {"relation"}
    assert out["relation"].item() == pytest.approx(total / 2, rel=1e-5)


def test_semi_hard_tuples_by_hand():
    # The authors' miner: negatives k of pair (a, p) with 0 < d_ak - d_ap <= 0.2 on the
    # student; merged per pair; a pair without one forms no tuple.
    s = [[1.0, 0.0], [0.9, 0.436], [0.8, 0.6], [0.0, 1.0], [0.96, -0.28]]
    t = [[1.0, 1.0], [1.0, 0.0], [-1.0, 1.0], [0.0, -1.0], [0.3, 0.2]]
    labels = [0, 0, 1, 2, 3]
    tau = 4.0
    us, ut = [_unit(v) for v in s], [_unit(v) for v in t]
    tuples = []
    for a, p in [(0, 1), (1, 0)]:
        d_ap = math.dist(us[a], us[p])
        negs = [k for k in (2, 3, 4) if 0 < math.dist(us[a], us[k]) - d_ap <= 0.2]
        if negs:
            tuples.append((a, p, negs))
    # by hand: (0, 1) has d_ap 0.447, row 2 at 0.632 (semi-hard), row 4 at 0.283 (hard),
    # row 3 at 1.414 (easy); (1, 0) has none (row 2 at 0.193, row 4 at 0.718): no tuple
    assert tuples == [(0, 1, [2])]
    total = 0.0
    for a, p, negs in tuples:
        cols = [p, *negs]
        p_s = _softmax([-math.dist(us[a], us[c]) / tau for c in cols])
        p_t = _softmax([-math.dist(ut[a], ut[c]) / tau for c in cols])
        total += _kl(p_t, p_s)
    out = _refilled(1)(StudentOutput(torch.tensor(s)), TeacherOutput(torch.tensor(t)),
                       torch.tensor(labels))
    assert out["relation"].item() == pytest.approx(total / len(tuples), rel=1e-4)
    # every negative farther than d_ap + 0.2 (or closer than d_ap): no tuple, zero loss
    far = [[1.0, 0.0], [0.995, 0.1], [-1.0, 0.0]]
    none = _refilled(1)(StudentOutput(torch.tensor(far)), TeacherOutput(torch.randn(3, 2)),
                        torch.tensor([0, 0, 1]))
    assert none["relation"].item() == 0.0


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
    for stage, key in ((1, "relation"), (2, "local_kd")):
        method = _refilled(stage, dim_s=4, dim_t=5, mining="all")
        full = method(StudentOutput(emb, head=head), TeacherOutput(t, centres), labels)
        labelled = method(StudentOutput(emb[:5], head=head), TeacherOutput(t[:5], centres),
                          labels[:5])
        assert full[key].item() == pytest.approx(labelled[key].item(), rel=1e-6)
        none = method(StudentOutput(emb, head=head), TeacherOutput(t, centres),
                      torch.full((6,), -1))
        assert none[key].item() == 0.0


def test_teacher_never_saw_student_identities():
    # teacher 5-d, student 3-d; centres are mean teacher embeddings of the student's 4 classes
    torch.manual_seed(2)
    head = CosHead(4, 3)
    emb = torch.randn(6, 3, requires_grad=True)
    t = torch.randn(6, 5, requires_grad=True)
    centres = torch.randn(4, 5, requires_grad=True)
    labels = torch.tensor([0, 0, 3, 3, 2, -1])
    out = {}
    for stage in (1, 2):
        method = _refilled(stage, num_classes=4, dim_s=3, dim_t=5, mining="all")
        out.update(method(StudentOutput(emb, head=head), TeacherOutput(t, centres), labels))
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
    for stage in (1, 2):
        method = _refilled(stage, mining="all")
        as_long = method(StudentOutput(emb, head=head), TeacherOutput(t, centres), labels)
        as_int = method(StudentOutput(emb, head=head), TeacherOutput(t, centres),
                        labels.to(torch.int32))
        for key in as_long:
            assert as_int[key].item() == pytest.approx(as_long[key].item())
    srd = create_method("srd", student_dim=2, teacher_dim=2, num_classes=3,
                        params={"num_negatives": 1, "margin_on_labelled": True})
    assert torch.isfinite(srd(StudentOutput(emb), TeacherOutput(t, centres),
                              labels.to(torch.int32))["srd"])


def test_two_stage_plan_splits_the_epochs_and_drops_ce_in_stage_one(tmp_path):
    from facekd.train.recipe import load_recipe
    from facekd.train.stages import stage_recipes

    recipe = load_recipe(None, [f"run.output={tmp_path}", "method.name=refilled",
                                "optim.epochs=3", "optim.warmup_epochs=1",
                                "method.weights={local_kd: 2.0}"])
    (one_name, one), (two_name, two) = stage_recipes(recipe)
    assert (one_name, two_name) == ("stage1", "stage2")
    assert one.method.params["stage"] == 1 and one.method.weights["ce"] == 0.0
    assert one.data.images_per_identity == 4 and one.optim.epochs == 1
    assert one.run.output == str(tmp_path / "stage1") and one.student.init is None
    assert two.method.params["stage"] == 2 and "ce" not in two.method.weights
    assert two.method.weights["local_kd"] == 2.0
    assert two.data.images_per_identity == 1 and two.optim.epochs == 2
    assert two.run.output == str(tmp_path)
    assert two.student.init == str(tmp_path / "stage1" / "student.pt")
    with pytest.raises(ConfigError, match="stage1_epochs"):
        stage_recipes(load_recipe(None, ["method.name=refilled", "optim.epochs=1"]))
    with pytest.raises(ConfigError, match="two trainer runs"):
        _refilled("two_stage")(StudentOutput(torch.randn(2, 2)), TeacherOutput(
            torch.randn(2, 2)), torch.tensor([0, 0]))
