"""The trainer: run folder, exact kill-and-resume, frozen teacher, schedules, bad recipes."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch
from train_support import StandInTeacher, memory_loader_factory, tiny_recipe

from facekd.errors import CheckpointError, ConfigError
from facekd.train import checkpointing
from facekd.train.schedule import lr_factor
from facekd.train.trainer import Trainer, train


def _student_state(run_dir) -> dict[str, torch.Tensor]:
    obj = torch.load(run_dir / "student.pt", weights_only=True)
    assert obj["format"] == "facekd" and obj["arch"] == "train_test_nobn"
    return obj["state_dict"]


def _rows(path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor],
                       atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if atol == 0.0:
            assert torch.equal(a[key], b[key]), key
        else:
            torch.testing.assert_close(a[key].float(), b[key].float(), atol=atol, rtol=0,
                                       msg=key)


def test_kill_and_resume_equals_uninterrupted_run(tmp_path):
    factory = memory_loader_factory()
    overrides = ("optim.epochs=1",)            # 4 steps of 8 images; checkpoint every 3
    full = train(tiny_recipe(tmp_path / "full", "srd", overrides), loader_factory=factory,
                 teacher=StandInTeacher())
    killed = tmp_path / "killed"
    # The "kill": stop after 2 steps (mid-epoch), then a fresh process resumes the folder.
    train(tiny_recipe(killed, "srd", (*overrides, "run.max_steps=2")),
          loader_factory=factory, teacher=StandInTeacher())
    assert [p.name for p in checkpointing.list_checkpoints(killed)] == ["step-00000002.pt"]
    train(tiny_recipe(killed, "srd", overrides), loader_factory=factory,
          teacher=StandInTeacher())
    _assert_same_state(_student_state(full), _student_state(killed))
    summary = json.loads((killed / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["resumed_from"].endswith("step-00000002.pt")
    assert summary["method"] == "srd" and summary["seed"] == 0
    # Logged losses of the repeated run equal the uninterrupted ones, step by step.
    rows_full, rows_killed = _rows(full / "metrics.csv"), _rows(killed / "metrics.csv")
    assert [r["step"] for r in rows_killed] == ["1", "2", "3", "4"]
    for a, b in zip(rows_full, rows_killed, strict=True):
        assert float(a["loss/srd"]) == pytest.approx(float(b["loss/srd"]), abs=1e-6)


def test_rerunning_a_run_that_stopped_mid_epoch_trains_nothing(tmp_path):
    # run.max_steps=2 stops inside a 4-step epoch; the same command again finds nothing
    # left to train (the loop body never runs) and rewrites the same student
    factory = memory_loader_factory()
    recipe = tiny_recipe(tmp_path / "run", "none", ("optim.epochs=1", "run.max_steps=2"))
    out = train(recipe, loader_factory=factory)
    before = _student_state(out)
    train(tiny_recipe(tmp_path / "run", "none", ("optim.epochs=1", "run.max_steps=2")),
          loader_factory=factory)
    _assert_same_state(before, _student_state(out))
    assert json.loads((out / "summary.json").read_text())["steps"] == 2


def test_run_folder_contents_and_backbone_only_student(tmp_path):
    out = train(tiny_recipe(tmp_path / "run", "none", ("run.max_steps=2",
                                                       "run.tensorboard=true")),
                loader_factory=memory_loader_factory())
    for name in ("recipe.yaml", "train.log", "metrics.csv", "student.pt", "full.pt",
                 "summary.json"):
        assert (out / name).is_file(), name
    assert list((out / "tb").iterdir()), "no TensorBoard event file"
    from facekd.train.recipe import load_recipe

    resolved = load_recipe(str(out / "recipe.yaml"))
    assert resolved.student.arch == "train_test_nobn" and resolved.run.max_steps == 2
    student = torch.load(out / "student.pt", weights_only=True)
    assert student["head"] is None and student["arch_kwargs"] == {"num_features": 32}
    full = torch.load(out / "full.pt", weights_only=True)
    assert full["head"]["weight"].shape == (4, 32)
    from facekd.models.checkpoint import load_backbone

    model, _ = load_backbone(out / "student.pt")
    with torch.no_grad():
        assert model.eval()(torch.zeros(2, 3, 112, 112)).shape == (2, 32)
    log_text = (out / "train.log").read_text()
    assert "seed 0" in log_text and "step 2/8" in log_text
    rows = _rows(out / "metrics.csv")
    assert {"loss/loss", "loss/ce", "lr", "images_per_s"} <= set(rows[0])
    assert all(math.isfinite(float(r["loss/ce"])) for r in rows)


def _real_teacher():
    """facekd's Teacher around an mbf_tiny with BatchNorm (buffers must not move either)."""
    import torch.nn.functional as F

    from facekd.models import create_model
    from facekd.models.teacher import Teacher

    torch.manual_seed(3)
    centres = F.normalize(torch.randn(4, 32), dim=1)
    return Teacher(create_model("mbf_tiny", num_features=32), centres=centres, scale=32.0,
                   device="cpu")


@pytest.mark.parametrize("make_teacher", [StandInTeacher, _real_teacher],
                         ids=["stand-in", "facekd-Teacher"])
