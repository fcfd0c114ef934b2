"""Thin wrapper, same as `facekd prep rec2folder ARGS` (see --help)."""

import sys

from facekd.cli import main

if __name__ == "__main__":
    sys.exit(main(["prep", "rec2folder", *sys.argv[1:]]))
