"""The method comparison on the embedded benchmark, under a fair protocol (issue 16).

One synthetic face dataset, one r_tiny teacher (seed 0), one teacher cache; every method
in ``METHODS`` trains the same mbf_tiny student through its ``recipes/*_synth.yaml``
recipe. Identities are split three ways and never cross:

- **train**: the identities the teacher and every student learn from;
- **validation**: an IJB-style protocol of other identities (``synth_val``, generated
  with seed 1: each synthetic identity's parameters come from ``(seed, role, index)``),
  used only to choose hyper-parameters;
- **test**: the held-out sets of ``synth`` (IJB-style protocol, LFW/CFP-FP/AgeDB-like
  ``.bin``), used only for the reported numbers.

Tuning, the same for every method: the method's main weight (all of its distillation
loss weights, scaled together) takes ``WEIGHT_FACTORS`` x the recipe's value; then,
where the method has a temperature or scale, ``TEMP_FACTORS`` x the recipe's value at
the chosen weight. One tuning seed (``TUNE_SEED``, not a test seed); the setting with
the best validation TAR@FAR=1e-3 wins (ties: the recipe's own). Then ``SEEDS`` test
runs at the chosen setting. ``feature_srd_weight`` is a control, not tuned: the
``feature`` baseline at SRD's effective cosine weight ``2 s^2 / D`` (see
:mod:`facekd.distill.srd`), so "SRD beats feature" cannot be loss weight alone.

Reported per method: test mean ± std over seeds with a 95 % t-interval of the mean, the
protocol's own resolution (the median over seeds of each run's cluster-bootstrap
interval, :mod:`facekd.evaluate.stats`; TAR@FAR only where the protocol has >= 10/FAR
impostor pairs), the share of the teacher-student gap closed, and paired differences
(same seed) against the student alone and against SRD with a 95 % t-interval over
seeds; a difference is significant when its interval excludes 0.

Everything lives in ``--work`` and is reused on a rerun: a run whose ``summary.json``
and evaluation exist is not retrained, unfinished trainings resume from their
checkpoints, and the tables are rewritten after every finished run. The work folder is
not committed, so finished runs travel between machines as a small committed file:
``--save-carry [PATH]`` (default ``bench/results/methods_carry.json``) writes every
finished run's small JSON files with a fingerprint of what they depend on (teacher
weights, teacher cache, data, sizes, recipes); ``--carry [PATH]`` (automatic for the
full run when the default file exists, ``--no-carry`` to refuse) retrains the teacher
and its cache, which are deterministic on one machine kind, and takes the carried runs
(marked by ``bench_carried.json``, no checkpoint) only when every fingerprint matches;
otherwise it logs which one differs and carries nothing.

Run: ``.venv/bin/python -m bench.methods`` (``--estimate`` first: it times a few steps
of every method and projects the whole comparison's CPU cost; budget <= 5 CPU-hours on
2 cores). ``--quick`` is the smoke test. Writes ``bench/results/methods.{json,md}``.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import os
import platform
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("bench.methods")

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
TEACHER_RECIPE = "teacher_synth.yaml"
TEACHER_ARCH, STUDENT_ARCH = "r_tiny", "mbf_tiny"
BINS = ("lfw", "cfp_fp", "agedb_30")
PRIMARY = "ijb_tar@far1e-3"
PRIMARY_FAR = 1e-3
ACC = "lfw_acc"
METRICS = (PRIMARY, ACC, "cfp_fp_acc", "agedb_30_acc")
SEEDS = (0, 1, 2, 3, 4)
TUNE_SEED = 1000
WEIGHT_FACTORS = (1 / 3, 1.0, 3.0)
TEMP_FACTORS = (0.5, 2.0)
VALIDATION_SEED = 1
LEVEL = 0.95


@dataclass(frozen=True)
class MethodSpec:
    """How a compared method is trained and tuned.

    ``weights``: the loss terms the weight factor scales together (the method's main
    weight); ``temperature``: the ``method.params`` key the temperature factor scales
    (a temperature or a logit scale), or None; ``tuned``: False for the student alone
    and the fixed-weight control.
    """

    recipe: str
    weights: tuple[str, ...] = ()
    temperature: str | None = None
    tuned: bool = True


SPECS: dict[str, MethodSpec] = {
    "none": MethodSpec("none_synth.yaml", tuned=False),
    "kd": MethodSpec("kd_synth.yaml", ("kd",), "temperature"),
    "feature": MethodSpec("feature_synth.yaml", ("feature",)),
    "feature_srd_weight": MethodSpec("feature_synth.yaml", ("feature",), tuned=False),
    "rkd": MethodSpec("rkd_synth.yaml", ("rkd_distance", "rkd_angle")),
    "refilled": MethodSpec("refilled_synth.yaml", ("relation", "local_kd"), "tau2"),
    "frskd": MethodSpec("frskd_synth.yaml", ("attention", "soft"), "temperature"),
    "srd": MethodSpec("srd_synth.yaml", ("srd", "feat")),
    "srd_unlabelled": MethodSpec("srd_unlabelled_synth.yaml", ("srd", "feat")),
    "adadistill": MethodSpec("adadistill_synth.yaml", ("adadistill",), "scale"),
    "ekd": MethodSpec("ekd_synth.yaml", ("ekd",), "temperature"),
}
METHODS = tuple(SPECS)
# run by default: srd_unlabelled trains on extra (unlabelled) data, another regime than
# the rest, and costs ~2x a student: `--methods ...,srd_unlabelled` adds it
DEFAULT_METHODS = tuple(m for m in METHODS if m != "srd_unlabelled")
# the main question first (alone, SRD, its control, the state of the art), costly last
RUN_ORDER = ("none", "srd", "feature_srd_weight", "adadistill", "ekd", "kd", "feature", "rkd",
             "refilled", "srd_unlabelled", "frskd")
# FRSKD's self-teacher makes its step ~6x a student's, srd_unlabelled's ~2x (--estimate)
COSTLY_LAST = ("srd_unlabelled", "frskd")
LABELS = {"none": "student alone", "feature_srd_weight": "feature at SRD's weight (control)",
          "frskd": "frskd (self-KD, no teacher)", "srd_unlabelled": "srd + unlabelled pool"}


@dataclass(frozen=True)
class BenchSize:
    """Data, model and schedule sizes of one benchmark setting."""

    synth_preset: str
    identities: int
    images_per_id: int
    lfw_pairs: int
    cfp_pairs: int
    agedb_pairs: int
    ijb_identities: int
    ijb_impostors: int
    val_ijb_identities: int
    val_ijb_impostors: int
    unlabelled_identities: int
    unlabelled_images_per_id: int
    batch_size: int
    unlabelled_batch_size: int
    teacher_epochs: int
    student_epochs: int
    max_steps: int | None = None
    resolution: int = 112     # stated, not a knob: the loader and the backbones use 112x112


SIZES: dict[str, BenchSize] = {
    # Sized from `python -m bench.methods --estimate` (bench/results/methods_estimate.md)
    # to fit 5 CPU-hours: 176 identities x 16 images, batch 64, students 2 epochs = 88
    # steps, the teacher 6 epochs (256 identities at 3 epochs projected 9.3 CPU-hours,
    # at 2 epochs 6.6; FRSKD's self-teacher alone is ~40 % of it); validation and test
    # IJB-style protocols hold >= 10/FAR = 10,000 impostor pairs, so TAR@FAR=1e-3 is
    # above their floor.
    "full": BenchSize("default", identities=176, images_per_id=16, lfw_pairs=1200,
                      cfp_pairs=600, agedb_pairs=600, ijb_identities=200, ijb_impostors=40000,
                      val_ijb_identities=100, val_ijb_impostors=20000,
                      unlabelled_identities=200, unlabelled_images_per_id=8, batch_size=64,
                      unlabelled_batch_size=32, teacher_epochs=6, student_epochs=2),
    # the test: seconds per stage, numbers meaningless
    "quick": BenchSize("tiny", identities=8, images_per_id=4, lfw_pairs=20, cfp_pairs=20,
                       agedb_pairs=20, ijb_identities=3, ijb_impostors=20,
                       val_ijb_identities=3, val_ijb_impostors=20,
                       unlabelled_identities=4, unlabelled_images_per_id=4, batch_size=8,
                       unlabelled_batch_size=4, teacher_epochs=1, student_epochs=2,
                       max_steps=2),
    # --estimate: enough images for a few full-size (batch 64) steps of every method
    "estimate": BenchSize("tiny", identities=16, images_per_id=8, lfw_pairs=20, cfp_pairs=0,
                          agedb_pairs=0, ijb_identities=3, ijb_impostors=20,
                          val_ijb_identities=3, val_ijb_impostors=20,
                          unlabelled_identities=8, unlabelled_images_per_id=8,
                          batch_size=64, unlabelled_batch_size=32, teacher_epochs=1,
                          student_epochs=4),
}


def recipes_dir() -> Path:
    from facekd.train.recipe import recipes_dir as found  # the shipped recipes

    return found()


# ----------------------------------------------------------------------------- layout
@dataclass(frozen=True)
class Layout:
    """Where every intermediate of the benchmark lives inside ``--work``."""

    work: Path

    @property
    def synth(self) -> Path:            # train identities + the test sets
        return self.work / "synth"

    @property
    def synth_val(self) -> Path:        # the validation identities' protocol
        return self.work / "synth_val"

    @property
    def shards(self) -> Path:
        return self.work / "shards"

    @property
    def shards_unlabelled(self) -> Path:
        return self.work / "shards_unlabelled"

    @property
    def teacher(self) -> Path:
        return self.work / "runs" / "teacher"

    @property
    def cache(self) -> Path:
        return self.work / "teacher_cache"

    @property
    def cache_unlabelled(self) -> Path:
        return self.work / "teacher_cache_unlabelled"

    @property
    def embedding_cache(self) -> Path:
        return self.work / "embedding_cache"

    def tune(self, method: str, tag: str) -> Path:
        return self.work / "runs" / "tune" / method / tag

    def student(self, method: str, seed: int) -> Path:
        return self.work / "runs" / "test" / method / f"seed{seed}"


# ----------------------------------------------------------------------------- steps
def prepare_data(layout: Layout, size: BenchSize, progress: bool) -> dict[str, Any]:
    """Synthetic faces (train, test sets, unlabelled pool), the validation identities'
    protocol and the shards the loader reads; each part is skipped when complete."""
    from facekd.data.shards import rec2shards
    from facekd.data.synth import generate

    timings: dict[str, float] = {}
    start = time.perf_counter()
    summary = generate(layout.synth, size.identities, size.images_per_id, 0,
                       preset=size.synth_preset, lfw_pairs=size.lfw_pairs,
                       cfp_pairs=size.cfp_pairs, agedb_pairs=size.agedb_pairs,
                       ijb_identities=size.ijb_identities, ijb_impostors=size.ijb_impostors,
                       unlabelled_identities=size.unlabelled_identities,
                       unlabelled_images_per_id=size.unlabelled_images_per_id,
                       progress=progress)
    # validation: other identities (seed 1), the IJB-style protocol only; its two
    # one-image training identities are never read
    val = generate(layout.synth_val, 2, 1, VALIDATION_SEED, preset=size.synth_preset,
                   lfw_pairs=0, cfp_pairs=0, agedb_pairs=0,
                   ijb_identities=size.val_ijb_identities,
                   ijb_impostors=size.val_ijb_impostors, unlabelled_identities=0,
                   progress=progress)
    timings["generate"] = time.perf_counter() - start
    start = time.perf_counter()
    for source, out in ((layout.synth, layout.shards),
                        (layout.synth / "unlabelled", layout.shards_unlabelled)):
        if not (out / "dataset.json").exists():
            rec2shards(source, out, shard_size=2000, workers=1)
    timings["shards"] = time.perf_counter() - start
    return {"synth": summary, "synth_val": val, "timings": timings}


def _recipe_overrides(layout: Layout, size: BenchSize, out: Path, seed: int, epochs: int,
                      progress: bool) -> list[str]:
    overrides = [f"data.train={layout.shards}", "data.val_bins=[]",
                 f"data.batch_size={size.batch_size}", f"optim.epochs={epochs}",
                 f"run.output={out}", f"run.seed={seed}", "run.eval_every=0",
                 "run.tensorboard=false", f"run.progress={str(progress).lower()}"]
    if size.max_steps is not None:
        overrides.append(f"run.max_steps={size.max_steps}")
    return overrides


@functools.cache
def _recipe(name: str) -> Any:
    from facekd.train.recipe import load_recipe

    return load_recipe(str(recipes_dir() / name))


def needs_teacher(method: str) -> bool:
    from facekd.distill import get_method_class

    return bool(get_method_class(_recipe(SPECS[method].recipe).method.name).needs_teacher)


def uses_unlabelled(method: str) -> bool:
    return bool(_recipe(SPECS[method].recipe).data.unlabelled)


def base_values(method: str) -> tuple[dict[str, float], float | None]:
    """The recipe's weights of the tuned terms and its temperature (or scale)."""
    from facekd.distill.base import get_method_class, parse_params

    spec = SPECS[method]
    recipe = _recipe(spec.recipe)
    cls = get_method_class(recipe.method.name)
    weights = {k: float(recipe.method.weights.get(k, cls.default_weights.get(k, 1.0)))
               for k in spec.weights}
    temp = None
    if spec.temperature:
        temp = float(getattr(parse_params(cls, recipe.method.params), spec.temperature))
    return weights, temp


