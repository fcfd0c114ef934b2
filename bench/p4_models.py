"""P4: backbone sizes and CPU cost, and what Partial FC sampling saves, in one run.

Part 1 builds every registered student-sized backbone (plus r18/r50 as teacher
reference), counts parameters and MACs at 112x112 (``facekd.models.flops``) and times a
batch-1 eval forward and a batch-16 train step (forward + backward) on CPU. Part 2 times
one classifier step (forward + backward of the CE over margin logits) of a plain
ArcFace head against Partial FC at several ``sample_rate`` values on the same
embeddings. Timings are interleaved round-robin (one call of each case per round) so
machine load hits all cases alike; tables report medians and ratios to a reference row.

Run: ``.venv/bin/python -m bench.p4_models`` (writes bench/results/p4_models.{md,json}).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from facekd.fileio import write_json_atomic, write_text_atomic
from facekd.models import create_head, create_model
from facekd.models.flops import count_macs, count_params
from facekd.models.partial_fc import PartialFC

RESULTS = Path(__file__).resolve().parent / "results"


def _interleaved(cases: dict[str, Callable[[], None]], rounds: int) -> dict[str, float]:
    """Median seconds per case, one call of each case per round after one warm-up call."""
    for fn in cases.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(rounds):
        for name, fn in cases.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def bench_backbones(archs: list[str], rounds: int, train_batch: int) -> list[dict]:
    torch.manual_seed(0)
    one = torch.rand(1, 3, 112, 112) * 2 - 1
    batch = torch.rand(train_batch, 3, 112, 112) * 2 - 1
    models = {a: create_model(a) for a in archs}
    rows = {a: {"arch": a, "params_m": count_params(m) / 1e6, "gmacs": count_macs(m) / 1e9,
                "embedding": int(m.num_features)} for a, m in models.items()}

    def infer(model):
        def run() -> None:
            model.eval()
            with torch.no_grad():
                model(one)
        return run

    def train(model):
        def run() -> None:
            model.train()
            model.zero_grad(set_to_none=True)
            model(batch).pow(2).mean().backward()
        return run

    latency = _interleaved({a: infer(m) for a, m in models.items()}, rounds)
    students = [a for a in archs if rows[a]["params_m"] < 10]
    step = _interleaved({a: train(models[a]) for a in students}, max(2, rounds // 2))
    for a in archs:
        rows[a]["infer_b1_ms"] = latency[a] * 1e3
        rows[a]["train_step_ms"] = step[a] * 1e3 if a in step else None
    return list(rows.values())


def bench_partial_fc(classes: int, dim: int, batch: int, rates: list[float],
                     rounds: int) -> list[dict]:
    torch.manual_seed(0)
    emb = torch.randn(batch, dim)
    labels = torch.randint(0, classes, (batch,))
    head = create_head("arcface", dim, classes)

    def plain() -> None:
        head.zero_grad(set_to_none=True)
        x = emb.clone().requires_grad_(True)
        F.cross_entropy(head(x, labels), labels).backward()

    cases: dict[str, Callable[[], None]] = {"MarginHead (all classes)": plain}
    for rate in rates:
        pfc = PartialFC(dim, classes, sample_rate=rate)
        pfc.train()

        def step(pfc=pfc) -> None:
            pfc.zero_grad(set_to_none=True)
            x = emb.clone().requires_grad_(True)
            pfc(x, labels).backward()
        cases[f"PartialFC sample_rate={rate}"] = step
    med = _interleaved(cases, rounds)
    base = med["MarginHead (all classes)"]
    return [{"case": name, "ms": t * 1e3, "ratio": t / base} for name, t in med.items()]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", nargs="+",
                        default=["mbf_tiny", "r_tiny", "mobilefacenet", "mbf", "r18", "r50"])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--train-batch", type=int, default=16)
    parser.add_argument("--classes", type=int, default=50_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--pfc-batch", type=int, default=128)
    parser.add_argument("--rates", nargs="+", type=float, default=[1.0, 0.3, 0.1])
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    backbones = bench_backbones(args.archs, args.rounds, args.train_batch)
    pfc = bench_partial_fc(args.classes, args.dim, args.pfc_batch, args.rates, args.rounds)
    ref = next(r for r in backbones if r["arch"] == "mbf") if any(
        r["arch"] == "mbf" for r in backbones) else backbones[0]
    env = {"torch": torch.__version__, "threads": torch.get_num_threads(),
           "cpu": platform.processor() or platform.machine(),
           "load_average": os.getloadavg()[0]}
    result = {"env": env, "args": {k: (str(v) if isinstance(v, Path) else v)
                                   for k, v in vars(args).items()},
              "backbones": backbones, "partial_fc": pfc}

    lines = ["# P4: backbone cost and Partial FC sampling", "",
             f"torch {env['torch']}, {env['threads']} CPU threads, load average "
             f"{env['load_average']:.1f} at the start of the run (shared machine: compare "
             "ratios, not absolute times). Command: "
             f"`python -m bench.p4_models {' '.join(argv if argv is not None else sys.argv[1:])}`",
             "",
             "## Backbones (112x112)", "",
             "| arch | params (M) | GMACs | emb | batch-1 infer ms | x mbf | "
             f"train step b{args.train_batch} ms | x mbf |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in backbones:
        step = r["train_step_ms"]
        step_txt = f"{step:.1f} | {step / ref['train_step_ms']:.2f}" if step and \
            ref["train_step_ms"] else "– | –"
        lines.append(f"| {r['arch']} | {r['params_m']:.2f} | {r['gmacs']:.3f} | "
                     f"{r['embedding']} | {r['infer_b1_ms']:.1f} | "
                     f"{r['infer_b1_ms'] / ref['infer_b1_ms']:.2f} | {step_txt} |")
    lines += ["", f"## Classifier step: {args.classes} classes, {args.dim}-d, batch "
              f"{args.pfc_batch} (forward + backward of the CE)", "",
              "| case | ms | ratio |", "|---|---:|---:|"]
    lines += [f"| {r['case']} | {r['ms']:.1f} | {r['ratio']:.3f} |" for r in pfc]
    args.out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.out / "p4_models.md", "\n".join(lines) + "\n")
    write_json_atomic(args.out / "p4_models.json", result)
    print("\n".join(lines))
    return result


if __name__ == "__main__":
    main()
