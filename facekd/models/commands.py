"""CLI group ``facekd models``: list the registered backbones with their sizes."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="backbone registry")
    msub = p.add_subparsers(dest="models_cmd", metavar="CMD")
    msub.required = True
    lp = msub.add_parser("list", help="names, parameters, MACs at 112x112, embedding size")
    lp.add_argument("--json", action="store_true", help="print JSON instead of a table")
    lp.set_defaults(func=_list)


def _list(args: argparse.Namespace) -> int:
    from facekd.models.registry import format_model_table

    print(format_model_table(as_json=args.json))
    return 0
