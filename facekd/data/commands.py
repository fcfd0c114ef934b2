"""CLI group ``facekd prep``: dataset conversion, inspection, .bin sets and alignment.

Each handler parses its arguments and makes one library call; the library modules are
imported lazily so ``facekd --help`` stays instant.
"""

from __future__ import annotations

import argparse
import importlib
from typing import Any


def _call(module: str, function: str, **kwargs: Any) -> Any:
    """Import ``module`` on demand and call ``function`` with the parsed options."""
    return getattr(importlib.import_module(module), function)(**kwargs)


def _print_json(obj: Any) -> None:
    import json

    print(json.dumps(obj, indent=2, default=str))


def _info(args: argparse.Namespace) -> int:
    summary = _call("facekd.data.info", "dataset_info", source=args.source, out=args.out,
                    sample_images=args.sample_images)
    _print_json(summary)
    return 0


def _rec2shards(args: argparse.Namespace) -> int:
    summary = _call("facekd.data.shards", "rec2shards", source=args.source, out=args.out,
                    shard_size=args.shard_size, workers=args.workers, verify=args.verify,
                    skip_bad=args.skip_bad)
    _print_json(summary)
    return 0


def _folder2shards(args: argparse.Namespace) -> int:
    summary = _call("facekd.data.folder", "folder2shards", source=args.source, out=args.out,
                    shard_size=args.shard_size, workers=args.workers, verify=args.verify,
                    skip_bad=args.skip_bad)
    _print_json(summary)
    return 0


def _shards2rec(args: argparse.Namespace) -> int:
    summary = _call("facekd.data.shards", "shards2rec", source=args.source, out=args.out,
                    verify=args.verify)
    _print_json(summary)
    return 0


def _rec2folder(args: argparse.Namespace) -> int:
    summary = _call("facekd.data.folder", "rec2folder", source=args.source, out=args.out,
                    limit=args.limit, skip_bad=args.skip_bad)
    _print_json(summary)
    return 0


def _reindex(args: argparse.Namespace) -> int:
    summary = _call("facekd.data.recordio", "reindex", rec_path=args.rec, idx_path=args.idx)
    _print_json(summary)
    return 0


def _make_bin(args: argparse.Namespace) -> int:
    summary = _call("facekd.data.binset", "make_bin", pairs_txt=args.pairs, out_bin=args.out,
                    root=args.root, resize=args.resize)
    _print_json(summary)
    return 0


def _bin_info(args: argparse.Namespace) -> int:
    summary = _call("facekd.data.binset", "bin_info", path=args.bin)
    _print_json(summary)
    return 0


def _align(args: argparse.Namespace) -> int:
    summary = _call("facekd.data.align", "align_folder", images_dir=args.images,
                    landmarks_file=args.landmarks, out_dir=args.out, size=args.size)
    _print_json(summary)
    return 0


def _synth(args: argparse.Namespace) -> int:
    summary = _call("facekd.data.synth", "generate", out_dir=args.out,
                    identities=args.identities, images_per_id=args.images_per_identity,
                    seed=args.seed, preset=args.preset, lfw_pairs=args.lfw_pairs,
                    cfp_pairs=args.cfp_pairs, agedb_pairs=args.agedb_pairs,
                    ijb_identities=args.ijb_identities,
                    unlabelled_identities=args.unlabelled_identities, workers=args.workers)
    _print_json(summary)
    return 0


def _add_conversion_options(p: argparse.ArgumentParser, shards: bool = True) -> None:
    if shards:
        p.add_argument("--shard-size", type=int, default=10000,
                       help="samples per tar shard (default 10000)")
        p.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
        p.add_argument("--verify", action="store_true",
                       help="re-read every written sample and compare it with the source")
    p.add_argument("--skip-bad", action="store_true",
                   help="list and count bad records instead of stopping at the first")