def srd_effective_weight() -> float:
    """``2 s^2 / D`` of the benchmark's teacher (its head scale and embedding size)."""
    from facekd.distill.srd import effective_cosine_weight

    teacher = _recipe(TEACHER_RECIPE)
    return effective_cosine_weight(teacher.student.head.scale, teacher.student.embedding_size)


@dataclass(frozen=True)
class Setting:
    """One point of the tuning grid: factors on the recipe's weight and temperature."""

    weight: float = 1.0
    temp: float = 1.0

    @property
    def tag(self) -> str:
        return f"w{self.weight:.4g}_t{self.temp:.4g}"


def setting_overrides(method: str, setting: Setting) -> list[str]:
    """The recipe values a setting changes (and the control's fixed weight)."""
    spec = SPECS[method]
    if method == "feature_srd_weight":
        return [f"method.weights.feature={srd_effective_weight():.6g}"]
    weights, temp = base_values(method)
    out = [f"method.weights.{k}={v * setting.weight:.6g}" for k, v in weights.items()]
    if spec.temperature and temp is not None:
        out.append(f"method.params.{spec.temperature}={temp * setting.temp:.6g}")
    return out


def setting_values(method: str, setting: Setting) -> dict[str, float]:
    """The hyper-parameter values a setting trains with, for the tables."""
    return {o.split("=", 1)[0].rsplit(".", 1)[-1]: float(o.split("=", 1)[1])
            for o in setting_overrides(method, setting)}


def student_overrides(layout: Layout, size: BenchSize, method: str, seed: int,
                      progress: bool, out: Path | None = None,
                      setting: Setting = Setting()) -> list[str]:
    """Paths, sizes, seed, output and the tuned setting; the recipe's values otherwise."""
    out = out or layout.student(method, seed)
    overrides = _recipe_overrides(layout, size, out, seed, size.student_epochs, progress)
    teacher = needs_teacher(method)
    if teacher:
        overrides += [f"teacher.checkpoint={layout.teacher / 'full.pt'}",
                      f"teacher.cache={layout.cache}"]
    if uses_unlabelled(method):
        overrides += [f"data.unlabelled={layout.shards_unlabelled}",
                      f"data.unlabelled_batch_size={size.unlabelled_batch_size}"]
        if teacher:
            overrides.append(f"teacher.unlabelled_cache={layout.cache_unlabelled}")
    return overrides + setting_overrides(method, setting)


def _train(recipe_file: str, overrides: list[str]) -> None:
    from facekd.train.recipe import load_recipe, shipped_recipe
    from facekd.train.trainer import train

    train(load_recipe(str(shipped_recipe(recipe_file)), overrides))


def _far_key(table: dict[Any, float], far: float) -> float:
    """The value at ``far`` of a FAR-keyed table (keys may be floats or strings)."""
    key = min(table, key=lambda k: abs(math.log10(float(k)) - math.log10(far)))
    if abs(float(key) - far) > 1e-9:
        raise KeyError(f"no FAR {far} in {sorted(table)}")
    return float(table[key])


def evaluate_model(model: Path, layout: Layout, progress: bool, workers: int,
                   split: str = "test") -> dict[str, Any]:
    """Scores of one model on the ``test`` sets or the ``validation`` protocol, with the
    IJB TAR's cluster-bootstrap interval; reused while the checkpoint hash is unchanged."""
    from facekd.evaluate.ijb import read_protocol
    from facekd.evaluate.pipeline import evaluate_bin, evaluate_ijb
    from facekd.evaluate.stats import far_supported, ijb_estimates
    from facekd.fileio import sha256_file, write_json_atomic
    from facekd.models.embedder import load_embedder

    out = model.parent / ("bench_eval.json" if split == "test" else "bench_val.json")
    digest = sha256_file(model)
    if out.exists():
        previous = json.loads(out.read_text())
        if previous.get("model_sha256") == digest:
            return previous
    start, cpu = time.perf_counter(), time.process_time()
    embedder = load_embedder(model, device="cpu")
    scores: dict[str, Any] = {"model": str(model), "model_sha256": digest, "split": split}
    root = layout.synth if split == "test" else layout.synth_val
    if split == "test":
        for name in BINS:
            path = root / f"{name}.bin"
            if path.exists():
                res = evaluate_bin(embedder, path, 64, cache_dir=layout.embedding_cache,
                                   progress=progress)
                scores[f"{name}_acc"] = 100.0 * float(res["acc_mean"])
                scores[f"{name}_pairs"] = int(res["num_pairs"])
    res = evaluate_ijb(embedder, root / "ijb", "IJBC", batch_size=64, workers=workers,
                       cache_dir=layout.embedding_cache, progress=progress)
    protocol = read_protocol(root / "ijb", "IJBC")
    n_imp = int((~protocol.labels.astype(bool)).sum())
    scores[PRIMARY] = 100.0 * _far_key(res["tar_at_far"], PRIMARY_FAR)
    scores["ijb_pairs"] = int(res["num_pairs"])
    scores["ijb_impostor_pairs"] = n_imp
    scores["above_floor"] = far_supported(PRIMARY_FAR, n_imp)
    if scores["above_floor"]:
        est = ijb_estimates(res, protocol.p1, protocol.p2, protocol.labels, (PRIMARY_FAR,))
        scores[f"{PRIMARY}_interval"] = {k: 100.0 * v for k, v in
                                         est["intervals"][f"tar@{PRIMARY_FAR:g}"].items()}
    scores["eval_seconds"] = time.perf_counter() - start
    scores["eval_cpu_seconds"] = time.process_time() - cpu
    write_json_atomic(out, scores)
    return scores


