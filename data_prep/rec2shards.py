"""Thin wrapper, same as `facekd prep rec2shards ARGS` (see --help)."""

import sys

from facekd.cli import main

if __name__ == "__main__":
    sys.exit(main(["prep", "rec2shards", *sys.argv[1:]]))
