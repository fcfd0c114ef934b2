"""Thin wrapper, same as `facekd prep reindex ARGS` (see --help)."""

import sys

from facekd.cli import main

if __name__ == "__main__":
    sys.exit(main(["prep", "reindex", *sys.argv[1:]]))
