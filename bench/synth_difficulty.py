"""How hard is the synthetic face data? Pixels vs a small and a larger CNN, side by side.

The embedded dataset must be learnable (a network trained on it verifies held-out
identities far better than pixel matching) and hard enough that capacity matters (a
larger network beats a tiny one), or distillation has nothing to show. This trains
``r_tiny`` (teacher-like) and ``mbf_tiny`` (student-like) for the same few epochs with
an ArcFace head on a small synthetic training set and scores the held-out lfw / cfp_fp
/ agedb_30 sets with the insightface 10-fold protocol; the pixel baseline is 32x32
standardised grey pixels. One seed, CPU, short schedules: a sanity check, not the
method comparison (that is bench/methods).

Run: ``.venv/bin/python -m bench.synth_difficulty [--identities 300 --epochs 6]``
(writes bench/results/synth_difficulty.{md,json}).
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path

import numpy as np

from facekd.fileio import write_json_atomic, write_text_atomic

RESULTS = Path(__file__).resolve().parent / "results"
WORK = Path(__file__).resolve().parent / "_work" / "synth_difficulty"
BINS = ("lfw", "cfp_fp", "agedb_30")


def _decode(blobs: list[bytes]) -> np.ndarray:
    from facekd.data.binset import decode_bin_images

    return decode_bin_images(blobs)


def load_train(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    from facekd.data import open_rec

    reader = open_rec(folder)
    keys = list(reader.image_keys())
    images = _decode([reader[k][1] for k in keys])
    labels = np.array([reader.label_of(k) for k in keys], dtype=np.int64)
    return images, labels


def pixel_scores(images: np.ndarray) -> np.ndarray:
    import cv2

    grey = images.mean(axis=1).astype(np.float32)
    small = np.stack([cv2.resize(g, (32, 32), interpolation=cv2.INTER_AREA) for g in grey])
    flat = small.reshape(len(small), -1)
    flat = (flat - flat.mean(1, keepdims=True)) / (flat.std(1, keepdims=True) + 1e-6)
    return flat


def to_tensor(images: np.ndarray):
    import torch

    from facekd.data.pixels import normalise_pixels

    return torch.from_numpy(normalise_pixels(images))


def train_model(arch: str, images: np.ndarray, labels: np.ndarray, epochs: int, seed: int,
                batch: int = 64, lr: float = 0.1) -> tuple[object, float]:
    import torch

    from facekd.models import create_model, model_info
    from facekd.models.heads import create_head

    torch.manual_seed(seed)
    model = create_model(arch)
    dim = model_info(arch)["embedding_size"]
    head = create_head("arcface", dim, int(labels.max()) + 1, scale=32.0, margin=0.3)
    params = list(model.parameters()) + list(head.parameters())
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=5e-4)
    steps = epochs * (len(images) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps,
                                                pct_start=0.15)
    rng = np.random.default_rng(seed)
    x_all, y_all = to_tensor(images), torch.from_numpy(labels)
    start = time.perf_counter()
    model.train()
    for _ in range(epochs):
        order = rng.permutation(len(images))
        for i in range(len(images) // batch):
            idx = torch.from_numpy(order[i * batch:(i + 1) * batch])
            x = x_all[idx]
            flip = torch.from_numpy(rng.random(len(idx)) < 0.5)
            x[flip] = x[flip].flip(-1)
            loss = torch.nn.functional.cross_entropy(head(model(x), y_all[idx]), y_all[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    return model, time.perf_counter() - start


def embed(model, images: np.ndarray, batch: int = 256) -> tuple[np.ndarray, np.ndarray]:
    import torch

    outs, flips = [], []
    with torch.no_grad():
        for i in range(0, len(images), batch):
            x = to_tensor(images[i:i + batch])
            outs.append(model(x).numpy())
            flips.append(model(x.flip(-1)).numpy())
    return np.concatenate(outs), np.concatenate(flips)


def main(argv: list[str] | None = None) -> int:
    import torch

    from facekd.data.binset import load_bin
    from facekd.data.synth import generate
    from facekd.evaluate.stats import bin_image_ids, interval_rule, verification_estimates
    from facekd.evaluate.verification import verify_pairs

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--identities", type=int, default=300)
    parser.add_argument("--images-per-id", type=int, default=16)
    parser.add_argument("--pairs", type=int, default=1200)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--strength", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    data = WORK / f"s{args.strength:g}_i{args.identities}x{args.images_per_id}_p{args.pairs}"
    generate(data, preset="default", identities=args.identities,
             images_per_id=args.images_per_id, lfw_pairs=args.pairs, cfp_pairs=args.pairs,
             agedb_pairs=args.pairs, ijb_identities=0, unlabelled_identities=0,
             strength=args.strength, seed=args.seed, progress=False)
    images, labels = load_train(data)
    sets = {}
    for name in BINS:
        blobs, issame = load_bin(data / f"{name}.bin")
        sets[name] = (_decode(blobs), np.array(issame))

    ids = {name: bin_image_ids(load_bin(data / f"{name}.bin")[0]) for name in BINS}

    def score(name: str, emb: np.ndarray, emb_flip: np.ndarray | None) -> dict[str, float]:
        issame = sets[name][1]
        res = verify_pairs(emb, emb_flip, issame)
        return verification_estimates(res, issame, ids[name])["intervals"]["acc"]

    rows: dict[str, dict] = {"pixels": {}}
    for name, (imgs, _) in sets.items():
        rows["pixels"][name] = score(name, pixel_scores(imgs), None)
    for arch in ("mbf_tiny", "r_tiny"):
        model, seconds = train_model(arch, images, labels, args.epochs, args.seed)
        rows[arch] = {"train_s": seconds}
        for name, (imgs, _) in sets.items():
            rows[arch][name] = score(name, *embed(model, imgs))

    lines = [
        "# Synthetic face difficulty: held-out 10-fold verification accuracy",
        "",
        f"Training set {args.identities} identities x {args.images_per_id} images, "
        f"{args.pairs} pairs per held-out set, nuisance strength {args.strength:g}, "
        f"{args.epochs} epochs ArcFace (s=32, m=0.3), SGD one-cycle lr 0.1, batch 64, "
        f"{args.threads} CPU thread(s), seed {args.seed}. Accuracy (%) [95 % interval]: "
        f"{interval_rule()}, clusters = images linked by genuine pairs.",
        "",
        "| embedder | lfw | cfp_fp | agedb_30 | train time (s) |",
        "|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        cells = " | ".join(f"{row[b]['value'] * 100:.2f} [{row[b]['low'] * 100:.2f}, "
                           f"{row[b]['high'] * 100:.2f}]" for b in BINS)
        lines.append(f"| {name} | {cells} | {row.get('train_s', 0):.0f} |")
    lines += ["", "Command: `.venv/bin/python -m bench.synth_difficulty "
              f"--identities {args.identities} --images-per-id {args.images_per_id} "
              f"--pairs {args.pairs} --epochs {args.epochs} --strength {args.strength:g} "
              f"--threads {args.threads} --seed {args.seed}`", ""]
    RESULTS.mkdir(parents=True, exist_ok=True)
    tag = "" if args.strength == 1.0 else f"_s{args.strength:g}"
    write_json_atomic(RESULTS / f"synth_difficulty{tag}.json",
                      {"args": vars(args), "accuracy": rows, "cpus": os.cpu_count()})
    write_text_atomic(RESULTS / f"synth_difficulty{tag}.md", "\n".join(lines))
    print("\n".join(lines))
    if os.environ.get("FACEKD_BENCH_KEEP") != "1":
        shutil.rmtree(data, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
