"""Methods trained in stages (REFILLED): one recipe, several trainer runs in sequence.

A method's :meth:`~facekd.distill.base.DistillMethod.stages` says which recipe values
each stage sets; this module derives the stage recipes and runs them. An earlier stage
writes ``OUT/<stage name>/``, the last one ``OUT`` itself; a stage whose
``summary.json`` exists is not rerun and an unfinished one resumes from its checkpoints,
so a killed staged run resumes like any other.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from facekd.train.recipe import Recipe


def _set(data: dict[str, Any], dotted: str, value: Any) -> None:
    node = data
    *parents, last = dotted.split(".")
    for key in parents:
        node = node.setdefault(key, {})
    node[last] = value


def stage_recipes(recipe: Recipe) -> list[tuple[str, Recipe]]:
    """(name, recipe) per stage; ``[("", recipe)]`` for a method trained in one run."""
    from facekd.config import from_dict, to_dict
    from facekd.distill.base import get_method_class, parse_params

    cls = get_method_class(recipe.method.name)
    stages = cls.stages(parse_params(cls, recipe.method.params), recipe)
    if not stages:
        return [("", recipe)]
    out = Path(recipe.run.output)
    folders = {stage.name: out / stage.name for stage in stages[:-1]}
    folders[stages[-1].name] = out
    result = []
    for stage in stages:
        data = to_dict(recipe)
        for key, value in stage.values.items():
            _set(data, key, value)
        _set(data, "run.output", str(folders[stage.name]))
        if stage.init_from is not None:
            _set(data, "student.init", str(folders[stage.init_from] / "student.pt"))
        result.append((stage.name, from_dict(Recipe, data)))
    return result


def run_stages(recipe: Recipe, run_one: Callable[[Recipe], Path]) -> Path:
    """Run each stage with ``run_one`` (skipping finished earlier ones); the last's folder."""
    stages = stage_recipes(recipe)
    for _, stage in stages[:-1]:
        if not (Path(stage.run.output) / "summary.json").exists():
            run_one(stage)
    return run_one(stages[-1][1])
