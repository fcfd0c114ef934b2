"""CLI group `facekd teacher` (placeholder until the Models issue lands)."""

from __future__ import annotations

import argparse

from facekd.cli import not_built


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("teacher", help="(not built yet)")
    p.set_defaults(func=not_built("teacher", "Models issue"))
