"""CLI group `facekd prep` (placeholder until the Data-prep issue lands)."""

from __future__ import annotations

import argparse

from facekd.cli import not_built


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prep", help="(not built yet)")
    p.set_defaults(func=not_built("prep", "Data-prep issue"))
