"""What identity-grouped (P x K) batches cost, apart from the method that asks for them.

EKD's and REFILLED's recipes train on P x K batches (``data.images_per_identity``); the
student alone and the other methods on random ones. So a method's score in
``bench.methods`` mixes the method with its batches. This trains, in the method
benchmark's own setting (its ``--work``: data, teacher cache, student schedule, the
tuning seed) and scored on its *validation* identities only, the student alone and EKD
(recipe values) at K = 1 (random batches) and at the K its recipe uses, so the two
effects can be read apart. The EKD docstring quotes this table.

Run: ``.venv/bin/python -m bench.method_batches`` after (or while) ``python -m
bench.methods`` has prepared its data and teacher cache; reuses finished runs. Writes
``bench/results/method_batches.{md,json}``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
# (method, images per identity): the student alone and EKD at random and at P x K batches
RUNS = (("none", 1), ("none", 2), ("ekd", 1), ("ekd", 2))


def run(work: Path, out: Path) -> dict[str, Any]:
    """Train (or reuse) each run of ``RUNS`` and score it on the validation identities."""
    import torch

    import bench.methods as bm

    layout = bm.Layout(work)
    size = bm.SIZES["full"]
    if not bm._cache_complete(layout.cache):
        from facekd.errors import FacekdError

        raise FacekdError(f"{layout.cache}: no complete teacher cache; run "
                          "`python -m bench.methods` first (it prepares data and cache)")
    torch.set_num_threads(1)        # as bench.methods' side-by-side student runs
    rows = []
    for method, k in RUNS:
        folder = out / f"{method}_k{k}"
        # at its recipe's K and values a tuned method's run is bench.methods' own x1 grid
        # point (same seed, setting and overrides): reuse it instead of training it again
        grid_point = layout.tune(method, "w1")
        if (bm.SPECS[method].tuned and k == bm._recipe(bm.SPECS[method].recipe)
                .data.images_per_identity and (grid_point / "summary.json").exists()):
            folder = grid_point
        if not (folder / "summary.json").exists():
            overrides = bm.student_overrides(layout, size, method, bm.TUNE_SEED, False, folder)
            overrides.append(f"data.images_per_identity={k}")
            bm._train(bm.SPECS[method].recipe, overrides)
        scores = bm.evaluate_model(folder / "student.pt", layout, False, 1, "validation")
        rows.append({"method": method, "images_per_identity": k,
                     bm.PRIMARY: scores[bm.PRIMARY],
                     "interval": scores.get(f"{bm.PRIMARY}_interval")})
    return {"benchmark": "P x K vs random batches, student alone and EKD",
            "command": "python -m bench.method_batches", "seed": bm.TUNE_SEED,
            "metric": f"{bm.PRIMARY} (%) on the validation identities", "runs": rows}


def markdown(result: dict[str, Any]) -> str:
    lines = ["# P x K batches vs random batches (validation identities)", "",
             f"Command: `{result['command']}`. The method benchmark's setting and data, "
             f"tuning seed {result['seed']}, recipe values; IJB-style TAR@FAR=1e-3 (%) on "
             "the validation identities with its 95 % cluster-bootstrap interval. One seed: "
             "read differences against the intervals.", "",
             "| method | images per identity | TAR@FAR=1e-3 (%) |", "|---|---:|---:|"]
    for row in result["runs"]:
        ci = row["interval"]
        cell = f"{row['ijb_tar@far1e-3']:.2f}" + (
            f" [{ci['low']:.2f}, {ci['high']:.2f}]" if ci else "")
        label = "student alone" if row["method"] == "none" else row["method"]
        lines.append(f"| {label} | {row['images_per_identity']} | {cell} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.method_batches",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=ROOT / "bench" / "_work" / "methods",
                        help="bench.methods' work folder (data, teacher cache)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "_work" / "method_batches",
                        help="where the runs go (reused on a rerun)")
    args = parser.parse_args(argv)
    from facekd.errors import FacekdError
    from facekd.fileio import write_json_atomic, write_text_atomic
    from facekd.logs import setup_logging

    setup_logging()
    try:
        result = run(args.work, args.out)
    except FacekdError as exc:
        print(f"bench.method_batches: {exc}", file=sys.stderr)
        return 2
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_json_atomic(RESULTS / "method_batches.json", result)
    write_text_atomic(RESULTS / "method_batches.md", markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
