"""Methods trained in stages: REFILLED's stage 1 alone, then stage 2 from its student."""

from __future__ import annotations

import csv

import pytest
import torch
from train_support import StandInTeacher, memory_loader_factory, tiny_recipe

from facekd.train.stages import stage_recipes
from facekd.train.trainer import Trainer, train


def _grouping_ignored(factory):
    # the in-memory stand-in has no P x K sampler; its 8-image batches of 4 classes hold
    # same-identity pairs anyway
    def wrapped(source, batch_size, **kw):
        kw.pop("images_per_identity", None)
        return factory(source, batch_size, **kw)

    return wrapped


def test_refilled_runs_stage_one_alone_then_stage_two_from_its_student(tmp_path):
    out = tmp_path / "run"
    recipe = tiny_recipe(out, "refilled", ("optim.epochs=2", "optim.warmup_epochs=0"))
    factory = _grouping_ignored(memory_loader_factory())
    train(recipe, loader_factory=factory, teacher=StandInTeacher())
    stage1 = out / "stage1"
    assert (stage1 / "summary.json").exists() and (out / "summary.json").exists()
    with open(stage1 / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows and "loss/local_kd" not in rows[0]
    for row in rows:   # stage 1: relationship matching only, no CE in the loss
        assert float(row["loss/loss"]) == pytest.approx(1000 * float(row["loss/relation"]),
                                                        rel=1e-5, abs=1e-6)
        assert float(row["loss/ce"]) > 0
    with open(out / "metrics.csv", newline="") as f:
        assert "loss/local_kd" in next(csv.DictReader(f))
    # stage 2 starts from stage 1's final student
    final_stage1 = torch.load(stage1 / "student.pt", weights_only=True)["state_dict"]
    _, second = stage_recipes(recipe)[1]
    trainer = Trainer(second, loader_factory=factory, teacher=StandInTeacher())
    try:
        trainer.setup()
        for key, value in trainer.student.state_dict().items():
            assert torch.equal(value, final_stage1[key]), key
    finally:
        trainer.close()
    # a rerun finds both stages done and trains nothing
    stamp = (stage1 / "student.pt").stat().st_mtime_ns
    train(recipe, loader_factory=factory, teacher=StandInTeacher())
    assert (stage1 / "student.pt").stat().st_mtime_ns == stamp


@pytest.mark.parametrize(("method", "params", "world", "partial_fc", "sample_rate", "expected"), [
    ("feature", {}, 1, None, 1.0, False),
    ("feature", {}, 2, None, 1.0, True),          # several ranks: sharded by default
    ("kd", {}, 1, None, 0.5, True),               # one rank holds every row anyway
    ("kd", {}, 2, None, 1.0, False),              # reads the head: replicated
    ("refilled", {"stage": 1}, 2, None, 1.0, True),
    ("refilled", {"stage": 2}, 2, None, 1.0, False),
    ("frskd", {"soft_target": "kd"}, 2, None, 1.0, False),
    ("frskd", {"soft_target": "cosine"}, 2, None, 1.0, True),
    ("kd", {}, 2, False, 1.0, False),
])
def test_partial_fc_default_follows_world_size_and_what_the_method_reads(
        tmp_path, method, params, world, partial_fc, sample_rate, expected):
    from facekd.train.trainer import resolve_partial_fc

    overrides = [f"method.params={params}".replace("'", ""),
                 f"student.head.sample_rate={sample_rate}"]
    if partial_fc is not None:
        overrides.append(f"student.head.partial_fc={str(partial_fc).lower()}")
    assert resolve_partial_fc(tiny_recipe(tmp_path, method, tuple(overrides)), world) is expected


def test_a_sharded_head_for_a_head_reading_stage_fails_before_stage_one(tmp_path, monkeypatch):
    """REFILLED stage 2 reads the student's head; with Partial FC asked for on 2 ranks the
    launch stops at once (one line, no stage trained), not after stage 1's hours."""
    from facekd.errors import ConfigError

    monkeypatch.setenv("WORLD_SIZE", "2")
    for name in ("MASTER_ADDR", "MASTER_PORT"):  # a regression fails here, never rendezvous
        monkeypatch.delenv(name, raising=False)
    out = tmp_path / "run"
    recipe = tiny_recipe(out, "refilled", ("optim.epochs=2", "student.head.partial_fc=true"))
    with pytest.raises(ConfigError, match=r"method 'refilled' reads the student's head.*"
                                          r"partial_fc: false"):
        train(recipe, loader_factory=memory_loader_factory(), teacher=StandInTeacher())
    assert not out.exists()
