"""The recipe/config system: strict keys with hints, typed values, overrides, round trip."""

from __future__ import annotations

import pytest

from facekd.config import apply_overrides, dump_config, load_config, save_config
from facekd.errors import ConfigError
from facekd.train.recipe import Recipe, load_recipe


@pytest.fixture
def recipe_file(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(
        "data:\n  batch_size: 64\n  val_bins: [a.bin, b.bin]\n"
        "student:\n  arch: mbf\n  head:\n    scale: 32\n"
        "method:\n  name: srd\n  weights: {srd: 1.0, feature: 2}\n"
    )
    return path


def test_loads_typed_values_and_defaults(recipe_file):
    r = load_recipe(str(recipe_file))
    assert r.data.batch_size == 64
    assert r.data.val_bins == ["a.bin", "b.bin"]
    assert r.student.head.scale == 32.0 and isinstance(r.student.head.scale, float)
    assert r.method.weights == {"srd": 1.0, "feature": 2.0}
    assert r.optim.name == "sgd"  # default filled in


def test_unknown_key_gets_a_hint(recipe_file):
    with pytest.raises(ConfigError, match=r"unknown key 'data.batch_sise'.*"
                       r"did you mean 'batch_size'"):
        load_recipe(str(recipe_file), ["data.batch_sise=3"])


def test_unknown_top_level_key_in_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("studnet:\n  arch: mbf\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown key 'studnet'.*"
                       r"did you mean 'student'"):
        load_recipe(str(path))


def test_nested_override_wins_over_file(recipe_file):
    r = load_recipe(str(recipe_file), ["student.head.scale=16", "optim.lr=0.01",
                                       "data.val_bins=[x.bin]", "teacher.checkpoint=t.pt"])
    assert r.student.head.scale == 16.0
    assert r.optim.lr == 0.01
    assert r.data.val_bins == ["x.bin"]
    assert r.teacher.checkpoint == "t.pt"


def test_type_error_names_the_key_path(recipe_file):
    with pytest.raises(ConfigError, match=r"student\.head\.scale: expected a number, "
                       r"got str 'big'"):
        load_recipe(str(recipe_file), ["student.head.scale=big"])
    with pytest.raises(ConfigError, match=r"data\.batch_size: expected an integer"):
        load_recipe(str(recipe_file), ["data.batch_size=1.5"])
    with pytest.raises(ConfigError, match=r"optim\.name: 'adam' is not one of"):
        load_recipe(str(recipe_file), ["optim.name=adam"])


def test_override_into_a_value_is_rejected(recipe_file):
    with pytest.raises(ConfigError, match="is a value, not a section"):
        load_recipe(str(recipe_file), ["data.batch_size.x=1"])


def test_malformed_override():
    with pytest.raises(ConfigError, match="not of the form"):
        apply_overrides({}, ["justakey"])


def test_resolved_config_round_trips(recipe_file, tmp_path):
    r = load_recipe(str(recipe_file), ["run.seed=7", "teacher.feature_layers=[layer3]"])
    out = tmp_path / "run" / "recipe.yaml"
    save_config(r, out)
    again = load_config(Recipe, out)
    assert again == r
    assert dump_config(again) == out.read_text()


def test_invalid_yaml_names_the_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match=r"broken.yaml: line \d+ invalid YAML"):
        load_recipe(str(path))


def test_validation_of_ranges(recipe_file):
    with pytest.raises(ConfigError, match="sample_rate must be in"):
        load_recipe(str(recipe_file), ["student.head.sample_rate=0"])


def test_head_keys_the_type_ignores_are_rejected(recipe_file):
    with pytest.raises(ConfigError, match=r"student\.head\.m2 = 0.3 is read only with "
                       r"type: combined \(type is arcface"):
        load_recipe(str(recipe_file), ["student.head.m2=0.3"])
    with pytest.raises(ConfigError, match=r"student\.head\.margin = 0.4 is not read with "
                       r"type: combined"):
        load_recipe(str(recipe_file), ["student.head.type=combined", "student.head.margin=0.4"])
    combined = load_recipe(str(recipe_file), ["student.head.type=combined",
                                              "student.head.m2=0.3", "student.head.m3=0.2"])
    assert (combined.student.head.m2, combined.student.head.m3) == (0.3, 0.2)
    # a resolved recipe of an earlier version (neutral m1/m2/m3 written out) still loads
    load_recipe(str(recipe_file), ["student.head.m1=1.0", "student.head.m2=0.0"])


def test_cosface_gets_its_own_default_margin():
    from facekd.models.heads import create_head, resolve_margins

    assert resolve_margins("cosface") == (1.0, 0.0, 0.4)  # not ArcFace's 0.5
    assert resolve_margins("arcface") == (1.0, 0.5, 0.0)
    assert resolve_margins("cosface", 0.35) == (1.0, 0.0, 0.35)
    assert create_head("cosface", 4, 3).m3 == 0.4
