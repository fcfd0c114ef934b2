"""Does the CFP-FP-like set rank a stronger model higher? Teacher vs student alone by
pose and by set size.

The CFP-FP-like set pairs frontal faces with turned ones. This scores the trained models
of finished ``facekd demo`` runs on CFP-like sets rendered with the generator's own pair
plan at several sizes and profile-yaw ranges (same seed and identity stream; only the
size or the profile yaw differs), with cluster-bootstrap intervals and the paired
teacher - student gap. Each variant isolates one candidate cause of a wrong ranking:

- *set size*: ``--pairs 1000,7000`` (the demo's old size; real CFP-FP's 10 folds x
  350 + 350). The fold columns give the gap in each of the 10 folds (each fold its own
  people, about a tenth of the set), so their spread is the noise of a set that size;
- *pose*: a ``0:8`` range is the pose-free control (frontal vs frontal, same pairs, same
  people); ``20:30``, ``30:40``, ``40:50`` walk into the tail of the training poses
  (yaw N(0, 14 deg) clipped at 50, so 3 % of training images turn beyond 30 deg);
- *separability*: AUC and d' (impostor minus genuine mean squared distance over their
  pooled sd) use every pair, not one threshold per fold.

Only embedding runs, no training, so it checks a held-out-set change in minutes.

Run: ``.venv/bin/python -m bench.cfp_pose demo_out [demo_out_seed1 ...]
[--pairs 1000,7000] [--ranges 0:8,30:50]`` (writes bench/results/cfp_pose.{md,json}).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from facekd.fileio import write_json_atomic, write_text_atomic

RESULTS = Path(__file__).resolve().parent / "results"
WORK = Path(__file__).resolve().parent / "_work" / "cfp_pose"
MODELS = {"teacher": "runs/teacher/student.pt", "student alone": "runs/student_alone/student.pt",
          "student + SRD": "runs/student_srd/student.pt"}


def _ranges(text: str) -> list[tuple[float, float]]:
    out = []
    for part in text.split(","):
        lo, hi = part.split(":")
        out.append((float(lo), float(hi)))
    return out


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",")]


def d_prime(dist: np.ndarray, same: np.ndarray) -> float:
    """Separation of impostor and genuine squared distances in pooled sds."""
    gen, imp = dist[same], dist[~same]
    return float((imp.mean() - gen.mean()) / np.sqrt((gen.var() + imp.var()) / 2))


def _generator_tag() -> str:
    """Rendered sets are kept under bench/_work for the next run, keyed by the
    generator's source so a renderer change never reuses stale images."""
    import hashlib

    import facekd.data.synth as synth
    import facekd.data.synth_render as render

    blob = b"".join(Path(m.__file__).read_bytes() for m in (synth, render))
    return hashlib.sha256(blob).hexdigest()[:12]


def _embed_once(embedders: dict, bins: list[bytes], ids: np.ndarray) -> dict:
    """``[orig | flip]`` features of every image slot, each distinct image embedded once
    (a CFP-like set names each image in about four pairs); cached under bench/_work
    by model and image hashes."""
    from facekd.data.binset import decode_bin_images
    from facekd.evaluate.embed import ArrayImageSource, extract_features

    _, first, inverse = np.unique(ids, return_index=True, return_inverse=True)
    source = ArrayImageSource(decode_bin_images([bins[i] for i in first], source="cfp"))
    return {name: extract_features(e, source, batch_size=128, cache_dir=WORK / "features",
                                   progress=False)[inverse] for name, e in embedders.items()}


