"""``facekd demo``: the whole pipeline on the embedded synthetic dataset.

Until the stages land it runs what exists; see README.
"""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the full pipeline on the embedded synthetic dataset")
    p.add_argument("--out", default="demo_out", help="output folder (reused when rerun)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from facekd.errors import FacekdError

    raise FacekdError("the demo pipeline is not built yet (Embedded default issue)")
