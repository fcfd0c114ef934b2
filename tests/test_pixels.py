"""One input scaling: facekd.data.pixels holds the 127.5 arithmetic, nothing else writes it."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np

from facekd.data.pixels import (
    GRAPH_MEAN,
    GRAPH_OFFSET,
    GRAPH_RECIPROCAL,
    normalise_pixels,
    to_raw_pixels,
)

PACKAGE = Path(__file__).resolve().parents[1] / "facekd"
RULE_NUMBERS = {127.5, 1.0 / 127.5}


def test_no_module_but_pixels_writes_the_rule_as_numbers():
    # Numbers only: docstrings and help texts may still describe (x - 127.5) / 127.5.
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.relative_to(PACKAGE).as_posix() == "data/pixels.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and type(node.value) is float \
                    and node.value in RULE_NUMBERS:
                found.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
    assert not found, f"127.5 written by hand (use facekd.data.pixels): {found}"


def test_graph_constants_and_inverse_are_the_old_arithmetic():
    assert (GRAPH_MEAN, GRAPH_RECIPROCAL, GRAPH_OFFSET) == (127.5, 1.0 / 127.5, -1.0)
    x = normalise_pixels(np.arange(256, dtype=np.uint8).reshape(1, 1, 16, 16))
    rng = np.random.default_rng(0)
    for value in (x, rng.uniform(-1, 1, (2, 3, 8, 8)).astype(np.float32)):
        assert np.array_equal(to_raw_pixels(value), value * 127.5 + 127.5)
        assert to_raw_pixels(value).dtype == np.float32
    assert np.array_equal(to_raw_pixels(x).ravel(), np.arange(256, dtype=np.float32))