def test_live_teacher_stays_frozen_and_bitwise_unchanged(tmp_path, make_teacher):
    teacher = make_teacher()
    before = {k: v.clone() for k, v in teacher.model.state_dict().items()}
    trainer = Trainer(tiny_recipe(tmp_path / "run", "srd", ("run.max_steps=2",)),
                      loader_factory=memory_loader_factory(), teacher=teacher)
    trainer.run()
    _assert_same_state(before, teacher.model.state_dict())
    assert all(p.grad is None for p in teacher.model.parameters())
    # The optimiser holds student, head and the method's connector, never the teacher.
    teacher_ids = {id(p) for p in teacher.model.parameters()}
    assert not teacher_ids & {id(p) for p in trainer.trainable}
    assert {id(p) for p in trainer.method.parameters()} <= {id(p) for p in trainer.trainable}


def test_schedule_warmup_then_poly_and_cosine():
    assert lr_factor(0, 100, 10, "poly") == pytest.approx(0.1)
    assert lr_factor(9, 100, 10, "poly") == pytest.approx(1.0)
    assert lr_factor(10, 100, 10, "poly") == pytest.approx(1.0)
    assert lr_factor(55, 100, 10, "poly") == pytest.approx(0.25)       # (1 - 0.5) ** 2
    assert lr_factor(55, 100, 10, "cosine") == pytest.approx(0.5)
    assert lr_factor(100, 100, 10, "cosine") == pytest.approx(0.0)
    assert lr_factor(50, 100, 0, "constant") == 1.0


def _setup(tmp_path, method, overrides=(), teacher=None):
    trainer = Trainer(tiny_recipe(tmp_path / "run", method, overrides),
                      loader_factory=memory_loader_factory(), teacher=teacher)
    try:
        trainer.setup()
    finally:
        trainer.close()


def test_unknown_method_fails_with_a_hint(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown distillation method 'srdd'.*did you mean "
                                          r"'srd'"):
        _setup(tmp_path, "srdd")


def test_srd_without_teacher_classifier_tells_how_to_get_one(tmp_path):
    teacher = StandInTeacher()
    teacher.centres = None          # a backbone-only teacher, no teacher.classifier
    with pytest.raises(ConfigError, match=r"needs the teacher's classifier.*"
                                          r"facekd teacher centres"):
        _setup(tmp_path, "srd", teacher=teacher)


def test_method_needing_a_teacher_without_one(tmp_path):
    with pytest.raises(ConfigError, match=r"method 'feature' needs a teacher.*"
                                          r"teacher.checkpoint"):
        _setup(tmp_path, "feature")


@pytest.mark.parametrize(("override", "message"), [
    ("optim.epochs=0", "optim.epochs must be positive"),
    ("run.max_steps=0", "run.max_steps must be positive"),
    ("optim.warmup_epochs=5", "exceeds optim.epochs"),
    ("student.head.sample_rate=1.5", "sample_rate must be in"),
])
def test_bad_recipe_values_are_rejected(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        tiny_recipe(tmp_path, "none", (override,))


def test_resume_with_another_student_is_refused(tmp_path):
    factory = memory_loader_factory()
    train(tiny_recipe(tmp_path / "run", "none", ("run.max_steps=1",)), loader_factory=factory)
    with pytest.raises(CheckpointError, match=r"was trained with student\.arch 'train_test_nobn'"):
        train(tiny_recipe(tmp_path / "run", "none", ("student.arch=r_tiny",)),
              loader_factory=factory)


def test_fresh_start_over_old_checkpoints_is_refused(tmp_path):
    factory = memory_loader_factory()
    train(tiny_recipe(tmp_path / "run", "none", ("run.max_steps=1",)), loader_factory=factory)
    with pytest.raises(ConfigError, match=r"already has checkpoints.*run\.resume"):
        train(tiny_recipe(tmp_path / "run", "none", ("run.resume=false",)),
              loader_factory=factory)


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    path = tmp_path / "checkpoints" / "step-00000001.pt"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=r"step-00000001\.pt: cannot load"):
        checkpointing.load_state(path)


def test_method_parts_are_clipped_apart_from_the_backbone(tmp_path, monkeypatch):
    # FRSKD's fresh self-teacher and its s = 64 head must not shrink the backbone's step:
    # the backbone is clipped alone (arcface_torch), the method's parts as their own group.
    calls: list[tuple[set[int], float]] = []
    real_clip = torch.nn.utils.clip_grad_norm_

    def spy(params, max_norm, *args, **kwargs):
        params = list(params)
        norm = real_clip(params, max_norm, *args, **kwargs)
        calls.append(({id(p) for p in params}, float(norm)))
        return norm

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)
    recipe = tiny_recipe(tmp_path / "run", "frskd",
                         ("method.params={pool: avg, scale: 64.0}", "optim.clip_grad=1.0",
                          "run.max_steps=1"))
    trainer = Trainer(recipe, loader_factory=memory_loader_factory())
    trainer.setup()
    try:
        trainer.train_step(next(iter(trainer.loader)), None)
        backbone = {id(p) for p in trainer.student.parameters()}
        method = {id(p) for p in trainer.method.parameters()}
        assert [ids for ids, _ in calls] == [backbone, method]
        # the backbone's gradient is clipped by its own norm only
        (_, raw_backbone), (_, raw_method) = calls
        after = math.sqrt(sum(float(p.grad.pow(2).sum())
                              for p in trainer.student.parameters() if p.grad is not None))
        assert after == pytest.approx(min(raw_backbone, 1.0), rel=1e-4)
        assert raw_method > 0.0
    finally:
        trainer.close()
