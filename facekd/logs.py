"""Logging set-up for the CLI and for run folders (one log file per long job)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _Console(logging.StreamHandler):
    """The CLI's console handler: writes to the ``sys.stderr`` of each record's time.

    A StreamHandler keeps the stream of its creation; when that stream is replaced and
    closed (a pytest capture, an embedding program's redirect), later records failed
    with "Logging error" tracebacks and went nowhere.
    """

    _facekd_console = True  # what test drivers keep when they clear the other handlers

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property  # type: ignore[override]
    def stream(self) -> Any:  # logging reads and assigns it
        return sys.stderr

    @stream.setter
    def stream(self, value: object) -> None:  # StreamHandler.__init__ assigns it
        pass


def setup_logging(verbosity: int = 0) -> None:
    """Console logging for the CLI: INFO by default, DEBUG with ``-v``."""
    level = logging.DEBUG if verbosity > 0 else logging.INFO
    root = logging.getLogger()
    root.setLevel(level)
    if not any(isinstance(h, _Console) for h in root.handlers):
        handler = _Console()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)


class _FileLog(logging.FileHandler):
    """A job's log file that goes quiet when its disk fills or vanishes.

    logging's default prints a traceback per failed record; the job's own output
    failure is what the user must see (one line, from the CLI), so a log that cannot be
    written just stops, and the console keeps every message.
    """

    failed = False

    def emit(self, record: logging.LogRecord) -> None:
        if not self.failed:
            super().emit(record)

    def handleError(self, record: logging.LogRecord) -> None:
        self.failed = True

    def flush(self) -> None:
        try:
            super().flush()
        except OSError:
            self.failed = True

    def close(self) -> None:  # a full disk fails the last flush; the job's error matters
        try:
            super().close()
        except OSError:
            self.failed = True


def add_file_log(path: str | Path) -> logging.Handler:
    """Also log to ``path`` (appending, so a resumed job keeps one log); returns the handler.

    An unwritable log location is an :class:`~facekd.errors.OutputError` naming it.
    """
    from facekd.fileio import make_dirs, output_error

    path = Path(path)
    make_dirs(path.parent)
    try:
        handler = _FileLog(path, encoding="utf-8")
    except OSError as exc:
        raise output_error(path, exc) from exc
    handler.setFormatter(logging.Formatter(FORMAT))
    logging.getLogger().addHandler(handler)
    return handler
