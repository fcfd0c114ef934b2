"""Does the CFP-FP-like set rank a stronger model higher? Teacher vs student alone by pose.

The CFP-FP-like set pairs frontal faces with turned ones. Its profiles used to be drawn
at 45-70 degrees of yaw, beyond anything in the training images (yaw N(0, 14 deg)
clipped at 50), and the teacher scored below the student alone there. This scores the
trained models of finished ``facekd demo`` runs on CFP-like sets rendered at several
profile-yaw ranges (same seed, same identities, only the profile yaw differs), with
cluster-bootstrap intervals and the paired teacher - student gap. Only embedding runs:
no training, so it checks a generator change in minutes.

Run: ``.venv/bin/python -m bench.cfp_pose demo_out [demo_out_seed1 ...] [--pairs 2000]``
(writes bench/results/cfp_pose.{md,json}).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from facekd.fileio import write_json_atomic, write_text_atomic

RESULTS = Path(__file__).resolve().parent / "results"
WORK = Path(__file__).resolve().parent / "_work" / "cfp_pose"
MODELS = {"teacher": "runs/teacher/student.pt", "student alone": "runs/student_alone/student.pt"}


def _ranges(text: str) -> list[tuple[float, float]]:
    out = []
    for part in text.split(","):
        lo, hi = part.split(":")
        out.append((float(lo), float(hi)))
    return out


def score_run(demo: Path, ranges: list[tuple[float, float]], pairs: int,
              bootstrap: int) -> dict:
    from facekd.data.synth import _write_pairs_bin
    from facekd.evaluate.pipeline import evaluate_bin
    from facekd.evaluate.stats import Estimate
    from facekd.models.embedder import load_embedder

    seed = int(json.loads((demo / "synth" / "synth.json").read_text())["seed"])
    embedders = {name: load_embedder(demo / rel, device="cpu") for name, rel in MODELS.items()}
    rows = []
    for lo, hi in ranges:
        path = WORK / f"seed{seed}" / f"cfp_{lo:g}_{hi:g}_{pairs}.bin"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            _write_pairs_bin(path, "cfp_fp", pairs, seed, 1.0, 1, False, profile_yaw=(lo, hi))
        res = {name: evaluate_bin(e, path, 128, use_cache=False, progress=False,
                                  bootstrap=bootstrap) for name, e in embedders.items()}
        t, a = res["teacher"], res["student alone"]
        gap = Estimate(100 * (t["acc_mean"] - a["acc_mean"]),
                       100 * (t["replicates"]["acc"] - a["replicates"]["acc"])).interval()
        rows.append({"seed": seed, "profile_yaw": [lo, hi], "pairs": pairs,
                     "acc": {n: {k: 100 * v for k, v in r["bootstrap"]["intervals"]["acc"].items()}
                             for n, r in res.items()},
                     "gap": gap.as_dict(), "clusters": t["bootstrap"]["clusters"]})
    return {"demo": str(demo), "seed": seed, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("demos", nargs="+", type=Path, help="finished facekd demo folders")
    parser.add_argument("--pairs", type=int, default=2000)
    parser.add_argument("--ranges", type=_ranges, default=_ranges("45:70,30:50"),
                        help="profile yaw ranges in degrees, e.g. 45:70,30:50")
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    runs = [score_run(d, args.ranges, args.pairs, args.bootstrap) for d in args.demos]

    lines = ["# CFP-FP-like set: teacher vs student alone by profile yaw", "",
             "10-fold accuracy (%) with 95 % cluster-bootstrap intervals "
             f"({args.bootstrap} resamples); gap = teacher - student alone on paired "
             f"resamples. {args.pairs} pairs per set, frontal yaw within +-8 deg; models from "
             "the `facekd demo` runs named below. Training poses: yaw N(0, 14 deg) clipped "
             "at 50.", "",
             "| seed | profile yaw (deg) | teacher | student alone | gap (points) |",
             "|---|---|---|---|---|"]
    for run in runs:
        for row in run["rows"]:
            cells = [f"{row['acc'][n]['value']:.2f} [{row['acc'][n]['low']:.2f}, "
                     f"{row['acc'][n]['high']:.2f}]" for n in MODELS]
            g = row["gap"]
            lines.append(f"| {row['seed']} | {row['profile_yaw'][0]:g}-{row['profile_yaw'][1]:g}"
                         f" | {cells[0]} | {cells[1]} | {g['value']:+.2f} [{g['low']:+.2f}, "
                         f"{g['high']:+.2f}] |")
    lines += ["", f"Clusters: {runs[0]['rows'][0]['clusters']}.", "",
              "Command: `.venv/bin/python -m bench.cfp_pose "
              + " ".join(str(d) for d in args.demos) + f" --pairs {args.pairs} --ranges "
              + ",".join(f"{lo:g}:{hi:g}" for lo, hi in args.ranges) + "`", ""]
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_json_atomic(RESULTS / "cfp_pose.json", {"args": {**vars(args), "demos": [
        str(d) for d in args.demos]}, "runs": runs})
    write_text_atomic(RESULTS / "cfp_pose.md", "\n".join(lines))
    print("\n".join(lines))
    shutil.rmtree(WORK, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
