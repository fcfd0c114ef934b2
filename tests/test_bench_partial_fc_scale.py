"""bench/partial_fc_scale: the per-rank model's arithmetic, its fits, and the step / save /
load children at toy size in this process (no timing assertions)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # bench/ is a script folder at the repo root, not installed
    sys.path.insert(0, str(ROOT))

from bench import partial_fc_scale as bench  # noqa: E402

CALIB = {"full": {"k_w": 6.0, "k_l": 5.0, "base": 0.0},
         "sampled": {"k_w": 4.0, "k_l": 5.0, "base": 0.0}}


def test_rank_model_counts_the_shard_and_the_logits():
    fit = {"a": 1e-10, "b": 1e-9, "c": 1e-9, "d": 0.01}
    rows = {w: bench.rank_model(2_059_906, w, 1.0, 128, 512, CALIB, fit) for w in (8, 64)}
    shard = -(-2_059_906 // 8)
    assert rows[8]["classes_per_rank"] == shard == 257_489
    assert rows[8]["weight_gb"] == pytest.approx(shard * 512 * 4 / 1e9)
    assert rows[8]["weight_gb"] == rows[8]["momentum_gb"] == rows[8]["grad_gb"]
    # B x C_l = per-rank batch x C: the logits (and the MACs) do not shrink with ranks
    assert rows[64]["logits_gb"] == pytest.approx(rows[8]["logits_gb"], rel=1e-3)
    assert rows[64]["gmacs"] == pytest.approx(rows[8]["gmacs"], rel=1e-3)
    assert rows[8]["peak_gb"] == pytest.approx(6 * rows[8]["weight_gb"]
                                               + 5 * rows[8]["logits_gb"])
    sampled = bench.rank_model(2_059_906, 8, 0.1, 128, 512, CALIB, None)
    # 10 % of the shard plus the positives the draw missed (about B / world of them)
    assert sampled["sampled_per_rank"] == round(0.1 * shard + 0.9 * 128)
    assert "step_s" not in sampled


def test_fits_recover_known_constants():
    counts = bench.solve_counts({"shard": 100.0, "logits": 10.0, "extra": 7 + 100 * 4 + 10 * 3},
                                {"shard": 5.0, "logits": 200.0, "extra": 7 + 5 * 4 + 200 * 3},
                                base=7.0)
    assert counts["k_w"] == pytest.approx(4.0) and counts["k_l"] == pytest.approx(3.0)
    true = {"a": 2e-11, "b": 3e-9, "c": 1e-9, "d": 0.05}
    # at one dim MACs and logits are proportional: the samples vary it, as the bench does
    samples = [{"batch": b, "c_s": cs, "c_l": cl, "dim": d,
                "step_s": bench.predict_time(true, b, cs, cl, d)}
               for b, cs, cl, d in ((128, 5e4, 5e4, 512), (256, 5e4, 5e4, 512),
                                    (128, 1e5, 1e5, 128), (128, 2e4, 2e5, 512),
                                    (256, 2e4, 2e5, 32), (128, 4e4, 4e5, 512))]
    fit = bench.fit_time(samples)
    for key in true:
        assert fit[key] == pytest.approx(true[key], rel=1e-3, abs=1e-12), key
    assert fit["worst_rel_error"] < 1e-6


def test_children_step_save_and_reshard_at_toy_size(tmp_path):
    out = bench.child_step({"world": 1, "rank": 0, "batch": 8, "classes": 2000, "dim": 16,
                            "rate": 0.1, "steps": 2})
    assert out["c_l"] == 2000 and 150 < out["c_s_mean"] < 260 and len(out["times"]) == 2
    saved = bench.child_save({"world": 1, "rank": 0, "classes": 1001, "dim": 8,
                              "work": str(tmp_path)})
    assert saved["save_s"] is not None and (tmp_path / "head.pt").is_file()
    for world in (1, 4):
        load = bench.child_load({"world": world, "ranks": list(range(world)), "saved_world": 1,
                                 "classes": 1001, "dim": 8, "work": str(tmp_path)})
        assert [s["rows"] for s in load["shards"]] == ([1001] if world == 1
                                                      else [251, 250, 250, 250])
        assert all(s["rows_equal"] and s["step"] == 1234 for s in load["shards"])
    result = {"classes": 1001, "dim": 8, "per_rank_batch": 8,
              "table": [bench.rank_model(1001, w, r, 8, 8, CALIB, {"a": 0, "b": 0, "c": 0,
                                                                   "d": 0.1})
                        for w in bench.WORLDS for r in bench.RATES],
              "check": [{"sample_rate": 1.0, "skipped": "no size fits"}],
              "reshard": {"classes": 1001, "dim": 8, "file_gb": 0.0, "loads": [load],
                          "saved": [saved, saved]},
              "calibration": {"counts": CALIB, "time_samples": [],
                              "time_fit": {"a": 0, "b": 0, "c": 0, "d": 0.1,
                                           "worst_rel_error": 0.0}},
              "load_note": "idle", "command": "python -m bench.partial_fc_scale"}
    md = bench.render(result)
    assert md.count("\n| 64 |") == 2 and "no size fits" in md and "| 4 | 3 | 250 |" in md
