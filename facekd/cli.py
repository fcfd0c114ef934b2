"""The ``facekd`` command: one argparse tree, one library call per subcommand.

Each pipeline stage registers its own group from a small ``commands`` module that
imports nothing heavy at module level, so ``facekd --help`` is instant. A
:class:`~facekd.errors.FacekdError` (bad input) becomes one line on stderr and exit
code 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from facekd import __version__
from facekd.errors import FacekdError

# (group, module defining ``register(subparsers)``), in pipeline order.
GROUPS: tuple[tuple[str, str], ...] = (
    ("prep", "facekd.data.commands"),
    ("models", "facekd.models.commands"),
    ("teacher", "facekd.models.teacher_commands"),
    ("distill", "facekd.distill_command"),
    ("eval", "facekd.evaluate.commands"),
    ("export", "facekd.export.commands"),
    ("demo", "facekd.demo"),
)

# Modules that add subcommands to groups above (``register(subparsers)`` too).
EXTENSIONS: tuple[str, ...] = ("facekd.train.commands",)  # facekd teacher cache

log = logging.getLogger("facekd")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="facekd",
        description="Distil ArcFace teachers into small face embedders: "
                    "data prep, distillation, evaluation and export.")
    parser.add_argument("--version", action="version", version=f"facekd {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="show tracebacks instead of one-line errors")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging")
    parser.add_argument("--allow-outside", action="store_true",
                        help="let dataset.json, IJB meta, pair and landmark lists name files "
                             "outside their folder (refused by default)")
    sub = parser.add_subparsers(dest="group", metavar="GROUP")
    sub.required = True
    for module in [m for _, m in GROUPS] + list(EXTENSIONS):
        importlib.import_module(module).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from facekd.logs import setup_logging

    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    if args.allow_outside:
        from facekd.inputs import allow_outside

        allow_outside()
    try:
        result = args.func(args)
    except FacekdError as exc:
        if args.debug:
            raise
        print(f"facekd: error: {one_line(exc)}", file=sys.stderr)
        return 2
    except OSError as exc:  # the environment (a path, the disk), not a bug in facekd
        if args.debug:
            raise
        print(f"facekd: error: {one_line(describe_os_error(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("facekd: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


def describe_os_error(exc: OSError) -> str:
    """One line for an OSError that reached the CLI: the path (when known) and the cause."""
    cause = exc.strerror or str(exc) or type(exc).__name__
    if exc.filename is None:
        return f"cannot complete: {cause}"
    where = f"{exc.filename}" + (f" -> {exc.filename2}" if exc.filename2 else "")
    return f"{where}: {cause}"


def one_line(text: str) -> str:
    """Messages embed file content and library text; the CLI promises one line."""
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


def not_built(group: str, issue: str):
    """Handler for a group whose stage is not implemented yet: says so plainly, exit 2."""

    def handler(args: argparse.Namespace) -> int:
        raise FacekdError(f"'facekd {group}' is not built yet ({issue})")

    return handler