# ----------------------------------------------------------------------------- tasks
@dataclass(frozen=True)
class Task:
    """One unit of work; ``needs`` name earlier tasks.

    kind: teacher | cache | tune (``axis`` "weight" or "temp" and its ``factor``; a temp
    task runs at the weight its method's weight tasks chose) | test (at the chosen
    setting, scored on the test identities).
    """

    name: str
    kind: str
    method: str = ""
    seed: int = 0
    needs: tuple[str, ...] = ()
    axis: str = ""
    factor: float = 1.0


def _tune_name(method: str, axis: str, factor: float) -> str:
    return f"tune/{method}/{axis}{factor:.4g}"


def tune_tasks(method: str) -> tuple[list[Task], list[Task]]:
    """The weight-grid tasks and the temperature tasks that follow them."""
    spec = SPECS[method]
    if not spec.tuned:
        return [], []
    base = ("cache",) if needs_teacher(method) else ()
    weights = [Task(_tune_name(method, "w", f), "tune", method, TUNE_SEED, base, "weight", f)
               for f in WEIGHT_FACTORS]
    temps = []
    if spec.temperature:
        after = tuple(t.name for t in weights)
        temps = [Task(_tune_name(method, "t", f), "tune", method, TUNE_SEED, after, "temp", f)
                 for f in TEMP_FACTORS]
    return weights, temps


def plan(methods: list[str], seeds: list[int]) -> list[Task]:
    """Teacher, cache, then per method in ``RUN_ORDER`` its tuning grid, then the test
    runs seed-major, so a partial run answers the main question (alone vs SRD) first.
    The methods in ``COSTLY_LAST`` come as a second block of the same shape after every
    other method's test runs, so a partial run has a complete table without them. The
    order changes no number: every run's seed and setting are fixed by its name."""
    tasks = [Task("teacher", "teacher")]
    if any(needs_teacher(m) for m in methods):
        tasks.append(Task("cache", "cache", needs=("teacher",)))
    ordered = sorted(methods, key=lambda m: RUN_ORDER.index(m) if m in RUN_ORDER else 99)
    for block in ([m for m in ordered if m not in COSTLY_LAST],
                  [m for m in ordered if m in COSTLY_LAST]):
        tasks += _plan_block(block, seeds)
    return tasks


def _plan_block(methods: list[str], seeds: list[int]) -> list[Task]:
    """The tuning grids of ``methods``, then their test runs seed-major."""
    tasks: list[Task] = []
    tuning: dict[str, list[str]] = {}
    for method in methods:
        weights, temps = tune_tasks(method)
        tasks += weights + temps
        tuning[method] = [t.name for t in weights + temps]
    for seed in seeds:
        for method in methods:
            needs = tuple(tuning[method]) or (("cache",) if needs_teacher(method) else ())
            tasks.append(Task(f"{method}/seed{seed}", "test", method, seed, needs))
    return tasks


def _cache_complete(folder: Path) -> bool:
    meta = folder / "meta.json"
    return meta.exists() and bool(json.loads(meta.read_text()).get("complete"))


def tune_runs(layout: Layout, method: str) -> list[dict[str, Any]]:
    """The finished tuning runs of a method: setting, validation score, values."""
    out = []
    folder = layout.work / "runs" / "tune" / method
    if not folder.is_dir():
        return out
    for run in sorted(folder.iterdir()):
        setting = _read_json(run / "bench_setting.json")
        val = _read_json(run / "bench_val.json")
        if setting and val and (run / "summary.json").exists():
            out.append({"tag": run.name, "setting": setting, PRIMARY: val.get(PRIMARY),
                        "train_cpu_seconds": _train_cpu(run),
                        "eval_cpu_seconds": val.get("eval_cpu_seconds"),
                        "values": setting_values(method, Setting(**setting))})
    return out


def best_setting(layout: Layout, method: str, axis: str = "") -> Setting:
    """The best validation setting among the finished tuning runs (``axis="weight"``:
    among the weight grid only); ties go to the one nearest the recipe's own values."""
    runs = tune_runs(layout, method)
    if axis == "weight":
        runs = [r for r in runs if r["setting"]["temp"] == 1.0]
    runs = [r for r in runs if r[PRIMARY] is not None]
    if not runs:
        return Setting()

    def key(run: dict[str, Any]) -> tuple[float, float]:
        s = run["setting"]
        return (round(run[PRIMARY], 9),
                -abs(math.log(s["weight"])) - abs(math.log(s["temp"])))

    return Setting(**max(runs, key=key)["setting"])


def task_setting(task: Task, layout: Layout) -> Setting:
    """The setting a task trains with (decided from finished runs when it starts)."""
    if task.kind == "tune":
        if task.axis == "weight":
            return Setting(weight=task.factor)
        return Setting(weight=best_setting(layout, task.method, "weight").weight,
                       temp=task.factor)
    if task.kind == "test" and SPECS[task.method].tuned:
        return best_setting(layout, task.method)
    return Setting()


def task_run(task: Task, layout: Layout) -> Path:
    if task.kind == "teacher":
        return layout.teacher
    if task.kind == "tune":
        return layout.tune(task.method, task.name.rsplit("/", 1)[-1])
    return layout.student(task.method, task.seed)


def task_done(task: Task, layout: Layout, methods: list[str]) -> bool:
    """Whether a task's outputs exist (checkpoint trained and evaluated, cache complete)."""
    if task.kind == "cache":
        unlabelled = any(uses_unlabelled(m) for m in methods)
        return _cache_complete(layout.cache) and (
            not unlabelled or _cache_complete(layout.cache_unlabelled))
    run = task_run(task, layout)
    evaluation = run / ("bench_val.json" if task.kind == "tune" else "bench_eval.json")
    if not ((run / "summary.json").exists() and evaluation.exists()):
        return False
    from facekd.fileio import sha256_file

    scored = json.loads(evaluation.read_text()).get("model_sha256")
    if not (run / "student.pt").exists():   # carried: trained and scored on another machine
        return (_read_json(run / CARRIED) or {}).get("model_sha256") == scored
    return scored == sha256_file(run / "student.pt")


def execute(task: Task, work: str, size: BenchSize, methods: list[str], progress: bool,
            io_workers: int) -> dict[str, Any]:
    """Run one task (in this process or a pool worker); returns what it did."""
    from facekd.fileio import write_json_atomic
    from facekd.train.cache import build_teacher_cache

    layout = Layout(Path(work))
    start = time.perf_counter()
    did: dict[str, Any] = {"task": task.name, "trained": False}
    if task.kind == "cache":
        sources = [(layout.shards, layout.cache)]
        if any(uses_unlabelled(m) for m in methods):
            sources.append((layout.shards_unlabelled, layout.cache_unlabelled))
        for source, out in sources:
            if not _cache_complete(out):
                cpu, wall = time.process_time(), time.perf_counter()
                build_teacher_cache(str(layout.teacher / "full.pt"), str(source), out,
                                    batch_size=size.batch_size, device="cpu", progress=progress)
                did["trained"] = True
                _write_cost(out, "cache", time.process_time() - cpu, time.perf_counter() - wall)
        did["seconds"] = time.perf_counter() - start
        return did
    run = task_run(task, layout)
    if task.kind == "teacher":
        recipe, overrides = TEACHER_RECIPE, _recipe_overrides(
            layout, size, run, 0, size.teacher_epochs, progress)
    else:
        setting = task_setting(task, layout)
        recipe = SPECS[task.method].recipe
        overrides = student_overrides(layout, size, task.method, task.seed, progress, run,
                                      setting)
        recorded = _read_json(run / "bench_setting.json")
        if recorded is not None and recorded != asdict(setting) and \
                (run / "summary.json").exists():
            raise RuntimeError(f"{run} was trained at {recorded}, the tuning now picks "
                               f"{asdict(setting)}: remove the folder to retrain")
        run.mkdir(parents=True, exist_ok=True)
        write_json_atomic(run / "bench_setting.json", asdict(setting))
    if not (run / "summary.json").exists():
        log.info("%s: training (%s, overrides %s)", task.name, recipe, " ".join(overrides))
        cpu, wall = time.process_time(), time.perf_counter()
        _train(recipe, overrides)
        did["trained"] = True
        _write_cost(run, "train", time.process_time() - cpu, time.perf_counter() - wall)
    split = "validation" if task.kind == "tune" else "test"
    scores = evaluate_model(run / "student.pt", layout, progress, io_workers, split)
    did.update({"seconds": time.perf_counter() - start, "scores": scores})
    return did


def _write_cost(folder: Path, what: str, cpu_seconds: float, wall_seconds: float) -> None:
    """CPU seconds (all threads) beside wall seconds: on a shared machine only the CPU
    time says what a run would take on idle cores (a resumed run records its last part)."""
    import torch

    from facekd.fileio import write_json_atomic

    path = folder / "bench_cost.json"
    cost = _read_json(path) or {}
    cost[what] = {"cpu_seconds": cpu_seconds, "wall_seconds": wall_seconds,
                  "torch_threads": torch.get_num_threads(), "load_average_1min": _load()}
    write_json_atomic(path, cost)


def _init_worker(threads: int) -> None:
    """Pool workers: one torch thread each (two small trainings beat one two-thread one)."""
    import torch

    from facekd.logs import setup_logging

    torch.set_num_threads(threads)
    setup_logging()


def _execute_logged(task: Task, work: str, size: BenchSize, methods: list[str],
                    progress: bool, io_workers: int) -> dict[str, Any]:
    try:
        return execute(task, work, size, methods, progress, io_workers)
    except BaseException as exc:  # reported in the parent; a bare pickle may lose the trace
        raise RuntimeError(f"{task.name}: {exc!r}\n{traceback.format_exc()}") from None


