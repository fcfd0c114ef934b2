"""Thin entry point: same as ``facekd eval ijb ...`` (see ``facekd eval ijb --help``)."""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from facekd.cli import main

    sys.exit(main(["eval", "ijb", *sys.argv[1:]]))
