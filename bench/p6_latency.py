"""P6: batch-1 CPU latency of the exported student, ONNX FP32/FP16/INT8 vs torch eager.

One run builds the student (``--arch``, default mbf; random weights with non-trivial
BatchNorm statistics and per-channel PReLU slopes in [-0.2, 1.3] unless ``--checkpoint``
is given), exports it through ``facekd.export.onnx_export.export_onnx`` with FP16 and
INT8 variants (INT8 calibrated on 256 synthetic aligned faces written to a temporary
.bin), then times a batch of one aligned face on the same thread budget for torch eager
and each onnxruntime file. Two more files put the INT8 gain in context:

* ``onnx_int8_prev``: the previous INT8 recipe (plain QDQ; PRelu, grouped and depthwise
  convolutions FP32), to show what the current recipe (every layer INT8) changes;
* ``onnx_fp32_rewritten``: the FP32 file with the same exact graph algebra the INT8
  recipe uses (grouped conv split, slopes folded, stem input padded to 4 channels, PRelu
  as Max(x, a*x)), so the INT8 gain is not credited with what the rewrites alone give.

Timings are blocks of consecutive calls per engine, in three passes with the order
rotated (:func:`time_blocks`), so machine load hits every engine alike and no engine's
spinning worker threads slow the next; the table reports wall and CPU-time
(``time.process_time``) medians and ratios of both. The onnxruntime profiler gives the
kernel time per op type (median per node over the profiled runs).

Goals (issue 7): ONNX FP32 <= 0.7x torch eager; INT8 <= 0.5x ONNX FP32.

Run: ``.venv/bin/python -m bench.p6_latency`` (writes bench/results/p6_latency.{md,json}).
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
        if isinstance(module, torch.nn.PReLU):
            # Trained PReLU slopes differ per channel, some negative, some above 1; the
            # INT8 recipe must handle both (a constant slope would be a LeakyRelu).
            module.weight.data.uniform_(-0.2, 1.3)
    path = workdir / f"{arch}.pt"
    save_checkpoint(path, model.eval(), arch, {},
                    meta={"recipe": "bench p6 (random weights and PReLU slopes)"})
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
    """Kernel milliseconds per run by op type (onnxruntime's profiler).

    The INT8 PRelu's slope products (1x1 depthwise QLinearConv) are listed apart from the
    network's convolutions. Each node's time is its median over the runs after two warm-up
    runs, so a run preempted by another process does not inflate the sums.
    """
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
    for _ in range(runs + 2):
        session.run(None, {name: x})
    events = json.loads(Path(session.end_profiling()).read_text())
    per_node: dict[tuple[str, str], list[float]] = {}
    for event in events:
        if event.get("cat") == "Node" and event.get("name", "").endswith("_kernel_time"):
            key = (event["args"]["op_name"], event["name"])
            per_node.setdefault(key, []).append(event["dur"] / 1e3)
    per_op: dict[str, float] = {}
    for (op, node), durations in per_node.items():
        if "_slope_QLinearConv" in node:
            op = "QLinearConv (PRelu slope)"
        per_op[op] = per_op.get(op, 0.0) + float(np.median(durations[2:] or durations))
    return dict(sorted(per_op.items(), key=lambda kv: -kv[1]))


def _torch_runner(model, threads: int):
    import torch

    torch.set_num_threads(threads)
    model.eval()

    def run(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(x)).numpy()

    return run


PASSES = 3        # passes over the files; each file's calls in one block per pass
PAUSE_S = 0.1     # between blocks: longer than any runtime's spin-wait after a call


def time_blocks(runners: dict, x: np.ndarray, warmup: int, rounds: int) -> dict:
    """Per-file wall and CPU-time latencies (ms) of ``rounds`` calls each.

    ``PASSES`` passes over the files, order rotated each pass; per pass each file gets a
    block of ``warmup`` untimed then about ``rounds / PASSES`` timed consecutive calls,
    after a pause. Blocks rather than one call per file per round: every ONNX Runtime session,
    NCNN's OpenMP and LiteRT's XNNPACK keep worker threads that spin-wait after a call,
    and on 2 cores a previous file's spinning thread takes the core the next file's
    second thread needs (``bench.timer_crosstalk``, ``mbf`` FP32 at 2 threads: LiteRT
    7.5 ms timed round-robin with ONNX Runtime and NCNN, 3.2 ms in blocks; NCNN 10.3 vs
    7.2 ms; at 1 thread within 3 %). The passes still spread a busy spell of the machine
    over every file.
    """
    wall: dict[str, list[float]] = {name: [] for name in runners}
    cpu: dict[str, list[float]] = {name: [] for name in runners}
    names = list(runners)
    for n in range(PASSES):
        timed = rounds // PASSES + (n < rounds % PASSES)   # exactly ``rounds`` in all
        for name in names[n % len(names):] + names[:n % len(names)]:
            time.sleep(PAUSE_S)
            run = runners[name]
            for _ in range(warmup):
                run(x)
            for _ in range(timed):
                cpu_start, start = time.process_time(), time.perf_counter()
                run(x)
                wall[name].append((time.perf_counter() - start) * 1e3)
                cpu[name].append((time.process_time() - cpu_start) * 1e3)
    return {name: {"median_ms": float(np.median(wall[name])),
                   "p10_ms": float(np.percentile(wall[name], 10)),
                   "p90_ms": float(np.percentile(wall[name], 90)),
                   "cpu_median_ms": float(np.median(cpu[name])),
                   "cpu_p10_ms": float(np.percentile(cpu[name], 10)),
                   "runs": len(wall[name])}
            for name in runners}


def _rewritten_fp32(src: Path, dst: Path) -> dict:
    """The FP32 file with the INT8 recipe's exact FP32 rewrites plus PRelu as Max."""
    import onnx

    from facekd.export import int8_rewrites as quant

    model_proto = onnx.load(str(src))
    done = {"prelu_slopes_folded": quant.fold_prelu_slopes_above_one(model_proto),
            "grouped_convs_split": quant.split_grouped_convs(model_proto),
            "conv_inputs_padded": quant.pad_conv_input_channels(model_proto),
            "prelu_as_max": quant.prelu_as_max(model_proto)}
    onnx.save(model_proto, str(dst))
    return done


def _one_minus_cos(path: Path, x: np.ndarray, reference: np.ndarray) -> float:
    from facekd.export.parity import onnx_embeddings

    got = onnx_embeddings(path, x, False)
    cos = (got * reference).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(
        reference, axis=1)
    return float((1.0 - cos).max())


ENGINES_PROFILED = ("onnx_fp32", "onnx_int8_prev", "onnx_int8")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="mbf")
    parser.add_argument("--checkpoint", help="facekd checkpoint to use instead of random weights")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per engine")
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--calib", type=int, default=256, help="INT8 calibration images")
    parser.add_argument("--calib-data", help="calibration source (.bin, RecordIO or shards) "
                        "instead of synthetic faces")
    parser.add_argument("--eval-bin", help=".bin set: verification accuracy of every file "
                        "(meaningful only with a trained --checkpoint)")
    parser.add_argument("--profile-runs", type=int, default=30,
                        help="runs of onnxruntime's per-op profiler per file")
    parser.add_argument("--out", default=str(RESULTS / "p6_latency"))
    args = parser.parse_args(argv)

    from facekd.export.calibration import load_calibration_images
    from facekd.export.graph import variant_path
    from facekd.export.int8 import quantize_int8
    from facekd.export.onnx_export import export_onnx, load_student
    from facekd.export.parity import synthetic_aligned_faces, to_model_input
    from facekd.export.variants import evaluate_variants
    from facekd.fileio import write_json_atomic, write_text_atomic

    with tempfile.TemporaryDirectory(prefix="facekd-p6-") as tmp:
        workdir = Path(tmp)
        ckpt = _student(args.arch, args.checkpoint, workdir)
        out = workdir / "student.onnx"
        calib_data = args.calib_data or _calibration_bin(workdir, args.calib)
        t0 = time.perf_counter()
        card = export_onnx(ckpt, out, fp16=True, int8=True, calib_data=calib_data,
                           calib_count=args.calib, eval_bin=args.eval_bin, force=True)
        export_s = time.perf_counter() - t0
        files = {"onnx_fp32": out, "onnx_fp16": variant_path(out, "fp16"),
                 "onnx_int8": variant_path(out, "int8"),
                 "onnx_int8_prev": workdir / "student.int8_prev.onnx",
                 "onnx_fp32_rewritten": workdir / "student.fp32_rewritten.onnx"}
        prev_settings = quantize_int8(
            out, files["onnx_int8_prev"],
            load_calibration_images(calib_data, args.calib), normalize_inside=False,
            recipe="qdq-dw-fp32")
        rewrites = _rewritten_fp32(out, files["onnx_fp32_rewritten"])
        student = load_student(ckpt)
        faces = to_model_input(synthetic_aligned_faces(16, seed=0))
        reference = _torch_embeddings(student.model, faces)
        one_minus_cos = {name: _one_minus_cos(path, faces, reference)
                         for name, path in files.items()}
        accuracy = {}
        if args.eval_bin:
            named = {("fp32" if k == "onnx_fp32" else k): v for k, v in files.items()}
            accuracy = {("onnx_fp32" if k == "fp32" else k): v for k, v in
                        evaluate_variants(named, args.eval_bin, False).items()}
        runners = {"torch_eager": _torch_runner(student.model, args.threads)}
        runners.update({name: _ort_runner(path, args.threads) for name, path in files.items()})
        x = to_model_input(synthetic_aligned_faces(1, seed=77))
        timings = time_blocks(runners, x, args.warmup, args.rounds)
        profiles = {name: _op_profile(files[name], x, args.threads, args.profile_runs,
                                      workdir) for name in ENGINES_PROFILED}
        sizes = {name: path.stat().st_size for name, path in files.items()}

    ratio_pairs = [("onnx_fp32", "torch_eager"), ("onnx_fp16", "onnx_fp32"),
                   ("onnx_int8", "onnx_fp32"), ("onnx_int8_prev", "onnx_fp32"),
                   ("onnx_int8", "onnx_int8_prev"), ("onnx_fp32_rewritten", "onnx_fp32"),
                   ("onnx_int8", "onnx_fp32_rewritten"), ("onnx_int8", "torch_eager")]
    ratios = {f"{a} / {b}": {
        "wall": timings[a]["median_ms"] / timings[b]["median_ms"],
        "cpu": timings[a]["cpu_median_ms"] / timings[b]["cpu_median_ms"]}
        for a, b in ratio_pairs}
    goals = {"onnx_fp32 / torch_eager": 0.7, "onnx_int8 / onnx_fp32": 0.5}
    import onnxruntime
    import torch

    result = {
        "benchmark": "p6_latency", "arch": card["model"]["arch"],
        "weights": args.checkpoint or "random (seed 0), PReLU slopes U(-0.2, 1.3)",
        "params": card["model"]["params"], "macs": card["model"]["macs"],
        "threads": args.threads, "rounds": args.rounds, "warmup": args.warmup,
        "export_seconds": export_s, "timings": timings, "ratios": ratios, "goals": goals,
        "goals_met": {k: {m: v <= goals[k] for m, v in ratios[k].items()} for k in goals},
        "max_one_minus_cos_vs_torch": one_minus_cos, "file_bytes": sizes,
        "accuracy": {k: {f: v.get(f) for f in ("bin", "accuracy", "drop_vs_fp32")}
                     for k, v in accuracy.items()},
        "int8_settings": card["variants"]["int8"]["quantization"],
        "int8_prev_settings": {k: v for k, v in prev_settings.items() if k != "excluded_nodes"},
        "fp32_rewrites": rewrites,
        "command": " ".join([".venv/bin/python -m bench.p6_latency",
                             *(argv if argv is not None else sys.argv[1:])]),
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


def _torch_embeddings(model, x: np.ndarray) -> np.ndarray:
    from facekd.export.parity import torch_embeddings

    return torch_embeddings(model, x)


def _markdown(r: dict) -> str:
    t = r["timings"]
    lines = [
        f"# P6: batch-1 CPU latency, `{r['arch']}` ({r['params'] / 1e6:.2f} M params, "
        f"{r['macs'] / 1e9:.3f} GMACs)",
        "",
        f"{r['threads']} thread(s) per engine, {r['rounds']} calls each in {PASSES} passes "
        f"of blocks (order rotated), each block after {r['warmup']} warm-up calls; "
        f"weights: {r['weights']}. 1-minute load average at the "
        f"end: {r['machine']['load_average_1m']:.1f} on {r['machine']['cpu_count']} CPUs. "
        f"CPU ms is `time.process_time` per call: on a shared machine it is the steadier "
        f"measure (wall time includes waiting for a core).",
        "",
        "| engine | wall median ms | wall p10 ms | wall p90 ms | CPU median ms | file MB "
        "| max 1-cos vs torch |" + (" accuracy | drop vs fp32 |" if r["accuracy"] else ""),
        "|---|---|---|---|---|---|---|" + ("---|---|" if r["accuracy"] else ""),
    ]
    for name, v in t.items():
        size = r["file_bytes"].get(name)
        cos = r["max_one_minus_cos_vs_torch"].get(name)
        row = (f"| {name} | {v['median_ms']:.2f} | {v['p10_ms']:.2f} | {v['p90_ms']:.2f} | "
               f"{v['cpu_median_ms']:.2f} | "
               + (f"{size / 1e6:.2f} | {cos:.2e} |" if size is not None else "– | – |"))
        if r["accuracy"]:
            acc = r["accuracy"].get(name, {})
            row += (f" {acc['accuracy']:.4f} | {acc['drop_vs_fp32']:+.4f} |"
                    if acc.get("accuracy") is not None and acc.get("drop_vs_fp32") is not None
                    else " – | – |")
        lines.append(row)
    lines += ["", "| ratio (medians) | wall | CPU | goal | met (wall / CPU) |",
              "|---|---|---|---|---|"]
    for name, value in r["ratios"].items():
        goal = r["goals"].get(name)
        met = "–" if goal is None else " / ".join(
            "yes" if value[m] <= goal else "**no**" for m in ("wall", "cpu"))
        lines.append(f"| {name} | {value['wall']:.3f} | {value['cpu']:.3f} | "
                     f"{'≤ ' + str(goal) if goal else '–'} | {met} |")
    s = r["int8_settings"]
    lines += [
        "", "Engines: `onnx_int8` is the shipped recipe (`facekd export onnx --int8`: "
        f"{s.get('recipe')}; {s.get('grouped_convs_split', 0)} grouped conv split into "
        f"depthwise convs, {s.get('prelu_slopes_folded', 0)} PRelus with slopes > 1 folded "
        f"into their neighbours, {s.get('conv_inputs_padded', 0)} conv input zero-padded "
        f"from 3 to 4 channels, {s.get('prelu_int8', 0)} PRelus as "
        f"Max(q, slope * q) on uint8 with the slope product as a 1x1 depthwise QLinearConv, "
        f"{s.get('prelu_fp32', 0)} left FP32); `onnx_int8_prev` is the previous recipe "
        "(plain QDQ, PRelu/grouped/depthwise convs FP32); `onnx_fp32_rewritten` is the FP32 "
        f"file with the same exact algebra ({r['fp32_rewrites']}), to separate the rewrite "
        "gain from the INT8 gain.",
    ]
    profiles = r.get("op_profile_ms") or {}
    if profiles:
        ops = sorted({op for p in profiles.values() for op in p},
                     key=lambda op: -max(p.get(op, 0.0) for p in profiles.values()))
        lines += ["", "Where the time goes (onnxruntime profiler, kernel ms per run by op "
                  "type, each node's median over the profiled runs):", "",
                  "| op | " + " | ".join(profiles) + " |",
                  "|---|" + "---|" * len(profiles)]
        for op in ops[:14]:
            lines.append(f"| {op} | " + " | ".join(f"{p.get(op, 0.0):.2f}"
                                                   for p in profiles.values()) + " |")
        lines.append("| total | " + " | ".join(f"{sum(p.values()):.2f}"
                                                for p in profiles.values()) + " |")
    lines += ["", f"Command: `{r.get('command') or '.venv/bin/python -m bench.p6_latency'}`",
              ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
