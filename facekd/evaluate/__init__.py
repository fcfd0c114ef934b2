"""facekd.evaluate: verification and IJB numbers identical to insightface's reference code.

Heavy modules load on first use, so importing the package (the CLI does) stays instant.
"""

from __future__ import annotations

from typing import Any

__all__ = ["evaluate_bin", "evaluate_ijb", "ijb_tar_at_far", "verify_pairs"]


def __getattr__(name: str) -> Any:
    if name == "verify_pairs":
        from facekd.evaluate.verification import verify_pairs

        return verify_pairs
    if name == "ijb_tar_at_far":
        from facekd.evaluate.ijb import ijb_tar_at_far

        return ijb_tar_at_far
    if name in ("evaluate_bin", "evaluate_ijb"):
        from facekd.evaluate import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'facekd.evaluate' has no attribute {name!r}")
