"""The method registry: names, strict typed params, weights, and what each method needs."""

from __future__ import annotations

import pytest
import torch

from facekd.distill import (
    StudentOutput,
    TeacherOutput,
    create_method,
    get_method_class,
    list_methods,
    resolve_weights,
)
from facekd.distill.connectors import sample_classes
from facekd.errors import ConfigError


def _make(name: str, **params):
    return create_method(name, student_dim=4, teacher_dim=6, num_classes=5, params=params)


def test_all_methods_registered():
    assert set(list_methods()) >= {"srd", "refilled", "frskd", "kd", "feature", "rkd", "none"}


def test_unknown_method_names_closest():
    with pytest.raises(ConfigError, match="did you mean 'srd'"):
        get_method_class("srdd")


def test_unknown_param_key_gives_hint():
    with pytest.raises(ConfigError, match=r"method\.params\.num_negative.*'num_negatives'"):
        _make("srd", num_negative=10)


@pytest.mark.parametrize("name,params,match", [
    ("kd", {"temperature": "hot"}, "temperature: expected a number"),
    ("kd", {"temperature": 0}, "temperature must be positive"),
    ("srd", {"connector": "conv"}, "connector: 'conv' is not one of"),
    ("srd", {"num_negatives": -1}, "num_negatives"),
    ("refilled", {"stage": 3}, "stage must be 1, 2 or 'two_stage'"),
    ("feature", {"feature_loss": "l1"}, "feature_loss: 'l1' is not one of"),
    ("none", {"anything": 1}, "unknown key 'method.params.anything'"),
])
def test_bad_params_raise_config_error(name, params, match):
    with pytest.raises(ConfigError, match=match):
        _make(name, **params)


def test_params_from_yaml_types():
    # YAML gives ints for floats and ints/strings for the REFILLED stage.
    assert _make("kd", temperature=2).params.temperature == 2.0
    assert _make("refilled", stage=1).params.stage == 1
    assert _make("refilled", stage="two_stage").params.stage == "two_stage"


def test_srd_feature_connector_needs_channels():
    with pytest.raises(ConfigError, match="student_feature_channels"):
        _make("srd", connector="feature")


def test_resolve_weights_defaults_overrides_and_typos():
    rkd = _make("rkd")
    assert resolve_weights(rkd, None) == {"rkd_distance": 25.0, "rkd_angle": 50.0, "ce": 1.0}
    assert resolve_weights(rkd, {"rkd_angle": 2, "ce": 0.5})["rkd_angle"] == 2.0
    with pytest.raises(ConfigError, match="did you mean 'rkd_angle'"):
        resolve_weights(rkd, {"rkd_angel": 1.0})
    assert resolve_weights(_make("none"), {}) == {"ce": 1.0}


def test_needs_flags():
    assert not get_method_class("none").needs_teacher
    assert not get_method_class("frskd").needs_teacher
    assert get_method_class("srd").needs_teacher_classifier
    assert not get_method_class("feature").needs_teacher_classifier
    assert not _make("refilled", stage=1).needs_teacher_classifier
    assert _make("refilled", stage=2).needs_teacher_classifier
    srd_feat = create_method("srd", student_dim=4, teacher_dim=6, num_classes=5,
                             params={"connector": "feature"}, student_feature_channels=[3, 8])
    assert srd_feat.needs_features and not _make("srd").needs_features


def test_missing_teacher_or_centres_is_a_clear_error():
    student = StudentOutput(torch.randn(3, 4))
    labels = torch.tensor([0, 1, -1])
    with pytest.raises(ConfigError, match="needs a teacher"):
        _make("srd")(student, None, labels)
    with pytest.raises(ConfigError, match="class centres"):
        _make("srd")(student, TeacherOutput(torch.randn(3, 6)), labels)


def test_none_returns_nothing():
    assert _make("none")(StudentOutput(torch.randn(2, 4)), None, torch.tensor([0, 1])) == {}


def test_sample_classes_keeps_positives_and_is_seeded():
    labels = torch.tensor([7, 3, 3, -1, 12])
    torch.manual_seed(5)
    first = sample_classes(labels, 20, 4)
    torch.manual_seed(5)
    again = sample_classes(labels, 20, 4)
    assert torch.equal(first, again)
    assert first.numel() == 3 + 4
    assert torch.equal(first, first.sort().values)
    assert {3, 7, 12} <= set(first.tolist())
    assert sample_classes(labels, 20, None) is None
    assert sample_classes(labels, 6, 10) is None  # everything kept anyway


# Old spellings of renamed method keys (issue 12: SRD's and feature's keys alike) and
# the current ones they stand for; each pair must build the very same method.
OLD_AND_NEW = [
    ("feature", {"loss": "cosine", "connector": True},
     {"feature_loss": "cosine", "connector": "embedding"}),
    ("feature", {"loss": "mse", "connector": False},
     {"feature_loss": "mse", "connector": "none"}),
    ("adadistill", {"connector": "linear"}, {"connector": "embedding"}),
]


@pytest.mark.parametrize("name,old,new", OLD_AND_NEW)
def test_old_spellings_build_the_same_method(name, old, new, caplog):
    dim = 4 if new.get("connector") == "none" else 6
    built = []
    for params in (old, new):
        torch.manual_seed(0)
        built.append(create_method(name, student_dim=4, teacher_dim=dim, num_classes=5,
                                   params=params))
    with_old, with_new = built
    assert with_old.params == with_new.params
    assert type(with_old.connector) is type(with_new.connector)
    state_old, state_new = with_old.state_dict(), with_new.state_dict()
    assert state_old.keys() == state_new.keys()
    assert all(torch.equal(state_old[k], state_new[k]) for k in state_old)
    torch.manual_seed(1)
    student, teacher = torch.randn(6, 4), torch.randn(6, dim)
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    losses = [m(StudentOutput(student), TeacherOutput(teacher), labels) for m in built]
    assert losses[0].keys() == losses[1].keys()
    assert all(torch.equal(losses[0][k], losses[1][k]) for k in losses[0])
    # the old spelling is a note in the log, not an error
    caplog.clear()
    create_method(name, student_dim=4, teacher_dim=dim, num_classes=5, params=old)
    notes = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert notes and all("deprecated" in note and "method.params." in note for note in notes)


def test_old_and_new_spelling_together_is_refused():
    with pytest.raises(ConfigError, match=r"'method\.params\.loss' is the old spelling of "
                                          r"'method\.params\.feature_loss'"):
        _make("feature", loss="mse", feature_loss="mse")


def test_srd_and_feature_recipes_share_their_key_names():
    from facekd.config import read_yaml
    from facekd.train.recipe import shipped_recipe

    keys = {name: set(read_yaml(shipped_recipe(f"{name}_synth.yaml"))["method"]["params"])
            for name in ("srd", "feature")}
    assert {"connector", "feature_loss"} <= keys["srd"] & keys["feature"]


def test_a_recipe_in_the_old_spelling_loads_to_the_same_params():
    from facekd.distill.base import parse_params
    from facekd.train.recipe import load_recipe, shipped_recipe

    path = str(shipped_recipe("feature_synth.yaml"))
    old = load_recipe(path, ["method.params={loss: cosine, connector: true}"])
    new = load_recipe(path)
    cls = get_method_class("feature")
    assert parse_params(cls, old.method.params) == parse_params(cls, new.method.params)