def score_run(demo: Path, ranges: list[tuple[float, float]], sizes: list[int],
              bootstrap: int, only: tuple[str, ...] = ()) -> dict:
    """Each model's 10-fold accuracy (as ``facekd eval verify`` scores it: image + flip,
    cluster-bootstrap interval) on each variant set, and the paired gap."""
    from facekd.data.binset import load_bin
    from facekd.data.synth import _write_pairs_bin
    from facekd.evaluate.embed import split_flip
    from facekd.evaluate.stats import Estimate, bin_image_ids, verification_estimates
    from facekd.evaluate.verification import verify_pairs
    from facekd.models.embedder import load_embedder

    seed = int(json.loads((demo / "synth" / "synth.json").read_text())["seed"])
    embedders = {name: load_embedder(demo / rel, device="cpu") for name, rel in MODELS.items()
                 if (demo / rel).exists() and (name in only or not only)}
    rows = []
    for pairs in sizes:
        for lo, hi in ranges:
            path = WORK / _generator_tag() / f"seed{seed}" / f"cfp_{lo:g}_{hi:g}_{pairs}.bin"
            if not path.exists():
                path.parent.mkdir(parents=True, exist_ok=True)
                _write_pairs_bin(path, "cfp_fp", pairs, seed, 1.0, 1, False,
                                 profile_yaw=(lo, hi))
            bins, issame = load_bin(path)
            same = np.asarray(issame, dtype=bool)
            ids = bin_image_ids(bins)
            res = {}
            for name, feats in _embed_once(embedders, bins, ids).items():
                r = verify_pairs(*split_flip(feats), same)
                est = verification_estimates(r, same, ids, n_boot=bootstrap)
                r["replicates"] = {k: e.replicates for k, e in est.pop("estimates").items()}
                r["bootstrap"] = est
                res[name] = r
            t, a = res["teacher"], res["student alone"]
            gap = Estimate(100 * (t["acc_mean"] - a["acc_mean"]),
                           100 * (t["replicates"]["acc"] - a["replicates"]["acc"])).interval()
            fold_gap = 100 * (np.array(t["accuracy_per_fold"]) - np.array(a["accuracy_per_fold"]))
            rows.append({
                "seed": seed, "profile_yaw": [lo, hi], "pairs": pairs,
                "acc": {n: {k: 100 * v for k, v in r["bootstrap"]["intervals"]["acc"].items()}
                        for n, r in res.items()},
                "auc": {n: 100 * r["auc"] for n, r in res.items()},
                "d_prime": {n: d_prime(np.asarray(r["sq_distance"]), same)
                            for n, r in res.items()},
                "gap": gap.as_dict(), "fold_gaps": [float(g) for g in fold_gap],
                "clusters": t["bootstrap"]["clusters"]})
    return {"demo": str(demo), "seed": seed, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("demos", nargs="+", type=Path, help="finished facekd demo folders")
    parser.add_argument("--pairs", type=_ints, default=_ints("1000,7000"),
                        help="set sizes in pairs, e.g. 1000,7000")
    parser.add_argument("--ranges", type=_ranges, default=_ranges("0:8,30:50"),
                        help="profile yaw ranges in degrees, e.g. 0:8,30:50")
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    runs = [score_run(d, args.ranges, args.pairs, args.bootstrap) for d in args.demos]

    def cell(row: dict, name: str) -> str:
        acc = row["acc"].get(name)
        return "-" if acc is None else f"{acc['value']:.2f} [{acc['low']:.2f}, {acc['high']:.2f}]"

    lines = ["# CFP-FP-like set: teacher vs student alone by set size and profile yaw", "",
             "10-fold accuracy (%) with 95 % cluster-bootstrap intervals "
             f"({args.bootstrap} resamples); gap = teacher - student alone on paired "
             "resamples; fold gaps: the gap in each of the 10 folds (each its own people), "
             "min / mean / max and how many folds rank the teacher higher; AUC (%) and d' "
             "as teacher / student alone / student + SRD. Frontal yaw within +-8 deg; the "
             "0-8 row is the pose-free control (both images frontal). Models from the "
             "`facekd demo` runs named below. Training poses: yaw N(0, 14 deg) clipped at 50.",
             "",
             "| seed | pairs | profile yaw (deg) | teacher | student alone | student + SRD "
             "| gap (points) | fold gaps: min / mean / max, teacher ahead | AUC | d' |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for run in runs:
        for row in run["rows"]:
            g, f = row["gap"], np.array(row["fold_gaps"])
            auc = " / ".join(f"{row['auc'][n]:.2f}" if n in row["auc"] else "-" for n in MODELS)
            dp = " / ".join(f"{row['d_prime'][n]:.2f}" if n in row["d_prime"] else "-"
                            for n in MODELS)
            lines.append(
                f"| {row['seed']} | {row['pairs']} | {row['profile_yaw'][0]:g}-"
                f"{row['profile_yaw'][1]:g} | " + " | ".join(cell(row, n) for n in MODELS)
                + f" | {g['value']:+.2f} [{g['low']:+.2f}, {g['high']:+.2f}] | {f.min():+.1f}"
                f" / {f.mean():+.2f} / {f.max():+.1f}, {int((f > 0).sum())} of 10 | {auc} | {dp} |")
    lines += ["", "Clusters per set: " + "; ".join(
        f"{row['pairs']} pairs {row['profile_yaw'][0]:g}-{row['profile_yaw'][1]:g}: "
        f"{row['clusters']}" for row in runs[0]["rows"]) + ".", "",
        "Command: `.venv/bin/python -m bench.cfp_pose "
        + " ".join(str(d) for d in args.demos) + " --pairs "
        + ",".join(str(p) for p in args.pairs) + " --ranges "
        + ",".join(f"{lo:g}:{hi:g}" for lo, hi in args.ranges) + "`", ""]
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_json_atomic(RESULTS / "cfp_pose.json", {"args": {**vars(args), "demos": [
        str(d) for d in args.demos]}, "runs": runs})
    write_text_atomic(RESULTS / "cfp_pose.md", "\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
