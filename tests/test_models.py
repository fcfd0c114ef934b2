"""Backbones: arcface_torch state-dict compatibility (golden fixtures), sizes, hooks."""

from __future__ import annotations

import hashlib
import json
import math
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch

from facekd.models import create_model, feature_layers, list_models, model_info
from facekd.models.registry import feature_shapes

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "arcface_torch"


def fill_state_dict(keys, gain, seed=2024):
    """The fixture README's fill rule, verbatim in behaviour."""
    g = torch.Generator().manual_seed(seed)
    sd = OrderedDict()
    for name, shape, _dtype in keys:
        shape = tuple(shape)
        if name.endswith("num_batches_tracked"):
            sd[name] = torch.zeros(shape, dtype=torch.int64)
            continue
        u = torch.rand(shape, generator=g)
        if name.endswith("running_var"):
            t = u + 0.5
        elif len(shape) >= 2:
            t = (u * 2 - 1) * (gain * math.sqrt(3.0 / math.prod(shape[1:])))
        elif name.endswith("weight"):
            t = u + 0.5
        else:
            t = (u * 2 - 1) * 0.2
        sd[name] = t
    return sd


def state_dict_sha256(sd) -> str:
    h = hashlib.sha256()
    for name, tensor in sd.items():
        h.update(name.encode())
        h.update(tensor.contiguous().numpy().tobytes())
    return h.hexdigest()


@pytest.mark.parametrize("arch", ["r18", "r50", "mbf"])
def test_arcface_torch_golden(arch):
    expected = json.loads((FIXTURES / "expected.json").read_text())["models"][arch]
    keys = json.loads((FIXTURES / arch / "keys.json").read_text())
    model = create_model(arch)
    ours = [[n, list(t.shape), str(t.dtype).replace("torch.", "")]
            for n, t in model.state_dict().items()]
    assert ours == keys
    sd = fill_state_dict(keys, expected["gain"], expected["seed"])
    assert state_dict_sha256(sd) == expected["filled_state_dict_sha256"]
    model.load_state_dict(sd, strict=True)
    model.eval()
    x = torch.from_numpy(np.load(FIXTURES / "input.npy"))
    with torch.no_grad():
        out = model(x).numpy()
    np.testing.assert_allclose(out, np.load(FIXTURES / arch / "output.npy"), rtol=1e-4, atol=1e-4)


# Published sizes (formats.md): params in millions, GMACs at 112x112.
PUBLISHED = {"r18": (24.0, 2.61), "r50": (43.6, 6.31), "r100": (65.2, 12.09),
             "r200": (118.8, 23.42), "mbf": (2.06, 0.438), "mobilefacenet": (0.99, 0.22)}


@pytest.mark.parametrize("arch", sorted(PUBLISHED))
def test_params_and_macs_match_published(arch):
    params_m, gmacs = PUBLISHED[arch]
    info = model_info(arch)
    assert info["params"] / 1e6 == pytest.approx(params_m, rel=0.015)
    assert info["macs"] / 1e9 == pytest.approx(gmacs, rel=0.01)
    assert info["embedding_size"] == (128 if arch == "mobilefacenet" else 512)


def test_r200_fc_size():
    with torch.device("meta"):
        fc = create_model("r200").fc
    assert sum(p.numel() for p in fc.parameters()) / 1e6 == pytest.approx(12.85, abs=0.01)


def test_registry_lists_all_names():
    names = list_models()
    for name in ["r18", "r34", "r50", "r100", "r200", "mbf", "mbf_large", "mobilefacenet",
                 "r_tiny", "mbf_tiny"]:
        assert name in names


@pytest.mark.parametrize("arch", ["mbf", "mbf_tiny", "mobilefacenet", "r_tiny"])
def test_feature_layers_are_multiscale(arch):
    model = create_model(arch)
    shapes = feature_shapes(model, feature_layers(model))
    assert [s[1] for s in shapes] == [56, 28, 14, 7]


@pytest.mark.parametrize("arch", ["mbf_tiny", "r_tiny", "mobilefacenet"])
def test_small_models_train_step_and_embedding_size(arch):
    model = create_model(arch, num_features=64)
    x = torch.rand(2, 3, 112, 112) * 2 - 1
    out = model(x)
    assert out.shape == (2, 64)
    out.pow(2).mean().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_unknown_model_is_a_user_error():
    from facekd.errors import FacekdError

    with pytest.raises(FacekdError, match="unknown model 'r9'"):
        create_model("r9")


@pytest.mark.parametrize("arch", ["mbf_tiny", "r_tiny"])
def test_fp16_flag_runs_body_in_autocast_and_returns_float32(arch):
    torch.manual_seed(0)
    model = create_model(arch).eval()
    half = create_model(arch, fp16=True).eval()
    half.load_state_dict(model.state_dict())
    x = torch.rand(2, 3, 112, 112) * 2 - 1
    with torch.no_grad():
        ref, out = model(x), half(x)
    assert out.dtype == torch.float32
    cos = torch.nn.functional.cosine_similarity(out, ref, dim=1)
    assert torch.all(cos > 0.98), cos


def test_models_list_cli(monkeypatch, capsys):
    import json as _json

    from facekd.cli import main
    from facekd.models import registry

    monkeypatch.setattr(registry, "list_models", lambda: ["mbf_tiny", "mobilefacenet"])
    assert main(["models", "list", "--json"]) == 0
    rows = _json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == ["mbf_tiny", "mobilefacenet"]
    assert rows[1]["embedding_size"] == 128 and 0.2e9 < rows[1]["macs"] < 0.23e9
    assert main(["models", "list"]) == 0
    assert "mobilefacenet" in capsys.readouterr().out


def test_cli_parser_does_not_import_torch():
    import subprocess
    import sys

    code = ("import sys, facekd.cli; facekd.cli.build_parser(); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.stdout.strip() == "False", out.stderr


def test_registry_refuses_a_second_factory_under_a_taken_name():
    from facekd.errors import FacekdError
    from facekd.models.registry import register_model

    def mbf_tiny(**kwargs):  # same name as a built-in, different factory
        raise AssertionError("must not be registered")

    list_models()  # built-ins loaded
    with pytest.raises(FacekdError, match="model 'mbf_tiny' registered twice"):
        register_model(mbf_tiny)
    assert create_model("mbf_tiny").__class__.__name__ != "NoneType"
    from facekd.models import mobilefacenet

    assert register_model(mobilefacenet.mbf_tiny) is mobilefacenet.mbf_tiny  # re-import: fine
