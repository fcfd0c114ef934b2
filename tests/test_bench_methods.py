"""bench/methods: the method comparison driver (schema, gap-share arithmetic, resume)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # bench/ is a script folder at the repo root, not installed
    sys.path.insert(0, str(ROOT))

from bench import methods as bench  # noqa: E402


def test_stats_t_interval_and_paired_differences_by_hand():
    s = bench.stats([60.0, 62.0, 64.0])
    assert s["mean"] == pytest.approx(62.0)
    assert s["std"] == pytest.approx(2.0)          # sample std over seeds
    # 95 % t-interval of the mean: t(0.975, df 2) = 4.303, sd / sqrt(3) = 1.1547
    assert s["ci"] == pytest.approx([62.0 - 4.3027 * 1.1547, 62.0 + 4.3027 * 1.1547],
                                    rel=1e-4)
    assert bench.t_quantile(4) == pytest.approx(2.7764, rel=1e-4)
    assert bench.stats([70.0])["std"] is None and bench.stats([70.0])["ci"] is None
    assert bench.stats([])["mean"] is None
    # paired by seed: differences 2, 3, 1, 2, 2 -> mean 2, sd 0.7071, half 2.7764 * 0.3162
    a = {"0": 80.0, "1": 81.0, "2": 79.0, "3": 82.0, "4": 80.0, "9": 99.0}
    b = {"0": 78.0, "1": 78.0, "2": 78.0, "3": 80.0, "4": 78.0}
    d = bench.paired(a, b)
    assert d["seeds"] == [0, 1, 2, 3, 4] and d["differences"] == [2.0, 3.0, 1.0, 2.0, 2.0]
    half = 2.7764 * 0.70711 / 5 ** 0.5
    assert d["ci"] == pytest.approx([2.0 - half, 2.0 + half], rel=1e-4)
    assert d["significant"]
    noisy = bench.paired({"0": 80.0, "1": 70.0}, {"0": 75.0, "1": 74.0})
    assert not noisy["significant"]               # mean +0.5 with df 1: interval spans 0
    assert bench.gap_share(90.0, 60.0, 75.0) == pytest.approx(0.5)
    assert bench.gap_share(70.0, 70.0, 71.0) is None


def test_plan_tunes_each_method_then_tests_seed_major():
    tasks = bench.plan(["none", "kd", "srd", "feature_srd_weight"], [0, 1])
    names = [t.name for t in tasks]
    w = [f"w{f:.4g}" for f in bench.WEIGHT_FACTORS]
    assert names == ["teacher", "cache",
                     *(f"tune/srd/{x}" for x in w), *(f"tune/kd/{x}" for x in w),
                     "tune/kd/t0.5", "tune/kd/t2",
                     "none/seed0", "srd/seed0", "feature_srd_weight/seed0", "kd/seed0",
                     "none/seed1", "srd/seed1", "feature_srd_weight/seed1", "kd/seed1"]
    needs = {t.name: t.needs for t in tasks}
    assert needs["none/seed0"] == () and needs["feature_srd_weight/seed1"] == ("cache",)
    # the temperature runs wait for the weight grid; the test runs for all tuning
    assert needs["tune/kd/t2"] == tuple(f"tune/kd/{x}" for x in w)
    assert needs["kd/seed1"] == (*(f"tune/kd/{x}" for x in w), "tune/kd/t0.5", "tune/kd/t2")
    # frskd is self-distillation: it never waits for the teacher
    assert bench.plan(["frskd"], [0])[2].needs == ()
    # the costly methods tune and test after every other method's test runs
    names = [t.name for t in bench.plan(["none", "frskd", "kd"], [0, 1])]
    assert names.index("tune/frskd/w1") > names.index("kd/seed1")
    assert names[-2:] == ["frskd/seed0", "frskd/seed1"]


def test_every_method_gets_the_same_grid_on_its_own_main_weight():
    # the grid multiplies the recipe's own values; the control is fixed at 2 s^2 / D
    assert bench.setting_overrides("kd", bench.Setting(3.0, 0.5)) == [
        "method.weights.kd=3", "method.params.temperature=2"]
    assert bench.setting_overrides("rkd", bench.Setting(1 / 3)) == [
        "method.weights.rkd_distance=8.33333", "method.weights.rkd_angle=16.6667"]
    assert bench.setting_overrides("refilled", bench.Setting(1.0, 2.0)) == [
        "method.weights.relation=1000", "method.weights.local_kd=1", "method.params.tau2=4"]
    assert bench.setting_overrides("srd", bench.Setting(3.0, 2.0)) == [
        "method.weights.srd=3", "method.weights.feat=3"]      # SRD has no temperature
    assert bench.srd_effective_weight() == 2 * 32.0**2 / 256 == 8.0
    assert bench.setting_overrides("feature_srd_weight", bench.Setting()) == [
        "method.weights.feature=8"]
    for method, spec in bench.SPECS.items():
        assert (bench.ROOT / "recipes" / spec.recipe).exists(), method
        if spec.tuned:
            assert spec.weights, method


def test_selection_is_on_validation_scores_with_ties_to_the_recipe(tmp_path):
    layout = bench.Layout(tmp_path)

    def finished(method, tag, setting, score):
        run = layout.tune(method, tag)
        run.mkdir(parents=True)
        (run / "summary.json").write_text("{}")
        (run / "bench_setting.json").write_text(json.dumps(setting))
        (run / "bench_val.json").write_text(json.dumps({bench.PRIMARY: score}))

    finished("kd", "w0.3333", {"weight": 1 / 3, "temp": 1.0}, 70.0)
    finished("kd", "w1", {"weight": 1.0, "temp": 1.0}, 72.0)
    finished("kd", "w3", {"weight": 3.0, "temp": 1.0}, 72.0)
    assert bench.best_setting(layout, "kd", "weight") == bench.Setting(1.0, 1.0)  # tie
    temp = bench.Task("tune/kd/t2", "tune", "kd", bench.TUNE_SEED, (), "temp", 2.0)
    assert bench.task_setting(temp, layout) == bench.Setting(1.0, 2.0)
    finished("kd", "t2", {"weight": 1.0, "temp": 2.0}, 75.0)
    test = bench.Task("kd/seed0", "test", "kd", 0)
    assert bench.task_setting(test, layout) == bench.Setting(1.0, 2.0)
    assert bench.best_setting(layout, "kd", "weight") == bench.Setting(1.0, 1.0)
    untuned = bench.Task("none/seed0", "test", "none", 0)
    assert bench.task_setting(untuned, layout) == bench.Setting()


def test_student_overrides_keep_recipe_hyper_parameters(tmp_path):
    layout = bench.Layout(tmp_path)
    size = bench.SIZES["full"]
    srd_unl = bench.student_overrides(layout, size, "srd_unlabelled", 1, False)
    keys = {o.split("=", 1)[0] for o in srd_unl}
    assert keys <= {"data.train", "data.val_bins", "data.batch_size", "optim.epochs",
                    "run.output", "run.seed", "run.eval_every", "run.tensorboard",
                    "run.progress", "teacher.checkpoint", "teacher.cache", "data.unlabelled",
                    "data.unlabelled_batch_size", "teacher.unlabelled_cache",
                    "method.weights.srd", "method.weights.feat"}
    assert "run.seed=1" in srd_unl and f"teacher.cache={layout.cache}" in srd_unl
    assert f"teacher.unlabelled_cache={layout.cache_unlabelled}" in srd_unl
    none = bench.student_overrides(layout, size, "none", 0, False)
    assert not any(o.startswith(("teacher.", "method.")) for o in none)


def _quick(work: Path, results: Path, *extra: str, methods: str = "none,srd",
           timeout: int = 1500) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "bench.methods", "--quick", "--work", str(work),
           "--results", str(results), "--methods", methods, *extra]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> tuple[Path, Path, subprocess.CompletedProcess]:
    """One quick comparison (none, srd), shared: it is the costly part of both tests."""
    root = tmp_path_factory.mktemp("quick")
    work, results = root / "work", root / "results"
    return work, results, _quick(work, results)


@pytest.mark.slow
def test_quick_run_end_to_end_and_resume(quick_run, tmp_path):
    work, results, done = quick_run
    cmd = [sys.executable, "-m", "bench.methods", "--quick", "--work", str(work),
           "--results", str(results), "--methods", "none,srd"]
    assert done.returncode == 0, done.stderr[-3000:]
    data = json.loads((results / "methods.json").read_text())
    assert data["complete"] and data["missing_runs"] == [] and data["failed_runs"] == {}
    assert list(data["methods"]) == ["none", "srd"]
    assert data["student_alone"] == data["methods"]["none"]
    tuning = [f"tune/srd/w{f:.4g}" for f in bench.WEIGHT_FACTORS]
    assert sorted(data["trained_this_invocation"]) == sorted(
        ["teacher", "cache", *tuning, "none/seed0", "srd/seed0", "none/seed1", "srd/seed1"])
    setting = data["setting"]
    assert setting["resolution"] == [112, 112] and setting["seeds"] == [0, 1]
    assert setting["train_images"] == 8 * 4 and setting["student_steps"] == 8
    assert setting["validation"]["ijb"]["identities"] == 3
    srd = data["methods"]["srd"]
    # tuned on the validation identities only: three weight settings, each with a score
    assert sorted(r["setting"]["weight"] for r in srd["tuning"]) == pytest.approx(
        sorted(bench.WEIGHT_FACTORS))
    assert all((work / "runs" / "tune" / "srd" / r["tag"] / "bench_val.json").exists()
               and not (work / "runs" / "tune" / "srd" / r["tag"] / "bench_eval.json").exists()
               for r in srd["tuning"])
    best = max(srd["tuning"], key=lambda r: (round(r[bench.PRIMARY], 9),
                                             -abs(math.log(r["setting"]["weight"]))))
    assert srd["chosen"]["setting"] == best["setting"]
    assert all(run["setting"] == best["setting"] for run in srd["runs"].values())
    # test numbers: per seed, paired differences against the student alone
    alone = data["methods"]["none"]
    for metric in bench.METRICS:
        entry = srd[metric]
        assert entry["n"] == 2 and entry["values"] == [srd["runs"][s][metric] for s in "01"]
    diffs = [srd["runs"][s][bench.PRIMARY] - alone["runs"][s][bench.PRIMARY] for s in "01"]
    assert srd["vs_alone"]["differences"] == pytest.approx(diffs)
    assert srd["vs_alone"]["mean"] == pytest.approx(sum(diffs) / 2)
    assert alone["vs_alone"] is None and srd["vs_srd"] is None
    assert alone["vs_srd"]["differences"] == pytest.approx([-d for d in diffs])
    assert data["floor_rule"].startswith("TAR@FAR") and "bootstrap" in data["bootstrap_rule"]
    table = (results / "methods.md").read_text()
    assert "python -m bench.methods --quick" in table and "Tuning (validation" in table
    assert "8 identities" in table and "112x112" in table and "Incomplete" not in table

    # a second invocation retrains and re-evaluates nothing
    stamps = {p: p.stat().st_mtime_ns for p in work.rglob("*")
              if p.name in ("summary.json", "student.pt", "bench_eval.json", "bench_val.json",
                            "meta.json")}
    assert len(stamps) >= 3 * 8
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    second = json.loads((results / "methods.json").read_text())
    assert second["trained_this_invocation"] == []
    assert second["methods"] == data["methods"] and second["teacher"] == data["teacher"]

    # --report-only (safe beside a running benchmark) tabulates the same runs
    report = subprocess.run([*cmd, "--report-only", "--results", str(tmp_path / "report")],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert report.returncode == 0, report.stderr[-3000:]
    third = json.loads((tmp_path / "report" / "methods.json").read_text())
    assert third["methods"] == data["methods"] and third["wall_time_s"] is None


@pytest.mark.slow
def test_carry_takes_finished_runs_only_when_the_fingerprint_matches(quick_run, tmp_path):
    work_a, results_a, done = quick_run
    assert done.returncode == 0, done.stderr[-3000:]
    a = json.loads((results_a / "methods.json").read_text())
    carry = tmp_path / "carry.json"
    saved = _quick(work_a, tmp_path / "unused", "--save-carry", str(carry), timeout=300)
    assert saved.returncode == 0, saved.stderr[-3000:]
    doc = json.loads(carry.read_text())
    students = [*(f"tune/srd/w{f:.4g}" for f in bench.WEIGHT_FACTORS),
                *(f"{m}/seed{s}" for m in ("none", "srd") for s in (0, 1))]
    assert sorted(doc["runs"]) == sorted(["teacher", *students])
    assert all(len(r["model_sha256"]) == 64 for r in doc["runs"].values())
    assert {"teacher/full.pt", "teacher_cache/emb.npy", "shards/manifest.parquet", "synth",
            "synth_val", "size"} <= set(doc["fingerprint"])

    # a fresh machine: teacher and cache retrain, match, and no student trains
    work_b, results_b = tmp_path / "b", tmp_path / "b_results"
    b = _quick(work_b, results_b, "--carry", str(carry))
    assert b.returncode == 0, b.stderr[-3000:]
    data = json.loads((results_b / "methods.json").read_text())
    assert sorted(data["trained_this_invocation"]) == ["cache", "teacher"]
    assert sorted(data["carried"]["runs"]) == sorted(students) and data["complete"]
    assert data["methods"] == a["methods"]
    assert data["teacher"][bench.PRIMARY] == a["teacher"][bench.PRIMARY]
    assert not list((work_b / "runs").glob("t*/*/*/student.pt"))   # tune/ and test/
    assert f"{len(students)} runs carried from" in (results_b / "methods.md").read_text()
    # a rerun takes the carried markers as finished runs
    again = _quick(work_b, results_b, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    second = json.loads((results_b / "methods.json").read_text())
    assert second["trained_this_invocation"] == [] and second["methods"] == a["methods"]

    # another teacher's runs: nothing carried, one line names the part that differs
    doc["fingerprint"]["teacher/student.pt"] = "0" * 64
    other = tmp_path / "other.json"
    other.write_text(json.dumps(doc))
    c = _quick(tmp_path / "c", tmp_path / "c_results", "--carry", str(other), "--seeds", "0",
               methods="none")
    assert c.returncode == 0, c.stderr[-3000:]
    data = json.loads((tmp_path / "c_results" / "methods.json").read_text())
    assert data["carried"]["runs"] == [] and "none/seed0" in data["trained_this_invocation"]
    assert "fingerprint differs in teacher/student.pt (nothing carried" in c.stderr
    assert "differs in teacher/student.pt" in (tmp_path / "c_results" / "methods.md").read_text()


def _result(methods: dict) -> dict:
    return {
        "command": "python -m bench.methods", "missing_runs": ["srd/seed4"], "failed_runs": {},
        "wall_time_s": 60.0, "machine": {"load_average_1min": 1.0, "cpus": 2},
        "floor_rule": "TAR@FAR ... floor", "bootstrap_rule": "[low, high]: bootstrap",
        "setting": {"size": vars(bench.SIZES["full"]) | {}, "train_images": 4096,
                    "train_identities": 256, "unlabelled_images": 1600,
                    "resolution": [112, 112], "teacher_steps": 384, "student_steps": 192,
                    "batch_size": 64, "test": {"ijb": {"identities": 200}},
                    "validation": {"ijb": {"identities": 100}, "seed": 1},
                    "seeds": [0, 1, 2, 3, 4], "tune_seed": 1000,
                    "weight_factors": list(bench.WEIGHT_FACTORS),
                    "temp_factors": list(bench.TEMP_FACTORS), "srd_effective_weight": 8.0,
                    "teacher": {"arch": "r_tiny", "widths": [16, 32, 64, 128],
                                "embedding_size": 256, "params": 1_900_000},
                    "student": {"arch": "mbf_tiny", "widths": [32, 32, 64, 128],
                                "embedding_size": 128, "params": 80_000}},
        "teacher": {"seeds": [0], **{m: {"mean": 80.0, "std": None, "n": 1}
                                     for m in bench.METRICS},
                    f"{bench.PRIMARY}_interval": {"value": 80.0, "low": 77.0, "high": 83.0}},
        "methods": methods,
    }


def _row(mean, tuned=True, vs_alone=None, vs_srd=None, seeds=(0, 1, 2, 3, 4)):
    entry = {m: bench.stats([mean - 1, mean, mean + 1, mean, mean][:len(seeds)])
             for m in bench.METRICS}
    run = {bench.PRIMARY: mean, bench.ACC: 70.0, "train_cpu_seconds": 120.0}
    return {"seeds": list(seeds), "tuned": tuned, **entry,
            "runs": {str(s): run for s in seeds}, "bootstrap_half_width": 2.5,
            "gap_share": {m: (mean - 60.0) / 20.0 for m in bench.METRICS},
            "chosen": {"setting": {"weight": 3.0, "temp": 1.0}, "values": {"srd": 3.0}}
            if tuned else {"setting": {"weight": 1.0, "temp": 1.0}, "values": {}},
            "tuning": [], "vs_alone": vs_alone, "vs_srd": vs_srd}


def test_markdown_states_intervals_significance_and_missing_runs():
    sig = bench.paired({str(s): 75.0 + (s % 2) for s in range(5)},
                       {str(s): 60.0 for s in range(5)})
    flat = bench.paired({"0": 61.0, "1": 59.0, "2": 62.0, "3": 58.0, "4": 60.5},
                        {str(s): 60.0 for s in range(5)})
    below = bench.paired({str(s): 61.0 + (s % 2) for s in range(5)},
                         {str(s): 75.0 for s in range(5)})
    result = _result({"none": _row(60.0, tuned=False),
                      "srd": _row(75.0, vs_alone=sig),
                      "kd": _row(60.3, vs_alone=flat, vs_srd=below)})
    result["methods"]["srd"]["tuning"] = [
        {"setting": {"weight": 3.0, "temp": 1.0}, "values": {"srd": 3.0, "feat": 3.0},
         bench.PRIMARY: 71.5}]
    text = bench.markdown(result)
    assert "SRD closes 75 % of the teacher-student TAR@FAR=1e-3 gap" in text
    assert "goal >= 60 %: met" in text
    assert "srd beats the student alone significantly" in text
    assert "kd does NOT beat the student alone significantly here" in text
    assert "below SRD" in text
    assert " * |" in text                                     # the significance mark
    assert "[77.00, 83.00]" in text and "± 2.50" in text      # bootstrap resolution
    assert "| srd | x3 / x1 | srd 3, feat 3 | 71.50 |" in text
    assert "missing runs** srd/seed4" in text
    assert "4096 images of 256 identities" in text and "112x112" in text
    assert "2s²/D = 8" in text
    result["setting"]["test_above_floor"] = False
    below = bench.markdown(result)
    assert "n/a (None impostor pairs)" in below and "no verdict" in below


def test_method_batches_needs_the_method_bench_first_and_tables_its_runs(tmp_path):
    from bench import method_batches
    from facekd.errors import FacekdError

    # without bench.methods' teacher cache: an error naming the folder (main: exit 2);
    # run() in-process, as main() would install a console log handler on this test's
    # captured stderr and leave it behind for the tests after it
    with pytest.raises(FacekdError, match="teacher_cache: no complete teacher cache"):
        method_batches.run(tmp_path, tmp_path / "o")
    table = method_batches.markdown({"command": "c", "seed": 1000, "runs": [
        {"method": "none", "images_per_identity": 2, "ijb_tar@far1e-3": 16.638,
         "interval": {"low": 9.1, "high": 27.2}},
        {"method": "ekd", "images_per_identity": 1, "ijb_tar@far1e-3": 32.29, "interval": None}]})
    assert "| student alone | 2 | 16.64 [9.10, 27.20] |" in table
    assert "| ekd | 1 | 32.29 |" in table
