"""Thin wrapper: `python data_prep/rec2shards.py ARGS` == `facekd prep rec2shards ARGS` (see --help)."""

import sys

from facekd.cli import main

if __name__ == "__main__":
    sys.exit(main(["prep", "rec2shards", *sys.argv[1:]]))
