"""P8: batch-1 latency of the student in ONNX Runtime, NCNN and LiteRT, FP32/FP16/INT8.

For each architecture (``--arch``, default mbf and mobilefacenet; seeded random weights
with non-trivial BatchNorm statistics and PReLU slopes U(-0.2, 1.3), as in P6, unless
``--checkpoint`` gives a trained student) one run exports every file through facekd's own
commands (``export_onnx`` and ``export_edge`` for ncnn and tflite, FP16 + INT8, INT8
calibrated on the same images for all three: 256 synthetic aligned faces in a temporary
.bin unless ``--calib-data``), then times a batch of one aligned face in each runtime's
Python package on 1 and 2 threads. Each file's calls run in blocks, three passes with the
order rotated (:func:`bench.p6_latency.time_blocks`: no runtime's spinning worker threads
slow the next file, and machine load hits every file alike); wall and CPU-time
(``time.process_time``) medians are reported, and the load average before and after.
With ``--eval-bin`` (meaningful with a trained checkpoint) each file's verification
accuracy is measured in its runtime.

Goals (issue 18): each runtime's INT8 within 1 point of its FP32 accuracy and <= 0.5x
its FP32 latency; and which runtime is fastest for these models here. One more row,
``litert/int8_prelu_op``, is LiteRT's INT8 of the plain graph (PRELU ops, not run by
XNNPACK in INT8), to show what the shipped file's PReLU-as-depthwise-convs changes. Two
more, ``litert/int8_no_prelu`` and ``ncnn/int8_no_prelu``, are those INT8 files with every
PReLU removed (profiling only, :mod:`bench.p8_floor`): their ratio to FP32 is the floor no
PReLU lowering can beat, i.e. what the runtime's INT8 convolutions give by themselves.

Run: ``.venv/bin/python -m bench.p8_edge`` (writes bench/results/p8_edge.{md,json}).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.p6_latency import PASSES, _calibration_bin, _ort_runner, _student, time_blocks

RESULTS = Path(__file__).resolve().parent / "results"
RUNTIMES = ("onnxruntime", "ncnn", "litert")
PRECISIONS = ("fp32", "fp16", "int8")
PRELU_OP = "litert/int8_prelu_op"  # the INT8 graph with PRELU ops, for comparison only
FLOORS = {"litert": "litert/int8_no_prelu", "ncnn": "ncnn/int8_no_prelu"}  # profiling only
EXTRA = (PRELU_OP, *FLOORS.values())


def _export_all(ckpt: Path, workdir: Path, calib: Path, calib_count: int,
                eval_bin: str | None) -> tuple[dict, dict, dict]:
    """Every file of one student: {(runtime, precision): files}, cards, export seconds."""
    from facekd.export import edge
    from facekd.export.ncnn_export import NcnnFormat
    from facekd.export.onnx_export import export_onnx, variant_path
    from facekd.export.tflite_export import TfliteFormat

    files, cards, seconds = {}, {}, {}
    t0 = time.perf_counter()
    onnx_out = workdir / "student.onnx"
    cards["onnxruntime"] = export_onnx(ckpt, onnx_out, fp16=True, int8=True, calib_data=calib,
                                       calib_count=calib_count, eval_bin=eval_bin, force=True)
    seconds["onnxruntime"] = time.perf_counter() - t0
    for p in PRECISIONS:
        files["onnxruntime", p] = [variant_path(onnx_out, p)]
    for runtime, fmt in (("ncnn", NcnnFormat()), ("litert", TfliteFormat())):
        t0 = time.perf_counter()
        out = workdir / f"student{fmt.suffix}"
        cards[runtime] = edge.export_edge(fmt, ckpt, out, fp16=True, int8=True,
                                          calib_data=calib, calib_count=calib_count,
                                          eval_bin=eval_bin, force=True)
        seconds[runtime] = time.perf_counter() - t0
        for p in PRECISIONS:
            files[runtime, p] = fmt.files(edge.variant_path(out, p))
    return files, cards, seconds


def _litert_int8_prelu_op(ckpt: Path, workdir: Path, calib: Path, count: int,
                          eval_bin: str | None) -> dict:
    """The LiteRT INT8 file quantised from the plain graph (PRELU ops, which XNNPACK does
    not run in INT8), to show what writing PReLU as a 1x1 depthwise conv + ADD changes."""
    import onnx

    from facekd.export.calibration import load_calibration_images
    from facekd.export.onnx_export import load_student, trace_to_onnx
    from facekd.export.parity import (
        synthetic_aligned_faces,
        to_model_input,
        torch_embeddings,
    )
    from facekd.export.tflite_export import TfliteEmbedder, quantize_int8
    from facekd.export.tflite_lower import onnx_to_tflite
    from facekd.export.variants import accuracy_of

    student = load_student(ckpt)
    trace = workdir / "plain.onnx"
    trace_to_onnx(student.model, trace)
    path = workdir / "student.int8_prelu_op.tflite"
    path.write_bytes(quantize_int8(onnx_to_tflite(onnx.load(str(trace))),
                                   load_calibration_images(calib, count),
                                   normalize_inside=False))
    x = to_model_input(synthetic_aligned_faces(16, seed=0))
    ref = torch_embeddings(student.model, x)
    got = TfliteEmbedder(path, normalize_inside=False)(x)
    cos = (ref * got).sum(1) / np.linalg.norm(ref, axis=1) / np.linalg.norm(got, axis=1)
    accuracy = None
    if eval_bin:
        from facekd.evaluate import evaluate_bin

        accuracy = accuracy_of(evaluate_bin(TfliteEmbedder(path, normalize_inside=False),
                                            eval_bin, use_cache=False, progress=False))
    return {"path": path, "one_minus_cos": float((1 - cos).max()), "accuracy": accuracy}


def _floor_files(files: dict, workdir: Path, calib: Path, count: int) -> dict[str, list[Path]]:
    """The LiteRT and NCNN INT8 files without PReLUs (:mod:`bench.p8_floor`)."""
    from bench.p8_floor import litert_int8_without_prelu, ncnn_int8_without_prelu
    from facekd.export.calibration import load_calibration_images

    images = load_calibration_images(calib, count)
    return {"litert": [litert_int8_without_prelu(files["onnxruntime", "fp32"][0], workdir,
                                                 images)],
            "ncnn": ncnn_int8_without_prelu(*files["ncnn", "fp32"], workdir, images)}


def _runner(runtime: str, precision: str, paths: list[Path], threads: int):
    """A batch-1 callable for one file in its own runtime package."""
    if runtime == "onnxruntime":
        return _ort_runner(paths[0], threads)
    if runtime == "ncnn":
        from facekd.export.ncnn_export import NcnnFormat

        return NcnnFormat().embedder(paths, precision, normalize_inside=False, threads=threads)
    from facekd.export.tflite_export import TfliteEmbedder

    return TfliteEmbedder(paths[0], normalize_inside=False, threads=threads)


def _bench_arch(arch: str, args: argparse.Namespace, workdir: Path) -> dict:
    ckpt = _student(arch, args.checkpoint, workdir)
    calib = Path(args.calib_data) if args.calib_data else _calibration_bin(workdir, args.calib)
    files, cards, export_s = _export_all(ckpt, workdir, calib, args.calib, args.eval_bin)
    prelu_op = _litert_int8_prelu_op(ckpt, workdir, calib, args.calib, args.eval_bin)
    floors = _floor_files(files, workdir, calib, args.calib)
    x = _input(args)
    timings: dict[str, dict] = {}
    for threads in args.threads:
        runners = {f"{r}/{p}": _runner(r, p, files[r, p], threads)
                   for r in RUNTIMES for p in PRECISIONS}
        runners[PRELU_OP] = _runner("litert", "int8", [prelu_op["path"]], threads)
        for runtime, key in FLOORS.items():
            runners[key] = _runner(runtime, "int8", floors[runtime], threads)
        timings[str(threads)] = time_blocks(runners, x, args.warmup, args.rounds)
    rows = {}
    for r in RUNTIMES:
        for p in PRECISIONS:
            info = cards[r]["variants"][p]
            evaluation = info.get("evaluation") or {}
            rows[f"{r}/{p}"] = {
                "runtime": r, "precision": p, "file": info["file"],
                "bytes": info.get("bytes") or sum(f.stat().st_size for f in files[r, p]),
                "max_one_minus_cos_vs_torch": info["parity"]["max_one_minus_cos"],
                "accuracy": evaluation.get("accuracy"),
                "drop_vs_fp32": evaluation.get("drop_vs_fp32"),
                "latency": {t: timings[t][f"{r}/{p}"] for t in timings}}
    base = rows["litert/fp32"]["accuracy"]
    rows[PRELU_OP] = {
        "runtime": "litert", "precision": "int8, PRELU ops (not shipped)",
        "file": prelu_op["path"].name, "bytes": prelu_op["path"].stat().st_size,
        "max_one_minus_cos_vs_torch": prelu_op["one_minus_cos"],
        "accuracy": prelu_op["accuracy"],
        "drop_vs_fp32": (None if base is None or prelu_op["accuracy"] is None
                         else base - prelu_op["accuracy"]),
        "latency": {t: timings[t][PRELU_OP] for t in timings}}
    for runtime, key in FLOORS.items():
        rows[key] = {
            "runtime": runtime, "precision": "int8 without PReLU (profiling floor, not shipped)",
            "file": floors[runtime][0].name,
            "bytes": sum(f.stat().st_size for f in floors[runtime]),
            "max_one_minus_cos_vs_torch": None, "accuracy": None, "drop_vs_fp32": None,
            "latency": {t: timings[t][key] for t in timings}}
    goals = {}
    for r in RUNTIMES:
        fp32, int8 = rows[f"{r}/fp32"], rows[f"{r}/int8"]
        for t in timings:
            wall = int8["latency"][t]["median_ms"] / fp32["latency"][t]["median_ms"]
            cpu = int8["latency"][t]["cpu_median_ms"] / fp32["latency"][t]["cpu_median_ms"]
            goals[f"{r} int8/fp32 latency, {t} thread(s)"] = {
                "wall": wall, "cpu": cpu, "goal": 0.5, "met": wall <= 0.5 and cpu <= 0.5}
            if r in FLOORS:
                floor = rows[FLOORS[r]]["latency"][t]
                goals[f"{r} int8/fp32 latency, {t} thread(s)"]["floor_without_prelu"] = {
                    "wall": floor["median_ms"] / fp32["latency"][t]["median_ms"],
                    "cpu": floor["cpu_median_ms"] / fp32["latency"][t]["cpu_median_ms"]}
        drop = int8["drop_vs_fp32"]
        goals[f"{r} int8 accuracy drop"] = {
            "drop": drop, "goal": 0.01, "met": None if drop is None else drop <= 0.01}
    fastest = {}
    for t in timings:
        for p in PRECISIONS:
            best = min(RUNTIMES, key=lambda r, p=p, t=t: rows[f"{r}/{p}"]["latency"][t]
                       ["cpu_median_ms"])
            fastest[f"{p}, {t} thread(s)"] = best
        best = min((k for k in rows if k not in EXTRA),
                   key=lambda k, t=t: rows[k]["latency"][t]["cpu_median_ms"])
        fastest[f"any, {t} thread(s)"] = best
    model = cards["onnxruntime"]["model"]
    return {"arch": model["arch"], "params": model["params"], "macs": model["macs"],
            "weights": args.checkpoint or "random (seed 0), PReLU slopes U(-0.2, 1.3)",
            "export_seconds": export_s, "rows": rows, "goals": goals, "fastest": fastest,
            "settings": {r: cards[r]["variants"]["int8"].get("quantization", {})
                         for r in RUNTIMES}}


def _input(args: argparse.Namespace) -> np.ndarray:
    from facekd.export.parity import synthetic_aligned_faces, to_model_input

    return to_model_input(synthetic_aligned_faces(1, seed=77))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", nargs="+", default=["mbf", "mobilefacenet"])
    parser.add_argument("--checkpoint", help="trained facekd checkpoint (one --arch: its own)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=8)
    parser.add_argument("--calib", type=int, default=256, help="INT8 calibration images")
    parser.add_argument("--calib-data", help="calibration source (.bin, RecordIO or shards) "
                        "instead of synthetic faces")
    parser.add_argument("--eval-bin", help=".bin set: every file's accuracy in its runtime")
    parser.add_argument("--out", default=str(RESULTS / "p8_edge"))
    args = parser.parse_args(argv)
    if args.checkpoint and len(args.arch) > 1:
        parser.error("--checkpoint is one student: pass its --arch only")

    import ai_edge_litert.interpreter  # noqa: F401  (fail before the exports if missing)
    import ncnn
    import onnxruntime

    from facekd.export.ncnn_export import versions
    from facekd.fileio import write_json_atomic, write_text_atomic

    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    archs = []
    for arch in args.arch:
        with tempfile.TemporaryDirectory(prefix="facekd-p8-") as tmp:
            archs.append(_bench_arch(arch, args, Path(tmp)))
    from importlib.metadata import version

    result = {
        "benchmark": "p8_edge", "archs": archs, "threads": args.threads,
        "rounds": args.rounds, "warmup": args.warmup, "calibration_images": args.calib,
        "eval_bin": args.eval_bin, "seconds": time.perf_counter() - started,
        "command": " ".join([".venv/bin/python -m bench.p8_edge",
                             *(argv if argv is not None else sys.argv[1:])]),
        "machine": {"cpu_count": os.cpu_count(), "processor": platform.processor(),
                    "machine": platform.machine(), **_cpu(), "load_average_1m_before": load_before,
                    "load_average_1m_after": os.getloadavg()[0],
                    "onnxruntime": onnxruntime.__version__, "ncnn": ncnn.__version__,
                    "pnnx": versions().get("pnnx"),
                    "ai_edge_litert": version("ai-edge-litert")},
    }
    out_base = Path(args.out)
    write_json_atomic(out_base.with_suffix(".json"), result)
    write_text_atomic(out_base.with_suffix(".md"), _markdown(result))
    print(_markdown(result))
    return result


def _markdown(r: dict) -> str:
    m = r["machine"]
    threads = [str(t) for t in r["threads"]]
    lines = [
        "# P8: batch-1 latency on the on-device runtimes (CPU)", "",
        f"{r['rounds']} calls per file and thread count, in {PASSES} passes of blocks "
        f"(order rotated; each block after {r['warmup']} warm-up calls and a pause, so no "
        f"runtime's spinning worker threads slow the next file); every file exported by "
        f"facekd (`export onnx`, `export ncnn`, `export tflite`, "
        f"INT8 calibrated on the same {r['calibration_images']} images) and run in its own "
        f"package: onnxruntime {m['onnxruntime']}, ncnn {m['ncnn']} (pnnx {m['pnnx']}), "
        f"ai-edge-litert {m['ai_edge_litert']} (XNNPACK). {m['cpu_count']} CPUs "
        f"({m.get('cpu_model') or m['machine']}{_flags(m.get('cpu_int8_flags'))}); "
        f"1-minute load average {m['load_average_1m_before']:.1f} before, "
        f"{m['load_average_1m_after']:.1f} after: the machine is shared, so compare ratios "
        f"and CPU ms (`time.process_time` per call) rather than absolute wall times.", ""]
    for a in r["archs"]:
        lines += [f"## `{a['arch']}` ({a['params'] / 1e6:.2f} M params, {a['macs'] / 1e9:.3f} "
                  f"GMACs; weights: {a['weights']})", "",
                  "| runtime | precision | MB | max 1-cos vs torch | accuracy | drop | "
                  + " | ".join(f"{t} thr wall ms | {t} thr CPU ms" for t in threads) + " |",
                  "|---|---|---|---|---|---|" + "---|---|" * len(threads)]
        for row in a["rows"].values():
            acc = row["accuracy"]
            drop = row["drop_vs_fp32"]
            lines.append(
                f"| {row['runtime']} | {row['precision']} | {row['bytes'] / 1e6:.2f} | "
                f"{_sci(row['max_one_minus_cos_vs_torch'])} | "
                f"{'–' if acc is None else f'{acc:.4f}'} | "
                f"{'–' if drop is None else f'{drop:+.4f}'} | "
                + " | ".join(f"{row['latency'][t]['median_ms']:.2f} | "
                             f"{row['latency'][t]['cpu_median_ms']:.2f}" for t in threads)
                + " |")
        lines += ["", "| goal | value | target | met |", "|---|---|---|---|"]
        for name, g in a["goals"].items():
            if "drop" in g:
                value = "not measured (no --eval-bin)" if g["drop"] is None else \
                    f"{g['drop']:+.4f}"
                met = "–" if g["met"] is None else ("yes" if g["met"] else "**no**")
                lines.append(f"| {name} | {value} | ≤ {g['goal']} | {met} |")
            else:
                floor = g.get("floor_without_prelu")
                note = "" if floor is None else (
                    f" (without PReLU: wall {floor['wall']:.3f}, CPU {floor['cpu']:.3f})")
                lines.append(f"| {name} | wall {g['wall']:.3f}, CPU {g['cpu']:.3f}{note} | "
                             f"≤ {g['goal']} | {'yes' if g['met'] else '**no**'} |")
        lines += ["", "Fastest (CPU median): " + "; ".join(
            f"{k}: {v}" for k, v in a["fastest"].items()) + ".", ""]
    lines += [f"Command: `{r['command']}` ({r['seconds'] / 60:.1f} min)", ""]
    return "\n".join(lines)


def _cpu() -> dict:
    """CPU model and the ISA flags the runtimes' INT8 kernels dispatch on (VNNI or not is
    what decides whether x86 INT8 convolutions beat FP32 ones)."""
    wanted = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8")
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    model = next((line.split(":", 1)[1].strip() for line in text.splitlines()
                  if line.startswith("model name")), None)
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines()
                  if line.startswith("flags")), [])
    return {"cpu_model": model, "cpu_int8_flags": [f for f in wanted if f in flags]}


def _flags(flags: list[str] | None) -> str:
    if flags is None:  # a result written before the bench recorded them
        return ""
    return "; " + (", ".join(flags) or "no AVX2/AVX-512/VNNI/AMX flags")


def _sci(value: float | None) -> str:
    return "–" if value is None else f"{value:.2e}"


if __name__ == "__main__":
    main()
