"""Scale: conversion, inspection, loader start-up and teacher cache at 1M-10M+ records.

WebFace42M (42.5M images, 2.06M identities) and Glint360K (17.1M, 360k) do not fit this
machine, so growth is measured on synthetic insightface datasets of growing size and
extrapolated. Each size is one ``train.rec``/``train.idx``/``property`` written with
facekd's own :func:`~facekd.data.recordio.write_insightface_dataset` from a handful of
pre-encoded 112x112 grayscale JPEGs (a few hundred bytes each, so the bench is about the
per-record machinery, not about copying bytes), every record with its own key and label.

Per size, each step runs as a fresh child process, timed by wall clock and measured with
``os.wait4`` (user + system CPU of the child and its worker processes, and the peak RSS
of the largest of them):

- ``facekd prep rec2shards`` (2 workers, 10,000 samples per shard);
- ``facekd prep info`` on the ``.rec`` and on the shards folder;
- loader start-up per rank over the shards manifest: ``build_train_loader`` + the first
  batch of 128 (open and validate the manifest, the epoch plan, one decode), for rank 0
  of world 1 and of world 8, after ``import torch`` (the baseline RSS is reported);
- the teacher cache's machinery, with synthetic embeddings instead of a teacher (the cost
  of a real teacher forward pass is not measured here): chunk files as the build writes
  them (50 batches of 64 in the loader's order), the merge into ``keys.npy``/``emb.npy``
  (``_finalise``), then opening the cache and looking up batches of 128 random keys.
  Embeddings are ``--cache-dim`` wide (16, fp16) to bound disk use; the size at D = 512
  is computed from the layout (N x 2 x D x 2 bytes + 8 N).

Goals (issue 17): rec2shards time per record flat (largest / smallest <= 1.5) and peak
RSS flat (<= 1.3x) up to >= 10M records; loader start-up extrapolated (a straight line
through the measured sizes) to a 42.5M-row manifest < 60 s and < 2 GB RSS per rank.

Disk: one size's files at a time under ``--work`` (deleted after the size is measured;
free space checked first). Resumable: each size's results are saved to ``scale.json`` as
they finish and a rerun skips sizes already there (``--redo`` measures them again).

Run: ``nice -n 5 .venv/bin/python -m bench.scale`` (writes bench/results/scale.{md,json,png});
``--quick`` runs tiny sizes in seconds (the test suite's check of the outputs).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
WORK = ROOT / "_work" / "scale"

FULL = [(1_000_000, 100_000), (3_000_000, 600_000), (10_000_000, 2_000_000)]
QUICK = [(2_000, 200), (6_000, 1_000)]
TARGET_ROWS = 42_500_000  # WebFace42M
GOALS = {"time_ratio": 1.5, "rss_ratio": 1.3, "loader_s": 60.0, "loader_gb": 2.0}

# --------------------------------------------------------------------------------------
# child processes

WRITE = r"""
import json, sys, time
import numpy as np
import cv2
from facekd.data.recordio import write_insightface_dataset
folder, n, labels = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
pool = []
for i in range(16):  # small real JPEGs, reused: each record still has its own key and label
    steps = (np.add.outer(np.arange(112), np.arange(112)) // 28 * 8 + 8 * i).astype(np.uint8)
    pool.append(cv2.imencode(".jpg", steps, [cv2.IMWRITE_JPEG_QUALITY, 30,
                                             cv2.IMWRITE_JPEG_OPTIMIZE, 1])[1].tobytes())
samples = ((i * labels // n, pool[i & 15]) for i in range(n))
t = time.perf_counter()
write_insightface_dataset(folder, samples, num_classes=labels)
print(json.dumps({"seconds": time.perf_counter() - t,
                  "payload_bytes": sum(map(len, pool)) / len(pool)}))
"""

LOADER = r"""
import json, resource, sys, time
import torch
from facekd.data.loader import build_train_loader
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
folder, rank, world = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
base = rss()
t0, c0 = time.perf_counter(), time.process_time()
loader = build_train_loader(folder, 128, seed=0, rank=rank, world_size=world, num_workers=0)
t1 = time.perf_counter()
batch = next(iter(loader))
t2, c2 = time.perf_counter(), time.process_time()
assert batch["image"].shape[0] == 128
print(json.dumps({"open_s": t1 - t0, "first_batch_s": t2 - t1, "startup_s": t2 - t0,
                  "startup_cpu_s": c2 - c0,
                  "base_mb": base, "rss_mb": rss(),
                  "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "batches": len(loader)}))
"""

CACHE = r"""
import json, resource, sys, time
from pathlib import Path
import numpy as np
phase, out, n, dim = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
chunks = out / "chunks"
t = time.perf_counter()
result = {}
if phase == "chunks":  # what build_teacher_cache's flush() writes, in the loader's order
    from facekd.data.loader import epoch_permutation
    chunks.mkdir(parents=True, exist_ok=True)
    keys = epoch_permutation(n, 0, 0).astype(np.int64) + 1  # image keys 1..N
    rows = 50 * 64
    emb = np.random.default_rng(0).standard_normal((rows, 2, dim)).astype(np.float16)
    for i, lo in enumerate(range(0, n, rows)):
        part = keys[lo:lo + rows]
        np.savez(chunks / f"chunk-r0-{i:06d}.npz", keys=part, emb=emb[:len(part)])
    result["chunk_files"] = i + 1
elif phase == "finalise":
    from facekd.train.cache import _finalise
    settings = {"teacher": "synthetic", "teacher_sha256": None, "source": "synthetic",
                "dtype": "float16", "batch_size": 64, "chunk_batches": 50, "world_size": 1}
    _finalise(out, chunks, np.float16, settings, None, 64.0)
    result["bytes"] = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
else:
    from facekd.train.cache import open_cache
    cache = open_cache(out)
    result["open_s"] = time.perf_counter() - t
    rng = np.random.default_rng(1)
    batches = [(rng.integers(1, n + 1, 128), rng.random(128) < 0.5) for _ in range(200)]
    t1, c1 = time.perf_counter(), time.process_time()
    for keys, flips in batches:
        cache.lookup(keys, flips)
    result["lookup_us"] = (time.perf_counter() - t1) / len(batches) * 1e6
    result["lookup_cpu_us"] = (time.process_time() - c1) / len(batches) * 1e6
result["seconds"] = time.perf_counter() - t
result["peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps(result))
"""


def child(argv: list[str]) -> dict[str, Any]:
    """Run ``argv``; its wall time, CPU time and peak RSS (it and its workers, wait4)."""
    start = time.perf_counter()
    with tempfile.TemporaryFile() as err_file:  # a file: a full stderr pipe cannot block it
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err_file)
        out = proc.stdout.read()
        proc.stdout.close()
        _, status, usage = os.wait4(proc.pid, 0)  # reaped here: its own rusage
        err_file.seek(0)
        err = err_file.read()
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    if proc.returncode:
        raise RuntimeError(f"{' '.join(argv[:6])} failed ({proc.returncode}): "
                           f"{err.decode(errors='replace')[-2000:]}")
    lines = out.decode().strip().splitlines()
    result: dict[str, Any] = {}
    try:
        parsed = json.loads("\n".join(lines)) if lines and lines[0].startswith("{") else None
    except json.JSONDecodeError:
        parsed = None
    if parsed is None and lines:
        try:
            parsed = json.loads(lines[-1])
        except json.JSONDecodeError:
            parsed = None
    if isinstance(parsed, dict):
        result.update(parsed)
    result.update({"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime,
                   "max_rss_mb": usage.ru_maxrss / 1024})
    return result


def py(code: str, *args: Any) -> list[str]:
    return [sys.executable, "-c", code, *map(str, args)]


def facekd(*args: Any) -> list[str]:
    return [sys.executable, "-m", "facekd", *map(str, args)]


# --------------------------------------------------------------------------------------
# one size


def dir_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def measure(n: int, labels: int, work: Path, shard_size: int, workers: int, dim: int,
            log: Any) -> dict[str, Any]:
    """Every measurement at ``n`` records; the size's files are deleted afterwards."""
    need = n * (600 + 2600 + 4 * dim + 100) + (2 << 30)
    work.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(work.parent).free
    if free < need:
        raise SystemExit(f"bench.scale: {n:,} records need about {need / 1e9:.1f} GB free "
                         f"under {work}, {free / 1e9:.1f} GB are")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    rec, shards, cache = work / "rec", work / "shards", work / "cache"
    row: dict[str, Any] = {"records": n, "labels": labels}
    try:
        log(f"{n:,} records: writing train.rec")
        row["write"] = child(py(WRITE, rec, n, labels))
        row["rec_bytes"] = dir_bytes(rec)
        log(f"{n:,} records: rec2shards")
        row["rec2shards"] = child(facekd("prep", "rec2shards", rec, shards,
                                         "--workers", workers, "--shard-size", shard_size))
        row["shards_bytes"] = dir_bytes(shards)
        log(f"{n:,} records: prep info")
        row["info_rec"] = child(facekd("prep", "info", rec, "--out", "-"))
        row["info_shards"] = child(facekd("prep", "info", shards, "--out", "-"))
        for key in ("info_rec", "info_shards"):  # keep the measurements, not the summary
            row[key] = {k: row[key][k] for k in ("wall_s", "cpu_s", "max_rss_mb", "images")
                        if k in row[key]}
        shutil.rmtree(rec)  # the loader and the cache need only the shards
        log(f"{n:,} records: loader start-up")
        row["loader_w1"] = child(py(LOADER, shards, 0, 1))
        row["loader_w8"] = child(py(LOADER, shards, 0, 8))
        log(f"{n:,} records: teacher cache machinery")
        row["cache_chunks"] = child(py(CACHE, "chunks", cache, n, dim))
        row["cache_finalise"] = child(py(CACHE, "finalise", cache, n, dim))
        row["cache_lookup"] = child(py(CACHE, "lookup", cache, n, dim))
        row["cache_bytes"] = row["cache_finalise"].get("bytes")
        row["cache_bytes_d512"] = n * 2 * 512 * 2 + 8 * n
        row["load_average"] = os.getloadavg()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return row


# --------------------------------------------------------------------------------------
# summary


def fit(xs: list[float], ys: list[float], at: float) -> tuple[float, float, float]:
    """Least-squares line ``a + b x`` through the points; ``(a, b, a + b at)``."""
    import numpy as np

    if len(xs) < 2:
        return float(ys[0]), 0.0, float(ys[0])
    b, a = np.polyfit(np.asarray(xs, float), np.asarray(ys, float), 1)
    return float(a), float(b), float(a + b * at)


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    rows = sorted(rows, key=lambda r: r["records"])
    small, large = rows[0], rows[-1]

    def per_record(row: dict[str, Any], key: str) -> float:
        return row["rec2shards"][key] / row["records"] * 1e6

    goals: dict[str, Any] = {
        "largest_records": large["records"],
        "time_ratio_wall": per_record(large, "wall_s") / per_record(small, "wall_s"),
        "time_ratio_cpu": per_record(large, "cpu_s") / per_record(small, "cpu_s"),
        "rss_ratio": large["rec2shards"]["max_rss_mb"] / small["rec2shards"]["max_rss_mb"]}
    goals["time_met"] = goals["time_ratio_wall"] <= GOALS["time_ratio"]
    goals["rss_met"] = goals["rss_ratio"] <= GOALS["rss_ratio"]
    xs = [r["records"] for r in rows]
    for world in ("w1", "w8"):
        key = f"loader_{world}"
        _, _, at_s = fit(xs, [r[key]["startup_s"] for r in rows], TARGET_ROWS)
        _, _, at_cpu = fit(xs, [r[key]["startup_cpu_s"] for r in rows], TARGET_ROWS)
        # the peak above the RSS after import torch: the torch libraries' resident pages
        # move with the page cache (10M records of shards push some out), the data's do not
        base = max(r[key]["base_mb"] for r in rows)
        _, slope_mb, at_mb = fit(xs, [r[key]["peak_mb"] - r[key]["base_mb"] for r in rows],
                                 TARGET_ROWS)
        at_mb += base
        goals[f"{key}_42m_s"] = at_s
        goals[f"{key}_42m_cpu_s"] = at_cpu
        goals[f"{key}_42m_gb"] = at_mb / 1024
        goals[f"{key}_bytes_per_row"] = slope_mb * 2**20
        # judged on CPU time (what an idle core gives; wall moves with the shared load)
        goals[f"{key}_met"] = at_cpu < GOALS["loader_s"] and at_mb / 1024 < GOALS["loader_gb"]
        goals[f"{key}_wall_met"] = at_s < GOALS["loader_s"]
    goals["at_least_10m"] = large["records"] >= 10_000_000
    _, slope, _ = fit(xs, [r["cache_finalise"]["max_rss_mb"] for r in rows], TARGET_ROWS)
    goals["cache_merge_bytes_per_sample"] = slope * 2**20
    return goals


def _mb(value: float) -> str:
    return f"{value:,.0f}"


def write_outputs(out: Path, state: dict[str, Any], quick: bool) -> None:
    from facekd.fileio import write_json_atomic, write_text_atomic

    rows = sorted(state["sizes"].values(), key=lambda r: r["records"])
    state["goals"] = summarise(rows) if rows else {}
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "scale.json", state)
    goals = state["goals"]
    lines = ["# Scale: conversion, info, loader start-up and teacher cache vs records", "",
             "| records | labels | .rec GB | shards GB | rec2shards wall s | CPU s | "
             "us/record wall | us/record CPU | peak RSS MB | info .rec s / MB | "
             "info shards s / MB |", "|" + "---|" * 11]
    for r in rows:
        c = r["rec2shards"]
        lines.append(
            f"| {r['records']:,} | {r['labels']:,} | {r['rec_bytes'] / 1e9:.2f} | "
            f"{r['shards_bytes'] / 1e9:.2f} | {c['wall_s']:.1f} | {c['cpu_s']:.1f} | "
            f"{c['wall_s'] / r['records'] * 1e6:.2f} | {c['cpu_s'] / r['records'] * 1e6:.2f} | "
            f"{_mb(c['max_rss_mb'])} | {r['info_rec']['wall_s']:.1f} / "
            f"{_mb(r['info_rec']['max_rss_mb'])} | {r['info_shards']['wall_s']:.1f} / "
            f"{_mb(r['info_shards']['max_rss_mb'])} |")
    lines += ["", "| records | loader world 1: start-up s / peak MB | world 8 rank 0: "
              "start-up s / peak MB | RSS after import torch MB | cache merge s / peak MB | "
              "cache open s (with import torch) | lookup us / batch of 128 (CPU) | "
              "cache GB (D = 16) | cache GB at D = 512 |", "|" + "---|" * 9]
    for r in rows:
        w1, w8 = r["loader_w1"], r["loader_w8"]
        look = r["cache_lookup"]
        lines.append(
            f"| {r['records']:,} | {w1['startup_s']:.2f} ({w1['startup_cpu_s']:.2f} CPU) / "
            f"{_mb(w1['peak_mb'])} | {w8['startup_s']:.2f} ({w8['startup_cpu_s']:.2f} CPU) / "
            f"{_mb(w8['peak_mb'])} | {_mb(w1['base_mb'])} | "
            f"{r['cache_finalise']['wall_s']:.1f} / {_mb(r['cache_finalise']['max_rss_mb'])} | "
            f"{look['open_s']:.3f} | {look['lookup_us']:.0f} ({look['lookup_cpu_us']:.0f}) | "
            f"{r['cache_bytes'] / 1e9:.3f} | {r['cache_bytes_d512'] / 1e9:.1f} |")
    if goals:
        def verdict(ok: bool) -> str:
            return "met" if ok else "NOT met"

        lines += [
            "",
            f"- Goal: rec2shards time per record flat up to >= 10M records (largest / "
            f"smallest <= {GOALS['time_ratio']}): wall {goals['time_ratio_wall']:.2f}, CPU "
            f"{goals['time_ratio_cpu']:.2f} at {goals['largest_records']:,} records "
            f"({verdict(goals['time_met'] and goals['at_least_10m'])}, judged on wall).",
            f"- Goal: rec2shards peak RSS flat (<= {GOALS['rss_ratio']}x): "
            f"{goals['rss_ratio']:.2f}x ({verdict(goals['rss_met'] and goals['at_least_10m'])}).",
            *[f"- Goal: loader start-up per rank at {TARGET_ROWS / 1e6:.1f}M rows < "
              f"{GOALS['loader_s']:.0f} s and < {GOALS['loader_gb']:.0f} GB ({label}): "
              f"{goals[f'{k}_42m_cpu_s']:.1f} CPU s ({goals[f'{k}_42m_s']:.1f} s wall, "
              f"{verdict(goals[f'{k}_wall_met'])} on wall), {goals[f'{k}_42m_gb']:.2f} GB "
              f"({goals[f'{k}_bytes_per_row']:.0f} bytes per manifest row) "
              f"({verdict(goals[f'{k}_met'])}); a straight line through the measured sizes."
              for k, label in (("loader_w1", "world 1"), ("loader_w8", "world 8, rank 0"))]]
    lines += [
        "",
        "- Synthetic insightface datasets written by facekd's RecordIO writer: 16 pre-encoded "
        "112x112 grayscale JPEGs of about "
        f"{rows[0]['write'].get('payload_bytes', 0):.0f} bytes cycled, each record its own "
        "key and label (labels sorted, records per label equal)." if rows else "",
        "- Every step is a fresh child process: wall time, user + system CPU of it and its "
        "workers, peak RSS of the largest of them (os.wait4). rec2shards: 2 workers, "
        f"{state['config']['shard_size']:,} samples per shard.",
        "- Loader start-up: build_train_loader + first batch of 128 (num_workers 0), after "
        "import torch; peak RSS includes the torch import (the RSS-after-import column). "
        "The 42.5M-row extrapolation fits the peak above that baseline (the torch "
        "libraries' resident pages move with the page cache) and adds the largest baseline.",
        "- Teacher cache: synthetic fp16 embeddings, no teacher forward pass (the machinery "
        "only: chunk files, merge, open, lookup); D = 16 on disk here, the D = 512 column is "
        "the layout's size (N x 2 x 512 x 2 + 8 N bytes). Merge peak RSS grows "
        f"{goals.get('cache_merge_bytes_per_sample', 0):.0f} bytes a sample here (its key "
        "arrays; emb.npy pages are released every 64 MB written).",
        "- Load average (1 min) as each size finished: "
        + " / ".join(f"{r.get('load_average', [0])[0]:.1f}" for r in rows)
        + f" on {os.cpu_count()} CPUs shared with other jobs; wall times move with it, CPU "
        "times less.",
        f"- Command: {state['config']['command']}", ""]
    write_text_atomic(out / "scale.md", "\n".join(lines))
    if rows:
        plot(out / "scale.png", rows, goals, quick)


def plot(path: Path, rows: list[dict[str, Any]], goals: dict[str, Any], quick: bool) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    from facekd.fileio import atomic_path

    xs = [r["records"] / 1e6 for r in rows]
    fig = Figure(figsize=(13, 4))
    ax1, ax2, ax3 = fig.subplots(1, 3)
    for key, label in (("wall_s", "rec2shards wall"), ("cpu_s", "rec2shards CPU")):
        ax1.plot(xs, [r["rec2shards"][key] / r["records"] * 1e6 for r in rows], "o-",
                 label=label)
    ax1.plot(xs, [r["info_rec"]["wall_s"] / r["records"] * 1e6 for r in rows], "s--",
             label="prep info .rec wall")
    ax1.set(xlabel="records (M)", ylabel="us per record", title="time per record")
    ax1.set_ylim(bottom=0)
    ax1.legend(fontsize=8)
    ax2.plot(xs, [r["rec2shards"]["max_rss_mb"] for r in rows], "o-", label="rec2shards")
    ax2.plot(xs, [r["info_rec"]["max_rss_mb"] for r in rows], "s--", label="prep info .rec")
    ax2.plot(xs, [r["cache_finalise"]["max_rss_mb"] for r in rows], "^--",
             label="cache merge (D = 16)")
    ax2.set(xlabel="records (M)", ylabel="peak RSS (MB)", title="peak RSS")
    ax2.set_ylim(bottom=0)
    ax2.legend(fontsize=8)
    target = TARGET_ROWS / 1e6
    for key, label, mark in (("loader_w1", "world 1", "o"), ("loader_w8", "world 8", "s")):
        line = ax3.plot(xs, [r[key]["peak_mb"] for r in rows], mark + "-",
                        label=f"peak MB, {label}")[0]
        if goals:
            ax3.plot([xs[-1], target], [rows[-1][key]["peak_mb"], goals[f"{key}_42m_gb"] * 1024],
                     ":", color=line.get_color())
    ax3.axhline(GOALS["loader_gb"] * 1024, color="grey", lw=0.8)
    ax3.set(xlabel="manifest rows (M)", ylabel="loader peak RSS per rank (MB)",
            title="loader start-up RSS (dotted: to 42.5M)")
    ax3.set_ylim(bottom=0)
    twin = ax3.twinx()
    twin.plot(xs, [r["loader_w1"]["startup_s"] for r in rows], "x--", color="black",
              label="start-up s, world 1")
    twin.set_ylabel("start-up s")
    twin.set_ylim(bottom=0)
    ax3.legend(fontsize=8, loc="upper left")
    twin.legend(fontsize=8, loc="lower right")
    fig.suptitle("bench.scale" + (" --quick (tiny sizes: not a measurement)" if quick else ""))
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=90)


# --------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (seconds)")
    parser.add_argument("--sizes", default=None,
                        help="RECORDS:LABELS,... (default 1M:100k, 3M:600k, 10M:2M)")
    parser.add_argument("--out", default=str(RESULTS), help="results folder")
    parser.add_argument("--work", default=str(WORK), help="scratch folder (emptied per size)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--cache-dim", type=int, default=16)
    parser.add_argument("--redo", action="store_true", help="measure done sizes again")
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    if args.sizes:
        sizes = [tuple(int(float(v)) for v in part.split(":")) for part in args.sizes.split(",")]
    shard_size = 1000 if args.quick else 10000
    out = Path(args.out)
    config = {"shard_size": shard_size, "workers": args.workers, "cache_dim": args.cache_dim,
              "command": "python -m bench.scale" + (" --quick" if args.quick else "")
              + (f" --sizes {args.sizes}" if args.sizes else "")}
    state: dict[str, Any] = {"title": "bench.scale", "config": config, "sizes": {}}
    saved = out / "scale.json"
    if saved.is_file() and not args.redo:
        old = json.loads(saved.read_text())
        same = {k: v for k, v in old.get("config", {}).items() if k != "command"} == \
            {k: v for k, v in config.items() if k != "command"}
        if same:
            state["sizes"] = old.get("sizes", {})
    started = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:7.1f} s] {message}", flush=True)

    for n, labels in sizes:
        if str(n) in state["sizes"] and state["sizes"][str(n)]["labels"] == labels:
            log(f"{n:,} records: done before, skipped")
            continue
        state["sizes"][str(n)] = measure(n, labels, Path(args.work), shard_size, args.workers,
                                         args.cache_dim, log)
        write_outputs(out, state, args.quick)  # saved as each size finishes: resumable
    state["sizes"] = {k: v for k, v in state["sizes"].items()
                      if (v["records"], v["labels"]) in set(map(tuple, sizes))}
    write_outputs(out, state, args.quick)
    print((out / "scale.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
