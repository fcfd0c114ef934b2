"""Thin wrapper, same as `facekd prep shards2rec ARGS` (see --help)."""

import sys

from facekd.cli import main

if __name__ == "__main__":
    sys.exit(main(["prep", "shards2rec", *sys.argv[1:]]))