# ----------------------------------------------------------------------------- carry
CARRY = RESULTS / "methods_carry.json"
CARRY_FORMAT = "facekd-bench-methods-carry"
# what collect(), tune_runs(), _test_rows() and best_setting() read of a run folder
CARRY_FILES = ("bench_setting.json", "bench_val.json", "bench_eval.json", "summary.json",
               "bench_cost.json")
CARRIED = "bench_carried.json"   # stands in for student.pt in task_done


def _sha256_tree(folder: Path) -> str:
    """One digest of every file under ``folder`` (logs excluded) and its relative path."""
    import hashlib

    from facekd.fileio import sha256_file

    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix != ".log"):
        h.update(f"{path.relative_to(folder).as_posix()}\0{sha256_file(path)}\n".encode())
    return h.hexdigest()


def _sha256_json(path: Path, drop: tuple[str, ...]) -> str:
    """Digest of a JSON file without the fields that depend on its folder's path (paths,
    the hash of a checkpoint that holds one)."""
    import hashlib

    data = {k: v for k, v in json.loads(path.read_text()).items() if k not in drop}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def _sha256_weights(path: Path) -> str:
    """Digest of a checkpoint's architecture and tensors: the file's own bytes also hold
    its run folder's path (``meta.recipe``), which differs between work folders."""
    import hashlib

    import torch

    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    h = hashlib.sha256(json.dumps([ckpt.get("arch"), ckpt.get("arch_kwargs")],
                                  sort_keys=True, default=str).encode())
    head = ckpt.get("head") or {}
    tensors = {**{f"state_dict.{k}": v for k, v in ckpt["state_dict"].items()},
               **({"head.weight": head["weight"]} if head.get("weight") is not None else {})}
    h.update(json.dumps([head.get("type"), head.get("config")], sort_keys=True,
                        default=str).encode())
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def fingerprint(layout: Layout, size: BenchSize, methods: list[str] | None = None
                ) -> dict[str, Any]:
    """What a finished run's numbers depend on, by part. ``methods``: the parts a plan of
    these methods builds (its carried runs need no other); None: all the folder holds."""
    def digest(path: Path, how: Any) -> str:
        return how(path) if path.exists() else "missing"

    from facekd.fileio import sha256_file

    out: dict[str, Any] = {"size": asdict(size)}
    for name in sorted({TEACHER_RECIPE, *(SPECS[m].recipe for m in methods or METHODS)}):
        out[f"recipes/{name}"] = digest(recipes_dir() / name, sha256_file)
    for name in ("student.pt", "full.pt"):
        out[f"teacher/{name}"] = digest(layout.teacher / name, _sha256_weights)
    if methods is None:
        caches = [c for c in (layout.cache, layout.cache_unlabelled) if _cache_complete(c)]
    else:
        caches = [layout.cache] if any(needs_teacher(m) for m in methods) else []
        if caches and any(uses_unlabelled(m) for m in methods):
            caches.append(layout.cache_unlabelled)
    for cache in caches:
        for name in ("keys.npy", "emb.npy", "centres.npy"):
            if name != "centres.npy" or (cache / name).exists():
                out[f"{cache.name}/{name}"] = digest(cache / name, sha256_file)
        out[f"{cache.name}/meta.json"] = digest(cache / "meta.json", lambda p: _sha256_json(
            p, ("teacher", "teacher_sha256", "source")))
    for shards in (layout.shards, layout.shards_unlabelled):
        out[f"{shards.name}/manifest.parquet"] = digest(shards / "manifest.parquet",
                                                        sha256_file)
        out[f"{shards.name}/dataset.json"] = digest(shards / "dataset.json",
                                                    lambda p: _sha256_json(p, ("source",)))
    for folder in (layout.synth, layout.synth_val):   # train, test sets, validation
        out[folder.name] = digest(folder, _sha256_tree)
    return out


def _machine() -> str:
    """Where a carry file was written: host, CPUs, torch and the commit."""
    import subprocess

    try:
        commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT,
                                capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return (f"{platform.node() or 'unknown host'} ({os.cpu_count()} CPUs, torch "
            f"{_torch_version()}) at commit {commit or 'unknown'}")


def save_carry(work: Path, path: Path, size: BenchSize, seeds: list[int]) -> dict[str, Any]:
    """Write every finished run's small JSON files and the fingerprint to ``path``."""
    from facekd.errors import FacekdError
    from facekd.fileio import write_text_atomic

    layout = Layout(work)
    methods = list(METHODS)
    runs: dict[str, Any] = {}
    for task in plan(methods, seeds):
        if task.kind == "cache" or not task_done(task, layout, methods):
            continue
        run = task_run(task, layout)
        files = {n: _read_json(run / n) for n in CARRY_FILES if (run / n).exists()}
        scored = files["bench_val.json" if task.kind == "tune" else "bench_eval.json"]
        runs[task.name] = {"model_sha256": scored["model_sha256"], "files": files}
    if "teacher" not in runs:
        raise FacekdError(f"{work}: no finished teacher, nothing to carry")
    doc = {"format": CARRY_FORMAT, "version": 1, "from": _machine(),
           "fingerprint": fingerprint(layout, size), "runs": runs}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(doc, indent=1, sort_keys=True) + "\n")
    log.info("carry: %d finished runs of %s written to %s", len(runs), work, path)
    return doc


def apply_carry(path: Path, layout: Layout, size: BenchSize, methods: list[str],
                tasks: list[Task]) -> tuple[list[str], str]:
    """Write the carried runs into their folders when the fingerprint of the teacher,
    cache and data built here matches; returns the carried task names and a note."""
    from facekd.fileio import write_json_atomic

    doc = _read_json(path) or {}
    if doc.get("format") != CARRY_FORMAT:
        return [], f"carry file {path} is missing or not a {CARRY_FORMAT} file: nothing carried"
    saved, here = doc.get("fingerprint") or {}, fingerprint(layout, size, methods)
    differ = [k for k, v in here.items() if saved.get(k) != v]
    if differ:
        note = (f"carry file {path} not used: fingerprint differs in {', '.join(differ)} "
                "(nothing carried, every run trains here)")
        log.warning(note)
        return [], note
    carried = []
    for task in tasks:
        entry = doc["runs"].get(task.name)
        run = task_run(task, layout)
        if task.kind not in ("tune", "test") or entry is None or (run / "summary.json").exists():
            continue
        setting = entry["files"].get("bench_setting.json")
        if task.kind == "test" and setting != asdict(task_setting(task, layout)):
            log.warning("carry: %s was trained at %s, the tuning here picks %s: not carried",
                        task.name, setting, asdict(task_setting(task, layout)))
            continue
        run.mkdir(parents=True, exist_ok=True)
        for name, data in entry["files"].items():
            write_json_atomic(run / name, data)
        write_json_atomic(run / CARRIED, {"from": doc.get("from"), "carry_file": str(path),
                                          "model_sha256": entry["model_sha256"]})
        carried.append(task.name)
    note = (f"{len(carried)} runs carried from {doc.get('from')} (fingerprint matched: "
            "teacher, cache, data, sizes, recipes)")
    log.info("carry: %s", note)
    return carried, note


def carried_runs(layout: Layout, tasks: list[Task]) -> dict[str, Any]:
    """The runs of ``tasks`` whose folders hold carried results, and where from."""
    names = [t.name for t in tasks if t.kind in ("tune", "test")
             and (task_run(t, layout) / CARRIED).exists()]
    sources = sorted({str((_read_json(task_run(t, layout) / CARRIED) or {}).get("from"))
                      for t in tasks if t.name in names})
    return {"runs": names, "from": sources}


# ----------------------------------------------------------------------------- results
def stats(values: list[float]) -> dict[str, Any]:
    """Mean, sample std and the 95 % t-interval of the mean (None below two values)."""
    n = len(values)
    if n == 0:
        return {"mean": None, "std": None, "n": 0, "ci": None}
    mean = sum(values) / n
    if n < 2:
        return {"mean": mean, "std": None, "n": n, "ci": None}
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = t_quantile(n - 1) * std / math.sqrt(n)
    return {"mean": mean, "std": std, "n": n, "ci": [mean - half, mean + half]}


def t_quantile(df: int, level: float = LEVEL) -> float:
    """Two-sided Student-t quantile (12.71 for df 1, 2.776 for df 4)."""
    from scipy.stats import t

    return float(t.ppf(0.5 + level / 2, df))


def paired(a: dict[str, float], b: dict[str, float]) -> dict[str, Any]:
    """``a - b`` over the seeds both have: per-seed differences, mean, t-interval and
    whether the interval excludes 0."""
    common = sorted(set(a) & set(b), key=int)
    diffs = [a[s] - b[s] for s in common]
    out = {"seeds": [int(s) for s in common], "differences": diffs, **stats(diffs)}
    ci = out["ci"]
    out["significant"] = bool(ci is not None and (ci[0] > 0 or ci[1] < 0))
    return out


def gap_share(teacher: float | None, alone: float | None, method: float | None) -> float | None:
    """(method - alone) / (teacher - alone); None when a number is missing or no gap."""
    if teacher is None or alone is None or method is None or abs(teacher - alone) < 1e-12:
        return None
    return (method - alone) / (teacher - alone)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


@functools.cache
def _model_desc(arch: str, dim: int) -> dict[str, Any]:
    """Params, MACs and the (C, H, W) of each stage's feature map: the widths in the caption."""
    from facekd.models import create_model, model_info
    from facekd.models.registry import feature_shapes

    info = model_info(arch)
    shapes = feature_shapes(create_model(arch))
    return {"arch": arch, "embedding_size": dim, "params": int(info["params"]),
            "macs": int(info["macs"]), "stage_shapes": [list(map(int, s)) for s in shapes],
            "widths": [int(s[0]) for s in shapes]}


