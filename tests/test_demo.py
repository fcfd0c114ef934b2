"""The README's main job, end to end at the smallest size: every stage runs and reports."""

from __future__ import annotations

import json

import numpy as np
import pytest

from facekd.demo import gap_lines, run_demo


def _cell(value):
    return {"value": value, "low": value - 1, "high": value + 1, "text": f"{value:.2f}"}


def test_gap_share_printed_only_where_the_gap_exceeds_its_interval():
    rng = np.random.default_rng(0)
    noise = rng.normal(0, 1, 500)
    rows = [{"cells": {"wide": _cell(90.0), "none": _cell(80.5)}},
            {"cells": {"wide": _cell(80.0), "none": _cell(80.0)}},
            {"cells": {"wide": _cell(85.0), "none": _cell(81.0)}}]
    reps = {"0|wide": 90 + noise, "1|wide": 80 + noise, "2|wide": 85 + noise,
            "0|none": 80.5 + noise + rng.normal(0, 3, 500), "1|none": 80 + noise,
            "2|none": 81 + noise}
    wide, none = gap_lines(rows, reps)
    assert "SRD closes 50 [50, 50] % of it" in wide and "10.00 [10.00, 10.00]" in wide
    assert "within its interval, no share" in none and "%" not in none


@pytest.fixture(scope="module")
def tiny_demo(tmp_path_factory):
    """One finished tiny demo at seed 0: (folder, report)."""
    out = tmp_path_factory.mktemp("demo") / "s0"
    return out, run_demo(out, preset="tiny")


@pytest.mark.slow
def test_tiny_demo_runs_every_stage_and_resumes(tiny_demo):
    out, report = tiny_demo
    text = report.read_text()
    for name in ("teacher", "student alone", "student + SRD", "lfw acc", "IJBC"):
        assert name in text
    assert (out / "report.png").stat().st_size > 10_000
    assert (out / "export" / "student_srd.onnx").exists()
    rows = json.loads((out / "eval" / "compare_rows.json").read_text())["rows"]
    assert len(rows) == 3
    # every figure is a percentage, whatever the source (bins or IJB), inside its interval;
    # the tiny sets cannot resolve any FAR, so every TAR says so instead of a number
    for row in rows:
        for name, cell in row["cells"].items():
            if "tar@" in name:
                assert cell["value"] is None and "impostor pairs)" in cell["text"]
            else:
                assert 0.0 <= cell["low"] <= cell["value"] <= cell["high"] <= 100.0
    assert "at least 10/FAR impostor pairs" in text and "bootstrap interval" in text
    assert "clusters: connected components" in text
    # a rerun reuses every finished step and rewrites the same table
    mtime = (out / "runs" / "teacher" / "student.pt").stat().st_mtime_ns
    run_demo(out, preset="tiny")
    assert (out / "runs" / "teacher" / "student.pt").stat().st_mtime_ns == mtime
    assert json.loads((out / "eval" / "compare_rows.json").read_text())["rows"] == rows


@pytest.mark.slow
def test_demo_seeds_reads_two_finished_demos(tiny_demo, tmp_path):
    from bench.demo_seeds import main

    outs = [tiny_demo[0], tmp_path / "s1"]
    run_demo(outs[1], preset="tiny", seed=1)
    results = tmp_path / "results"
    assert main([*map(str, outs), "--results", str(results)]) == 0
    summary = json.loads((results / "demo_seeds.json").read_text())
    assert [d["seed"] for d in summary["demos"]] == [0, 1]
    rows = [json.loads((o / "eval" / "compare_rows.json").read_text())["rows"] for o in outs]
    metric = "lfw acc"
    entry = summary["metrics"][metric]
    for i, name in enumerate(("teacher", "student alone", "student + SRD")):
        seen = [r[i]["cells"][metric]["value"] for r in rows]
        assert [v["value"] for v in entry["values"][name]] == pytest.approx(seen)
        assert entry["spread"][name] == pytest.approx(max(seen) - min(seen))
    gap = entry["gaps"]["teacher - student alone"][1]
    assert gap["value"] == pytest.approx(rows[1][0]["cells"][metric]["value"]
                                         - rows[1][1]["cells"][metric]["value"])
    assert gap["low"] <= gap["value"] <= gap["high"]
    # every TAR of the tiny sets is below its floor: left out, not printed as a number
    assert all(v is None for k, v in summary["metrics"].items() if "tar@" in k)
    assert "| lfw acc | teacher |" in (results / "demo_seeds.md").read_text()


def test_demo_seeds_names_an_unfinished_demo(tmp_path, capsys):
    from bench.demo_seeds import main

    (tmp_path / "half" / "eval").mkdir(parents=True)
    assert main([str(tmp_path / "half"), "--results", str(tmp_path / "results")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "half: not a finished facekd demo (no eval/compare_rows.json)" in err[0]
    assert not (tmp_path / "results").exists()
