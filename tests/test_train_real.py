"""End to end on real files: synthetic RecordIO data, a facekd teacher checkpoint, the
``facekd teacher cache`` and ``facekd distill`` commands, labelled + unlabelled sources."""

from __future__ import annotations

import json

import pytest
import torch

from facekd.cli import main


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from facekd.data.synth import generate
    from facekd.models import create_model
    from facekd.models.checkpoint import save_checkpoint
    from facekd.models.heads import create_head

    root = tmp_path_factory.mktemp("real")
    generate(root / "data", preset="tiny", identities=6, images_per_id=4, lfw_pairs=20,
             cfp_pairs=0, agedb_pairs=0, ijb_identities=0, unlabelled_identities=2,
             unlabelled_images_per_id=4, progress=False)
    torch.manual_seed(5)
    teacher = create_model("mbf_tiny", num_features=32).eval()
    head = create_head("arcface", 32, 6)
    save_checkpoint(root / "teacher.pt", teacher, "mbf_tiny", {"num_features": 32}, head=head)
    recipe = root / "recipe.yaml"
    recipe.write_text(
        "data: {batch_size: 8, unlabelled_batch_size: 4, num_workers: 0}\n"
        "student: {arch: mbf_tiny, embedding_size: 16, head: {scale: 16}}\n"
        "method: {name: srd, params: {num_negatives: 3}}\n"
        "optim: {epochs: 1, lr: 0.05}\n"
        "run: {device: cpu, progress: false, tensorboard: false, log_every: 1}\n")
    return root


def _distill(world, name, *overrides):
    out = world / name
    data = world / "data"
    code = main(["distill", str(world / "recipe.yaml"), f"run.output={out}",
                 f"data.train={data}", f"data.unlabelled={data / 'unlabelled'}",
                 f"data.val_bins=[{data / 'lfw.bin'}]", *overrides])
    assert code == 0
    return out


@pytest.mark.slow
def test_cli_cache_then_distill_equals_live_teacher(world):
    data = world / "data"
    for source, out in ((data, "cache"), (data / "unlabelled", "cache_unl")):
        assert main(["teacher", "cache", str(world / "teacher.pt"), str(source),
                     str(world / out), "--dtype", "float32", "--batch-size", "8"]) == 0
    meta = json.loads((world / "cache" / "meta.json").read_text())
    assert meta["num_samples"] == 24 and meta["num_centres"] == 6 and meta["dim"] == 32
    live = _distill(world, "live", f"teacher.checkpoint={world / 'teacher.pt'}")
    cached = _distill(world, "cached", f"teacher.cache={world / 'cache'}",
                      f"teacher.unlabelled_cache={world / 'cache_unl'}")
    a = torch.load(live / "student.pt", weights_only=True)["state_dict"]
    b = torch.load(cached / "student.pt", weights_only=True)["state_dict"]
    for key in a:
        torch.testing.assert_close(a[key].float(), b[key].float(), atol=1e-4, rtol=1e-4,
                                   msg=key)
    summary = json.loads((cached / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["teacher_cache"].endswith("cache")
    assert {"srd", "feat", "ce"} <= set(summary["last_losses"])
    assert 0.0 <= summary["eval"]["val/lfw/acc"] <= 1.0     # the final student is verified


def test_srd_without_classifier_exits_2_with_the_fix(world, capsys):
    from facekd.models import create_model
    from facekd.models.checkpoint import save_checkpoint

    bare = world / "bare.pt"
    save_checkpoint(bare, create_model("mbf_tiny", num_features=32), "mbf_tiny",
                    {"num_features": 32})
    code = main(["distill", str(world / "recipe.yaml"), f"run.output={world / 'bad'}",
                 f"data.train={world / 'data'}", f"teacher.checkpoint={bare}"])
    assert code == 2
    # the error is one line; INFO lines reach this capture only when this test is the
    # first in the process to set up the CLI's console log
    err = [line for line in capsys.readouterr().err.strip().splitlines()
           if not line.startswith("INFO ")]
    assert len(err) == 1 and "facekd teacher centres" in err[0]


def test_cache_of_another_teacher_is_refused(world, capsys):
    from facekd.models import create_model
    from facekd.models.checkpoint import save_checkpoint
    from facekd.train.cache import build_teacher_cache

    cache = world / "cache"
    build_teacher_cache(str(world / "teacher.pt"), str(world / "data"), cache,
                        batch_size=8, dtype="float32", progress=False)  # no-op when built
    other = world / "other.pt"
    save_checkpoint(other, create_model("mbf_tiny", num_features=32), "mbf_tiny",
                    {"num_features": 32})
    code = main(["distill", str(world / "recipe.yaml"), f"run.output={world / 'mixed'}",
                 f"data.train={world / 'data'}", f"teacher.checkpoint={other}",
                 f"teacher.cache={cache}"])
    assert code == 2
    assert "built from another teacher" in capsys.readouterr().err
