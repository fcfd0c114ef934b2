"""The README's main job, end to end at the smallest size: every stage runs and reports."""

from __future__ import annotations

import json

import pytest

from facekd.demo import gap_share, run_demo


def test_gap_share():
    assert gap_share(90.0, 60.0, 75.0) == pytest.approx(0.5)
    assert gap_share(90.0, 60.0, 60.0) == 0.0
    assert gap_share(70.0, 70.0, 71.0) is None


@pytest.mark.slow
def test_tiny_demo_runs_every_stage_and_resumes(tmp_path):
    out = tmp_path / "demo"
    report = run_demo(out, preset="tiny")
    text = report.read_text()
    for name in ("teacher", "student alone", "student + SRD", "lfw acc", "IJBC"):
        assert name in text
    assert (out / "report.png").stat().st_size > 10_000
    assert (out / "export" / "student_srd.onnx").exists()
    rows = json.loads((out / "eval" / "compare_rows.json").read_text())
    assert len(rows) == 3
    # every figure is a percentage, whatever the source (bins or IJB)
    assert all(0.0 <= v <= 100.0 for row in rows for k, v in row.items()
               if k not in ("model", "model_sha256"))
    # a rerun reuses every finished step and rewrites the same table
    mtime = (out / "runs" / "teacher" / "student.pt").stat().st_mtime_ns
    run_demo(out, preset="tiny")
    assert (out / "runs" / "teacher" / "student.pt").stat().st_mtime_ns == mtime
    assert json.loads((out / "eval" / "compare_rows.json").read_text()) == rows
