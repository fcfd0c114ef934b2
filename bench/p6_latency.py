"""P6: batch-1 CPU latency of the exported student, ONNX FP32/FP16/INT8 vs torch eager.

One run builds the student (``--arch``, default mbf; random weights with non-trivial
BatchNorm statistics unless ``--checkpoint`` is given), exports it through
``facekd.export.onnx_export.export_onnx`` with FP16 and INT8 variants (INT8 calibrated on
256 synthetic aligned faces written to a temporary .bin), then times a batch of one
aligned face on the same thread budget for torch eager and each onnxruntime file.
A fourth file quantises the depthwise convolutions too (facekd keeps them FP32 because
onnxruntime's INT8 depthwise kernel is slower than its FP32 one), to show that choice.
Timings are interleaved round-robin (one call of each engine per round) so machine load
hits every engine alike; the table reports medians, p90 and ratios.

Goals (issue 7): ONNX FP32 <= 0.7x torch eager; INT8 <= 0.5x ONNX FP32.

Run: ``.venv/bin/python -m bench.p6_latency`` (writes bench/results/p6_latency.{md,json}).
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"


def _student(arch: str, checkpoint: str | None, workdir: Path) -> Path:
    """A facekd checkpoint to export: the given one, or a seeded random ``arch``."""
    if checkpoint:
        return Path(checkpoint)
    import torch

    from facekd.models import create_model, save_checkpoint

    torch.manual_seed(0)
    model = create_model(arch)
    for module in model.modules():
        if isinstance(module, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    path = workdir / f"{arch}.pt"
    save_checkpoint(path, model.eval(), arch, {}, meta={"recipe": "bench p6 (random weights)"})
    return path


def _calibration_bin(workdir: Path, count: int) -> Path:
    """``count`` synthetic aligned faces as a .bin (JPEG q95), the INT8 calibration set."""
    import cv2

    from facekd.data.binset import write_bin
    from facekd.export.parity import synthetic_aligned_faces

    faces = synthetic_aligned_faces(count, seed=1234)
    bins = [cv2.imencode(".jpg", f[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes()
            for f in faces]
    path = workdir / "calib.bin"
    write_bin(path, bins, [i % 2 == 0 for i in range(count // 2)])
    return path


def _ort_runner(path: Path, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), sess_options=options,
                                   providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x})[0]


def _op_profile(path: Path, x: np.ndarray, threads: int, runs: int, workdir: Path) -> dict:
    """Milliseconds per run spent in each op type (onnxruntime's profiler), after warm-up."""
    import json

    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    options.enable_profiling = True
    options.profile_file_prefix = str(workdir / f"profile_{path.stem}")
    session = ort.InferenceSession(str(path), sess_options=options,
                                   providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    for _ in range(runs):
        session.run(None, {name: x})
    events = json.loads(Path(session.end_profiling()).read_text())
    per_op: dict[str, float] = {}
    for event in events:
        if event.get("cat") == "Node" and event.get("name", "").endswith("_kernel_time"):
            op = event["args"]["op_name"]
            per_op[op] = per_op.get(op, 0.0) + event["dur"] / 1e3 / runs
    return dict(sorted(per_op.items(), key=lambda kv: -kv[1]))


def _torch_runner(model, threads: int):
    import torch

    torch.set_num_threads(threads)
    model.eval()

    def run(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(x)).numpy()

    return run


def _time_interleaved(runners: dict, x: np.ndarray, warmup: int, rounds: int) -> dict:
    """Per-engine latencies (ms) measured round-robin, one call each per round."""
    for _ in range(warmup):
        for run in runners.values():
            run(x)
    times: dict[str, list[float]] = {name: [] for name in runners}
    for r in range(rounds):
        names = list(runners)
        names = names[r % len(names):] + names[:r % len(names)]   # rotate the order
        for name in names:
            start = time.perf_counter()
            runners[name](x)
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: {"median_ms": float(np.median(t)), "p10_ms": float(np.percentile(t, 10)),
                   "p90_ms": float(np.percentile(t, 90)), "runs": len(t)}
            for name, t in times.items()}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="mbf")
    parser.add_argument("--checkpoint", help="facekd checkpoint to use instead of random weights")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per engine")
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--calib", type=int, default=256, help="INT8 calibration images")
    parser.add_argument("--profile-runs", type=int, default=30,
                        help="runs of onnxruntime's per-op profiler (FP32, INT8)")
    parser.add_argument("--out", default=str(RESULTS / "p6_latency"))
    args = parser.parse_args(argv)

    from facekd.export.onnx_export import export_onnx, load_student, variant_path
    from facekd.export.parity import synthetic_aligned_faces, to_model_input
    from facekd.export.quantize import load_calibration_images, quantize_int8
    from facekd.fileio import write_json_atomic, write_text_atomic

    with tempfile.TemporaryDirectory(prefix="facekd-p6-") as tmp:
        workdir = Path(tmp)
        ckpt = _student(args.arch, args.checkpoint, workdir)
        out = workdir / "student.onnx"
        t0 = time.perf_counter()
        card = export_onnx(ckpt, out, fp16=True, int8=True,
                           calib_data=_calibration_bin(workdir, args.calib),
                           calib_count=args.calib)
        export_s = time.perf_counter() - t0
        # For comparison: INT8 with the depthwise convolutions quantised too (not shipped).
        all_int8 = workdir / "student.int8_all.onnx"
        quantize_int8(out, all_int8, load_calibration_images(workdir / "calib.bin", args.calib),
                      normalize_inside=False, keep_depthwise_fp32=False)
        model = load_student(ckpt).model
        runners = {"torch_eager": _torch_runner(model, args.threads)}
        for variant in ("fp32", "fp16", "int8"):
            runners[f"onnx_{variant}"] = _ort_runner(variant_path(out, variant), args.threads)
        runners["onnx_int8_all_layers"] = _ort_runner(all_int8, args.threads)
        x = to_model_input(synthetic_aligned_faces(1, seed=77))
        timings = _time_interleaved(runners, x, args.warmup, args.rounds)
        profiles = {variant: _op_profile(variant_path(out, variant), x, args.threads,
                                         args.profile_runs, workdir)
                    for variant in ("fp32", "int8")}

    med = {k: v["median_ms"] for k, v in timings.items()}
    ratios = {
        "onnx_fp32 / torch_eager": med["onnx_fp32"] / med["torch_eager"],
        "onnx_fp16 / onnx_fp32": med["onnx_fp16"] / med["onnx_fp32"],
        "onnx_int8 / onnx_fp32": med["onnx_int8"] / med["onnx_fp32"],
        "onnx_int8 / torch_eager": med["onnx_int8"] / med["torch_eager"],
        "onnx_int8_all_layers / onnx_fp32": med["onnx_int8_all_layers"] / med["onnx_fp32"],
    }
    goals = {"onnx_fp32 / torch_eager": 0.7, "onnx_int8 / onnx_fp32": 0.5}
    parity = {v: card["variants"][v]["parity"]["max_one_minus_cos"]
              for v in ("fp32", "fp16", "int8")}
    sizes = {v: card["variants"][v]["bytes"] for v in ("fp32", "fp16", "int8")}
    import onnxruntime
    import torch

    result = {
        "benchmark": "p6_latency", "arch": args.arch,
        "weights": args.checkpoint or "random (seed 0)",
        "params": card["model"]["params"], "macs": card["model"]["macs"],
        "threads": args.threads, "rounds": args.rounds, "warmup": args.warmup,
        "export_seconds": export_s, "timings": timings, "ratios": ratios, "goals": goals,
        "goals_met": {k: ratios[k] <= g for k, g in goals.items()},
        "parity_max_one_minus_cos": parity, "file_bytes": sizes,
        "op_profile_ms": profiles,
        "machine": {"cpu_count": os.cpu_count(), "processor": platform.processor(),
                    "load_average_1m": os.getloadavg()[0], "torch": torch.__version__,
                    "onnxruntime": onnxruntime.__version__},
    }
    out_base = Path(args.out)
    write_json_atomic(out_base.with_suffix(".json"), result)
    write_text_atomic(out_base.with_suffix(".md"), _markdown(result))
    print(_markdown(result))
    return result


