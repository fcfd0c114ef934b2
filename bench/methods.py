"""The method comparison on the embedded benchmark (issue 8, part 3).

One synthetic face dataset, one r_tiny teacher (seed 0), one teacher cache; then every
method in ``METHODS`` trains the same mbf_tiny student through its ``recipes/<m>_synth.yaml``
recipe (recipe defaults; only data paths, sizes, seed and output are overridden) for each
seed. Teacher and students are scored on held-out identities: TAR@FAR=1e-3 on the
IJB-style protocol (the primary number) and 10-fold accuracy on the LFW-like ``.bin``
(plus cfp_fp and agedb_30). The share of the teacher-student gap a method closes is
``(method - alone) / (teacher - alone)`` on the seed means.

Everything lives in ``--work`` and is reused on a rerun: a run whose ``summary.json``
exists is not retrained, a model whose ``bench_eval.json`` matches its checkpoint hash is
not re-evaluated, and unfinished trainings resume from their checkpoints. The results
table is rewritten after every finished run, so a partial run still reports (and names
the runs that are missing).

Run: ``.venv/bin/python -m bench.methods`` (estimated ~11k core-seconds, about 95 min on
2 idle CPU cores; ``--jobs 2`` runs two trainings side by side on one thread each).
``--quick`` is the smoke test. Writes ``bench/results/methods.json`` and ``methods.md``.
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
METHODS = ("none", "kd", "feature", "rkd", "refilled", "frskd", "srd", "srd_unlabelled")
RUN_ORDER = ("none", "srd", "kd", "feature", "rkd", "refilled", "srd_unlabelled", "frskd")
SEEDS = (0, 1, 2)
BINS = ("lfw", "cfp_fp", "agedb_30")
PRIMARY = "ijb_tar@far1e-3"
ACC = "lfw_acc"
METRICS = (PRIMARY, ACC, "cfp_fp_acc", "agedb_30_acc")
TEACHER_ARCH, STUDENT_ARCH = "r_tiny", "mbf_tiny"


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
    unlabelled_identities: int
    unlabelled_images_per_id: int
    batch_size: int
    unlabelled_batch_size: int
    teacher_epochs: int
    student_epochs: int
    max_steps: int | None = None
    resolution: int = 112     # stated, not a knob: the loader and the backbones use 112x112


SIZES: dict[str, BenchSize] = {
    # Chosen from one-thread CPU-time measurements on the shared machine (batch-64 train
    # step: mbf_tiny ~1.1 s, r_tiny ~2.8 s; SRD + cache ~1.3x the student alone; inference
    # ~7 ms (mbf_tiny) / ~15 ms (r_tiny) per image): teacher 480 steps, 24 student runs x
    # 240 steps, 25 evaluations of ~14k images (image + flip) and the teacher cache add up
    # to ~12k core-seconds, i.e. ~100 min on 2 idle cores with --jobs 2.
    "full": BenchSize("default", identities=320, images_per_id=16, lfw_pairs=1200,
                      cfp_pairs=600, agedb_pairs=600, ijb_identities=200, ijb_impostors=40000,
                      unlabelled_identities=200, unlabelled_images_per_id=8, batch_size=64,
                      unlabelled_batch_size=32, teacher_epochs=6, student_epochs=3),
    # the test: seconds per stage, numbers meaningless
    "quick": BenchSize("tiny", identities=8, images_per_id=4, lfw_pairs=20, cfp_pairs=20,
                       agedb_pairs=20, ijb_identities=3, ijb_impostors=20,
                       unlabelled_identities=4, unlabelled_images_per_id=4, batch_size=8,
                       unlabelled_batch_size=4, teacher_epochs=1, student_epochs=1,
                       max_steps=2),
}


# ----------------------------------------------------------------------------- layout
@dataclass(frozen=True)
class Layout:
    """Where every intermediate of the benchmark lives inside ``--work``."""

    work: Path

    @property
    def synth(self) -> Path:
        return self.work / "synth"

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

    def student(self, method: str, seed: int) -> Path:
        return self.work / "runs" / method / f"seed{seed}"


# ----------------------------------------------------------------------------- steps
def prepare_data(layout: Layout, size: BenchSize, progress: bool) -> dict[str, Any]:
    """Synthetic faces (train, held-out .bin sets, IJB-style protocol, unlabelled pool)
    and the shards the loader reads; each part is skipped when already complete."""
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
    timings["generate"] = time.perf_counter() - start
    start = time.perf_counter()
    for source, out in ((layout.synth, layout.shards),
                        (layout.synth / "unlabelled", layout.shards_unlabelled)):
        if not (out / "dataset.json").exists():
            rec2shards(source, out, shard_size=2000, workers=1)
    timings["shards"] = time.perf_counter() - start
    return {"synth": summary, "timings": timings}


def _recipe_overrides(layout: Layout, size: BenchSize, out: Path, seed: int, epochs: int,
                      progress: bool) -> list[str]:
    overrides = [f"data.train={layout.shards}", "data.val_bins=[]",
                 f"data.batch_size={size.batch_size}", f"optim.epochs={epochs}",
                 f"run.output={out}", f"run.seed={seed}", "run.eval_every=0",
                 "run.tensorboard=false", f"run.progress={str(progress).lower()}"]
    if size.max_steps is not None:
        overrides.append(f"run.max_steps={size.max_steps}")
    return overrides


def recipe_name(method: str) -> str:
    return f"{method}_synth.yaml"


def student_overrides(layout: Layout, size: BenchSize, method: str, seed: int,
                      progress: bool) -> list[str]:
    """Paths, sizes, seed and output only: every hyper-parameter stays the recipe's."""
    overrides = _recipe_overrides(layout, size, layout.student(method, seed), seed,
                                  size.student_epochs, progress)
    teacher = needs_teacher(method)
    if teacher:
        overrides += [f"teacher.checkpoint={layout.teacher / 'full.pt'}",
                      f"teacher.cache={layout.cache}"]
    if uses_unlabelled(method):
        overrides += [f"data.unlabelled={layout.shards_unlabelled}",
                      f"data.unlabelled_batch_size={size.unlabelled_batch_size}"]
        if teacher:
            overrides.append(f"teacher.unlabelled_cache={layout.cache_unlabelled}")
    return overrides


