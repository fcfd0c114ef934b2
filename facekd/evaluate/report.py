"""Evaluation reports: one CSV + Markdown table, ROC curves as PNG, a JSON with everything.

A number without its provenance cannot be compared later, so every report carries the
model file sha256, the dataset hash and the settings that produced it.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from facekd.fileio import atomic_path, write_json_atomic, write_text_atomic


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}" if abs(value) < 1e-3 and value != 0 else f"{value:.4f}"
    return str(value)


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(c, "")) for c in columns) + " |")
    return "\n".join(lines)


def columns_of(rows: Sequence[dict[str, Any]]) -> list[str]:
    cols: list[str] = []
    for row in rows:
        for key in row:
            if key not in cols:
                cols.append(key)
    return cols


def write_table(out_dir: str | Path, stem: str, rows: Sequence[dict[str, Any]],
                header: Sequence[str] = (), title: str = "facekd evaluation") -> dict[str, Path]:
    """Write ``<stem>.csv`` and ``<stem>.md`` (title, provenance lines, table)."""
    out_dir = Path(out_dir)
    cols = columns_of(rows)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({c: row.get(c, "") for c in cols})
    csv_path, md_path = out_dir / f"{stem}.csv", out_dir / f"{stem}.md"
    write_text_atomic(csv_path, buf.getvalue())
    md = [f"# {title}", ""]
    md += [f"- {line}" for line in header]
    md += ["", markdown_table(rows, cols), ""]
    write_text_atomic(md_path, "\n".join(md))
    return {"csv": csv_path, "md": md_path}


def plot_roc(path: str | Path, curves: dict[str, tuple[np.ndarray, np.ndarray]],
             title: str) -> Path:
    """ROC curves (TPR vs FPR on a log axis) for several models on one dataset, as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4.5), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    for label, (fpr, tpr) in curves.items():
        fpr = np.asarray(fpr)
        ok = fpr > 0
        ax.plot(fpr[ok], np.asarray(tpr)[ok], label=label, linewidth=1.5)
    ax.set_xscale("log")
    ax.set_xlim(1e-6, 1)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("False positive rate")
    ax.set_ylabel("True positive rate")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png")
    return path


def jsonable(obj: Any) -> Any:
    """Results with numpy values and float keys -> plain JSON types (arrays dropped)."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items() if not isinstance(v, np.ndarray)}
    if isinstance(obj, list | tuple):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_json(path: str | Path, obj: Any) -> Path:
    write_json_atomic(path, jsonable(obj))
    return Path(path)
