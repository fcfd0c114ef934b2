"""ONNX export: parity gate, dynamic batch, insightface loading, challenge checks, cards."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from facekd.cli import main as cli_main
from facekd.errors import FacekdError
from facekd.export import onnx_export, parity
from facekd.export.card import card_paths
from facekd.export.checks import check_challenge
from facekd.export.graph import read_metadata
from facekd.export.onnx_export import export_backbone, export_onnx, load_student
from facekd.models import create_model, list_models, save_checkpoint

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"
TEACHERS = {"r18", "r34", "r50", "r100", "r200"}
STUDENTS = [name for name in list_models() if name not in TEACHERS]


def _randomised(arch: str, seed: int = 0) -> torch.nn.Module:
    """A model whose BatchNorm statistics are not the identity, so outputs depend on input."""
    torch.manual_seed(seed)
    model = create_model(arch)
    for module in model.modules():
        if isinstance(module, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
            if module.affine:
                module.weight.data.uniform_(0.8, 1.2)
                module.bias.data.uniform_(-0.1, 0.1)
    return model.eval()


def _torch_embed(model: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


def _run(path: Path, x: np.ndarray) -> np.ndarray:
    return parity.onnx_session(path).run(None, {"data": x.astype(np.float32)})[0]


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "mbf_tiny.pt"
    save_checkpoint(path, _randomised("mbf_tiny"), "mbf_tiny", {}, meta={"recipe": "demo"})
    return path


@pytest.fixture(scope="module")
def tiny_onnx(tiny_ckpt, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    export_onnx(tiny_ckpt, out)
    return out


@pytest.mark.parametrize("arch", [pytest.param(a, marks=pytest.mark.slow) if a == "mbf_large"
                                  else a for a in STUDENTS])
def test_parity_on_every_registered_student(arch, tmp_path):
    model = _randomised(arch)
    path = tmp_path / "s.onnx"
    if arch == "mbf_tiny":   # the whole gate; the bigger students get trace + parity only
        save_checkpoint(tmp_path / "s.pt", model, arch, {})
        section = export_backbone(load_student(tmp_path / "s.pt"), path, parity_faces=4).section
        assert section["parity"]["passed"] and section["challenge"]["passed"]
    else:
        onnx_export.trace_to_onnx(model, path)
    x = parity.to_model_input(parity.synthetic_aligned_faces(3, seed=9))
    expected, got = _torch_embed(model, x), _run(path, x)
    report = parity.compare_embeddings(expected, got, arch, parity.FP32_THRESHOLDS)
    assert report.passed and report.max_one_minus_cos <= 1e-5
    # Independent of the gate's own arithmetic: real-looking faces agree element-wise.
    np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-4)


def test_graph_contract_and_dynamic_batch(tiny_onnx, tiny_ckpt):
    model_proto = onnx.load(str(tiny_onnx))
    onnx.checker.check_model(model_proto)
    assert [i.name for i in model_proto.graph.input] == ["data"]
    assert [o.name for o in model_proto.graph.output] == ["embedding"]
    dims = model_proto.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [3, 112, 112]
    assert max(o.version for o in model_proto.opset_import if o.domain in ("", "ai.onnx")) >= 17
    meta = read_metadata(tiny_onnx)
    assert meta["facekd.input_normalization"] == "outside"
    assert meta["facekd.arch"] == "mbf_tiny"
    model = load_student(tiny_ckpt).model
    x = parity.to_model_input(parity.synthetic_aligned_faces(7, seed=3))
    full = _run(tiny_onnx, x)
    np.testing.assert_allclose(full, _torch_embed(model, x), rtol=1e-3, atol=1e-5)
    for n in (1, 3):
        np.testing.assert_allclose(_run(tiny_onnx, x[:n]), full[:n], rtol=1e-4, atol=1e-6)


def test_card_written_next_to_model(tiny_onnx, tiny_ckpt):
    json_path, md_path = card_paths(tiny_onnx)
    card = json.loads(json_path.read_text())
    assert card["model"]["arch"] == "mbf_tiny"
    assert card["model"]["embedding_size"] == 128
    assert card["model"]["params"] > 0 and card["model"]["macs"] > 0
    assert card["input"]["normalization"] == "outside"
    assert card["source"]["checkpoint_sha256"] == onnx_export.sha256_file(tiny_ckpt)
    assert card["source"]["checkpoint_meta"] == {"recipe": "demo"}
    assert card["variants"]["fp32"]["parity"]["passed"]
    assert card["file"]["sha256"] == onnx_export.sha256_file(tiny_onnx)
    text = md_path.read_text()
    assert "mbf_tiny" in text and "| fp32 |" in text


def _aligned_bgr_faces(n: int) -> np.ndarray:
    return np.ascontiguousarray(parity.synthetic_aligned_faces(n, seed=11)[..., ::-1])


@pytest.mark.parametrize("inside", [False, True])
def test_insightface_loads_it_and_get_feat_matches_torch(inside, tiny_ckpt, tmp_path):
    from insightface.model_zoo import get_model

    out = tmp_path / "m.onnx"
    export_onnx(tiny_ckpt, out, normalize_inside=inside)
    rec = get_model(str(out), providers=["CPUExecutionProvider"])
    assert type(rec).__name__ == "ArcFaceONNX"
    assert (rec.input_mean, rec.input_std) == ((0.0, 1.0) if inside else (127.5, 127.5))
    if inside:
        names = [n.name for n in onnx.load(str(out)).graph.node[:2]]
        assert names[0].startswith("Sub") and names[1].startswith("Mul")
    bgr = _aligned_bgr_faces(3)
    model = load_student(tiny_ckpt).model
    expected = _torch_embed(model, parity.to_model_input(bgr[..., ::-1].copy()))
    for i in range(3):
        feat = rec.get_feat(bgr[i]).ravel()
        np.testing.assert_allclose(feat, expected[i], rtol=1e-3, atol=1e-4)


def test_perturbed_weights_after_tracing_fail_the_gate(tiny_ckpt, tmp_path, monkeypatch, capsys):
    real_trace = onnx_export.trace_to_onnx

    def trace_then_perturb(model, path, opset=17):
        real_trace(model, path, opset)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))

    monkeypatch.setattr(onnx_export, "trace_to_onnx", trace_then_perturb)
    out = tmp_path / "broken.onnx"
    with pytest.raises(FacekdError, match="parity gate failed"):
        export_onnx(tiny_ckpt, out)
    assert list(tmp_path.iterdir()) == []
    # The CLI turns it into one line and exit code 2, still leaving nothing behind.
    code = cli_main(["export", "onnx", str(tiny_ckpt), str(out)])
    assert code == 2
    err = capsys.readouterr().err
    assert "parity gate failed" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_plain_state_dict_needs_arch_and_run_folder_recipe(tmp_path):
    model = _randomised("mbf_tiny", seed=1)
    run = tmp_path / "run"
    run.mkdir()
    save_checkpoint(run / "student.pt", model, "mbf_tiny", {})
    rec = FIXTURES / "recordio" / "insightface_layout"
    (run / "recipe.yaml").write_text(f"method:\n  name: srd\nstudent:\n  arch: mbf_tiny\n"
                                     f"data:\n  train: {rec}\n")
    # --int8 without --calib-data calibrates on the recipe's training data.
    assert cli_main(["export", "onnx", str(run), str(tmp_path / "a.onnx"), "--int8",
                     "--calib-count", "16"]) == 0
    card = json.loads(card_paths(tmp_path / "a.onnx")[0].read_text())
    assert card["variants"]["int8"]["quantization"]["calibration_source"] == str(rec)
    assert card["source"]["run_folder"] == str(run)
    assert card["source"]["recipe_summary"]["method.name"] == "srd"
    assert card["source"]["recipe_sha256"] == onnx_export.sha256_file(run / "recipe.yaml")

    torch.save(model.state_dict(), tmp_path / "backbone.pth")
    export_onnx(tmp_path / "backbone.pth", tmp_path / "b.onnx", arch="mbf_tiny")
    x = parity.to_model_input(parity.synthetic_aligned_faces(2, seed=4))
    np.testing.assert_allclose(_run(tmp_path / "b.onnx", x), _torch_embed(model, x),
                               rtol=1e-3, atol=1e-5)
    assert cli_main(["export", "onnx", str(tmp_path / "nope.pt"), str(tmp_path / "c.onnx")]) == 2


def test_simplify_keeps_dynamic_batch(tiny_ckpt, tmp_path):
    out = tmp_path / "simp.onnx"
    section = export_onnx(tiny_ckpt, out, simplify=True)["variants"]["fp32"]
    assert section["simplified"] and section["parity"]["passed"]
    x = parity.to_model_input(parity.synthetic_aligned_faces(3, seed=2))
    assert _run(out, x).shape == (3, 128)


def _tiny_graph(path: Path, *, outputs: int = 1, fp16_weight: bool = False, dim: int = 8,
                nan: bool = False) -> Path:
    """A hand-made 1x1-conv + global-pool 'embedder' for the challenge checks."""
    w_type = TensorProto.FLOAT16 if fp16_weight else TensorProto.FLOAT
    w_np = np.full((dim, 3, 1, 1), np.nan if nan else 0.1,
                   np.float16 if fp16_weight else np.float32)
    weight = helper.make_tensor("w", w_type, w_np.shape, w_np.flatten().tolist())
    nodes = []
    src = "data"
    if fp16_weight:
        nodes.append(helper.make_node("Cast", ["data"], ["data16"], to=TensorProto.FLOAT16))
        src = "data16"
    nodes += [helper.make_node("Conv", [src, "w"], ["c"]),
              helper.make_node("GlobalAveragePool", ["c"], ["p"]),
              helper.make_node("Flatten", ["p"], ["f"])]
    last = "f"
    if fp16_weight:
        nodes.append(helper.make_node("Cast", ["f"], ["f32"], to=TensorProto.FLOAT))
        last = "f32"
    nodes.append(helper.make_node("Identity", [last], ["embedding"]))
    outs = [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", dim])]
    if outputs == 2:
        nodes.append(helper.make_node("Identity", [last], ["extra"]))
        outs.append(helper.make_tensor_value_info("extra", TensorProto.FLOAT, ["batch", dim]))
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("data", TensorProto.FLOAT,
                                                   ["batch", 3, 112, 112])], outs, [weight])
    model_proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model_proto.ir_version = 8
    onnx.save(model_proto, str(path))
    return path


def test_challenge_checks(tmp_path):
    good = check_challenge(_tiny_graph(tmp_path / "ok.onnx"))
    assert good["passed"] and good["feature_dim"] == 8
    cases = {"two.onnx": ({"outputs": 2}, "single_output"),
             "half.onnx": ({"fp16_weight": True}, "no_fp16_initializers"),
             "wide.onnx": ({"dim": 513}, "feature_dim_le_512"),
             "nan.onnx": ({"nan": True}, "no_nan_batch32")}
    for name, (kwargs, failing) in cases.items():
        path = _tiny_graph(tmp_path / name, **kwargs)
        report = check_challenge(path, raise_on_fail=False)
        assert report[failing] is False and not report["passed"], name
        with pytest.raises(FacekdError, match=failing):
            check_challenge(path)
    assert check_challenge(tmp_path / "half.onnx", allow_fp16=True)["passed"]


def test_bad_options_are_one_line_errors(tiny_ckpt, tmp_path):
    with pytest.raises(FacekdError, match="needs --calib-data"):
        export_onnx(tiny_ckpt, tmp_path / "x.onnx", int8=True)
    with pytest.raises(FacekdError, match=r"\.onnx"):
        export_onnx(tiny_ckpt, tmp_path / "x.pt")
    with pytest.raises(FacekdError, match="opset"):
        export_onnx(tiny_ckpt, tmp_path / "x.onnx", opset=13)
    assert list(tmp_path.iterdir()) == []
