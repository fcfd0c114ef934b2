"""bench/methods: the method comparison driver (schema, gap-share arithmetic, resume)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # bench/ is a script folder at the repo root, not installed
    sys.path.insert(0, str(ROOT))

from bench import methods as bench  # noqa: E402


def test_stats_and_gap_share():
    s = bench.stats([60.0, 62.0, 64.0])
    assert s["mean"] == pytest.approx(62.0)
    assert s["std"] == pytest.approx(2.0)          # sample std over seeds
    assert bench.stats([70.0])["std"] is None       # no spread from one seed
    assert bench.stats([])["mean"] is None
    assert bench.gap_share(90.0, 60.0, 75.0) == pytest.approx(0.5)
    assert bench.gap_share(90.0, 60.0, 57.0) == pytest.approx(-0.1)
    assert bench.gap_share(70.0, 70.0, 71.0) is None
    assert bench.gap_share(None, 60.0, 70.0) is None


def test_plan_is_teacher_first_then_seed_major():
    tasks = bench.plan(["none", "kd", "srd"], [0, 1])
    names = [t.name for t in tasks]
    # the main comparison (alone vs srd) first within each seed
    assert names == ["teacher", "cache", "none/seed0", "srd/seed0", "kd/seed0",
                     "none/seed1", "srd/seed1", "kd/seed1"]
    needs = {t.name: t.needs for t in tasks}
    assert needs["none/seed0"] == () and needs["kd/seed1"] == ("cache",)
    # frskd is self-distillation: it never waits for the teacher
    assert bench.plan(["frskd"], [0])[-1].needs == ()


def test_student_overrides_keep_recipe_hyper_parameters(tmp_path):
    layout = bench.Layout(tmp_path)
    size = bench.SIZES["full"]
    srd_unl = bench.student_overrides(layout, size, "srd_unlabelled", 1, False)
    keys = {o.split("=", 1)[0] for o in srd_unl}
    assert keys <= {"data.train", "data.val_bins", "data.batch_size", "optim.epochs",
                    "run.output", "run.seed", "run.eval_every", "run.tensorboard",
                    "run.progress", "teacher.checkpoint", "teacher.cache", "data.unlabelled",
                    "data.unlabelled_batch_size", "teacher.unlabelled_cache"}
    assert "run.seed=1" in srd_unl and f"teacher.cache={layout.cache}" in srd_unl
    assert f"teacher.unlabelled_cache={layout.cache_unlabelled}" in srd_unl
    none = bench.student_overrides(layout, size, "none", 0, False)
    assert not any(o.startswith("teacher.") for o in none)


@pytest.mark.slow
def test_quick_run_end_to_end_and_resume(tmp_path):
    work, results = tmp_path / "work", tmp_path / "results"
    cmd = [sys.executable, "-m", "bench.methods", "--quick", "--work", str(work),
           "--results", str(results), "--methods", "none,srd"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    data = json.loads((results / "methods.json").read_text())
    assert data["complete"] and data["missing_runs"] == [] and data["failed_runs"] == {}
    assert list(data["methods"]) == ["none", "srd"]
    assert data["student_alone"] == data["methods"]["none"]
    assert sorted(data["trained_this_invocation"]) == ["cache", "none/seed0", "srd/seed0",
                                                       "teacher"]
    setting = data["setting"]
    assert setting["resolution"] == [112, 112]
    assert setting["train_images"] == 8 * 4 and setting["student_steps"] == 4
    assert setting["teacher"]["arch"] == "r_tiny" and setting["student"]["arch"] == "mbf_tiny"
    assert len(setting["student"]["widths"]) == 4 and setting["teacher"]["params"] > 0
    assert data["wall_time_s"] > 0
    teacher = data["teacher"]
    assert teacher["seeds"] == [0]
    for metric in bench.METRICS:
        assert 0.0 <= teacher[metric]["mean"] <= 100.0
        for method in ("none", "srd"):
            row = data["methods"][method]
            assert row["seeds"] == [0]
            entry = row[metric]
            assert entry["n"] == 1 and entry["std"] is None
            assert entry["values"] == [row["runs"]["0"][metric]]
            assert entry["mean"] == pytest.approx(entry["values"][0])
            t, a, m = teacher[metric]["mean"], data["methods"]["none"][metric]["mean"], \
                entry["mean"]
            share = row["gap_share"][metric]
            if abs(t - a) < 1e-12:
                assert share is None
            else:
                assert share == pytest.approx((m - a) / (t - a))
    assert data["methods"]["none"]["gap_share"][bench.PRIMARY] in (0.0, None)
    table = (results / "methods.md").read_text()
    assert "python -m bench.methods --quick" in table and "srd" in table
    assert "8 identities" in table and "112x112" in table and "Incomplete" not in table

    # a second invocation retrains and re-evaluates nothing
    stamps = {p: p.stat().st_mtime_ns for p in work.rglob("*")
              if p.name in ("summary.json", "student.pt", "bench_eval.json", "meta.json")}
    assert len(stamps) >= 3 * 3
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    second = json.loads((results / "methods.json").read_text())
    assert second["trained_this_invocation"] == []
    assert second["methods"] == data["methods"] and second["teacher"] == data["teacher"]
    assert second["wall_time_s"] >= data["wall_time_s"]

    # --report-only (safe beside a running benchmark) tabulates the same runs
    report = subprocess.run([*cmd, "--report-only", "--results", str(tmp_path / "report")],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert report.returncode == 0, report.stderr[-3000:]
    third = json.loads((tmp_path / "report" / "methods.json").read_text())
    assert third["methods"] == data["methods"] and third["wall_time_s"] is None


def test_markdown_names_missing_runs():
    result = {
        "command": "python -m bench.methods", "missing_runs": ["srd/seed2"], "failed_runs": {},
        "wall_time_s": 60.0, "machine": {"load_average_1min": 1.0, "cpus": 2},
        "setting": {"size": vars(bench.SIZES["full"]) | {}, "train_images": 5120,
                    "train_identities": 320, "unlabelled_images": 1600,
                    "resolution": [112, 112], "teacher_steps": 600, "student_steps": 300,
                    "batch_size": 64, "held_out": {"ijb": {}},
                    "teacher": {"arch": "r_tiny", "widths": [16, 32, 64, 128],
                                "embedding_size": 256, "params": 1_900_000},
                    "student": {"arch": "mbf_tiny", "widths": [32, 32, 64, 128],
                                "embedding_size": 128, "params": 80_000}},
        "teacher": {"seeds": [0], **{m: {"mean": 80.0, "std": None, "n": 1}
                                     for m in bench.METRICS}},
        "methods": {},
    }
    entry = {m: {"mean": 60.0, "std": 1.0, "n": 3} for m in bench.METRICS}
    result["methods"]["none"] = {"seeds": [0, 1, 2], **entry,
                                 "gap_share": {m: 0.0 for m in bench.METRICS}}
    result["methods"]["srd"] = {"seeds": [0, 1], **{m: {"mean": 75.0, "std": 2.0, "n": 2}
                                                    for m in bench.METRICS},
                                "gap_share": {m: 0.75 for m in bench.METRICS}}
    run = {bench.PRIMARY: 61.0, bench.ACC: 70.0, "train_cpu_seconds": 120.0}
    result["methods"]["none"]["runs"] = {str(s): run for s in (0, 1, 2)}
    result["methods"]["srd"]["runs"] = {"0": run, "1": run}
    text = bench.markdown(result)
    assert "| srd | 61.00 / 70.00 / 2.0 | 61.00 / 70.00 / 2.0 | missing |" in text
    assert "missing runs** srd/seed2" in text
    assert "75.00 ± 2.00" in text and "75 %" in text
    assert "goal >= 60 %: met" in text
    assert "kd has no finished run" in text
    assert "5120 images of 320 identities" in text and "112x112" in text