def needs_teacher(method: str) -> bool:
    from facekd.demo import recipes_dir
    from facekd.distill import get_method_class
    from facekd.train.recipe import load_recipe

    recipe = load_recipe(str(recipes_dir() / recipe_name(method)))
    return bool(get_method_class(recipe.method.name).needs_teacher)


def uses_unlabelled(method: str) -> bool:
    from facekd.demo import recipes_dir
    from facekd.train.recipe import load_recipe

    return bool(load_recipe(str(recipes_dir() / recipe_name(method))).data.unlabelled)


def _train(recipe_file: str, overrides: list[str]) -> None:
    from facekd.demo import recipes_dir
    from facekd.train.recipe import load_recipe
    from facekd.train.trainer import train

    train(load_recipe(str(recipes_dir() / recipe_file), overrides))


def _far_key(table: dict[Any, float], far: float) -> float:
    """The value at ``far`` of a FAR-keyed table (keys may be floats or strings)."""
    key = min(table, key=lambda k: abs(math.log10(float(k)) - math.log10(far)))
    if abs(float(key) - far) > 1e-9:
        raise KeyError(f"no FAR {far} in {sorted(table)}")
    return float(table[key])


def evaluate_model(model: Path, layout: Layout, progress: bool, workers: int) -> dict[str, Any]:
    """Held-out scores of one model; reused while the checkpoint hash is unchanged."""
    from facekd.evaluate.pipeline import evaluate_bin, evaluate_ijb
    from facekd.fileio import sha256_file, write_json_atomic
    from facekd.models.embedder import load_embedder

    out = model.parent / "bench_eval.json"
    digest = sha256_file(model)
    if out.exists():
        previous = json.loads(out.read_text())
        if previous.get("model_sha256") == digest:
            return previous
    start, cpu = time.perf_counter(), time.process_time()
    embedder = load_embedder(model, device="cpu")
    scores: dict[str, Any] = {"model": str(model), "model_sha256": digest}
    for name in BINS:
        path = layout.synth / f"{name}.bin"
        if path.exists():
            res = evaluate_bin(embedder, path, 64, cache_dir=layout.embedding_cache,
                               progress=progress)
            scores[f"{name}_acc"] = 100.0 * float(res["acc_mean"])
            scores[f"{name}_pairs"] = int(res["num_pairs"])
    res = evaluate_ijb(embedder, layout.synth / "ijb", "IJBC", batch_size=64, workers=workers,
                       cache_dir=layout.embedding_cache, progress=progress)
    scores[PRIMARY] = 100.0 * _far_key(res["tar_at_far"], 1e-3)
    scores["ijb_pairs"] = int(res["num_pairs"])
    scores["eval_seconds"] = time.perf_counter() - start
    scores["eval_cpu_seconds"] = time.process_time() - cpu
    write_json_atomic(out, scores)
    return scores


