"""Child process of tests/test_hostile_inputs.py: runs many ``facekd`` command lines.

Usage: ``python tests/hostile_driver.py CASES.json RESULTS.json``. Each case is
``{"id", "argv", "list": [folders]}``; it runs through the real CLI entry point
(``facekd.cli.main``) with file descriptors 1 and 2 captured, so OpenCV's or libjpeg's
own writes count as output too. Grouping the cases in one process saves a torch import
per case (seconds each on a small machine); between cases the log handlers and the
``--allow-outside`` switch are reset so no case leaks into the next.

Safety nets the cases are judged by:
- ``HOSTILE_AS_LIMIT_GB``: address-space headroom (RLIMIT_AS) over what the imports
  use, so a value that sizes memory from untrusted metadata fails with MemoryError (a
  traceback the test reports) instead of swapping the machine;
- ``HOSTILE_SECRET``: a folder no case may open (an audit hook records every Python
  ``open`` under it).
"""

from __future__ import annotations

import json
import logging
import os
import resource
import sys
import tempfile
import traceback


def _vm_size() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


def _listing(folders: list[str]) -> list[tuple[str, int]]:
    """``(relative path, size)`` of every file (size -1 for folders) under ``folders``."""
    found = []
    for folder in folders:
        for parent, dirs, files in os.walk(folder):
            for name in dirs:
                found.append((os.path.relpath(os.path.join(parent, name), folder), -1))
            for name in files:
                path = os.path.join(parent, name)
                found.append((os.path.relpath(path, folder), os.lstat(path).st_size))
    return sorted(found)


def main() -> int:
    cases_file, results_file = sys.argv[1], sys.argv[2]
    with open(cases_file) as f:
        cases = json.load(f)
    # What the commands import anyway, loaded before the limit is measured.
    import cv2  # noqa: F401
    import onnxruntime  # noqa: F401
    import pyarrow.parquet  # noqa: F401
    import torch

    from facekd.cli import main as cli

    torch.set_num_threads(1)
    headroom = float(os.environ.get("HOSTILE_AS_LIMIT_GB", "0"))
    limit = int(_vm_size() + headroom * (1 << 30)) if headroom else None
    if limit:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    secret = os.environ.get("HOSTILE_SECRET")
    opened: list[str] = []

    def audit(event: str, args: tuple) -> None:
        if event == "open" and secret and args and isinstance(args[0], (str, bytes)):
            path = os.fsdecode(args[0])
            if os.path.realpath(path).startswith(secret):
                opened.append(path)

    sys.addaudithook(audit)
    root_logger = logging.getLogger()
    results = []
    for case in cases:
        opened.clear()
        if "alloc_gb" in case:  # proves the limit bounds growth: this must fail
            try:
                block = bytearray(int(case["alloc_gb"] * (1 << 30)))
                del block
                results.append({"id": case["id"], "rc": "allocated"})
            except MemoryError:
                results.append({"id": case["id"], "rc": "MemoryError"})
            continue
        sys.stdout.flush()
        sys.stderr.flush()
        saved = os.dup(1), os.dup(2)
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            os.dup2(out.fileno(), 1)
            os.dup2(err.fileno(), 2)
            crash = None
            try:
                rc = cli(case["argv"])
            except SystemExit as exc:
                rc = exc.code if isinstance(exc.code, int) else 1
            except BaseException:  # what the test is looking for: an escaped exception
                rc = None
                crash = traceback.format_exc()
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            out.seek(0)
            err.seek(0)
            stdout = out.read().decode(errors="replace")
            stderr = err.read().decode(errors="replace")
        for handler in list(root_logger.handlers):
            if not getattr(handler, "_facekd_console", False):
                root_logger.removeHandler(handler)
                handler.close()
        os.environ.pop("FACEKD_ALLOW_OUTSIDE", None)
        results.append({"id": case["id"], "rc": rc, "stdout": stdout[-4000:],
                        "stderr": stderr[-4000:], "crash": crash, "opened": list(opened),
                        "listing": _listing(case.get("list", []))})
    results.append({"id": "__limit__", "limit": limit, "vm": _vm_size()})
    with open(results_file, "w") as f:
        json.dump(results, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
