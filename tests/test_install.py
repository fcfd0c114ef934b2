"""Installed, not only cloned: the wheel carries everything ``facekd demo`` needs.

The wheel is built from a copy of the source tree, installed with ``--no-deps`` into a
fresh virtual environment that sees this environment's dependencies (through a ``.pth``
file, so not the editable facekd), and ``facekd demo --preset tiny`` runs from an
unrelated folder: no file of the clone may be needed at run time.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SKIP = {".venv", "build", "dist", "demo_out", "runs", ".git", "__pycache__", ".pytest_cache",
        ".ruff_cache", ".hypothesis", "_work", "_venv_mxnet", "results"}


def _source_copy(dest: Path) -> Path:
    """The tracked layout of the repository (links kept, build leftovers left out)."""
    def ignore(folder: str, names: list[str]) -> set[str]:
        return {n for n in names if n in SKIP or n.endswith(".egg-info")}

    shutil.copytree(REPO, dest, symlinks=True, ignore=ignore)
    return dest


def _run(*cmd: str | Path, cwd: Path, env: dict[str, str] | None = None,
         timeout: int = 900) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd}: exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.mark.slow
def test_the_wheel_ships_the_recipes_and_runs_the_demo_from_any_folder(tmp_path):
    src = _source_copy(tmp_path / "src")
    dist = tmp_path / "dist"
    _run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "--no-index", "-q", "-w", dist, src, cwd=tmp_path)
    wheel = next(dist.glob("facekd-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    shipped = sorted(p.name for p in (REPO / "recipes").glob("*.yaml"))
    assert sorted(Path(n).name for n in names if n.startswith("facekd/recipes/")) == shipped

    venv = tmp_path / "venv"
    _run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=tmp_path)
    python = venv / "bin" / "python"
    _run(sys.executable, "-m", "pip", "--python", python, "install", "--no-deps",
         "--no-index", "-q", wheel, cwd=tmp_path)
    purelib = Path(_run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])",
                        cwd=tmp_path).stdout.strip())
    # This environment's packages (torch, onnx, ...) without running its .pth files, so its
    # editable facekd stays invisible.
    deps = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (purelib / "facekd_test_deps.pth").write_text("".join(f"{p}\n" for p in sorted(deps)))

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "FACEKD_CACHE")}
    env["FACEKD_CACHE"] = str(tmp_path / "cache")
    where = _run(python, "-c", "import facekd; print(facekd.__file__)", cwd=elsewhere, env=env)
    assert Path(where.stdout.strip()).is_relative_to(purelib), where.stdout
    _run(venv / "bin" / "facekd", "demo", "--preset", "tiny", "--out", "demo", cwd=elsewhere,
         env=env, timeout=1800)
    report = (elsewhere / "demo" / "report.md").read_text()
    assert "student + SRD" in report
    assert (elsewhere / "demo" / "export" / "student_srd.onnx").is_file()