# ----------------------------------------------------------------------------- tasks
@dataclass(frozen=True)
class Task:
    """One unit of work: train (or build) and evaluate; ``needs`` name earlier tasks."""

    name: str
    kind: str                 # teacher | cache | student
    method: str = ""
    seed: int = 0
    needs: tuple[str, ...] = ()


def plan(methods: list[str], seeds: list[int]) -> list[Task]:
    """Teacher first, then seed-major student runs (the student alone and SRD first, the
    costly self-distillation last), so a partial run answers the main question early."""
    tasks = [Task("teacher", "teacher")]
    if any(needs_teacher(m) for m in methods):
        tasks.append(Task("cache", "cache", needs=("teacher",)))
    ordered = sorted(methods, key=lambda m: RUN_ORDER.index(m) if m in RUN_ORDER else 99)
    for seed in seeds:
        for method in ordered:
            tasks.append(Task(f"{method}/seed{seed}", "student", method, seed,
                              ("cache",) if needs_teacher(method) else ()))
    return tasks


def _cache_complete(folder: Path) -> bool:
    meta = folder / "meta.json"
    return meta.exists() and bool(json.loads(meta.read_text()).get("complete"))


def task_done(task: Task, layout: Layout, methods: list[str]) -> bool:
    """Whether a task's outputs exist (checkpoint trained and evaluated, cache complete)."""
    if task.kind == "cache":
        unlabelled = any(uses_unlabelled(m) for m in methods)
        return _cache_complete(layout.cache) and (
            not unlabelled or _cache_complete(layout.cache_unlabelled))
    run = layout.teacher if task.kind == "teacher" else layout.student(task.method, task.seed)
    evaluation = run / "bench_eval.json"
    if not ((run / "summary.json").exists() and evaluation.exists()):
        return False
    from facekd.fileio import sha256_file

    return json.loads(evaluation.read_text()).get("model_sha256") == \
        sha256_file(run / "student.pt")


def execute(task: Task, work: str, size: BenchSize, methods: list[str], progress: bool,
            io_workers: int) -> dict[str, Any]:
    """Run one task (in this process or a pool worker); returns what it did."""
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
    if task.kind == "teacher":
        run = layout.teacher
        recipe, overrides = "teacher_synth.yaml", _recipe_overrides(
            layout, size, run, 0, size.teacher_epochs, progress)
    else:
        run = layout.student(task.method, task.seed)
        recipe = recipe_name(task.method)
        overrides = student_overrides(layout, size, task.method, task.seed, progress)
    if not (run / "summary.json").exists():
        log.info("%s: training (%s, overrides %s)", task.name, recipe, " ".join(overrides))
        cpu, wall = time.process_time(), time.perf_counter()
        _train(recipe, overrides)
        did["trained"] = True
        _write_cost(run, "train", time.process_time() - cpu, time.perf_counter() - wall)
    scores = evaluate_model(run / "student.pt", layout, progress, io_workers)
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