def _markdown(r: dict) -> str:
    lines = [
        f"# P6: batch-1 CPU latency, `{r['arch']}` ({r['params'] / 1e6:.2f} M params, "
        f"{r['macs'] / 1e9:.3f} GMACs)",
        "",
        f"{r['threads']} thread(s) per engine, {r['rounds']} interleaved rounds after "
        f"{r['warmup']} warm-up rounds; weights: {r['weights']}. 1-minute load average at the "
        f"end: {r['machine']['load_average_1m']:.1f} on {r['machine']['cpu_count']} CPUs "
        f"(shared machine: absolute times are noisy, ratios less so).",
        "",
        "| engine | median ms | p10 ms | p90 ms | file MB | max 1-cos vs torch |",
        "|---|---|---|---|---|---|",
    ]
    for name, t in r["timings"].items():
        variant = name.removeprefix("onnx_")
        size = r["file_bytes"].get(variant)
        cos = r["parity_max_one_minus_cos"].get(variant)
        lines.append(f"| {name} | {t['median_ms']:.2f} | {t['p10_ms']:.2f} | {t['p90_ms']:.2f} "
                     f"| {size / 1e6:.2f} | {cos:.2e} |" if size is not None else
                     f"| {name} | {t['median_ms']:.2f} | {t['p10_ms']:.2f} | "
                     f"{t['p90_ms']:.2f} | – | – |")
    lines += ["", "| ratio (median) | value | goal | met |", "|---|---|---|---|"]
    for name, value in r["ratios"].items():
        goal = r["goals"].get(name)
        met = "–" if goal is None else ("yes" if value <= goal else "**no**")
        lines.append(f"| {name} | {value:.3f} | {'≤ ' + str(goal) if goal else '–'} | {met} |")
    profiles = r.get("op_profile_ms") or {}
    if profiles:
        ops = sorted({op for p in profiles.values() for op in p},
                     key=lambda op: -max(p.get(op, 0.0) for p in profiles.values()))
        lines += ["", "Where the time goes (onnxruntime profiler, ms per run, kernel time by op "
                  "type; PRelu has no INT8 kernel, so INT8 runs it in FP32 between "
                  "Dequantize/Quantize):", "",
                  "| op | " + " | ".join(profiles) + " |",
                  "|---|" + "---|" * len(profiles)]
        for op in ops[:10]:
            lines.append(f"| {op} | " + " | ".join(f"{p.get(op, 0.0):.2f}"
                                                   for p in profiles.values()) + " |")
        lines.append("| total | " + " | ".join(f"{sum(p.values()):.2f}"
                                                for p in profiles.values()) + " |")
    lines += ["", "Command: `.venv/bin/python -m bench.p6_latency"
              + (f" --arch {r['arch']}" if r["arch"] != "mbf" else "")
              + (f" --threads {r['threads']}" if r["threads"] != 1 else "") + "`", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
