"""train's CLI: ``facekd teacher cache`` (the trainer's teacher cache).

``facekd distill`` itself is wired in :mod:`facekd.distill_command`, above the stages,
because it composes training with in-training verification (``facekd.evaluate``).
Handlers import the library lazily so ``facekd --help`` stays instant.
"""

from __future__ import annotations

import argparse

from facekd.models.teacher_commands import add_teacher_pass_options, subcommands


def register(sub: argparse._SubParsersAction) -> None:
    """Add train's subcommands to the groups other stages created."""
    _register_teacher_cache(subcommands(sub))


def _register_teacher_cache(tsub: argparse._SubParsersAction) -> None:
    """``facekd teacher cache``: the trainer's teacher cache, in the teacher group."""
    kp = tsub.add_parser(
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
    add_teacher_pass_options(kp)
    kp.add_argument("--chunk-batches", dest="save_every", type=int,
                    default=argparse.SUPPRESS, help=argparse.SUPPRESS)  # old spelling
    kp.set_defaults(func=_cache)


def _cache(args: argparse.Namespace) -> int:
    from facekd.train.cache import build_teacher_cache

    build_teacher_cache(args.teacher, args.shards, args.out, arch=args.arch,
                        classifier=args.classifier, batch_size=args.batch_size,
                        dtype=args.dtype, device=args.device, num_workers=args.workers,
                        chunk_batches=args.save_every)
    return 0