# ----------------------------------------------------------------------------- results
def stats(values: list[float]) -> dict[str, Any]:
    """Mean and sample std (None below two values) of per-seed numbers."""
    n = len(values)
    if n == 0:
        return {"mean": None, "std": None, "n": 0}
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
    return {"mean": mean, "std": std, "n": n}


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


def collect(layout: Layout, size: BenchSize, methods: list[str], seeds: list[int],
            data: dict[str, Any], wall_seconds: float | None, command: str,
            failed: dict[str, str], trained_now: list[str]) -> dict[str, Any]:
    """Everything known so far in the ``methods.json`` schema (missing runs named)."""
    teacher_eval = _read_json(layout.teacher / "bench_eval.json")
    teacher_summary = _read_json(layout.teacher / "summary.json")
    teacher = {"runs": {}, "seeds": []}
    for metric in METRICS:
        value = teacher_eval.get(metric) if teacher_eval else None
        teacher[metric] = {"mean": value, "std": None, "n": int(value is not None),
                           "values": [] if value is None else [value]}
    if teacher_eval:
        teacher["seeds"] = [0]
        teacher["runs"]["0"] = {"train_seconds": (teacher_summary or {}).get("train_seconds"),
                                "steps": (teacher_summary or {}).get("steps"),
                                "train_cpu_seconds": _train_cpu(layout.teacher),
                                "eval_seconds": teacher_eval.get("eval_seconds"),
                                "eval_cpu_seconds": teacher_eval.get("eval_cpu_seconds")}
    rows: dict[str, dict[str, Any]] = {}
    missing: list[str] = [] if teacher_eval else ["teacher"]
    for method in methods:
        row: dict[str, Any] = {"recipe": f"recipes/{recipe_name(method)}", "seeds": [],
                               "runs": {}}
        per_metric: dict[str, list[float]] = {m: [] for m in METRICS}
        for seed in seeds:
            run = layout.student(method, seed)
            evaluation, summary = _read_json(run / "bench_eval.json"), _read_json(
                run / "summary.json")
            if not evaluation or not summary:
                missing.append(f"{method}/seed{seed}")
                continue
            row["seeds"].append(seed)
            row["runs"][str(seed)] = {"train_seconds": summary.get("train_seconds"),
                                      "steps": summary.get("steps"),
                                      "train_cpu_seconds": _train_cpu(run),
                                      "eval_seconds": evaluation.get("eval_seconds"),
                                      "eval_cpu_seconds": evaluation.get("eval_cpu_seconds"),
                                      **{m: evaluation.get(m) for m in METRICS}}
            for metric in METRICS:
                if evaluation.get(metric) is not None:
                    per_metric[metric].append(float(evaluation[metric]))
        for metric in METRICS:
            row[metric] = {**stats(per_metric[metric]), "values": per_metric[metric]}
        rows[method] = row
    alone = rows.get("none")
    for row in rows.values():
        row["gap_share"] = {}
        row["gap_share_per_seed"] = {}
        for metric in METRICS:
            t = teacher[metric]["mean"]
            a = alone[metric]["mean"] if alone else None
            row["gap_share"][metric] = gap_share(t, a, row[metric]["mean"])
            if alone:
                row["gap_share_per_seed"][metric] = {
                    s: gap_share(t, alone["runs"][s].get(metric), r.get(metric))
                    for s, r in row["runs"].items() if s in alone["runs"]}
    synth = data.get("synth", {})
    setting = {
        "size": asdict(size),
        "train_images": size.identities * size.images_per_id,
        "train_identities": size.identities,
        "unlabelled_images": size.unlabelled_identities * size.unlabelled_images_per_id,
        "held_out": {k: synth.get(k) for k in ("lfw", "cfp_fp", "agedb_30", "ijb")},
        "teacher": dict(_model_desc(TEACHER_ARCH, 256)),
        "student": dict(_model_desc(STUDENT_ARCH, 128)),
        "resolution": [size.resolution, size.resolution],
        "teacher_steps": (teacher_summary or {}).get("total_steps") or size.teacher_epochs * (
            size.identities * size.images_per_id // size.batch_size),
        "student_steps": _first_steps(layout, methods, seeds) or size.student_epochs * (
            size.identities * size.images_per_id // size.batch_size),
        "batch_size": size.batch_size,
    }
    return {
        "benchmark": "distillation methods on the embedded synthetic-face benchmark",
        "command": command,
        "primary_metric": f"{PRIMARY}: IJB-style 1:1 TAR (%) at FAR=1e-3, held-out identities",
        "accuracy_metric": f"{ACC}: 10-fold verification accuracy (%) on the LFW-like .bin",
        "gap_share_rule": "(method - alone) / (teacher - alone) on seed means; "
                          "per seed against the alone run of the same seed",
        "complete": not missing and not failed,
        "missing_runs": missing,
        "failed_runs": failed,
        "trained_this_invocation": trained_now,
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
                                         for r in row["runs"].values())]
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
            if summary:
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


def _share(value: float | None) -> str:
    return "–" if value is None else f"{100 * value + 0.0:.0f} %".replace("-0 %", "0 %")


LABELS = {"none": "student alone", "kd": "kd", "feature": "feature", "rkd": "rkd",
          "refilled": "refilled", "frskd": "frskd (self-KD)", "srd": "srd",
          "srd_unlabelled": "srd + unlabelled pool"}


def markdown(result: dict[str, Any]) -> str:
    """The table with a caption naming data size, widths, resolution and the command."""
    s = result["setting"]
    size = s["size"]
    t, st = s["teacher"], s["student"]
    held = s["held_out"]
    ijb = held.get("ijb") or {}
    stopped = f", stopped after {size['max_steps']}" if size.get("max_steps") else ""
    caption = (
        f"Held-out synthetic identities; train {s['train_images']} images of "
        f"{s['train_identities']} identities (+ {s['unlabelled_images']} unlabelled images of "
        f"unseen identities for srd + unlabelled), {s['resolution'][0]}x{s['resolution'][1]} "
        f"input. Teacher {t['arch']} (IResNet, stage widths {t['widths']}, "
        f"{t['embedding_size']}-d, "
        f"{t['params'] / 1e6:.2f} M params, {size['teacher_epochs']} epochs = "
        f"{s['teacher_steps']} steps, seed 0); student {st['arch']} (MobileFaceNet, stage "
        f"widths {st['widths']}, {st['embedding_size']}-d, {st['params'] / 1e6:.2f} M params, "
        f"{size['student_epochs']} "
        f"epochs = {s['student_steps']} steps{stopped}), batch {s['batch_size']}, "
        f"recipe defaults "
        f"otherwise. TAR@FAR=1e-3: IJB-style 1:1 protocol ({ijb.get('identities')} identities, "
        f"{ijb.get('templates')} templates, {ijb.get('genuine_pairs')} genuine / "
        f"{ijb.get('impostor_pairs')} impostor pairs). Accuracy: 10-fold on the LFW-like "
        f".bin ({size['lfw_pairs']} pairs); CFP-FP-like {size['cfp_pairs']}, AgeDB-like "
        f"{size['agedb_pairs']} pairs. Mean ± std over seeds (std shown from 2 seeds on).")
    lines = ["# Distillation methods on the embedded benchmark", "", caption, "",
             f"Command: `{result['command']}`", "",
             "| model | seeds | TAR@FAR=1e-3 (%) | gap closed (TAR) | LFW-like acc (%) "
             "| gap closed (acc) | CFP-FP-like acc (%) | AgeDB-like acc (%) |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    teacher = result["teacher"]
    full = "100 %" if teacher["seeds"] else "–"
    lines.append(f"| teacher ({t['arch']}) | {teacher['seeds'] or 'missing'} | "
                 f"{_fmt(teacher[PRIMARY])} | {full} | {_fmt(teacher[ACC])} | {full} | "
                 f"{_fmt(teacher['cfp_fp_acc'])} | {_fmt(teacher['agedb_30_acc'])} |")
    for method, row in result["methods"].items():
        seeds = row["seeds"] or "missing"
        lines.append(
            f"| {LABELS.get(method, method)} | {seeds} | {_fmt(row[PRIMARY])} | "
            f"{_share(row['gap_share'][PRIMARY])} | {_fmt(row[ACC])} | "
            f"{_share(row['gap_share'][ACC])} | {_fmt(row['cfp_fp_acc'])} | "
            f"{_fmt(row['agedb_30_acc'])} |")
    lines += ["", *verdict(result), "", *per_seed_table(result), ""]
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


def per_seed_table(result: dict[str, Any]) -> list[str]:
    """Every run's own numbers, so the spread behind each mean is visible."""
    seeds = sorted({int(s) for row in result["methods"].values() for s in row.get("runs", {})})
    if not seeds:
        return []
    lines = ["Per seed: TAR@FAR=1e-3 (%) / LFW-like acc (%) / training CPU minutes.", "",
             "| model | " + " | ".join(f"seed {s}" for s in seeds) + " |",
             "|---|" + "---:|" * len(seeds)]

    def cell(run: dict[str, Any] | None) -> str:
        if not run:
            return "missing"
        cpu = run.get("train_cpu_seconds")
        return (f"{run[PRIMARY]:.2f} / {run[ACC]:.2f} / "
                + ("–" if cpu is None else f"{cpu / 60:.1f}"))

    teacher = result["teacher"]
    run = (teacher.get("runs") or {}).get("0")
    teacher_cell = cell({**run, PRIMARY: teacher[PRIMARY]["mean"], ACC: teacher[ACC]["mean"]}
                        if run else None)
    lines.append("| teacher (seed 0 only) | " + " | ".join(
        teacher_cell if s == seeds[0] else "" for s in seeds) + " |")
    for method, row in result["methods"].items():
        lines.append(f"| {LABELS.get(method, method)} | "
                     + " | ".join(cell(row.get("runs", {}).get(str(s))) for s in seeds) + " |")
    return lines


def verdict(result: dict[str, Any]) -> list[str]:
    """The issue's goal, answered from the measured means (no claim without the runs)."""
    rows = result["methods"]
    srd = rows.get("srd")
    if not srd or srd[PRIMARY]["mean"] is None:
        return ["SRD has no finished run yet: no verdict."]
    share = srd["gap_share"][PRIMARY]
    teacher, alone = result["teacher"][PRIMARY]["mean"], (rows.get("none") or {}).get(
        PRIMARY, {}).get("mean")
    out = []
    if teacher is not None and alone is not None and teacher <= alone:
        out.append(f"The teacher ({teacher:.2f}) does not beat the student alone "
                   f"({alone:.2f}) on TAR@FAR=1e-3: there is no gap to close, so the gap "
                   "shares say nothing and the 60 % goal cannot be judged.")
    else:
        goal = "met" if share is not None and share >= 0.6 else "NOT met"
        out.append(f"SRD closes {_share(share)} of the teacher-student TAR@FAR=1e-3 gap "
                   f"(goal >= 60 %: {goal}).")
    for base in ("kd", "feature", "rkd"):
        other = rows.get(base)
        if not other or other[PRIMARY]["mean"] is None:
            out.append(f"SRD vs {base}: {base} has no finished run.")
            continue
        a, b = srd[PRIMARY]["mean"], other[PRIMARY]["mean"]
        spread = [x["std"] for x in (srd[PRIMARY], other[PRIMARY]) if x["std"] is not None]
        within = (f"; difference {a - b:+.2f} vs seed std up to {max(spread):.2f}"
                  if len(spread) == 2 else "")
        out.append(f"SRD vs {base}: {_fmt(srd[PRIMARY])} vs {_fmt(other[PRIMARY])} "
                   f"TAR@FAR=1e-3 -> {'SRD better' if a > b else 'SRD NOT better'} on the mean "
                   f"({srd[PRIMARY]['n']} vs {other[PRIMARY]['n']} seeds{within}).")
    return [f"- {line}" for line in out]


def write_results(result: dict[str, Any], results_dir: Path) -> None:
    from facekd.fileio import write_json_atomic, write_text_atomic

    write_json_atomic(results_dir / "methods.json", result)
    write_text_atomic(results_dir / "methods.md", markdown(result))


# ----------------------------------------------------------------------------- driver
def report_only(work: Path, results_dir: Path, size: BenchSize, methods: list[str],
                seeds: list[int], command: str) -> dict[str, Any]:
    """Tabulate what a (possibly still running) benchmark has finished; trains nothing."""
    layout = Layout(work)
    manifest = _read_json(layout.synth / "synth.json") or {}
    data = {"synth": manifest.get("parts", {})}
    result = collect(layout, size, methods, seeds, data, None, command, {}, [])
    results_dir.mkdir(parents=True, exist_ok=True)
    write_results(result, results_dir)
    return result


def run_bench(work: Path, results_dir: Path, size: BenchSize, methods: list[str],
              seeds: list[int], jobs: int, command: str) -> dict[str, Any]:
    """Prepare, train, evaluate and tabulate; resumable at every step."""
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

    def publish() -> dict[str, Any]:
        wall = wall_before + time.perf_counter() - start
        result = collect(layout, size, methods, seeds, data, wall, command, failed, trained)
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
        # threads); the mbf_tiny students then run side by side on one thread each (they
        # are slower on two threads than on one).
        first = [t for t in todo if t.kind != "student"]
        _schedule(first, done, 1, work, size, methods, progress, 2, failed, trained, publish)
        _schedule([t for t in todo if t.kind == "student"], done, jobs, work, size, methods,
                  progress, 1 if jobs > 1 else 2, failed, trained, publish)
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
                        help="tiny sizes, 1 seed, 2 steps per run (the test)")
    parser.add_argument("--work", type=Path, default=None,
                        help="intermediates (default bench/_work/methods, quick: ..._quick)")
    parser.add_argument("--results", type=Path, default=None,
                        help="where methods.json/.md go (default bench/results; with --quick "
                             "WORK/results, so a smoke test never overwrites the real table)")
    parser.add_argument("--seeds", default=None, help="comma-separated (default 0,1,2; quick 0)")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help=f"comma-separated subset of {','.join(METHODS)}")
    parser.add_argument("--report-only", action="store_true",
                        help="only rewrite the table from finished runs (safe while a run "
                             "is going on in the same --work)")
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
        methods.insert(0, "none")   # the gap share needs the student alone
    seeds_text = args.seeds or ("0" if args.quick else ",".join(map(str, SEEDS)))
    try:
        seeds = [int(s) for s in seeds_text.split(",") if s.strip()]
    except ValueError:
        print(f"bench.methods: --seeds must be comma-separated integers, got {seeds_text!r}",
              file=sys.stderr)
        return 2
    size = SIZES["quick" if args.quick else "full"]
    work = args.work or ROOT / "bench" / "_work" / ("methods_quick" if args.quick else "methods")
    results = args.results or (work / "results" if args.quick else RESULTS)
    jobs = args.jobs or (1 if args.quick or (os.cpu_count() or 1) < 2 else 2)
    command = "python -m bench.methods" + (" --quick" if args.quick else "")
    if args.methods != ",".join(METHODS):
        command += f" --methods {','.join(methods)}"
    if args.seeds:
        command += f" --seeds {seeds_text}"
    try:
        if args.report_only:
            result = report_only(work, results, size, methods, seeds, command)
            print(markdown(result))
            return 0
        result = run_bench(work, results, size, methods, seeds, jobs, command)
    except FacekdError as exc:
        print(f"bench.methods: {exc}", file=sys.stderr)
        return 2
    print(markdown(result))
    return 1 if result["failed_runs"] else 0


if __name__ == "__main__":
    sys.exit(main())
