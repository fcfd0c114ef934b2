"""Logging set-up for the CLI and for run folders (one log file per long job)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(verbosity: int = 0) -> None:
    """Console logging for the CLI: INFO by default, DEBUG with ``-v``."""
    level = logging.DEBUG if verbosity > 0 else logging.INFO
    root = logging.getLogger()
    root.setLevel(level)
    if not any(getattr(h, "_facekd_console", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        handler._facekd_console = True  # type: ignore[attr-defined]
        root.addHandler(handler)


def add_file_log(path: str | Path) -> logging.Handler:
    """Also log to ``path`` (appending, so a resumed job keeps one log); returns the handler."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter(FORMAT))
    logging.getLogger().addHandler(handler)
    return handler
