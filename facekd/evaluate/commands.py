"""CLI group ``facekd eval {verify,ijb,compare}``.

Handlers parse arguments and call one function of ``facekd.evaluate.pipeline``; it is
imported on use so ``facekd --help`` stays instant.
"""

from __future__ import annotations

import argparse
from typing import Any


def _pipeline() -> Any:
    from facekd.evaluate import pipeline

    return pipeline


def _log_to(out: str | None) -> None:
    if out:
        from pathlib import Path

        from facekd.logs import add_file_log

        add_file_log(Path(out) / "eval.log")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--arch", help="architecture of a plain arcface_torch state dict "
                                  "(guessed from its keys when omitted)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: CUDA when present)")
    p.add_argument("--batch-size", type=int, default=256,
                   help="images loaded per step; results do not depend on it (default 256)")
    p.add_argument("--cache-dir", help="feature cache (default ~/.cache/facekd/features "
                                       "or $FACEKD_CACHE/features)")
    p.add_argument("--no-cache", action="store_true", help="recompute features, cache nothing")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument("--bootstrap", type=int, default=1000, metavar="N",
                   help="resamples of subjects/templates for the 95 %% intervals "
                        "(default 1000, seed 0; 0: no intervals)")


def _verify(args: argparse.Namespace) -> int:
    _log_to(args.out)
    _pipeline().run_verify(args.model, args.bins, arch=args.arch, device=args.device,
                           batch_size=args.batch_size, flip=not args.no_flip,
                           nrof_folds=args.folds, cache_dir=args.cache_dir,
                           use_cache=not args.no_cache, out=args.out,
                           progress=not args.no_progress, bootstrap=args.bootstrap)
    return 0


def _ijb(args: argparse.Namespace) -> int:
    _log_to(args.out)
    _pipeline().run_ijb(args.model, args.ijb_dir, dataset=args.dataset, arch=args.arch,
                        device=args.device, use_norm_score=not args.no_norm_score,
                        use_detector_score=not args.no_detector_score,
                        use_flip_test=not args.no_flip_test, batch_size=args.batch_size,
                        workers=args.workers, cache_dir=args.cache_dir,
                        use_cache=not args.no_cache, out=args.out,
                        progress=not args.no_progress, bootstrap=args.bootstrap)
    return 0


def _compare(args: argparse.Namespace) -> int:
    _log_to(args.out)
    _pipeline().run_compare(args.models, args.bins or [], args.out, ijb_dir=args.ijb,
                            dataset=args.dataset, arch=args.arch, device=args.device,
                            batch_size=args.batch_size, workers=args.workers,
                            cache_dir=args.cache_dir, use_cache=not args.no_cache,
                            progress=not args.no_progress, bootstrap=args.bootstrap)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    group = sub.add_parser("eval", help="verification (.bin) and IJB-B/C evaluation, reports",
                           description="Evaluate any model file (facekd checkpoint, "
                                       "arcface_torch state dict, ONNX) with numbers identical "
                                       "to insightface's reference code.")
    cmds = group.add_subparsers(dest="eval_cmd", metavar="COMMAND")
    cmds.required = True

    p = cmds.add_parser("verify", help="10-fold accuracy, VAL@FAR, ROC on .bin sets")
    p.add_argument("model", help="model file (.pt/.pth checkpoint or .onnx)")
    p.add_argument("bins", nargs="+", metavar="FILE.bin", help="verification sets")
    p.add_argument("--no-flip", action="store_true", help="do not add the mirror embedding")
    p.add_argument("--folds", type=int, default=10, help="cross-validation folds (default 10)")
    p.add_argument("--out", help="folder for verify.csv/.md/.json and ROC PNGs")
    _common(p)
    p.set_defaults(func=_verify)

    p = cmds.add_parser("ijb", help="IJB-B/C 1:1 TAR@FAR (and 1:N when its files exist)")
    p.add_argument("model", help="model file (.pt/.pth checkpoint or .onnx)")
    p.add_argument("ijb_dir", metavar="IJB_DIR", help="protocol folder with meta/ and loose_crop/")
    p.add_argument("--dataset", default="IJBC", choices=["IJBC", "IJBB"], type=str.upper)
    p.add_argument("--no-norm-score", action="store_true",
                   help="L2-normalise image features (reference use_norm_score=False)")
    p.add_argument("--no-detector-score", action="store_true",
                   help="ignore faceness scores (reference use_detector_score=False)")
    p.add_argument("--no-flip", dest="no_flip_test", action="store_true",
                   help="original image only (reference use_flip_test=False)")
    p.add_argument("--no-flip-test", dest="no_flip_test", action="store_true",
                   default=argparse.SUPPRESS, help=argparse.SUPPRESS)  # old spelling
    p.add_argument("--workers", type=int, default=4, help="image loading/alignment threads")
    p.add_argument("--out", help="folder for ijb.csv/.md/.json and the ROC PNG")
    _common(p)
    p.set_defaults(func=_ijb)

    p = cmds.add_parser("compare", help="one table + ROC PNGs for several models")
    p.add_argument("models", nargs="+", metavar="MODEL", help="teacher and student files")
    p.add_argument("--bins", nargs="+", metavar="FILE.bin", help="verification sets")
    p.add_argument("--ijb", metavar="IJB_DIR", help="also score this IJB protocol folder")
    p.add_argument("--dataset", default="IJBC", choices=["IJBC", "IJBB"], type=str.upper)
    p.add_argument("--workers", type=int, default=4, help="IJB image loading threads")
    p.add_argument("--out", required=True, help="folder for compare.csv/.md/.json + ROC PNGs")
    _common(p)
    p.set_defaults(func=_compare)