def _median(values: list[float]) -> float | None:
    if not values:
        return None
    v = sorted(values)
    mid = len(v) // 2
    return v[mid] if len(v) % 2 else (v[mid - 1] + v[mid]) / 2


def _test_rows(layout: Layout, method: str, seeds: list[int], missing: list[str]
               ) -> dict[str, Any]:
    spec = SPECS[method]
    row: dict[str, Any] = {"recipe": f"recipes/{spec.recipe}", "tuned": spec.tuned,
                           "seeds": [], "runs": {}}
    per_metric: dict[str, list[float]] = {m: [] for m in METRICS}
    half_widths: list[float] = []
    for seed in seeds:
        run = layout.student(method, seed)
        evaluation, summary = _read_json(run / "bench_eval.json"), _read_json(
            run / "summary.json")
        if not evaluation or not summary:
            missing.append(f"{method}/seed{seed}")
            continue
        row["seeds"].append(seed)
        interval = evaluation.get(f"{PRIMARY}_interval")
        row["runs"][str(seed)] = {"train_seconds": summary.get("train_seconds"),
                                  "steps": summary.get("steps"),
                                  "train_cpu_seconds": _train_cpu(run),
                                  "eval_cpu_seconds": evaluation.get("eval_cpu_seconds"),
                                  "setting": _read_json(run / "bench_setting.json"),
                                  f"{PRIMARY}_interval": interval,
                                  **{m: evaluation.get(m) for m in METRICS}}
        if interval:
            half_widths.append((interval["high"] - interval["low"]) / 2)
        for metric in METRICS:
            if evaluation.get(metric) is not None:
                per_metric[metric].append(float(evaluation[metric]))
    for metric in METRICS:
        row[metric] = {**stats(per_metric[metric]), "values": per_metric[metric]}
    row["bootstrap_half_width"] = _median(half_widths)
    row["tuning"] = tune_runs(layout, method) if spec.tuned else []
    chosen = best_setting(layout, method) if spec.tuned else Setting()
    row["chosen"] = {"setting": asdict(chosen), "values": setting_values(method, chosen)}
    return row


def _values_by_seed(row: dict[str, Any] | None, metric: str = PRIMARY) -> dict[str, float]:
    if not row:
        return {}
    return {s: float(r[metric]) for s, r in row["runs"].items() if r.get(metric) is not None}