def register(sub: argparse._SubParsersAction) -> None:
    prep = sub.add_parser("prep", help="convert and inspect datasets (.rec, shards, .bin)",
                          description="Dataset preparation without MXNet.")
    psub = prep.add_subparsers(dest="command", metavar="COMMAND")
    psub.required = True

    p = psub.add_parser("info", help="summary of a .rec dataset or shards folder")
    p.add_argument("source", help="dataset folder, .rec file or shards folder")
    p.add_argument("--out", default=None,
                   help="folder for summary.json and the histogram PNG (default: DIR/info; "
                        "'-' prints only)")
    p.add_argument("--sample-images", type=int, default=2000,
                   help="images sampled for size/format statistics (default 2000)")
    p.set_defaults(func=_info)

    p = psub.add_parser("rec2shards", help=".rec dataset -> WebDataset tar shards")
    p.add_argument("source", help="dataset folder or .rec file")
    p.add_argument("out", help="output shards folder")
    _add_conversion_options(p)
    p.set_defaults(func=_rec2shards)

    p = psub.add_parser("folder2shards", help="one directory per identity -> tar shards")
    p.add_argument("source", help="folder with one sub-folder of images per identity")
    p.add_argument("out", help="output shards folder")
    _add_conversion_options(p)
    p.set_defaults(func=_folder2shards)

    p = psub.add_parser("shards2rec", help="tar shards -> insightface train.rec/idx/property")
    p.add_argument("source", help="shards folder (with manifest.parquet)")
    p.add_argument("out", help="output dataset folder")
    p.add_argument("--verify", action="store_true",
                   help="check every image against its sha1 in the manifest")
    p.set_defaults(func=_shards2rec)

    p = psub.add_parser("rec2folder", help="write the images of a .rec out for inspection")
    p.add_argument("source", help="dataset folder or .rec file")
    p.add_argument("out", help="output folder (one sub-folder per label)")
    p.add_argument("--limit", type=int, default=None, help="stop after this many images")
    _add_conversion_options(p, shards=False)
    p.set_defaults(func=_rec2folder)

    p = psub.add_parser("reindex", help="rebuild a .idx by scanning the .rec")
    p.add_argument("rec", help=".rec file")
    p.add_argument("--idx", default=None, help="output .idx (default: beside the .rec)")
    p.set_defaults(func=_reindex)

    p = psub.add_parser("make-bin", help="write a verification .bin from image pairs")
    p.add_argument("pairs", help="text file: 'image1 image2 same(0/1)' per line")
    p.add_argument("out", help="output .bin")
    p.add_argument("--root", default=None, help="folder the image paths are relative to")
    p.add_argument("--resize", action="store_true",
                   help="resize images that are not 112x112 instead of refusing them")
    p.set_defaults(func=_make_bin)

    p = psub.add_parser("bin-info", help="summary of a verification .bin")
    p.add_argument("bin", help=".bin file")
    p.set_defaults(func=_bin_info)

    p = psub.add_parser("align", help="5-landmark alignment of images to 112x112 crops")
    p.add_argument("images", help="folder of images")
    p.add_argument("landmarks", help="text file: 'name x1 y1 ... x5 y5' per line")
    p.add_argument("out", help="output folder")
    p.add_argument("--size", type=int, default=112, help="output size (default 112)")
    p.set_defaults(func=_align)

    p = psub.add_parser("synth", help="generate a small synthetic face dataset")
    p.add_argument("out", help="output dataset folder")
    p.add_argument("--preset", choices=["tiny", "default"], default="default",
                   help="size preset; the options below override it")
    p.add_argument("--identities", type=int, default=None, help="training identities")
    p.add_argument("--images-per-identity", type=int, default=None)
    p.add_argument("--lfw-pairs", type=int, default=None, help="0 skips lfw.bin")
    p.add_argument("--cfp-pairs", type=int, default=None, help="0 skips cfp_fp.bin")
    p.add_argument("--agedb-pairs", type=int, default=None, help="0 skips agedb_30.bin")
    p.add_argument("--ijb-identities", type=int, default=None, help="0 skips ijb/")
    p.add_argument("--unlabelled-identities", type=int, default=None,
                   help="0 skips unlabelled/")
    p.add_argument("--workers", type=int, default=None, help="render processes")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_synth)
