"""CLI group ``facekd teacher``: rebuild a teacher classifier (``centres``).

``facekd.train.commands`` adds ``cache`` to this group through :func:`subcommands` (the
cache belongs to the trainer, and models must not import train). Handlers import the
library lazily so ``facekd --help`` stays instant.
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
    add_teacher_pass_options(cp)
    cp.set_defaults(func=_centres)
    p.facekd_subcommands = tsub  # type: ignore[attr-defined]  # for subcommands()


def add_teacher_pass_options(p: argparse.ArgumentParser) -> None:
    """Options of a resumable pass of the teacher over a dataset (``centres``, ``cache``)."""
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda when present)")
    p.add_argument("--workers", type=int, default=0, help="loader worker processes")
    p.add_argument("--num-workers", dest="workers", type=int, default=argparse.SUPPRESS,
                   help=argparse.SUPPRESS)  # old spelling
    p.add_argument("--save-every", type=int, default=50,
                   help="batches between resume points (default 50)")


def subcommands(sub: argparse._SubParsersAction) -> argparse._SubParsersAction:
    """The ``facekd teacher`` group's subcommands, for stages that add their own."""
    return sub.choices["teacher"].facekd_subcommands


def _centres(args: argparse.Namespace) -> int:
    from facekd.models.teacher import teacher_centres

    teacher_centres(args.teacher, args.data, args.out, arch=args.arch,
                    batch_size=args.batch_size, device=args.device,
                    num_workers=args.workers, save_every=args.save_every)
    return 0

