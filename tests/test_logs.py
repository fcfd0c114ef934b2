"""The CLI's console log follows ``sys.stderr`` as it is when a record is written."""

from __future__ import annotations

import io
import logging
import sys

import pytest

from facekd.logs import setup_logging


@pytest.fixture
def root_handlers():
    root = logging.getLogger()
    saved, level = list(root.handlers), root.level
    yield root
    root.handlers[:] = saved
    root.setLevel(level)


def test_console_follows_replaced_and_closed_stderr(root_handlers, monkeypatch) -> None:
    first = io.StringIO()
    monkeypatch.setattr(sys, "stderr", first)
    setup_logging()
    logging.getLogger("facekd.test").info("to the first stream")
    first.close()  # what a finished pytest capture or a closed redirect leaves behind
    second = io.StringIO()
    monkeypatch.setattr(sys, "stderr", second)
    setup_logging()  # a second CLI call in the same process adds no second handler
    logging.getLogger("facekd.test").info("to the second stream")
    text = second.getvalue()
    assert text.splitlines() == ["INFO facekd.test: to the second stream"]
    consoles = [h for h in root_handlers.handlers if getattr(h, "_facekd_console", False)]
    assert len(consoles) == 1
