"""P3: training-loader images/s vs bare ``cv2.imdecode`` of the same images, in one run.

The loader reads each image from the shards (random order, mmap), decodes it, flips half
of them, writes it into a uint8 batch and converts the batch once to float32 NCHW in
[-1, 1]. The floor is ``cv2.imdecode`` alone over the same bytes already in memory. A
naive loader (per-image float conversion, then ``torch.stack``) is shown for context.
Everything runs in this one process with one torch thread; best of N rounds.

Run: ``.venv/bin/python -m bench.p3_loader`` (writes bench/results/p3_loader.*).
"""

from __future__ import annotations

import argparse
import time

import cv2
import numpy as np
import torch

from bench._prepdata import WORK, load_note, make_rec, write_results
from facekd.data.loader import build_train_loader
from facekd.data.shards import ShardSet, rec2shards


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=8192)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)

    folder = make_rec(WORK / f"p3_rec_{args.images}", args.images)
    shards = WORK / f"p3_shards_{args.images}"
    if not (shards / "manifest.parquet").is_file():
        rec2shards(folder, shards, shard_size=2048, workers=1)
    shard_set = ShardSet(shards)
    payloads = [shard_set.read(i) for i in range(len(shard_set))]
    n = len(payloads)

    def bare() -> None:
        for payload in payloads:
            cv2.imdecode(np.frombuffer(payload, np.uint8), cv2.IMREAD_COLOR)

    def facekd_loader() -> None:
        loader = build_train_loader(shards, args.batch_size, seed=0, drop_last=False)
        for batch in loader:
            assert batch["image"].dtype == torch.float32

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

    def best(fn) -> float:
        fn()  # warm-up (page cache, imports)
        times = []
        for _ in range(args.rounds):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return min(times)

    t_bare = best(bare)
    t_loader = best(facekd_loader)
    t_naive = best(naive)
    ratio = t_bare / t_loader
    rows = [
        {"pipeline": "cv2.imdecode only (bytes in memory)", "images/s": n / t_bare,
         "x bare decode": 1.0},
        {"pipeline": "facekd loader (read + decode + flip + batch normalise)",
         "images/s": n / t_loader, "x bare decode": ratio},
        {"pipeline": "naive per-image float conversion + stack", "images/s": n / t_naive,
         "x bare decode": t_bare / t_naive},
    ]
    notes = [f"{n} images 112x112 JPEG q95, batch {args.batch_size}, num_workers=0, one "
             f"torch thread, best of {args.rounds} rounds.",
             f"Goal >= 0.85x bare decode: measured {ratio:.2f}x "
             f"({'met' if ratio >= 0.85 else 'NOT met'}).",
             f"cv2 {cv2.__version__}: the loader decodes straight to RGB (IMREAD_COLOR_RGB) "
             "when available.",
             load_note(),
             "Command: .venv/bin/python -m bench.p3_loader"]
    md = write_results("p3_loader", "P3: loader throughput vs bare decode", rows,
                       ["pipeline", "images/s", "x bare decode"], notes, {"args": vars(args)})
    print(md.read_text())


if __name__ == "__main__":
    main()
