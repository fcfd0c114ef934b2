"""Errors caused by user input.

The CLI turns a :class:`FacekdError` into one line on stderr and exit code 2, so every
check of files, records, keys and recipes raises one of these with a message that names
what is wrong and where.
"""

from __future__ import annotations


class FacekdError(Exception):
    """A problem with the user's input (file, record, key, option); not a bug."""


class ConfigError(FacekdError):
    """A recipe or override that does not fit the schema."""


class DataError(FacekdError):
    """A data file that is missing, truncated or malformed."""


class CheckpointError(FacekdError):
    """A checkpoint that cannot be loaded into the requested model."""


class OutputError(FacekdError):
    """An output path that cannot be written (read-only, no permission, disk full, a file
    where a folder is needed); the message names the path and the cause."""


def first_line(exc: BaseException) -> str:
    """The first line of a foreign exception's message (its type name when empty): what
    a one-line error quotes of a library's multi-line report."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
