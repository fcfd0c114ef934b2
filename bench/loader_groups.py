"""Identity-grouped (P x K) batches vs plain random batches, side by side in one run.

Three questions, each answered for K = 1 (plain) and K = 4 (``images_per_identity``):

1. Does a batch hold same-identity pairs (what REFILLED stage 1's ``relation`` term and
   RKD-like losses need)? Counted from the epoch plans alone, on the embedded synthetic
   setting (600 identities x 16 images, batch 64) and on an MS1MV3-sized label layout
   (93,431 identities, 5.18M images, batch 128; synthetic per-identity counts).
2. What does the epoch plan cost? Every DataLoader worker recomputes it once per epoch;
   measured at MS1MV3 size (CPU seconds, best of N).
3. Does grouping slow the loader? One epoch over 4,096 JPEGs (read + decode + flip +
   normalise), K = 1 vs K = 4, interleaved rounds, one torch thread.

Run: ``.venv/bin/python -m bench.loader_groups`` (writes bench/results/loader_groups.*).
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np
import torch

from bench._prepdata import WORK, load_note, make_rec, write_results
from facekd.data.loader import (
    build_train_loader,
    epoch_flips,
    epoch_permutation,
    identity_chunks,
    normalise_batch,
)

MS1MV3_IDENTITIES = 93_431
MS1MV3_IMAGES = 5_179_510


def ms1mv3_like_labels(seed: int = 0) -> np.ndarray:
    """Labels with MS1MV3's identity and image totals and a skewed per-identity count."""
    rng = np.random.default_rng(seed)
    raw = rng.lognormal(mean=0.0, sigma=0.7, size=MS1MV3_IDENTITIES)
    counts = np.maximum(1, np.round(raw / raw.sum() * MS1MV3_IMAGES)).astype(np.int64)
    counts[np.argmax(counts)] += MS1MV3_IMAGES - counts.sum()
    return np.repeat(np.arange(MS1MV3_IDENTITIES), counts)


def batch_rows(labels: np.ndarray, batch_size: int, k: int, seed: int, num_batches: int
               ) -> list[np.ndarray]:
    """Sample rows of the first batches of epoch 0 (rank 0 of 1)."""
    if k == 1:
        perm = epoch_permutation(len(labels), seed, 0)
        return [perm[j * batch_size:(j + 1) * batch_size] for j in range(num_batches)]
    chunks = identity_chunks(labels, k, seed, 0)[0]
    per = batch_size // k
    return [chunks[j * per:(j + 1) * per].reshape(-1) for j in range(num_batches)]


def pair_stats(labels: np.ndarray, batch_size: int, k: int, num_batches: int
               ) -> dict[str, float]:
    with_pair, pairs = 0, []
    for rows in batch_rows(labels, batch_size, k, 0, num_batches):
        counts = np.unique(labels[rows], return_counts=True)[1]
        n_pairs = int((counts * (counts - 1)).sum())   # ordered anchor-positive pairs
        with_pair += n_pairs > 0
        pairs.append(n_pairs)
    return {"batches with a same-identity pair": with_pair / num_batches,
            "anchor-positive pairs per batch": float(np.mean(pairs))}


def plan_seconds(labels: np.ndarray, k: int, rounds: int) -> float:
    best = float("inf")
    for epoch in range(rounds):
        start = time.process_time()
        if k == 1:
            epoch_permutation(len(labels), 0, epoch)
            epoch_flips(len(labels), 0, epoch)
        else:
            identity_chunks(labels, k, 0, epoch)
        best = min(best, time.process_time() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--k", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(1)
    k = args.k
    rows: list[dict[str, Any]] = []

    synth = np.repeat(np.arange(600), 16)
    ms1m = ms1mv3_like_labels()
    for name, labels, batch in (("synth 600x16", synth, 64), ("MS1MV3-like", ms1m, 128)):
        num_batches = min(500, len(labels) // batch)
        for kk in (1, k):
            stats = pair_stats(labels, batch, kk, num_batches)
            rows.append({"measure": f"{name}, batch {batch}: batches with a pair "
                                    f"({num_batches} batches)", "K": kk,
                         "value": stats["batches with a same-identity pair"]})
            rows.append({"measure": f"{name}, batch {batch}: anchor-positive pairs/batch",
                         "K": kk, "value": stats["anchor-positive pairs per batch"]})

    plan = {kk: plan_seconds(ms1m, kk, args.rounds) for kk in (1, k)}
    for kk in (1, k):
        rows.append({"measure": "MS1MV3-size epoch plan, CPU s per worker per epoch", "K": kk,
                     "value": plan[kk]})

    folder = make_rec(WORK / f"groups_rec_{args.images}", args.images)
    loaders = {kk: build_train_loader(folder, 128, seed=0, images_per_identity=kk)
               for kk in (1, k)}
    for loader in loaders.values():
        for _ in loader:
            pass   # warm-up: page cache, imports
    cpu = {kk: float("inf") for kk in loaders}
    images = {kk: len(loader) * 128 for kk, loader in loaders.items()}
    for _ in range(args.rounds):     # interleaved, so a busy spell hits both
        for kk, loader in loaders.items():
            start = time.process_time()
            for batch in loader:
                normalise_batch(batch["image"])  # what a CPU trainer pays in total
            cpu[kk] = min(cpu[kk], time.process_time() - start)
    for kk in loaders:
        rate = images[kk] / cpu[kk]
        rows.append({"measure": f"loader images/s (CPU time), {args.images} JPEGs, batch 128",
                     "K": kk, "value": rate})

    plain = {row["measure"]: row["value"] for row in rows if row["K"] == 1}
    for row in rows:
        if plain[row["measure"]]:
            row["ratio vs K=1"] = row["value"] / plain[row["measure"]]
    notes = [f"K = images_per_identity; K = 1 is the plain loader. {load_note()}",
             "Pairs: ordered (anchor, positive) pairs of equal label among a batch's rows; "
             "REFILLED's relation term is exactly zero on a batch without one.",
             "MS1MV3-like labels: 93,431 identities, 5,179,510 images, lognormal "
             "(sigma 0.7) per-identity counts (the real file was not used).",
             "Plan cost: K=1 = permutation + flips of all samples; K>1 = identity_chunks "
             "(one sort of n keys, chunk building, chunk shuffle, flips).",
             "Command: .venv/bin/python -m bench.loader_groups"]
    md = write_results("loader_groups", "Identity-grouped (P x K) batches vs plain batches",
                       rows, ["measure", "K", "value", "ratio vs K=1"], notes,
                       {"args": vars(args), "plan_cpu_seconds": plan, "loader_cpu_seconds": cpu})
    print(md.read_text())


if __name__ == "__main__":
    main()
