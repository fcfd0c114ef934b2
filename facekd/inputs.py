"""What an input folder may reference: the one place facekd decides it.

Metadata inside a dataset names other files: ``dataset.json`` its shard tars, IJB meta
files their images under ``loose_crop/``, a ``make-bin`` pair list or an ``align``
landmarks file its images. A downloaded or crafted folder must not make facekd read
(or, for ``align``, write) anything outside it, so every such name goes through
:func:`inside`: absolute names, ``..`` and symlinks are resolved, and a target that
leaves the folder is a :class:`~facekd.errors.DataError` naming the file, the line or
key and the name. ``facekd --allow-outside`` (or ``FACEKD_ALLOW_OUTSIDE=1``, which
DataLoader workers and torchrun ranks inherit) lifts the rule for users whose lists
point elsewhere on purpose.
"""

from __future__ import annotations

import os
from pathlib import Path

from facekd.errors import DataError

ENV = "FACEKD_ALLOW_OUTSIDE"


def allow_outside(enabled: bool = True) -> None:
    """Let names point outside their folder for this process and its children."""
    if enabled:
        os.environ[ENV] = "1"
    else:
        os.environ.pop(ENV, None)


def outside_allowed() -> bool:
    return os.environ.get(ENV, "") not in ("", "0")


class Folder:
    """A folder whose listed names are checked once each (its real path is kept)."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self._real = os.path.realpath(self.root)
        self._prefix = self._real.rstrip(os.sep) + os.sep
        self._allowed = outside_allowed()

    def inside(self, name: str | os.PathLike, where: str, what: str = "file") -> Path:
        """``root / name`` when it stays inside ``root`` (symlinks resolved), else an error.

        ``where`` names the listing (``file:line`` or ``file: key``) for the message.
        """
        text = str(os.fspath(name))  # numpy str from meta files prints as np.str_(...)
        if not text or "\0" in text:
            raise DataError(f"{where}: {what} name {text!r} is empty or holds a NUL byte")
        path = self.root / text
        if self._allowed:
            return path
        real = os.path.realpath(path)
        if real != self._real and not real.startswith(self._prefix):
            raise DataError(f"{where}: {what} {text!r} lies outside {self.root} "
                            f"(resolves to {real}); pass --allow-outside to allow it")
        return path


def inside(root: str | os.PathLike, name: str | os.PathLike, where: str,
           what: str = "file") -> Path:
    """:meth:`Folder.inside` for a single name."""
    return Folder(root).inside(name, where, what)
