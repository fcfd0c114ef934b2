"""CLI group `facekd eval` (placeholder until the Evaluation issue lands)."""

from __future__ import annotations

import argparse

from facekd.cli import not_built


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="(not built yet)")
    p.set_defaults(func=not_built("eval", "Evaluation issue"))
