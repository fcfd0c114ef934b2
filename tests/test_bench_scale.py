"""bench/scale.py --quick: the outputs' structure, clean-up and resume (no timings checked)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

STEPS = ("write", "rec2shards", "info_rec", "info_shards", "loader_w1", "loader_w8",
         "cache_chunks", "cache_finalise", "cache_lookup")


def _run(out: Path, work: Path) -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    done = subprocess.run([sys.executable, "-m", "bench.scale", "--quick", "--out", str(out),
                           "--work", str(work)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.slow
def test_quick_scale_bench_writes_its_results_cleans_up_and_resumes(tmp_path):
    out, work = tmp_path / "results", tmp_path / "work"
    _run(out, work)
    state = json.loads((out / "scale.json").read_text())
    rows = sorted(state["sizes"].values(), key=lambda r: r["records"])
    assert [r["records"] for r in rows] == [2000, 6000]
    for row in rows:
        for step in STEPS:
            assert {"wall_s", "cpu_s", "max_rss_mb"} <= set(row[step]), step
        assert row["info_rec"]["images"] == row["info_shards"]["images"] == row["records"]
        assert row["loader_w8"]["batches"] * 8 <= row["loader_w1"]["batches"]
        assert row["rec_bytes"] > 0 and row["shards_bytes"] > row["rec_bytes"]
        assert row["cache_bytes_d512"] == row["records"] * (2 * 512 * 2 + 8)
    goals = state["goals"]
    for key in ("time_ratio_wall", "time_ratio_cpu", "rss_ratio", "loader_w1_42m_gb",
                "loader_w8_42m_cpu_s", "time_met", "rss_met", "loader_w1_met"):
        assert key in goals
    md = (out / "scale.md").read_text()
    assert md.count("| 2,000 |") == 2 and "Goal: loader start-up" in md
    assert (out / "scale.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not work.exists() or not any(work.iterdir())  # each size's files deleted
    again = _run(out, work)  # resumable: both sizes are done, nothing is measured again
    assert again.count("done before, skipped") == 2
    assert json.loads((out / "scale.json").read_text())["sizes"] == state["sizes"]
