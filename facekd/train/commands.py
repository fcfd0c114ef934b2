"""CLI group ``facekd distill RECIPE [key=value ...]``.

Multi-GPU / multi-node: launch the same command under torchrun
(``torchrun --nproc-per-node 8 -m facekd distill RECIPE``); the trainer reads torchrun's
environment itself.
"""

from __future__ import annotations

import argparse
import os


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("distill", help="train a student (optionally with a teacher) from a recipe",
                       description="Train a student from a YAML recipe; key.sub=value "
                                   "arguments override recipe keys. Rerunning the same "
                                   "command resumes from the run folder's latest checkpoint.")
    p.add_argument("recipe", help="recipe YAML file (see recipes/)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from facekd.train.recipe import load_recipe
    from facekd.train.trainer import train

    recipe = load_recipe(args.recipe, args.overrides)
    out = train(recipe)
    if os.environ.get("RANK", "0") == "0":   # torchrun: print the run folder once
        print(out)
    return 0
