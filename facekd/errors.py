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
