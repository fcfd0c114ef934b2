"""Thin wrapper, same as `facekd prep info ARGS` (see --help)."""

import sys

from facekd.cli import main

if __name__ == "__main__":
    sys.exit(main(["prep", "info", *sys.argv[1:]]))
