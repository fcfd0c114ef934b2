"""CLI group `facekd export` (placeholder until the Export issue lands)."""

from __future__ import annotations

import argparse

from facekd.cli import not_built


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="(not built yet)")
    p.set_defaults(func=not_built("export", "Export issue"))
