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
    ("feature", {"loss": "l1"}, "loss: 'l1' is not one of"),
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
