"""Loader images/s per worker process, and how many workers feed one GPU.

The training loader's worker processes do the CPU work (read, decode, flip, CHW); the
main process only receives the uint8 batches. Each pass below runs the real
``TrainLoader`` with N worker processes over one epoch of synthetic 112x112 JPEGs
(q95, the size of MS1M faces), the workers ending with the pass, so their CPU time is
counted exactly (``RUSAGE_CHILDREN``). images/s per worker = images / worker CPU
seconds: what one worker on an idle core delivers, independent of how busy this shared
machine is. The same with ``decode_device`` (``data.decode: device``): workers only read and pack
the JPEG bytes and the main process decodes the batch on its device; here that device is
the CPU, so "main process CPU us/image" is torchvision's decode, which a GPU takes over.

Workers per GPU = ceil(the GPU's training rate / images/s per worker), at arcface_torch's
published MobileFaceNet rate: 12,185 samples/s on 8 GPUs, i.e. 1,523 per GPU.

Run: ``.venv/bin/python -m bench.loader_workers`` (writes bench/results/loader_workers.*).
"""

from __future__ import annotations

import argparse
import math
import os
import resource
import statistics
import time
from typing import Any

import torch

from bench._prepdata import WORK, load_note, make_rec, write_results
from facekd.data.loader import build_train_loader

ARCFACE_MBF_PER_GPU = 12185 / 8   # arcface_torch README, MobileFaceNet, 8 GPUs


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def one_pass(source: Any, batch_size: int, workers: int, device_decode: bool) -> dict[str, float]:
    """One epoch through a fresh loader whose workers exit at the end of it."""
    loader = build_train_loader(source, batch_size, seed=0, drop_last=False,
                                num_workers=workers, persistent_workers=False,
                                decode_device="cpu" if device_decode else None)
    children, main_cpu = _children_cpu(), time.process_time()
    wall = time.perf_counter()
    images = 0
    for batch in loader:
        images += len(batch["key"])
    wall = time.perf_counter() - wall
    main_cpu = time.process_time() - main_cpu
    del loader   # workers are joined when the iterator ends; reaped by now
    worker_cpu = _children_cpu() - children
    return {"images": images, "wall_s": wall, "worker_cpu_s": worker_cpu,
            "main_cpu_s": main_cpu}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=8192)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    source = make_rec(WORK / f"p3_rec_{args.images}", args.images)
    rows = []
    for device_decode in (False, True):
        for workers in args.workers:
            passes = [one_pass(source, args.batch_size, workers, device_decode)
                      for _ in range(args.rounds)]
            # a worker is one process on one core: images per second of worker CPU time
            per_worker = [p["images"] / p["worker_cpu_s"] for p in passes]
            rate = statistics.median(per_worker)
            rows.append({
                "workers do": "read + pack JPEG bytes (data.decode: device; main decodes, here "
                              "on CPU)" if device_decode
                else "read + decode + flip + CHW (default)",
                "num_workers": workers,
                "worker CPU us/image": 1e6 / rate,
                "images/s per worker (CPU time)": rate,
                "images/s (wall, this shared machine)": statistics.median(
                    p["images"] / p["wall_s"] for p in passes),
                "main process CPU us/image": statistics.median(
                    1e6 * p["main_cpu_s"] / p["images"] for p in passes),
                "workers for 1,523/s (arcface_torch mbf per GPU)":
                    math.ceil(ARCFACE_MBF_PER_GPU / rate),
            })
    default = [r for r in rows if r["workers do"].startswith("read + decode")]
    best = max(r["images/s per worker (CPU time)"] for r in default)
    worst = min(r["images/s per worker (CPU time)"] for r in default)
    notes = [
        f"{args.images} images 112x112 JPEG q95 read from the .rec, batch {args.batch_size}, "
        f"median of {args.rounds} passes; each pass forks its workers and joins them, so "
        "their CPU time (RUSAGE_CHILDREN) includes start-up and the epoch plan.",
        f"One worker decodes {worst:,.0f}-{best:,.0f} images/s of CPU time: at "
        f"arcface_torch's MobileFaceNet rate ({ARCFACE_MBF_PER_GPU:,.0f} samples/s per GPU, "
        f"12,185 on 8 GPUs) {math.ceil(ARCFACE_MBF_PER_GPU / worst)} worker(s) per GPU "
        "feed it; the default data.num_workers: 2 leaves headroom. A GPU that trains "
        f"faster needs about its images/s / {worst:,.0f} workers, or data.decode: device.",
        "Wall images/s depends on this 2-core machine's load (other jobs ran); the CPU-time "
        f"rates do not. {load_note()}",
        "Command: .venv/bin/python -m bench.loader_workers",
    ]
    columns = list(rows[0])
    md = write_results("loader_workers", "Loader images/s per worker process", rows, columns,
                       notes, {"args": vars(args), "arcface_mbf_per_gpu": ARCFACE_MBF_PER_GPU,
                               "cpus": os.cpu_count()})
    print(md.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
