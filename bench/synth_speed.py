"""Synthetic face generator throughput: render rate on one core and the default preset's time.

Goals (issue 8 / the synth brief): >= 500 rendered 112x112 faces per second on one core
(render + JPEG encode), and the ``default`` preset (the demo's data) in under a minute.

Side by side in one run: rendering + encoding vs JPEG encoding alone of the same images
(the floor any generator writing JPEGs pays), both single-process. Because the machine
is shared, images/s is reported from wall time and from this process's CPU time
(``time.process_time``); the CPU-time figure is the one-core rate.

Run: ``.venv/bin/python -m bench.synth_speed [--images 3000] [--skip-preset]``
(writes bench/results/synth_speed.{md,json}).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from facekd.fileio import write_json_atomic, write_text_atomic

RESULTS = Path(__file__).resolve().parent / "results"


def _timed(fn) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def measure_render(n_images: int, per_id: int = 16) -> dict:
    import cv2

    from facekd.data.synth import identity_params
    from facekd.data.synth_render import FaceRenderer, encode_jpeg, sample_nuisance

    cv2.setNumThreads(1)
    n_ids = max(1, n_images // per_id)
    idents = [identity_params(0, 0, i) for i in range(n_ids)]
    jobs = [(i, sample_nuisance(np.random.default_rng([1, i, k]), idents[i]))
            for i in range(n_ids) for k in range(per_id)]
    renderer = FaceRenderer()
    images: list[np.ndarray] = []

    def render_only() -> None:
        for i, nuis in jobs:
            images.append(renderer.render(idents[i], nuis, i)[0])

    def render_encode() -> None:
        fresh = FaceRenderer()
        for i, nuis in jobs:
            encode_jpeg(fresh.render(idents[i], nuis, i)[0], nuis.jpeg_quality)

    def encode_only() -> None:
        for (_, nuis), image in zip(jobs, images, strict=True):
            encode_jpeg(image, nuis.jpeg_quality)

    def sample_only() -> None:
        for i, _ in jobs:
            sample_nuisance(np.random.default_rng([2, i]), idents[i])

    n = len(jobs)
    out = {"images": n, "identities": n_ids}
    for name, fn in (("render", render_only), ("render_encode", render_encode),
                     ("encode_only", encode_only), ("sample_nuisance", sample_only)):
        wall, cpu = _timed(fn)
        out[name] = {"wall_s": wall, "cpu_s": cpu, "per_s_wall": n / wall, "per_s_cpu": n / cpu}
    return out


def measure_preset(preset: str) -> dict:
    import resource

    from facekd.data.synth import generate

    def cpu_seconds() -> float:
        own = resource.getrusage(resource.RUSAGE_SELF)
        kids = resource.getrusage(resource.RUSAGE_CHILDREN)
        return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime

    tmp = Path(tempfile.mkdtemp(prefix="synth_bench_"))
    try:
        cpu = cpu_seconds()
        wall = time.perf_counter()
        summary = generate(tmp / "data", preset=preset, seed=0, progress=False)
        wall = time.perf_counter() - wall
        cpu = cpu_seconds() - cpu
        size = sum(p.stat().st_size for p in (tmp / "data").rglob("*") if p.is_file())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    images = sum(int(part.get("images", 0)) for part in summary.values()
                 if isinstance(part, dict))
    return {"preset": preset, "wall_s": wall, "cpu_s": cpu, "images": images, "bytes": size,
            "images_per_s": images / wall}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--skip-preset", action="store_true")
    args = parser.parse_args(argv)
    load = os.getloadavg()[0]
    render = measure_render(args.images)
    preset = None if args.skip_preset else measure_preset("default")
    result = {"host": platform.platform(), "cpus": os.cpu_count(), "load_avg_1min": load,
              "render": render, "default_preset": preset}
    r = render
    lines = [
        "# Synthetic face generator throughput",
        "",
        f"{r['images']} images of {r['identities']} identities, 112x112, one process, "
        f"cv2 one thread; {os.cpu_count()} CPUs shared, 1-min load average {load:.1f} at "
        "start (wall rates suffer from other jobs; CPU-time rates are the one-core rate).",
        "",
        "| step | images/s (CPU time) | images/s (wall) | vs JPEG encode alone (CPU) |",
        "|---|---|---|---|",
    ]
    enc = r["encode_only"]["per_s_cpu"]
    for name in ("render", "render_encode", "encode_only", "sample_nuisance"):
        row = r[name]
        lines.append(f"| {name} | {row['per_s_cpu']:.0f} | {row['per_s_wall']:.0f} | "
                     f"{enc / row['per_s_cpu']:.2f}x the time |")
    goal = r["render_encode"]["per_s_cpu"]
    lines += ["", f"Goal >= 500 images/s on one core (render + encode): "
                  f"{'met' if goal >= 500 else 'NOT met'} ({goal:.0f}/s)."]
    if preset:
        lines += ["", f"`default` preset ({preset['images']} images, "
                      f"{preset['bytes'] / 1e6:.0f} MB, workers=2): {preset['wall_s']:.1f} s wall, "
                      f"{preset['images_per_s']:.0f} images/s; goal < 60 s: "
                      f"{'met' if preset['wall_s'] < 60 else 'NOT met'}. It used "
                      f"{preset['cpu_s']:.0f} CPU-seconds (parent + render workers), i.e. "
                      f"{preset['cpu_s'] / 2:.0f} s on two otherwise idle cores."]
    lines += ["", "Command: `.venv/bin/python -m bench.synth_speed`", ""]
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_json_atomic(RESULTS / "synth_speed.json", result)
    write_text_atomic(RESULTS / "synth_speed.md", "\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