def collect(layout: Layout, size: BenchSize, methods: list[str], seeds: list[int],
            data: dict[str, Any], wall_seconds: float | None, command: str,
            failed: dict[str, str], trained_now: list[str], carry_note: str | None = None
            ) -> dict[str, Any]:
    """Everything known so far in the ``methods.json`` schema (missing runs named)."""
    from facekd.evaluate.stats import FLOOR_RULE, interval_rule

    teacher_eval = _read_json(layout.teacher / "bench_eval.json")
    teacher_summary = _read_json(layout.teacher / "summary.json")
    teacher: dict[str, Any] = {"runs": {}, "seeds": []}
    for metric in METRICS:
        value = teacher_eval.get(metric) if teacher_eval else None
        teacher[metric] = {"mean": value, "std": None, "n": int(value is not None),
                           "ci": None, "values": [] if value is None else [value]}
    if teacher_eval:
        teacher["seeds"] = [0]
        teacher[f"{PRIMARY}_interval"] = teacher_eval.get(f"{PRIMARY}_interval")
        teacher["runs"]["0"] = {"train_seconds": (teacher_summary or {}).get("train_seconds"),
                                "steps": (teacher_summary or {}).get("steps"),
                                "train_cpu_seconds": _train_cpu(layout.teacher),
                                "eval_cpu_seconds": teacher_eval.get("eval_cpu_seconds")}
    missing: list[str] = [] if teacher_eval else ["teacher"]
    for method in methods:
        weights, temps = tune_tasks(method)
        for task in weights + temps:
            if not task_run(task, layout).joinpath("bench_val.json").exists():
                missing.append(task.name)
    rows = {method: _test_rows(layout, method, seeds, missing) for method in methods}
    alone, srd = rows.get("none"), rows.get("srd")
    t_mean = teacher[PRIMARY]["mean"]
    for method, row in rows.items():
        row["gap_share"] = {m: gap_share(teacher[m]["mean"],
                                         alone[m]["mean"] if alone else None, row[m]["mean"])
                            for m in METRICS}
        shares = [gap_share(t_mean, alone["runs"][s][PRIMARY], r[PRIMARY])
                  for s, r in row["runs"].items() if alone and s in alone["runs"]]
        row["gap_share_per_seed"] = stats([v for v in shares if v is not None])
        mine = _values_by_seed(row)
        row["vs_alone"] = paired(mine, _values_by_seed(alone)) if method != "none" else None
        row["vs_srd"] = paired(mine, _values_by_seed(srd)) if srd and method != "srd" \
            else None
    synth, val = data.get("synth", {}), data.get("synth_val", {})
    setting = {
        "size": asdict(size),
        "train_images": size.identities * size.images_per_id,
        "train_identities": size.identities,
        "unlabelled_images": size.unlabelled_identities * size.unlabelled_images_per_id,
        "test": {k: synth.get(k) for k in ("lfw", "cfp_fp", "agedb_30", "ijb")},
        "validation": {"ijb": val.get("ijb"), "seed": VALIDATION_SEED},
        "teacher": dict(_model_desc(TEACHER_ARCH, 256)),
        "student": dict(_model_desc(STUDENT_ARCH, 128)),
        "resolution": [size.resolution, size.resolution],
        "teacher_steps": (teacher_summary or {}).get("total_steps") or size.teacher_epochs * (
            size.identities * size.images_per_id // size.batch_size),
        "student_steps": _first_steps(layout, methods, seeds) or size.student_epochs * (
            size.identities * size.images_per_id // size.batch_size),
        "batch_size": size.batch_size,
        "seeds": seeds, "tune_seed": TUNE_SEED, "weight_factors": list(WEIGHT_FACTORS),
        "temp_factors": list(TEMP_FACTORS),
        "srd_effective_weight": srd_effective_weight(),
    }
    from facekd.evaluate.stats import far_supported

    test_impostors = ((synth.get("ijb") or {}).get("impostor_pairs"))
    setting["test_above_floor"] = bool(test_impostors is not None and far_supported(
        PRIMARY_FAR, int(test_impostors)))
    return {
        "benchmark": "distillation methods on the embedded synthetic-face benchmark, "
                     "fair protocol (train / validation / test identities)",
        "command": command,
        "primary_metric": f"{PRIMARY}: IJB-style 1:1 TAR (%) at FAR=1e-3, test identities",
        "accuracy_metric": f"{ACC}: 10-fold verification accuracy (%) on the LFW-like .bin",
        "selection_rule": f"per method: main weight x {list(WEIGHT_FACTORS)}, then "
                          f"temperature/scale x {list(TEMP_FACTORS)} at the chosen weight; "
                          f"best validation {PRIMARY} at seed {TUNE_SEED}; ties to the "
                          "recipe's values",
        "interval_rule": f"mean ± std over seeds; [low, high] the {int(LEVEL * 100)} % "
                         "t-interval of the mean over seeds; paired differences per seed",
        "bootstrap_rule": interval_rule(),
        "floor_rule": FLOOR_RULE,
        "gap_share_rule": "(method - alone) / (teacher - alone) on seed means",
        "complete": not missing and not failed,
        "missing_runs": missing,
        "failed_runs": failed,
        "trained_this_invocation": trained_now,
        "carried": {**carried_runs(layout, plan(methods, seeds)), "note": carry_note},
        "setting": setting,
        "teacher": teacher,
        "student_alone": rows.get("none"),
        "methods": rows,
        "wall_time_s": wall_seconds,
        "cpu_seconds": _cpu_totals(layout, teacher, rows),
        "data_prep_seconds": data.get("timings", {}),
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                    "torch": _torch_version(), "load_average_1min": _load()},
    }


def _cpu_totals(layout: Layout, teacher: dict[str, Any], rows: dict[str, dict[str, Any]]
                ) -> dict[str, float]:
    """Core-seconds spent so far (train, eval, cache): the idle-machine cost estimate."""
    runs = [*teacher["runs"].values(), *(r for row in rows.values()
                                         for r in [*row["runs"].values(), *row["tuning"]])]
    totals = {"train": sum(r.get("train_cpu_seconds") or 0.0 for r in runs),
              "eval": sum(r.get("eval_cpu_seconds") or 0.0 for r in runs),
              "cache": sum(((_read_json(folder / "bench_cost.json") or {}).get("cache") or {})
                           .get("cpu_seconds", 0.0)
                           for folder in (layout.cache, layout.cache_unlabelled))}
    totals["total"] = sum(totals.values())
    return totals


def _train_cpu(run: Path) -> float | None:
    cost = _read_json(run / "bench_cost.json") or {}
    return (cost.get("train") or {}).get("cpu_seconds")


def _first_steps(layout: Layout, methods: list[str], seeds: list[int]) -> int | None:
    for method in methods:
        for seed in seeds:
            summary = _read_json(layout.student(method, seed) / "summary.json")
            if summary and method != "refilled":   # REFILLED's folder holds stage 2 only
                return summary.get("total_steps")
    return None


def _torch_version() -> str:
    import torch

    return torch.__version__


def _load() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def _fmt(entry: dict[str, Any]) -> str:
    if entry["mean"] is None:
        return "–"
    std = entry.get("std")
    return f"{entry['mean']:.2f}" + (f" ± {std:.2f}" if std is not None else "")


def _ci(entry: dict[str, Any] | None) -> str:
    ci = (entry or {}).get("ci")
    return "–" if not ci else f"[{ci[0]:.2f}, {ci[1]:.2f}]"


def _share(value: float | None) -> str:
    return "–" if value is None else f"{100 * value + 0.0:.0f} %".replace("-0 %", "0 %")


def _diff(entry: dict[str, Any] | None) -> str:
    if not entry or entry.get("mean") is None:
        return "–"
    mark = " *" if entry.get("significant") else ""
    return f"{entry['mean']:+.2f} {_ci(entry)}{mark}"


def _chosen(row: dict[str, Any]) -> str:
    values = row.get("chosen", {}).get("values") or {}
    if not row.get("tuned"):
        return ", ".join(f"{k} {v:g}" for k, v in values.items()) + " (fixed)" if values \
            else "–"
    s = row["chosen"]["setting"]
    text = ", ".join(f"{k} {v:g}" for k, v in values.items())
    return f"{text} (x{s['weight']:.3g} / x{s['temp']:.3g})"


def markdown(result: dict[str, Any]) -> str:
    """The tables with a caption naming data sizes, splits, grid, seeds and the command."""
    s = result["setting"]
    size = s["size"]
    t, st = s["teacher"], s["student"]
    ijb = (s["test"] or {}).get("ijb") or {}
    vijb = (s["validation"] or {}).get("ijb") or {}
    stopped = f", stopped after {size['max_steps']}" if size.get("max_steps") else ""
    caption = (
        f"Train {s['train_images']} images of {s['train_identities']} identities "
        f"(+ {s['unlabelled_images']} unlabelled images of unseen identities for srd + "
        f"unlabelled), {s['resolution'][0]}x{s['resolution'][1]} input. Validation: "
        f"an IJB-style protocol of other identities ({vijb.get('identities')} identities, "
        f"{vijb.get('genuine_pairs')} genuine / {vijb.get('impostor_pairs')} impostor "
        f"pairs; synth seed {s['validation']['seed']}), used only to choose each method's "
        f"setting. Test: IJB-style protocol ({ijb.get('identities')} identities, "
        f"{ijb.get('templates')} templates, {ijb.get('genuine_pairs')} genuine / "
        f"{ijb.get('impostor_pairs')} impostor pairs) and the LFW-like .bin "
        f"({size['lfw_pairs']} pairs), identities seen by nothing else. Teacher "
        f"{t['arch']} (stage widths {t['widths']}, {t['embedding_size']}-d, "
        f"{t['params'] / 1e6:.2f} M params, {size['teacher_epochs']} epochs = "
        f"{s['teacher_steps']} steps, seed 0); student {st['arch']} (stage widths "
        f"{st['widths']}, {st['embedding_size']}-d, {st['params'] / 1e6:.2f} M params, "
        f"{size['student_epochs']} epochs = {s['student_steps']} steps{stopped}, REFILLED's "
        f"two stages sharing them), batch {s['batch_size']}. Tuning, the same for every "
        f"method: main weight x {', '.join(f'{f:.3g}' for f in s['weight_factors'])}, then "
        f"temperature/scale x {', '.join(f'{f:.3g}' for f in s['temp_factors'])} at the "
        f"chosen weight, seed {s['tune_seed']}, best validation TAR@FAR=1e-3. Test seeds "
        f"{s['seeds']}. The control trains `feature` at SRD's effective cosine weight "
        f"2s²/D = {s['srd_effective_weight']:g}.")
    lines = ["# Distillation methods on the embedded benchmark (fair protocol)", "",
             caption, "", f"Command: `{result['command']}`", "", *_carry_lines(result),
             "| model | chosen setting | seeds | TAR@FAR=1e-3 (%) | 95 % CI of mean | "
             "bootstrap ± (protocol) | gap closed | vs alone | vs SRD | LFW-like acc (%) |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    floor_ok = s.get("test_above_floor", True)
    na = f"n/a ({ijb.get('impostor_pairs')} impostor pairs)"

    def tar(entry: dict[str, Any], text: str, derived: bool = True) -> str:
        return text if floor_ok else ("–" if derived else na)

    teacher = result["teacher"]
    tint = teacher.get(f"{PRIMARY}_interval")
    t_boot = f"[{tint['low']:.2f}, {tint['high']:.2f}]" if tint else "–"
    lines.append(f"| teacher ({t['arch']}) | – | {teacher['seeds'] or 'missing'} | "
                 f"{tar(teacher, _fmt(teacher[PRIMARY]), False)} | – | {t_boot} | "
                 f"{'100 %' if teacher['seeds'] else '–'} | – | – | {_fmt(teacher[ACC])} |")
    for method, row in result["methods"].items():
        half = row.get("bootstrap_half_width")
        lines.append(
            f"| {LABELS.get(method, method)} | {_chosen(row)} | {row['seeds'] or 'missing'} "
            f"| {tar(row, _fmt(row[PRIMARY]), False)} | {tar(row, _ci(row[PRIMARY]))} | "
            f"{'–' if half is None else f'± {half:.2f}'} | "
            f"{tar(row, _share(row['gap_share'][PRIMARY]))} | "
            f"{tar(row, _diff(row.get('vs_alone')))} | "
            f"{tar(row, _diff(row.get('vs_srd')))} | {_fmt(row[ACC])} |")
    lines += ["", "vs alone / vs SRD: mean paired difference (same seed) in TAR points with "
              "its 95 % t-interval over seeds; * = significant (the interval excludes 0). "
              "Bootstrap ±: median over seeds of each run's half-width of the "
              "cluster-bootstrap interval, the protocol's own resolution. "
              + result["floor_rule"] + ". " + result["bootstrap_rule"] + ".", "",
              *verdict(result), "", *tuning_table(result), "", *per_seed_table(result), ""]
    if result["missing_runs"]:
        lines.append("**Incomplete: missing runs** " + ", ".join(result["missing_runs"]) +
                     f". Resume with `{result['command']}` (finished runs are reused).")
    if result["failed_runs"]:
        lines.append("**Failed runs:** " + "; ".join(
            f"{k}: {v.splitlines()[0]}" for k, v in result["failed_runs"].items()))
    cpu = result.get("cpu_seconds", {}).get("total", 0.0)
    wall = result["wall_time_s"]
    lines += ["", ("Wall time so far: unknown (written by --report-only while the run "
                   "continues)" if wall is None else f"Wall time so far: {wall / 60:.1f} min")
              + " "
              f"(load average at write: {result['machine']['load_average_1min']}, "
              f"{result['machine']['cpus']} CPUs); CPU time of training, evaluation and "
              f"cache: {cpu / 60:.1f} core-min (data generation not counted). Per-run "
              "numbers: `methods.json`.", ""]
    return "\n".join(lines)


def _carry_lines(result: dict[str, Any]) -> list[str]:
    """Which runs came from another machine (trained and scored there, no checkpoint here)."""
    carried = result.get("carried") or {}
    lines = []
    if carried.get("runs"):
        lines.append(f"**Carried:** {len(carried['runs'])} runs carried from "
                     f"{'; '.join(carried['from'])} (fingerprint matched: teacher, cache, "
                     "data, sizes, recipes); trained and scored there, their checkpoints are "
                     "not here (names: `carried.runs` in methods.json).")
    elif carried.get("note"):
        lines.append(f"**Carry:** {carried['note']}.")
    return [*lines, ""] if lines else []


def tuning_table(result: dict[str, Any]) -> list[str]:
    """Every tuning run's validation score, so each choice can be checked."""
    rows = [(m, r) for m, row in result["methods"].items() for r in row.get("tuning", [])]
    if not rows:
        return []
    lines = [f"Tuning (validation identities, seed {result['setting']['tune_seed']}): "
             "validation TAR@FAR=1e-3 (%) per setting.", "",
             "| method | setting | values | validation TAR@FAR=1e-3 (%) |", "|---|---|---|---:|"]
    for method, run in rows:
        s = run["setting"]
        values = ", ".join(f"{k} {v:g}" for k, v in run["values"].items())
        score = run.get(PRIMARY)
        lines.append(f"| {LABELS.get(method, method)} | x{s['weight']:.3g} / x{s['temp']:.3g} "
                     f"| {values} | {'–' if score is None else f'{score:.2f}'} |")
    return lines


def per_seed_table(result: dict[str, Any]) -> list[str]:
    """Every test run's own numbers, so the spread behind each mean is visible."""
    seeds = sorted({int(s) for row in result["methods"].values() for s in row.get("runs", {})})
    if not seeds:
        return []
    lines = ["Per seed (test): TAR@FAR=1e-3 (%) / LFW-like acc (%) / training CPU minutes.",
             "", "| model | " + " | ".join(f"seed {s}" for s in seeds) + " |",
             "|---|" + "---:|" * len(seeds)]

    def cell(run: dict[str, Any] | None) -> str:
        if not run:
            return "missing"
        cpu = run.get("train_cpu_seconds")
        acc = run.get(ACC)
        return (f"{run[PRIMARY]:.2f} / {'–' if acc is None else f'{acc:.2f}'} / "
                + ("–" if cpu is None else f"{cpu / 60:.1f}"))

    for method, row in result["methods"].items():
        lines.append(f"| {LABELS.get(method, method)} | "
                     + " | ".join(cell(row.get("runs", {}).get(str(s))) for s in seeds) + " |")
    return lines


def verdict(result: dict[str, Any]) -> list[str]:
    """What the measured numbers support, method by method (no claim without the runs)."""
    rows = result["methods"]
    srd = rows.get("srd")
    if not result["setting"].get("test_above_floor", True):
        return ["- The test protocol holds fewer than 10/FAR impostor pairs: TAR@FAR=1e-3 is "
                "below its resolution floor, so no verdict (numbers in methods.json only)."]
    out = []
    teacher = result["teacher"][PRIMARY]["mean"]
    alone = (rows.get("none") or {}).get(PRIMARY, {}).get("mean")
    if srd and srd[PRIMARY]["mean"] is not None:
        if teacher is not None and alone is not None and teacher <= alone:
            out.append(f"The teacher ({teacher:.2f}) does not beat the student alone "
                       f"({alone:.2f}) on TAR@FAR=1e-3: no gap to close, so gap shares say "
                       "nothing and the 60 % goal cannot be judged.")
        else:
            share = srd["gap_share"][PRIMARY]
            goal = "met" if share is not None and share >= 0.6 else "NOT met"
            out.append(f"SRD closes {_share(share)} of the teacher-student TAR@FAR=1e-3 gap "
                       f"on the test identities (goal >= 60 %: {goal}).")
    for method, row in rows.items():
        if method == "none":
            continue
        label = LABELS.get(method, method)
        vs = row.get("vs_alone")
        if not vs or vs.get("mean") is None or vs["n"] < 2:
            out.append(f"{label}: fewer than two paired seeds with the student alone; "
                       "no verdict.")
            continue
        word = ("beats the student alone significantly" if vs["significant"] and vs["mean"] > 0
                else "is significantly WORSE than the student alone" if vs["significant"]
                else "does NOT beat the student alone significantly here")
        line = f"{label} {word} ({_diff(vs)} over {vs['n']} seeds)"
        other = row.get("vs_srd")
        if other and other.get("mean") is not None and other["n"] >= 2:
            rel = ("above" if other["mean"] > 0 else "below") if other["significant"] \
                else "not significantly different from"
            line += f"; {rel} SRD ({_diff(other)})"
        out.append(line + ".")
    return [f"- {line}" for line in out]


def write_results(result: dict[str, Any], results_dir: Path) -> None:
    from facekd.fileio import write_json_atomic, write_text_atomic

    write_json_atomic(results_dir / "methods.json", result)
    write_text_atomic(results_dir / "methods.md", markdown(result))


# ----------------------------------------------------------------------------- estimate
# Images per unit of the held-out sets, from the data summary of a full-size synth run
# (IJB-style: 2391 images for 200 identities; .bin: 400 / 320 / 200 images for 1200 /
# 600 / 600 pairs): what a full-size evaluation embeds, image and flip.
IJB_IMAGES_PER_IDENTITY = 11.96
BIN_IMAGES_PER_PAIR = {"lfw": 1 / 3, "cfp_fp": 0.533, "agedb_30": 1 / 3}


def _run_steps(run: Path) -> int:
    """Training steps a run folder (and its REFILLED stage folders) did."""
    total = 0
    for summary in [run / "summary.json", *run.glob("*/summary.json")]:
        data = _read_json(summary)
        if data:
            total += int(data.get("steps", 0))
    return total


def estimate(work: Path, results_dir: Path, methods: list[str], seeds: list[int],
             command: str) -> dict[str, Any]:
    """Time a few full-batch steps of every method and project the full comparison.

    Per method, two short runs (1 and 4 steps) at the full size's batch on a small
    dataset; their CPU-time difference per extra step, times the steps of every task of
    the full plan, plus evaluation and cache costs per image measured the same way.
    """
    import torch

    from facekd.fileio import write_json_atomic, write_text_atomic

    full, size = SIZES["full"], SIZES["estimate"]
    layout = Layout(work)
    torch.set_num_threads(1)   # as the comparison's side-by-side students
    prepare_data(layout, size, False)
    timings: dict[str, Any] = {}


    def per_step(recipe: str, overrides: list[str], folder: Path) -> float:
        cpu = {}
        for steps in (1, 4):
            out = folder / f"steps{steps}"
            if not (out / "summary.json").exists():
                start, wall = time.process_time(), time.perf_counter()
                _train(recipe, [*overrides, f"run.output={out}", f"run.max_steps={steps}"])
                _write_cost(out, "train", time.process_time() - start,
                            time.perf_counter() - wall)
            cpu[steps] = (_train_cpu(out) or 0.0, _run_steps(out))
        (c1, n1), (c4, n4) = cpu[1], cpu[4]
        return max(c4 - c1, 0.0) / max(n4 - n1, 1)

    # teacher step, cache and evaluation cost per image
    teacher_overrides = _recipe_overrides(layout, size, layout.teacher, 0, 2, False)
    timings["teacher_step"] = per_step(
        TEACHER_RECIPE, [o for o in teacher_overrides if not o.startswith("run.output=")],
        work / "est" / "teacher")
    # recorded costs, not timers, so a rerun (which reuses every run) reports the same
    execute(Task("teacher", "teacher"), str(work), size, methods, False, 1)
    execute(Task("cache", "cache", needs=("teacher",)), str(work), size, methods, False, 1)
    cache_cpu = sum(((_read_json(f / "bench_cost.json") or {}).get("cache") or {})
                    .get("cpu_seconds", 0.0) for f in (layout.cache, layout.cache_unlabelled))
    cache_images = 2 * (size.identities * size.images_per_id + size.unlabelled_identities *
                        size.unlabelled_images_per_id)
    timings["teacher_image"] = cache_cpu / cache_images
    eval_images = 2 * (_read_json(layout.synth / "synth.json") or {}).get("parts", {}).get(
        "ijb", {}).get("images", 0) + 2 * sum(
        ((_read_json(layout.synth / "synth.json") or {}).get("parts", {}).get(b) or {})
        .get("images", 0) for b in BINS)
    for method in methods:
        run = layout.student(method, 0)
        overrides = [o for o in student_overrides(layout, size, method, 0, False, run)
                     if not o.startswith("run.output=")]
        timings[f"step/{method}"] = per_step(SPECS[method].recipe, overrides,
                                             work / "est" / method)
    probe = work / "est" / "none" / "steps4" / "student.pt"
    scores = evaluate_model(probe, layout, False, 1, "test")
    timings["student_image"] = scores["eval_cpu_seconds"] / max(eval_images, 1)
    # the projection
    steps = full.student_epochs * (full.identities * full.images_per_id // full.batch_size)
    test_images = 2 * (IJB_IMAGES_PER_IDENTITY * full.ijb_identities + sum(
        BIN_IMAGES_PER_PAIR[b] * getattr(full, f"{b.split('_')[0]}_pairs") for b in BINS))
    val_images = 2 * IJB_IMAGES_PER_IDENTITY * full.val_ijb_identities
    cost: dict[str, float] = {}
    by_method = dict.fromkeys(methods, 0.0)
    for task in plan(methods, seeds):
        if task.kind == "teacher":
            t_steps = full.teacher_epochs * (full.identities * full.images_per_id //
                                             full.batch_size)
            cost[task.name] = (t_steps * timings["teacher_step"] +
                               test_images * 2 * timings["student_image"])
        elif task.kind == "cache":
            cost[task.name] = timings["teacher_image"] * 2 * (
                full.identities * full.images_per_id +
                full.unlabelled_identities * full.unlabelled_images_per_id)
        else:
            images = val_images if task.kind == "tune" else test_images
            cost[task.name] = steps * timings[f"step/{task.method}"] + \
                images * timings["student_image"]
            by_method[task.method] += cost[task.name]
    total = sum(cost.values())
    result = {"command": command, "size": asdict(full), "student_steps": steps,
              "timings_cpu_seconds": timings, "tasks": len(cost),
              "cost_cpu_seconds": cost, "by_method_cpu_seconds": by_method,
              "total_cpu_hours": total / 3600, "budget_cpu_hours": 5.0,
              "fits_budget": total / 3600 <= 5.0,
              "note": "one torch thread per training, as with --jobs 2; the teacher's "
                      "evaluation is taken as twice a student's per image",
              "machine": {"cpus": os.cpu_count(), "load_average_1min": _load(),
                          "torch": _torch_version()}}
    results_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(results_dir / "methods_estimate.json", result)
    lines = ["# Cost estimate of the method comparison", "",
             f"Command: `{command}`. Per-step CPU seconds measured at batch "
             f"{size.batch_size} (one thread, runs of 1 and 4 steps on a small dataset), "
             f"projected to the full plan ({len(cost)} tasks, students {steps} steps, "
             f"seeds {seeds}, tuning grid x{', '.join(f'{f:.3g}' for f in WEIGHT_FACTORS)} "
             f"then x{', '.join(f'{f:.3g}' for f in TEMP_FACTORS)}). CPU time is inflated "
             "on a loaded machine: the load average below says how loaded.", "",
             "| method | CPU s / step | projected CPU h (tuning + test) |", "|---|---:|---:|"]
    for method in methods:
        lines.append(f"| {LABELS.get(method, method)} | {timings[f'step/{method}']:.2f} | "
                     f"{by_method[method] / 3600:.2f} |")
    lines += ["", f"Teacher step {timings['teacher_step']:.2f} CPU s; evaluation "
              f"{1e3 * timings['student_image']:.1f} CPU ms per student image; cache "
              f"{1e3 * timings['teacher_image']:.1f} CPU ms per image.", "",
              f"**Projected total: {total / 3600:.2f} CPU-hours** (budget 5: "
              f"{'fits' if result['fits_budget'] else 'does NOT fit'}; load average at "
              f"write {_load()}).", ""]
    write_text_atomic(results_dir / "methods_estimate.md", "\n".join(lines))
    return result


# ----------------------------------------------------------------------------- driver
def report_only(work: Path, results_dir: Path, size: BenchSize, methods: list[str],
                seeds: list[int], command: str) -> dict[str, Any]:
    """Tabulate what a (possibly still running) benchmark has finished; trains nothing."""
    layout = Layout(work)
    data = {"synth": (_read_json(layout.synth / "synth.json") or {}).get("parts", {}),
            "synth_val": (_read_json(layout.synth_val / "synth.json") or {}).get("parts", {})}
    result = collect(layout, size, methods, seeds, data, None, command, {}, [])
    results_dir.mkdir(parents=True, exist_ok=True)
    write_results(result, results_dir)
    return result


def run_bench(work: Path, results_dir: Path, size: BenchSize, methods: list[str],
              seeds: list[int], jobs: int, command: str, carry: Path | None = None
              ) -> dict[str, Any]:
    """Prepare, tune, train, evaluate and tabulate; resumable at every step. ``carry``:
    a carry file whose runs are taken once the teacher and cache here match it."""
    from facekd.fileio import write_json_atomic
    from facekd.logs import add_file_log

    layout = Layout(work)
    work.mkdir(parents=True, exist_ok=True)
    results_dir.mkdir(parents=True, exist_ok=True)
    handler = add_file_log(work / "bench.log")
    state_path = work / "bench_state.json"
    state = _read_json(state_path) or {}
    wall_before = float(state.get("wall_seconds", 0.0))
    start = time.perf_counter()
    progress = jobs == 1
    failed: dict[str, str] = {}
    trained: list[str] = []
    carry_note: str | None = None

    def publish() -> dict[str, Any]:
        wall = wall_before + time.perf_counter() - start
        result = collect(layout, size, methods, seeds, data, wall, command, failed, trained,
                         carry_note)
        write_results(result, results_dir)
        write_json_atomic(state_path, {"wall_seconds": wall})
        return result

    try:
        log.info("preparing data in %s", work)
        data = prepare_data(layout, size, progress)
        tasks = plan(methods, seeds)
        done = {t.name for t in tasks if task_done(t, layout, methods)}
        todo = [t for t in tasks if t.name not in done]
        publish()   # a table (naming every missing run) exists from the start
        log.info("%d tasks, %d already done, %d to run with %d job(s)",
                 len(tasks), len(done), len(todo), jobs)
        # The teacher and its cache run first on every core (r_tiny scales ~1.75x on two
        # threads); the mbf_tiny students then run side by side on one thread each.
        first = [t for t in todo if t.kind in ("teacher", "cache")]
        _schedule(first, done, 1, work, size, methods, progress, 2, failed, trained, publish)
        if carry is not None and not failed:
            carried, carry_note = apply_carry(carry, layout, size, methods, tasks)
            done |= set(carried)
            publish()
        _schedule([t for t in todo if t.kind not in ("teacher", "cache") and t.name not in done],
                  done, jobs, work, size, methods, progress, 1 if jobs > 1 else 2, failed,
                  trained, publish)
        return publish()
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()


def _schedule(todo: list[Task], done: set[str], jobs: int, work: Path, size: BenchSize,
              methods: list[str], progress: bool, io_workers: int, failed: dict[str, str],
              trained: list[str], publish) -> None:
    """Run tasks in plan order as their dependencies finish, ``jobs`` at a time."""
    total = len(todo)
    finished = 0

    def ready(task: Task) -> bool:
        return all(n in done for n in task.needs)

    def blocked(task: Task) -> bool:
        return any(n in failed for n in task.needs)

    def record(task: Task, outcome: dict[str, Any] | None, error: str | None) -> None:
        nonlocal finished
        finished += 1
        if error is not None:
            failed[task.name] = error
            log.error("[%d/%d] %s FAILED: %s", finished, total, task.name, error)
        else:
            done.add(task.name)
            if outcome and outcome.get("trained"):
                trained.append(task.name)
            scores = (outcome or {}).get("scores") or {}
            log.info("[%d/%d] %s done in %.0f s%s", finished, total, task.name,
                     (outcome or {}).get("seconds", 0.0),
                     f" (TAR@FAR=1e-3 {scores[PRIMARY]:.2f} %, LFW-like acc "
                     f"{scores.get(ACC, float('nan')):.2f} %)" if PRIMARY in scores else "")
        publish()

    pending = list(todo)
    if jobs <= 1:
        while pending:
            task = next((t for t in pending if ready(t) or blocked(t)), None)
            if task is None:
                break
            pending.remove(task)
            if blocked(task):
                record(task, None, "skipped: a task it needs failed")
                continue
            log.info("starting %s", task.name)
            try:
                record(task, execute(task, str(work), size, methods, progress, io_workers),
                       None)
            except Exception as exc:  # one broken method must not stop the others
                log.exception("%s failed", task.name)
                record(task, None, repr(exc))
        return

    import multiprocessing as mp
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool

    threads = max(1, (os.cpu_count() or 1) // jobs)
    running: dict[Any, Task] = {}
    with ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn"),
                             initializer=_init_worker, initargs=(threads,)) as pool:
        while pending or running:
            for task in list(pending):
                if len(running) >= jobs:
                    break
                if blocked(task):
                    pending.remove(task)
                    record(task, None, "skipped: a task it needs failed")
                elif ready(task):
                    pending.remove(task)
                    log.info("starting %s", task.name)
                    running[pool.submit(_execute_logged, task, str(work), size, methods,
                                        False, io_workers)] = task
            if not running:
                break
            finished_futures, _ = wait(list(running), return_when=FIRST_COMPLETED)
            broken = False
            for future in finished_futures:
                task = running.pop(future)
                try:
                    record(task, future.result(), None)
                except BrokenProcessPool as exc:  # a worker died (killed, out of memory)
                    record(task, None, f"worker process died: {exc!r}")
                    broken = True
                except Exception as exc:
                    record(task, None, str(exc))
            if broken:
                log.error("a worker process died; stopping here (rerun to resume)")
                break


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.methods", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes, 2 seeds, 2 steps per run (the test)")
    parser.add_argument("--estimate", action="store_true",
                        help="time a few steps of every method and project the full "
                             "comparison's CPU cost (bench/results/methods_estimate.*)")
    parser.add_argument("--work", type=Path, default=None,
                        help="intermediates (default bench/_work/methods, quick: ..._quick)")
    parser.add_argument("--results", type=Path, default=None,
                        help="where methods.json/.md go (default bench/results; with --quick "
                             "WORK/results, so a smoke test never overwrites the real table)")
    parser.add_argument("--seeds", default=None,
                        help="comma-separated test seeds (default 0,1,2,3,4; quick 0,1)")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                        help=f"comma-separated subset of {','.join(METHODS)} (default: all "
                             "but srd_unlabelled)")
    parser.add_argument("--report-only", action="store_true",
                        help="only rewrite the table from finished runs (safe while a run "
                             "is going on in the same --work)")
    parser.add_argument("--save-carry", type=Path, nargs="?", const=CARRY, default=None,
                        metavar="PATH", help="write the finished runs of --work and their "
                        f"fingerprint to PATH (default {CARRY.relative_to(ROOT)}); trains "
                        "nothing")
    parser.add_argument("--carry", type=Path, nargs="?", const=CARRY, default=None,
                        metavar="PATH", help="take the runs of a carry file when the teacher, "
                        "cache and data built here match its fingerprint (default: the file "
                        "above, automatically for the full run when it exists)")
    parser.add_argument("--no-carry", action="store_true",
                        help="never take carried runs (everything trains here)")
    parser.add_argument("--jobs", type=int, default=None,
                        help="trainings side by side (default 2 on >=2 CPUs, 1 with --quick)")
    args = parser.parse_args(argv)
    from facekd.errors import FacekdError
    from facekd.logs import setup_logging

    setup_logging()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        print(f"bench.methods: unknown method(s) {unknown}; choose from {METHODS}",
              file=sys.stderr)
        return 2
    if "none" not in methods:
        methods.insert(0, "none")   # the gap share and the paired differences need it
    seeds_text = args.seeds or ("0,1" if args.quick else ",".join(map(str, SEEDS)))
    try:
        seeds = [int(s) for s in seeds_text.split(",") if s.strip()]
    except ValueError:
        print(f"bench.methods: --seeds must be comma-separated integers, got {seeds_text!r}",
              file=sys.stderr)
        return 2
    size = SIZES["quick" if args.quick else "full"]
    default_work = "methods_quick" if args.quick else (
        "methods_estimate" if args.estimate else "methods")
    work = args.work or ROOT / "bench" / "_work" / default_work
    results = args.results or (work / "results" if args.quick else RESULTS)
    jobs = args.jobs or (1 if args.quick or (os.cpu_count() or 1) < 2 else 2)
    command = "python -m bench.methods" + (" --quick" if args.quick else "") + (
        " --estimate" if args.estimate else "")
    if args.methods != ",".join(DEFAULT_METHODS):
        command += f" --methods {','.join(methods)}"
    if args.seeds:
        command += f" --seeds {seeds_text}"
    try:
        if args.estimate:
            est = estimate(work, results, methods, seeds, command)
            print((results / "methods_estimate.md").read_text())
            return 0 if est["fits_budget"] else 1
        if args.save_carry:
            save_carry(work, args.save_carry, size, seeds)
            print(f"bench.methods: carry file written to {args.save_carry}")
            return 0
        if args.report_only:
            result = report_only(work, results, size, methods, seeds, command)
            print(markdown(result))
            return 0
        carry = None if args.no_carry else args.carry or (
            CARRY if not args.quick and CARRY.exists() else None)
        if carry is not None and not carry.exists():
            print(f"bench.methods: no carry file {carry}", file=sys.stderr)
            return 2
        result = run_bench(work, results, size, methods, seeds, jobs, command, carry)
    except FacekdError as exc:
        print(f"bench.methods: {exc}", file=sys.stderr)
        return 2
    print(markdown(result))
    return 1 if result["failed_runs"] else 0


if __name__ == "__main__":
    sys.exit(main())
