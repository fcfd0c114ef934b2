"""Small file helpers shared by every stage: atomic writes and content hashes.

Long jobs must never leave a half-written file under its final name, so every writer
goes through :func:`atomic_path` (write to a temp file beside the target, then rename).
It is also the one place where a failing output (read-only folder, no permission, full
disk, a file where a folder should be) becomes an :class:`~facekd.errors.OutputError`
naming the path and the cause, so no command needs its own handling.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from facekd.errors import OutputError

_TMP_TAG = re.compile(r"^\..+\.tmp-(\d+)(\..*)?$")  # .NAME.tmp-PID[.suffix]


def _cause(exc: OSError, folder: Path) -> str:
    """The reason an output failed, in words (numpy's short write has no errno)."""
    if exc.errno is None and disk_full(folder):
        return os.strerror(errno.ENOSPC)
    if exc.errno in (errno.EEXIST, errno.ENOTDIR):
        return "a file is in the way where a folder is needed"
    return exc.strerror or str(exc) or type(exc).__name__


def disk_full(folder: str | os.PathLike) -> bool:
    """True when the file system holding ``folder`` has no block left for us."""
    try:
        return os.statvfs(folder).f_bavail == 0
    except (OSError, AttributeError):
        return False


def output_error(path: str | os.PathLike, exc: OSError) -> OutputError:
    """The one-line error for an output ``path`` that ``exc`` stopped."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    return OutputError(f"{path}: cannot write ({_cause(exc, folder)})")


def make_dirs(folder: str | os.PathLike) -> Path:
    """``mkdir -p`` for an output folder, failing with an :class:`OutputError`."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{folder}: cannot create the output folder "
                          f"({_cause(exc, folder.parent)})") from exc
    return folder


def _about_output(exc: OSError, paths: tuple[Path, ...]) -> bool:
    """Whether ``exc`` came from writing one of ``paths`` (not from reading an input)."""
    if exc.filename is None:
        return True
    return any(os.fspath(exc.filename) == os.fspath(p) for p in paths)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` on success.

    ``suffix`` keeps an extension on the temp name for writers that insist on one
    (``torch.onnx.export``, ``np.save``). On error the temp file is removed, and an
    OSError of the write itself becomes an :class:`OutputError` naming ``path``.
    """
    path = Path(path)
    make_dirs(path.parent)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}{suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as exc:
        if _about_output(exc, (tmp, path, path.parent)):
            raise output_error(path, exc) from exc
        raise
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


def remove_stale_temps(folder: str | os.PathLike) -> list[Path]:
    """Delete temp files of :func:`atomic_path` left in ``folder`` by killed processes.

    A temp name carries its writer's PID; a file whose PID is no longer running (or is
    this process, which has nothing open yet) is a leftover, and a resumed job removes
    it rather than leaving ``.manifest.parquet.tmp-1234.parquet`` lying about.
    """
    removed = []
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return removed
    for entry in entries:
        match = _TMP_TAG.match(entry.name)
        if not match or not entry.is_file():
            continue
        pid = int(match.group(1))
        if pid != os.getpid() and _pid_alive(pid):
            continue
        with contextlib.suppress(OSError):
            entry.unlink()
            removed.append(entry)
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks so large files stay out of memory."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def reserve_space(path: str | os.PathLike) -> None:
    """Allocate every block of ``path`` now (a sparse file a memmap will fill).

    Writing into a mapped page that the disk cannot back kills the process with SIGBUS;
    allocating up front turns a full disk into an ordinary ENOSPC OSError.
    """
    if not hasattr(os, "posix_fallocate"):
        return
    with open(path, "r+b") as f:
        size = os.fstat(f.fileno()).st_size
        if size:
            try:
                os.posix_fallocate(f.fileno(), 0, size)
            except OSError as exc:
                if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL):
                    return  # the file system cannot preallocate; nothing gained, nothing lost
                raise OSError(exc.errno, exc.strerror, os.fspath(path)) from None
