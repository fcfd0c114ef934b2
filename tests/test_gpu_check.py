"""bench/gpu_check.py: its CPU quick mode end to end, and its per-check robustness."""

from __future__ import annotations

import json
import time

import pytest

from bench import gpu_check


@pytest.mark.slow
def test_quick_cpu_mode_runs_every_check_green(tmp_path):
    # a generous time guard: on a loaded CI machine the guard must not turn checks into
    # SKIPPED rows (it is tested below); on an idle 2-core machine this takes minutes
    code = gpu_check.main(["--device", "cpu", "--quick", "--out", str(tmp_path),
                           "--budget-s", "1800"])
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    statuses = {r["check"]: r["status"] for r in report["results"]}
    assert statuses == dict.fromkeys("abcdefgh", "PASS"), report["results"]
    assert code == 0 and report["device"] == "cpu" and report["quick"]
    md = (tmp_path / "gpu_check.md").read_text()
    assert "| b | SIGKILL after a checkpoint + resume | PASS |" in md
    step = next(r for r in report["results"] if r["check"] == "a")
    assert {row["config"] for row in step["rows"]} == {"alone", "srd + cache",
                                                       "srd + live r_tiny"}


def test_a_failing_check_is_a_row_and_the_guard_skips(tmp_path, monkeypatch):
    def boom(ctx):
        raise ValueError("no such thing\nsecond line")

    monkeypatch.setattr(gpu_check, "CHECKS", [
        ("x", "raises", boom, 0), ("y", "passes", lambda ctx: {"ok": True, "summary": "fine"}, 0),
        ("z", "too long", lambda ctx: {"ok": True}, 1e6)])
    ctx = gpu_check.Context("cpu", gpu_check.QUICK, tmp_path, time.perf_counter() + 60)
    rows = gpu_check.run_checks(ctx)
    assert [r["status"] for r in rows] == ["ERROR", "PASS", "SKIPPED"]
    assert rows[0]["summary"] == "ValueError: no such thing"
    assert "time guard" in rows[2]["summary"]


def test_cuda_asked_for_without_one_is_exit_2(capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main(["--device", "cuda", "--out", "/nonexistent"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err
