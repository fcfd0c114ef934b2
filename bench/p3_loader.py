"""P3: training-loader images/s vs bare ``cv2.imdecode`` of the same images, in one run.

The loader (built once, like in training; one epoch per round) reads each image from the
shards (random order, mmap), decodes it, flips half of them and writes it into a uint8
NCHW RGB batch: that batch is what it yields, and every consumer turns it into the
[-1, 1] float input with ``normalise_batch(images, device)`` on its own device. So the
table shows, side by side:

- the floor: ``cv2.imdecode`` alone over the same bytes already in memory;
- the loader up to the uint8 batch: what a GPU trainer's CPU pays per image (the
  normalisation is then one device op on the GPU, after a 4x smaller host->device copy);
- the loader plus ``normalise_batch(images, "cpu")``: what a CPU trainer pays in total
  (an exact lookup table, float32 writes of 150 KB per image);
- the loader plus ``normalise_batch(images, "cuda")`` (copy + arithmetic, synchronised),
  only when a CUDA device is present;
- a naive loader (per-image float conversion, then ``torch.stack``), for context.

Everything runs in this one process with one torch thread; best of N interleaved rounds,
reported as wall time and as CPU time (the machine is shared), plus the median ratio.

Run: ``.venv/bin/python -m bench.p3_loader`` (writes bench/results/p3_loader.*).
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from typing import Any

import cv2
import numpy as np
import torch

from bench._prepdata import WORK, load_note, make_rec, write_results
from facekd.data.loader import build_train_loader, normalise_batch
from facekd.data.shards import ShardSet, rec2shards

GOAL = 0.85


def breakdown(shard_set: ShardSet, payloads: list[bytes], loader: Any, rounds: int
              ) -> dict[str, float]:
    """CPU us per image of each loader step alone (decode done once beforehand).

    ``loader`` is the loader's own epoch with ``cv2.imdecode`` answering a ready image:
    its time is everything the loader adds to decoding, without decode's noise.
    """
    batch_size = loader.batch_size
    images = [cv2.imdecode(np.frombuffer(p, np.uint8), cv2.IMREAD_COLOR) for p in payloads]
    batch = np.empty((batch_size, 3, *images[0].shape[:2]), np.uint8)
    scratch = np.empty_like(images[0])

    hot = images[0]  # the loader splits/flips an image it has just decoded (in cache)

    def split() -> None:
        for i in range(len(images)):
            plane = batch[i % batch_size]
            cv2.split(hot, [plane[2], plane[1], plane[0]])

    def flip() -> None:
        for _ in range(len(images)):
            cv2.flip(hot, 1, dst=scratch)

    def read() -> None:
        for i in range(len(images)):
            shard_set.read(i)

    uint8_batch = torch.from_numpy(batch)

    def normalise() -> None:
        for _ in range(0, len(images), batch_size):
            normalise_batch(uint8_batch, "cpu")

    def loader_without_decode() -> None:
        real = cv2.imdecode
        cv2.imdecode = lambda buffer, flags: images[0]
        try:
            for _ in loader:
                pass
        finally:
            cv2.imdecode = real

    steps = {"split": split, "flip": flip, "read": read, "normalise": normalise,
             "loader": loader_without_decode}
    best = {name: float("inf") for name in steps}
    for _ in range(rounds):
        for name, fn in steps.items():
            start = time.process_time()
            fn()
            best[name] = min(best[name], time.process_time() - start)
    count = {name: len(images) for name in steps} | {"loader": loader.num_samples}
    return {name: 1e6 * seconds / count[name] for name, seconds in best.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=8192)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(1)
    load_at_start = os.getloadavg()

    folder = make_rec(WORK / f"p3_rec_{args.images}", args.images)
    shards = WORK / f"p3_shards_{args.images}"
    if not (shards / "manifest.parquet").is_file():
        rec2shards(folder, shards, shard_size=2048, workers=1)
    shard_set = ShardSet(shards)
    payloads = [bytes(shard_set.read(i)) for i in range(len(shard_set))]
    n = len(payloads)

    def bare() -> None:
        for payload in payloads:
            cv2.imdecode(np.frombuffer(payload, np.uint8), cv2.IMREAD_COLOR)

    loader = build_train_loader(shards, args.batch_size, seed=0, drop_last=False)

    def uint8_batches() -> None:  # one epoch of a long-lived loader, as in training
        for batch in loader:
            assert batch["image"].dtype == torch.uint8

    def cpu_normalised() -> None:  # what the trainer does with each batch on a CPU device
        for batch in loader:
            assert normalise_batch(batch["image"], "cpu").dtype == torch.float32

    def cuda_normalised() -> None:
        for batch in loader:
            normalise_batch(batch["image"], "cuda")
        torch.cuda.synchronize()

    flips = np.random.default_rng(0).random(n) < 0.5

    def naive() -> None:
        for start in range(0, n, args.batch_size):
            tensors = []
            for i in range(start, min(start + args.batch_size, n)):
                image = cv2.imdecode(np.frombuffer(payloads[i], np.uint8), cv2.IMREAD_COLOR)
                image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
                if flips[i]:
                    image = np.fliplr(image)
                x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float()
                tensors.append((x / 255 - 0.5) / 0.5)
            torch.stack(tensors)

    pipelines: dict[str, Callable[[], None]] = {"bare": bare, "uint8": uint8_batches,
                                                "cpu_norm": cpu_normalised}
    if torch.cuda.is_available():
        pipelines["cuda_norm"] = cuda_normalised
    pipelines["naive"] = naive
    for fn in pipelines.values():
        fn()  # warm-up (page cache, imports, pooled batches)
    wall: dict[str, list[float]] = {name: [] for name in pipelines}
    cpu: dict[str, list[float]] = {name: [] for name in pipelines}
    for _ in range(args.rounds):  # interleaved, so a busy spell hits every pipeline
        for name, fn in pipelines.items():
            t, c = time.perf_counter(), time.process_time()
            fn()
            wall[name].append(time.perf_counter() - t)
            cpu[name].append(time.process_time() - c)

    labels = {"bare": "cv2.imdecode only (bytes in memory)",
              "uint8": "facekd loader -> uint8 batch (read + decode + flip + CHW); "
                       "a GPU trainer normalises on the device",
              "cpu_norm": "facekd loader + normalise_batch on CPU (what a CPU trainer pays)",
              "cuda_norm": "facekd loader + normalise_batch on CUDA (copy + arithmetic)",
              "naive": "naive per-image float conversion + stack"}

    parts = breakdown(shard_set, payloads[:2048], loader, args.rounds)
    python_us = parts["loader"] - parts["split"] - parts["flip"] / 2 - parts["read"]

    def ratio(times: dict[str, list[float]], name: str, stat: Callable) -> float:
        return float(stat(times["bare"]) / stat(times[name]))

    rows = [{"pipeline": labels[name],
             "us/image (CPU)": 1e6 * min(cpu[name]) / n,
             "images/s (wall)": n / min(wall[name]),
             "x bare (wall)": ratio(wall, name, min),
             "images/s (CPU time)": n / min(cpu[name]),
             "x bare (CPU time)": ratio(cpu, name, min),
             "x bare (CPU, median)": ratio(cpu, name, np.median)}
            for name in pipelines]

    def verdict(name: str) -> str:
        wall_x, cpu_x = ratio(wall, name, min), ratio(cpu, name, min)
        met = {(True, True): "met on both", (True, False): "met on wall time only",
               (False, True): "met on CPU time only",
               (False, False): "NOT met"}[(wall_x >= GOAL, cpu_x >= GOAL)]
        return f"{wall_x:.2f}x wall, {cpu_x:.2f}x CPU time ({met})"

    notes = [
        f"{n} images 112x112 JPEG q95, batch {args.batch_size}, num_workers=0, one torch "
        f"thread; best of {args.rounds} interleaved rounds (ratios of the best times; the "
        "median column is the ratio of median CPU times).",
        f"Goal >= {GOAL}x bare decode, judged on the uint8 row: {verdict('uint8')}. Why that "
        "row: the loader yields uint8 and normalisation is late, on the consumer's device. "
        "On a CUDA trainer it is one elementwise op on the GPU after a 4x smaller "
        "host->device copy, so the loader's CPU cost per image is exactly the uint8 row; "
        "the issue's 'decode + flip + normalise into a batch tensor' then spends its "
        "normalise on the device.",
        f"A CPU trainer pays the normalisation on the CPU as well: loader + CPU "
        f"normalisation is {verdict('cpu_norm')} (an exact cv2.LUT writing 150 KB of "
        "float32 per image; memory-bandwidth bound, so it moves most with other jobs' "
        "load). A CPU trainer's forward and backward step costs far more per image.",
        "Bit-exactness: normalise_batch gives float32 (x - 127.5) / 127.5, the same floats on "
        "CPU (lookup table) and CUDA (torch arithmetic); tests/test_loader.py checks all 256 "
        "values, and trainer, teacher cache and class-centre outputs are bitwise those of "
        "the earlier float loader.",
        "Loader path per image: cv2.imdecode (BGR) -> cv2.flip (half) -> cv2.split into the "
        "RGB planes of a recycled uint8 batch. What the loader adds to imdecode, measured "
        "with imdecode answering a ready image (CPU us/image, best of the rounds): "
        f"{parts['loader']:.1f} in all; apart: cv2.split {parts['split']:.1f}, cv2.flip "
        f"{parts['flip']:.1f} (x 0.5: half the images), shard read {parts['read']:.1f}, "
        f"leaving {python_us:.1f} for Python and the batch dict; the CPU normalisation adds "
        f"{parts['normalise']:.1f}. (Tried and "
        "dropped, all slower: IMREAD_COLOR_RGB + transpose, numpy/torch transposes, "
        "cv2.mixChannels, an in-place flip of the CHW planes.)",
        "CPU time (time.process_time, one process) is what an idle core would deliver; "
        "wall time on a shared machine moves with other jobs' load.",
        f"Load average at start: {load_at_start[0]:.1f} (1 min), {load_at_start[1]:.1f} "
        f"(5 min). {load_note()}",
        "Command: .venv/bin/python -m bench.p3_loader"]
    md = write_results("p3_loader", "P3: loader throughput vs bare decode", rows,
                       ["pipeline", "us/image (CPU)", "images/s (wall)", "x bare (wall)",
                        "images/s (CPU time)", "x bare (CPU time)", "x bare (CPU, median)"],
                       notes, {"args": vars(args), "goal": GOAL, "wall_seconds": wall,
                               "cpu_seconds": cpu, "load_at_start": list(load_at_start),
                               "breakdown_us_per_image": parts})
    print(md.read_text())


if __name__ == "__main__":
    main()
