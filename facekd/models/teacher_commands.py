"""CLI group ``facekd teacher``: rebuild a teacher classifier (``centres``).

The trainer owner adds ``cache`` here. Handlers import the library lazily so
``facekd --help`` stays instant.
"""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("teacher", help="teacher classifier and embedding cache")
    tsub = p.add_subparsers(dest="teacher_cmd", metavar="CMD")
    tsub.required = True

    cp = tsub.add_parser(
        "centres", help="class centres of teacher embeddings (image + flip) over a dataset",
        description="Rebuild the teacher classifier when only a backbone was released: the "
                    "normalised mean teacher embedding of each class of DATA. OUT ending in "
                    ".npy gets the C x D matrix; otherwise a torch file with counts. "
                    "Resumable: rerun the same command after an interruption.")
    cp.add_argument("teacher", help="arcface_torch backbone, facekd checkpoint or .onnx")
    cp.add_argument("data", help="shards folder or RecordIO dataset folder")
    cp.add_argument("out", help="output .npy or .pt")
    cp.add_argument("--arch", help="registry name when the checkpoint is a bare state dict")
    cp.add_argument("--batch-size", type=int, default=128)
    cp.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda when present)")
    cp.add_argument("--num-workers", type=int, default=0)
    cp.add_argument("--save-every", type=int, default=50,
                    help="batches between resume points (default 50)")
    cp.set_defaults(func=_centres)

    kp = tsub.add_parser(  # the trainer's teacher cache (facekd.train.cache)
        "cache", help="run the teacher once over the training data (image + mirror)",
        description="Store the teacher embedding of every training image and of its mirror "
                    "image (flip is the only augmentation, so this is exact) in OUT, "
                    "memory-mapped and keyed by sample key, plus the teacher class centres; "
                    "recipes then set teacher.cache: OUT. Resumable: rerun after a kill. "
                    "Several GPUs: torchrun --nproc-per-node N -m facekd teacher cache ...")
    kp.add_argument("teacher", help="arcface_torch backbone, facekd checkpoint or .onnx")
    kp.add_argument("shards", help="shards folder or RecordIO dataset folder (the training data)")
    kp.add_argument("out", help="output cache folder")
    kp.add_argument("--arch", help="registry name when the checkpoint is a bare state dict")
    kp.add_argument("--classifier", help="class centres / Partial FC files for the teacher head")
    kp.add_argument("--dtype", choices=["float16", "float32"], default="float16")
    kp.add_argument("--batch-size", type=int, default=128)
    kp.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda when present)")
    kp.add_argument("--num-workers", type=int, default=0)
    kp.add_argument("--chunk-batches", type=int, default=50,
                    help="batches between resume points (default 50)")
    kp.set_defaults(func=_cache)


def _centres(args: argparse.Namespace) -> int:
    from facekd.models.teacher import teacher_centres

    teacher_centres(args.teacher, args.data, args.out, arch=args.arch,
                    batch_size=args.batch_size, device=args.device,
                    num_workers=args.num_workers, save_every=args.save_every)
    return 0


def _cache(args: argparse.Namespace) -> int:
    from facekd.train.cache import build_teacher_cache

    build_teacher_cache(args.teacher, args.shards, args.out, arch=args.arch,
                        classifier=args.classifier, batch_size=args.batch_size,
                        dtype=args.dtype, device=args.device, num_workers=args.num_workers,
                        chunk_batches=args.chunk_batches)
    return 0
