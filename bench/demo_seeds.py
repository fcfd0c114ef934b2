"""How much the demo's numbers move across training seeds, and which gaps survive them.

Reads finished ``facekd demo --out DIR --seed N`` folders (their ``eval/compare_rows.json``
and the paired bootstrap replicates ``eval/compare_replicates.npz``) and writes, per
metric: every model's value on each seed with its cluster-bootstrap interval, the spread
across seeds, and on each seed the teacher - student alone and SRD - student alone gaps
with their paired intervals. A gap is read as real only where its interval excludes 0
on every seed; a spread larger than a figure's own interval says the seed, not the
evaluation set, limits what a difference means.

Run: ``.venv/bin/python -m bench.demo_seeds demo_out/s0 demo_out/s1`` (writes
bench/results/demo_seeds.{md,json}).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from facekd.demo import metric_estimates
from facekd.errors import FacekdError
from facekd.evaluate.stats import Interval
from facekd.fileio import write_json_atomic, write_text_atomic

RESULTS = Path(__file__).resolve().parent / "results"
MODELS = ("teacher", "student alone", "student + SRD")


NEEDED = ("eval/compare_rows.json", "eval/compare_replicates.npz", "runs/teacher/summary.json")


def read_demo(folder: Path) -> dict[str, Any]:
    """One demo's seed and, per metric, the three models' estimates (None below a floor)."""
    missing = [name for name in NEEDED if not (folder / name).is_file()]
    if missing:
        raise FacekdError(f"{folder}: not a finished facekd demo (no {missing[0]}); "
                          f"run `facekd demo --out {folder}` first")
    rows = json.loads((folder / "eval" / "compare_rows.json").read_text())["rows"]
    seed = json.loads((folder / "runs" / "teacher" / "summary.json").read_text())["seed"]
    with np.load(folder / "eval" / "compare_replicates.npz") as npz:
        replicates = {k: npz[k] for k in npz.files}
    metrics = {metric: metric_estimates(rows, replicates, metric) for metric in rows[0]["cells"]}
    return {"folder": str(folder), "seed": int(seed), "metrics": metrics}


def summarise(demos: list[dict[str, Any]]) -> dict[str, Any]:
    """Per metric: values per seed, spread, and the two gaps per seed."""
    out: dict[str, Any] = {}
    for metric in demos[0]["metrics"]:
        per_seed = [d["metrics"].get(metric) for d in demos]
        if any(p is None for p in per_seed):
            out[metric] = None
            continue
        values = {name: [p[i].interval().as_dict() for p in per_seed]
                  for i, name in enumerate(MODELS)}
        spread = {name: max(v["value"] for v in vs) - min(v["value"] for v in vs)
                  for name, vs in values.items()}
        gaps = {"teacher - student alone": [p[0].minus(p[1]).interval() for p in per_seed],
                "SRD - student alone": [p[2].minus(p[1]).interval() for p in per_seed]}
        out[metric] = {
            "values": values, "spread": spread,
            "gaps": {k: [g.as_dict() for g in v] for k, v in gaps.items()},
            "gap_on_every_seed": {k: all(g.excludes_zero() and g.value > 0 for g in v)
                                  for k, v in gaps.items()}}
    return out


def markdown(demos: list[dict[str, Any]], summary: dict[str, Any], command: str) -> str:
    seeds = [d["seed"] for d in demos]
    lines = ["# The demo across training seeds", "",
             f"`facekd demo` (default preset) at seeds {seeds}; every figure in %, with its "
             "95 % cluster-bootstrap interval (the demo's own); gaps are differences of "
             "paired resamples on one seed. Metrics below a protocol's resolution floor "
             "are left out (the demo prints them as n/a).", "",
             f"Command: `{command}`", "",
             "| metric | model | " + " | ".join(f"seed {s}" for s in seeds)
             + " | spread across seeds |", "|---|---|" + "---:|" * (len(seeds) + 1)]
    for metric, entry in summary.items():
        if entry is None:
            continue
        for name in MODELS:
            cells = [Interval(**v).format(2) for v in entry["values"][name]]
            lines.append(f"| {metric} | {name} | " + " | ".join(cells)
                         + f" | {entry['spread'][name]:.2f} |")
    lines += ["", "| metric | gap | " + " | ".join(f"seed {s}" for s in seeds)
              + " | interval above 0 on every seed |", "|---|---|" + "---:|" * len(seeds) + "---|"]
    for metric, entry in summary.items():
        if entry is None:
            continue
        for gap, values in entry["gaps"].items():
            cells = [Interval(**v).format(2) for v in values]
            every = "**yes**" if entry["gap_on_every_seed"][gap] else "no"
            lines.append(f"| {metric} | {gap} | " + " | ".join(cells) + f" | {every} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.demo_seeds", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("demos", nargs="+", type=Path, help="finished facekd demo folders")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    try:
        demos = [read_demo(folder) for folder in args.demos]
    except FacekdError as exc:
        print(f"bench.demo_seeds: {exc}", file=sys.stderr)
        return 2
    summary = summarise(demos)
    command = "python -m bench.demo_seeds " + " ".join(str(d) for d in args.demos)
    write_json_atomic(args.results / "demo_seeds.json",
                      {"command": command, "demos": [{"folder": d["folder"], "seed": d["seed"]}
                                                     for d in demos], "metrics": summary})
    text = markdown(demos, summary, command)
    write_text_atomic(args.results / "demo_seeds.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
