"""Why the latency benches time each file in blocks: the same three FP32 files (ONNX
Runtime, NCNN, LiteRT) timed one call per file per round (each round's order rotated)
and in blocks (:func:`bench.p6_latency.time_blocks`), on 1 and 2 threads, in one run.

At 2 threads every runtime keeps worker threads that spin-wait after a call; on a 2-core
machine a spinning pool left by the previous file takes the core the next file's second
thread needs, so round-robin timing charges one runtime for another's threads. At 1
thread there are no worker threads and the two timers should agree.

Run: ``.venv/bin/python -m bench.timer_crosstalk`` (writes
bench/results/timer_crosstalk.{md,json}; about a minute).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.p6_latency import _ort_runner, _student, time_blocks

RESULTS = Path(__file__).resolve().parent / "results"


def time_round_robin(runners: dict, x: np.ndarray, warmup: int, rounds: int) -> dict:
    """The timer the benches used before: one call of each file per round."""
    for _ in range(warmup):
        for run in runners.values():
            run(x)
    wall: dict[str, list[float]] = {name: [] for name in runners}
    names = list(runners)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            start = time.perf_counter()
            runners[name](x)
            wall[name].append((time.perf_counter() - start) * 1e3)
    return {name: {"median_ms": float(np.median(wall[name]))} for name in runners}


def _runners(workdir: Path, arch: str, threads: int) -> dict:
    from facekd.export.edge import export_edge
    from facekd.export.ncnn_export import NcnnFormat
    from facekd.export.onnx_export import export_onnx
    from facekd.export.tflite_export import TfliteEmbedder, TfliteFormat

    onnx_path, param, tflite = (workdir / "s.onnx", workdir / "s.param", workdir / "s.tflite")
    if not onnx_path.is_file():
        ckpt = _student(arch, None, workdir)
        export_onnx(ckpt, onnx_path, force=True)
        export_edge(NcnnFormat(), ckpt, param, force=True)
        export_edge(TfliteFormat(), ckpt, tflite, force=True)
    return {"onnxruntime": _ort_runner(onnx_path, threads),
            "ncnn": NcnnFormat().embedder(NcnnFormat().files(param), "fp32",
                                          normalize_inside=False, threads=threads),
            "litert": TfliteEmbedder(tflite, normalize_inside=False, threads=threads)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="mbf")
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--out", default=str(RESULTS / "timer_crosstalk"))
    args = parser.parse_args(argv)

    from facekd.export.parity import synthetic_aligned_faces, to_model_input
    from facekd.fileio import write_json_atomic, write_text_atomic

    x = to_model_input(synthetic_aligned_faces(1, seed=77))
    load_before = os.getloadavg()[0]
    rows = {}
    with tempfile.TemporaryDirectory(prefix="facekd-timer-") as tmp:
        for threads in (1, 2):
            runners = _runners(Path(tmp), args.arch, threads)
            if threads == 1:
                robin = time_round_robin(runners, x, args.warmup, args.rounds)
                blocks = time_blocks(runners, x, args.warmup, args.rounds)
            else:  # blocks first here: any warm-up or load trend then favours round robin
                blocks = time_blocks(runners, x, args.warmup, args.rounds)
                robin = time_round_robin(runners, x, args.warmup, args.rounds)
            rows[threads] = {name: {"round_robin_ms": robin[name]["median_ms"],
                                    "blocks_ms": blocks[name]["median_ms"]}
                             for name in runners}
    result = {"benchmark": "timer_crosstalk", "arch": args.arch, "rounds": args.rounds,
              "rows": rows, "cpu_count": os.cpu_count(),
              "load_average_1m_before": load_before,
              "load_average_1m_after": os.getloadavg()[0],
              "command": " ".join([".venv/bin/python -m bench.timer_crosstalk",
                                   *(argv if argv is not None else sys.argv[1:])])}
    write_json_atomic(Path(args.out).with_suffix(".json"), result)
    write_text_atomic(Path(args.out).with_suffix(".md"), _markdown(result))
    print(_markdown(result))
    return result


def _markdown(r: dict) -> str:
    lines = [f"# Round-robin vs block timing, `{r['arch']}` FP32, batch 1", "",
             f"Median wall ms of {r['rounds']} calls per file; {r['cpu_count']} CPUs, "
             f"1-minute load average {r['load_average_1m_before']:.1f} before, "
             f"{r['load_average_1m_after']:.1f} after.", "",
             "| threads | runtime | round robin ms | blocks ms | round robin / blocks |",
             "|---|---|---|---|---|"]
    for threads, runtimes in r["rows"].items():
        for name, row in runtimes.items():
            lines.append(f"| {threads} | {name} | {row['round_robin_ms']:.2f} | "
                         f"{row['blocks_ms']:.2f} | "
                         f"{row['round_robin_ms'] / row['blocks_ms']:.2f} |")
    lines += ["", f"Command: `{r['command']}`", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
