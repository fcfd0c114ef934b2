"""Shared helpers of the data-prep benchmarks (P1, P2, P3, P7): synthetic datasets, tables.

The synthetic images are 112x112 JPEGs at quality 95 of smooth colour fields plus noise:
about 7.3 KB each, the size of MS1M/Glint faces, so byte-copy costs are realistic. A pool
of distinct encodings is cycled to keep generation fast; every record is still its own
record at its own offset.
"""

from __future__ import annotations

import json
import platform
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
WORK = ROOT / "_work"
MXNET_VENV = ROOT / "_venv_mxnet"
MXNET_PINS = ["mxnet==1.9.1", "numpy==1.23.5", "opencv-python-headless==4.11.0.86"]


def jpeg_pool(count: int = 256, seed: int = 0) -> list[bytes]:
    import cv2

    rng = np.random.default_rng(seed)
    pool = []
    for _ in range(count):
        small = rng.integers(0, 256, (14, 14, 3), dtype=np.uint8)
        image = cv2.resize(small, (112, 112), interpolation=cv2.INTER_CUBIC)
        noisy = np.clip(image.astype(np.int16) + rng.normal(0, 4, image.shape), 0, 255)
        ok, data = cv2.imencode(".jpg", noisy.astype(np.uint8), [cv2.IMWRITE_JPEG_QUALITY, 95])
        assert ok
        pool.append(data.tobytes())
    return pool


def make_rec(folder: Path, num_images: int, images_per_id: int = 20, seed: int = 0) -> Path:
    """An insightface-layout dataset of ``num_images`` synthetic JPEGs (cached by size)."""
    from facekd.data.recordio import write_insightface_dataset

    folder = Path(folder)
    stamp = folder / "made.json"
    want = {"num_images": num_images, "images_per_id": images_per_id, "seed": seed}
    if stamp.is_file() and json.loads(stamp.read_text()) == want:
        return folder
    pool = jpeg_pool(seed=seed)
    num_ids = -(-num_images // images_per_id)
    samples = ((i // images_per_id, pool[i % len(pool)]) for i in range(num_images))
    write_insightface_dataset(folder, samples, num_classes=num_ids)
    stamp.write_text(json.dumps(want))
    return folder


def ensure_mxnet_venv() -> tuple[Path | None, str]:
    """Python of a side venv with MXNet 1.9.1 (created on first use), or None and why."""
    python = MXNET_VENV / "bin" / "python"
    check = [str(python), "-c", "import mxnet, numpy; print(mxnet.__version__)"]
    if python.exists() and subprocess.run(check, capture_output=True).returncode == 0:
        return python, "existing venv"
    base = shutil.which("python3.11")
    if base is None:
        return None, "python3.11 not found"
    try:
        subprocess.run([base, "-m", "venv", str(MXNET_VENV)], check=True, capture_output=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *MXNET_PINS], check=True,
                       capture_output=True, timeout=1200)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        return None, f"cannot install {' '.join(MXNET_PINS)}: {exc}"
    if subprocess.run(check, capture_output=True).returncode != 0:
        return None, "mxnet installed but does not import"
    return python, "created"


def machine() -> dict[str, Any]:
    import os

    return {"python": sys.version.split()[0], "platform": platform.platform(),
            "cpus": os.cpu_count(), "load_average": os.getloadavg()}


def load_note() -> str:
    """The machine is shared: say how busy it was, since that moves every ratio."""
    import os

    one, five, _ = os.getloadavg()
    return (f"Load average during the run: {one:.1f} (1 min), {five:.1f} (5 min) on "
            f"{os.cpu_count()} CPUs shared with other jobs.")


def write_results(name: str, title: str, rows: list[dict[str, Any]], columns: list[str],
                  notes: list[str], extra: dict[str, Any]) -> Path:
    """``bench/results/<name>.md`` (a table) and ``.json`` (everything)."""
    from facekd.fileio import write_json_atomic, write_text_atomic

    RESULTS.mkdir(parents=True, exist_ok=True)
    lines = [f"# {title}", "", "| " + " | ".join(columns) + " |",
             "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(c, "")) for c in columns) + " |")
    lines += ["", *[f"- {n}" for n in notes], ""]
    md = RESULTS / f"{name}.md"
    write_text_atomic(md, "\n".join(lines))
    write_json_atomic(RESULTS / f"{name}.json",
                      {"title": title, "rows": rows, "notes": notes, "machine": machine(),
                       **extra})
    return md


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.3f}" if value < 100 else f"{value:,.0f}"
    return str(value)
