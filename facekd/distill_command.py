"""``facekd distill RECIPE [key=value ...]``: train a student, verifying on ``data.val_bins``.

It sits above the stage packages (as :mod:`facekd.demo` does) because it composes two of
them: :mod:`facekd.train` runs the loop and takes any evaluator, and
:func:`facekd.evaluate.evaluate_bin` is the one it is given.

Multi-GPU / multi-node: launch the same command under torchrun
(``torchrun --nproc-per-node 8 -m facekd distill RECIPE``); the trainer reads torchrun's
environment itself.
"""

from __future__ import annotations

import argparse
import os
from typing import Any


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("distill", help="train a student (optionally with a teacher) from a recipe",
                       description="Train a student from a YAML recipe; key.sub=value "
                                   "arguments override recipe keys. Rerunning the same "
                                   "command resumes from the run folder's latest checkpoint.")
    p.add_argument("recipe", help="recipe YAML file (see recipes/)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides")
    p.set_defaults(func=run)


def verify_bin(embedder: Any, path: str, batch_size: int) -> dict[str, Any]:
    """The trainer's evaluator: 10-fold verification on one ``.bin``, never cached (the
    model is still training), without a progress bar, and without bootstrap intervals
    (the trainer logs only the accuracy and its fold std, every validation round)."""
    from facekd.evaluate import evaluate_bin

    return evaluate_bin(embedder, path, batch_size=batch_size, use_cache=False,
                        progress=False, bootstrap=0)


def run(args: argparse.Namespace) -> int:
    from facekd.train.recipe import load_recipe
    from facekd.train.trainer import train

    recipe = load_recipe(args.recipe, args.overrides)
    out = train(recipe, evaluator=verify_bin)
    if os.environ.get("RANK", "0") == "0":   # torchrun: print the run folder once
        print(out)
    return 0
