"""Multi-node as users launch it: ``torchrun --nnodes N --nproc-per-node 1 --rdzv-backend
c10d --rdzv-endpoint 127.0.0.1:PORT`` started N times on this machine ("nodes" = launcher
processes, gloo), running facekd's CLI on a real ``.rec`` through the real loader.

- the teacher cache built by 2 nodes (each rank its share, rank 0 merges) equals the
  one-process cache;
- training on 2 nodes gives the one-process weights and losses;
- a 2-node run stopped mid-epoch resumes on 1 and on 3 nodes and still ends at the
  one-process weights (loader position, Partial FC rows and their momentum resharded);
  with another global batch it continues at the same point of the epoch, re-indexed.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from train_support import free_port, register_test_models

from facekd.train.cache import build_teacher_cache, open_cache
from facekd.train.recipe import load_recipe
from facekd.train.trainer import train

ROOT = Path(__file__).resolve().parents[1]
ENTRY = Path(__file__).resolve().parent / "torchrun_entry.py"
REC = ROOT.parent / "shared" / "fixtures" / "recordio" / "insightface_layout"  # 60 images
GLOBAL_BATCH = 6   # 10 steps per epoch at 1, 2 and 3 ranks
SAVE_AT = 7        # mid-epoch checkpoint

pytestmark = pytest.mark.skipif(not REC.is_dir(), reason="../shared/fixtures missing")


def torchrun_nodes(nodes: int, argv: list[str], logs: Path, timeout: float = 300.0) -> None:
    """Start ``nodes`` torchrun launchers (1 process each) meeting at one c10d endpoint."""
    port = free_port()
    env = {**os.environ, "FACEKD_ALLOW_OUTSIDE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    logs.mkdir(parents=True, exist_ok=True)
    procs = []
    for node in range(nodes):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nodes),
               "--nproc-per-node", "1", "--rdzv-backend", "c10d",
               "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", f"t{port}",
               "--max-restarts", "0", str(ENTRY), *argv]
        out = open(logs / f"node{node}.log", "w")  # noqa: SIM115 - closed below
        procs.append((subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                       cwd=ROOT), out))
    codes = []
    for proc, out in procs:
        try:
            codes.append(proc.wait(timeout=timeout))
        except subprocess.TimeoutExpired:
            proc.kill()
            codes.append(proc.wait())
        out.close()
    if any(codes):
        tail = "\n".join((logs / f"node{n}.log").read_text()[-3000:] for n in range(nodes))
        raise AssertionError(f"torchrun nodes exited with {codes}:\n{tail}")


def overrides(out: Path, cache: Path, batch: int) -> list[str]:
    return [f"run.output={out}", f"data.train={REC}", f"data.batch_size={batch}",
            "data.num_workers=0", "student.arch=train_test_nobn",
            "student.embedding_size=128", "student.head.scale=16",
            "student.head.partial_fc=true", "student.head.sample_rate=0.5",
            "optim.epochs=2", "optim.lr=0.05", "optim.warmup_epochs=0.5", "run.device=cpu",
            "run.threads=1", f"run.save_every={SAVE_AT}", "run.keep_checkpoints=0",
            "run.log_every=1", "run.progress=false", "run.tensorboard=false",
            "method.name=feature", "method.params={connector: false}",
            f"teacher.cache={cache}"]


def train_here(out: Path, cache: Path, batch: int = GLOBAL_BATCH) -> Path:
    register_test_models()
    os.environ["FACEKD_ALLOW_OUTSIDE"] = "1"
    try:
        return train(load_recipe(None, overrides(out, cache, batch)))
    finally:
        os.environ.pop("FACEKD_ALLOW_OUTSIDE", None)


def assert_same_run(a: Path, b: Path) -> None:
    fa = torch.load(a / "full.pt", weights_only=True)
    fb = torch.load(b / "full.pt", weights_only=True)
    for key in fa["state_dict"]:
        torch.testing.assert_close(fa["state_dict"][key], fb["state_dict"][key], atol=1e-5,
                                   rtol=1e-4, msg=key)
    torch.testing.assert_close(fa["head"]["weight"], fb["head"]["weight"], atol=1e-5,
                               rtol=1e-4)
    # metrics.csv logs each loss averaged over ranks: the global-batch mean
    la, lb = last_metrics(a), last_metrics(b)
    assert la["step"] == lb["step"] == "20"
    for name in ("loss/loss", "loss/ce", "loss/feature"):
        assert float(lb[name]) == pytest.approx(float(la[name]), rel=1e-4, abs=1e-5), name


def last_metrics(run: Path) -> dict[str, str]:
    with open(run / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))[-1]


def resume_copy(run: Path, dest: Path, step: int) -> Path:
    (dest / "checkpoints").mkdir(parents=True)
    name = f"step-{step:08d}.pt"
    shutil.copy(run / "checkpoints" / name, dest / "checkpoints" / name)
    return dest


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    """A random mbf_tiny teacher file, cached by 2 torchrun nodes and by one process."""
    from facekd.models import create_model
    from facekd.models.checkpoint import save_checkpoint

    tmp = tmp_path_factory.mktemp("multinode")
    torch.manual_seed(0)
    teacher = tmp / "teacher.pt"
    save_checkpoint(teacher, create_model("mbf_tiny").eval(), "mbf_tiny")
    two, one = tmp / "cache2", tmp / "cache1"
    torchrun_nodes(2, ["teacher", "cache", str(teacher), str(REC), str(two), "--dtype",
                       "float32", "--batch-size", "4", "--device", "cpu"], tmp / "logs_cache")
    os.environ["FACEKD_ALLOW_OUTSIDE"] = "1"
    try:
        build_teacher_cache(str(teacher), str(REC), one, batch_size=4, dtype="float32",
                            device="cpu", progress=False)
    finally:
        os.environ.pop("FACEKD_ALLOW_OUTSIDE", None)
    return tmp, two, one


@pytest.mark.slow
def test_teacher_cache_built_by_two_nodes_equals_one_process(caches):
    _, two, one = caches
    a, b = open_cache(two), open_cache(one)
    assert len(a) == len(b) == 60 and np.array_equal(a.keys, b.keys)
    np.testing.assert_allclose(a.emb, b.emb, atol=1e-5)
    meta = json.loads((two / "meta.json").read_text())
    assert meta["complete"] and meta["world_size"] == 2 and meta["num_samples"] == 60
    assert not (two / "chunks").exists()   # both ranks' shares merged, chunks removed


@pytest.mark.slow
def test_two_nodes_train_like_one_process_and_resume_on_one_and_three(caches):
    tmp, cache, _ = caches
    recipe = tmp / "recipe.yaml"
    recipe.write_text("run: {device: cpu}\n")  # everything else as overrides
    single = train_here(tmp / "single", cache)
    two = tmp / "two"
    torchrun_nodes(2, ["distill", str(recipe), *overrides(two, cache, GLOBAL_BATCH // 2)],
                   tmp / "logs_two")
    summary = json.loads((two / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 20
    assert_same_run(single, two)

    # stopped at step 7 of 10 in epoch 0 (its step-7 checkpoint), resumed elsewhere
    on_one = train_here(resume_copy(two, tmp / "on_one", SAVE_AT), cache)
    assert_same_run(single, on_one)
    on_three = resume_copy(two, tmp / "on_three", SAVE_AT)
    torchrun_nodes(3, ["distill", str(recipe), *overrides(on_three, cache, GLOBAL_BATCH // 3)],
                   tmp / "logs_three")
    summary = json.loads((on_three / "summary.json").read_text())
    assert summary["world_size"] == 3 and summary["resumed_from"].endswith("step-00000007.pt")
    assert_same_run(single, on_three)

    # another global batch (3): 7 x 6 samples done = batch 14 of 20; 2 epochs = 40 steps
    halved = train_here(resume_copy(two, tmp / "halved", SAVE_AT), cache, batch=3)
    summary = json.loads((halved / "summary.json").read_text())
    assert summary["steps"] == 40 and summary["epochs_done"] == 2
    with open(halved / "metrics.csv", newline="") as f:
        steps = [int(float(row["step"])) for row in csv.DictReader(f)]
    assert steps[:2] == [15, 16] and steps[-1] == 40


def test_collective_timeout_from_the_environment(monkeypatch):
    from datetime import timedelta

    from facekd.errors import ConfigError
    from facekd.train.ddp import DEFAULT_TIMEOUT_S, TIMEOUT_ENV, dist_timeout

    monkeypatch.delenv(TIMEOUT_ENV, raising=False)
    assert dist_timeout() == timedelta(seconds=DEFAULT_TIMEOUT_S)
    monkeypatch.setenv(TIMEOUT_ENV, "7200")
    assert dist_timeout() == timedelta(hours=2)
    monkeypatch.setenv(TIMEOUT_ENV, "0")
    with pytest.raises(ConfigError, match=TIMEOUT_ENV):
        dist_timeout()


def test_resume_with_another_global_batch_moves_both_sources(tmp_path):
    """Saved at global batch 8 after 3 of 4 steps; resumed at 4 (labelled) and 2
    (unlabelled): 24 samples done = batch 6 of 8, the unlabelled position scaled alike."""
    from train_support import StandInTeacher, memory_loader_factory, tiny_recipe

    common = ("method.name=feature", "method.params={connector: false}",
              "data.unlabelled=memory")
    run = tmp_path / "run"
    train(tiny_recipe(run, "feature", (*common, "data.unlabelled_batch_size=4",
                                       "run.max_steps=3")),
          loader_factory=memory_loader_factory(), teacher=StandInTeacher())
    state = torch.load(run / "checkpoints" / "step-00000003.pt", weights_only=True)
    assert state["in_epoch"] == 3 and state["global_batch"] == 8
    assert state["unlabelled_global_batch"] == 4
    train(tiny_recipe(run, "feature", (*common, "data.batch_size=4",
                                       "data.unlabelled_batch_size=2")),
          loader_factory=memory_loader_factory(), teacher=StandInTeacher())
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 16 and summary["epochs_done"] == 2
    with open(run / "metrics.csv", newline="") as f:
        steps = [int(float(row["step"])) for row in csv.DictReader(f)]
    assert steps == [1, 2, 3, *range(7, 17)]


@pytest.mark.slow
def test_nodes_without_a_shared_folder_stop_with_one_line(tmp_path):
    from train_support import memory_loader_factory, run_processes, tiny_recipe, unshared_worker

    # node 0's run folder has a checkpoint; node 1's (its own disk) has none
    train(tiny_recipe(tmp_path / "node0" / "run", "none", ("run.max_steps=3",)),
          loader_factory=memory_loader_factory())
    run_processes(unshared_worker, 2, str(tmp_path))
    for rank in range(2):
        cache_error, resume_error = (tmp_path / f"errors{rank}.txt").read_text().splitlines()
        assert "rank 0 cannot see" in cache_error and "written by rank 1" in cache_error
        assert "filesystem every node shares" in cache_error
        assert "rank 1 cannot read" in resume_error and "step-00000003.pt" in resume_error


@pytest.mark.slow
def test_refilled_stages_run_in_one_two_node_launch_and_rerun_trains_nothing(tmp_path):
    """REFILLED's stages are two trainer runs inside one torchrun launch sharing one
    process group (re-creating it for stage 2 hung gloo); stage 2 starts from the student
    rank 0 wrote. With ``partial_fc: null`` stage 1 (relations only) gets a
    sharded Partial FC and stage 2 (it reads the student's head) a replicated one.
    Relaunched, the run finds both stages done and trains nothing."""
    from facekd.models import create_model
    from facekd.models.checkpoint import save_checkpoint

    torch.manual_seed(0)
    teacher = tmp_path / "teacher.pt"   # a backbone with a 12-class head: its centres
    save_checkpoint(teacher, create_model("mbf_tiny").eval(), "mbf_tiny",
                    head={"weight": torch.randn(12, 128), "config": {"scale": 16.0}})
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("run: {device: cpu}\n")
    out = tmp_path / "run"
    dropped = ("method.", "teacher.", "optim.epochs", "student.head.partial_fc",
               "student.head.sample_rate")
    argv = ["distill", str(recipe),
            *(o for o in overrides(out, tmp_path, GLOBAL_BATCH // 2)
              if not o.startswith(dropped)),
            "optim.epochs=2", "method.name=refilled", f"teacher.checkpoint={teacher}",
            "method.params={stage: two_stage, stage1_epochs: 1, "
            "stage1_images_per_identity: 3, mining: all}"]
    torchrun_nodes(2, argv, tmp_path / "logs")
    stage1 = out / "stage1"
    # stage 1: P x K batches (K = 3) of the 12 x 5 images, 12 steps; stage 2: random, 10
    for run, steps in ((stage1, 12), (out, 10)):
        summary = json.loads((run / "summary.json").read_text())
        assert summary["world_size"] == 2 and summary["steps"] == steps, run
    assert "loss/local_kd" not in last_metrics(stage1)
    assert float(last_metrics(out)["loss/local_kd"]) > 0
    assert "student head replicated on all 2 ranks" not in (stage1 / "train.log").read_text()
    assert "student head replicated on all 2 ranks" in (out / "train.log").read_text()
    stamp = (stage1 / "student.pt").stat().st_mtime_ns
    final = torch.load(out / "student.pt", weights_only=True)["state_dict"]
    torchrun_nodes(2, argv, tmp_path / "logs_again")
    assert (stage1 / "student.pt").stat().st_mtime_ns == stamp   # stage 1 not rerun
    again = torch.load(out / "student.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(final[k], again[k]) for k in final)    # stage 2 trained no step
