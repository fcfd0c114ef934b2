"""Every shipped recipe loads, names a registered method with valid params and weights,
and says at the top what it reproduces and what it costs."""

from __future__ import annotations

from pathlib import Path

import pytest

from facekd.distill.base import get_method_class, parse_params
from facekd.train.recipe import load_recipe

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))
METHODS = ("srd", "srd_unlabelled", "refilled", "frskd", "adadistill", "ekd", "kd", "feature",
           "rkd", "none")


def test_every_method_has_a_paper_and_an_embedded_recipe():
    names = {p.stem for p in RECIPES}
    for method in METHODS:
        assert f"{method}_ms1mv3" in names and f"{method}_synth" in names, method


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_loads_and_is_documented(path):
    recipe = load_recipe(str(path))
    cls = get_method_class(recipe.method.name)
    parse_params(cls, recipe.method.params)
    assert set(recipe.method.weights) <= set(cls.default_weights) | {"ce"}
    header = path.read_text().split("\ndata:")[0]
    assert "Reproduces:" in header and "Expected cost" in header
    if cls.needs_teacher:
        assert recipe.teacher.checkpoint or recipe.teacher.cache
    if recipe.data.unlabelled:
        assert recipe.method.name == "srd"
        assert recipe.teacher.unlabelled_cache or not recipe.teacher.cache


@pytest.mark.parametrize("path", [p for p in RECIPES if p.stem.endswith("_ms1mv3")],
                         ids=lambda p: p.name)
def test_paper_scale_recipes_use_arcface_torch_hyper_parameters(path):
    r = load_recipe(str(path))
    assert (r.student.arch, r.student.embedding_size) == ("mbf", 512)
    assert r.data.batch_size == 128 and r.optim.lr == 0.1 and r.optim.schedule == "poly"
    assert r.optim.weight_decay == 1e-4 and r.optim.name == "sgd"
    assert (r.student.head.type, r.student.head.scale, r.student.head.margin) == \
        ("arcface", 64.0, 0.5)
    if get_method_class(r.method.name).needs_teacher:
        assert r.teacher.arch == "r100"
