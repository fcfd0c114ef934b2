"""NCNN and LiteRT exports: each file runs in its runtime's own package and is gated."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from facekd.cli import main
from facekd.errors import FacekdError
from facekd.export import edge, parity
from facekd.export.card import card_paths
from facekd.export.ncnn_export import INT8_TAG, NcnnFormat, read_param, read_weights
from facekd.export.tflite_export import TfliteEmbedder, TfliteFormat
from facekd.models import create_model, save_checkpoint
from facekd.models.checkpoint import load_backbone

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"
REC = FIXTURES / "recordio" / "insightface_layout"
FORMATS = {"ncnn": NcnnFormat, "tflite": TfliteFormat}


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A run folder of a tiny student trained on synthetic faces (with its lfw.bin)."""
    from facekd.data.synth import generate

    root = tmp_path_factory.mktemp("edge_trained")
    generate(root / "data", preset="tiny", identities=8, images_per_id=4, lfw_pairs=20,
             cfp_pairs=0, agedb_pairs=0, ijb_identities=0, progress=False)
    (root / "recipe.yaml").write_text(
        "data: {batch_size: 8, num_workers: 0}\n"
        "student: {arch: mbf_tiny, embedding_size: 32, head: {scale: 16}}\n"
        "method: {name: none}\n"
        "optim: {epochs: 2, lr: 0.1}\n"
        "run: {device: cpu, progress: false, tensorboard: false, log_every: 4}\n")
    assert main(["distill", str(root / "recipe.yaml"), f"run.output={root / 'run'}",
                 f"data.train={root / 'data'}"]) == 0
    return root


@pytest.fixture(scope="module")
def untrained(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = create_model("mbf_tiny")
    for module in model.modules():
        if isinstance(module, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
            module.weight.data.uniform_(0.5, 1.5)
        if isinstance(module, torch.nn.PReLU):
            module.weight.data.uniform_(-0.2, 1.3)
    path = tmp_path_factory.mktemp("edge_ckpt") / "s.pt"
    save_checkpoint(path, model.eval(), "mbf_tiny", {})
    return path


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ncnn", "tflite"])
def test_trained_student_in_its_runtime(name, trained, tmp_path):
    fmt = FORMATS[name]()
    out = tmp_path / f"student{fmt.suffix}"
    lfw = trained / "data" / "lfw.bin"
    card = edge.export_edge(fmt, trained / "run", out, fp16=True, int8=True,
                            eval_bin=lfw, max_drop=1.0)
    variants = card["variants"]
    assert set(variants) == {"fp32", "fp16", "int8"}
    # INT8 calibrated by default on the recipe's training data, as the ONNX INT8 is.
    assert variants["int8"]["quantization"]["calibration_source"] == str(trained / "data")
    assert variants["int8"]["quantization"]["calibration_images"] == 32
    assert variants["fp32"]["parity"]["passed"]
    assert variants["fp32"]["parity"]["max_one_minus_cos"] <= 1e-5

    model, _ = load_backbone(trained / "run" / "student.pt")
    model = model.float().eval()
    x = parity.to_model_input(parity.synthetic_aligned_faces(6, seed=3))
    reference = parity.torch_embeddings(model, x)
    from facekd.evaluate import evaluate_bin
    from facekd.export.variants import accuracy_of

    floor = {"fp32": 0.9999, "fp16": 0.999, "int8": 0.95}
    for variant, info in variants.items():
        files = fmt.files(edge.variant_path(out, variant))
        assert all(f.is_file() for f in files), variant
        # A fresh runtime session on other faces than the gate's.
        embedder = fmt.embedder(files, variant, normalize_inside=False)
        assert _cos(reference, embedder(x)).min() >= floor[variant], variant
        assert info["verdict"]["accepted"] and not info["verdict"]["forced"]
        numbers = evaluate_bin(embedder, str(lfw), use_cache=False, progress=False)
        assert info["evaluation"]["accuracy"] == pytest.approx(accuracy_of(numbers))
        assert info["evaluation"]["metrics"]["num_pairs"] == 20
        own = json.loads(card_paths(files[0])[0].read_text())
        assert own["file"]["variant"] == variant and own["file"]["sha256"] == info["sha256"]
        assert own["runtime"]["package"] == ("ncnn" if name == "ncnn" else "ai-edge-litert")
        assert f"| {variant} |" in card_paths(files[0])[1].read_text()
    # (Eight steps teach this student little; the accuracies are checked for agreement
    # with a fresh run in the runtime above, not for being high.)
    assert 0.0 <= variants["int8"]["evaluation"]["accuracy"] <= 1.0
    sizes = {v: variants[v]["bytes"] for v in variants}
    # INT8 weights are a quarter of FP32's, but on 82 k weights the per-channel scales, and
    # for LiteRT the PReLUs' 1x1 depthwise convs and tensor names, weigh (mbf: 0.42x).
    assert sizes["fp16"] < 0.6 * sizes["fp32"]
    assert sizes["int8"] < (0.45 if name == "ncnn" else 0.8) * sizes["fp32"]
    int8 = fmt.files(edge.variant_path(out, "int8"))
    if name == "tflite":
        from ai_edge_litert.interpreter import Interpreter

        types = {d["dtype"] for d in Interpreter(model_path=str(int8[0])).get_tensor_details()}
        assert np.int8 in types and np.int32 in types
    else:
        layers, _ = read_param(int8[0])
        assert {layer.params.get(8) for layer in layers
                if layer.type.startswith(("Convolution", "InnerProduct"))} <= {"1", "2"}
        assert int8[1].read_bytes()[:4] == INT8_TAG.to_bytes(4, "little")


@pytest.mark.parametrize("name", ["ncnn", "tflite"])
def test_normalisation_inside_takes_raw_pixels(name, untrained, tmp_path):
    fmt = FORMATS[name]()
    out = tmp_path / f"raw{fmt.suffix}"
    card = edge.export_edge(fmt, untrained, out, normalize_inside=True)
    assert card["input"]["normalization"] == "inside"
    faces = parity.synthetic_aligned_faces(3, seed=9)
    model, _ = load_backbone(untrained)
    reference = parity.torch_embeddings(model.eval(), parity.to_model_input(faces))
    raw = faces.astype(np.float32).transpose(0, 3, 1, 2)
    files = fmt.files(out)
    if name == "tflite":
        from ai_edge_litert.interpreter import Interpreter

        it = Interpreter(model_path=str(files[0]))
        index = it.get_input_details()[0]["index"]
        it.resize_tensor_input(index, [3, 112, 112, 3])
        it.allocate_tensors()
        it.set_tensor(index, np.ascontiguousarray(raw.transpose(0, 2, 3, 1)))
        it.invoke()
        got = it.get_tensor(it.get_output_details()[0]["index"])
    else:
        embedder = fmt.embedder(files, "fp32", normalize_inside=False)  # feeds x as given
        got = np.stack([embedder.run_one(img) for img in raw])
    assert _cos(reference, got).min() >= 0.9999


def _perturbing(monkeypatch, target: str) -> None:
    """Make the converter see different weights than the gate's torch reference."""
    import importlib

    module_name, func = target.rsplit(".", 1)
    module = importlib.import_module(module_name)
    original = getattr(module, func)

    def convert(model, *args, **kwargs):
        saved = {k: v.clone() for k, v in model.state_dict().items()}
        convs = [p for p in model.parameters() if p.dim() == 4]
        with torch.no_grad():
            weight = convs[len(convs) // 2]
            weight.add_(torch.randn_like(weight, generator=torch.Generator().manual_seed(1))
                        * weight.std())
        try:
            return original(model, *args, **kwargs)
        finally:
            model.load_state_dict(saved)

    monkeypatch.setattr(module, func, convert)


@pytest.mark.parametrize(("name", "target"), [
    ("ncnn", "facekd.export.ncnn_export.pnnx_convert"),
    ("tflite", "facekd.export.onnx_export.trace_to_onnx")])
def test_failed_parity_leaves_nothing(name, target, untrained, tmp_path, monkeypatch, capsys):
    _perturbing(monkeypatch, target)
    suffix = FORMATS[name].suffix
    code = main(["export", name, str(untrained), str(tmp_path / f"s{suffix}")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "parity gate failed" in err and len(err.splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_refused_int8_is_removed_unless_forced(untrained, tmp_path, monkeypatch):
    impossible = parity.ParityThresholds(max_abs=0.0, max_one_minus_cos=0.0)
    monkeypatch.setitem(edge.THRESHOLDS, "int8", impossible)
    out = tmp_path / "s.tflite"
    with pytest.raises(FacekdError, match=r"refused.*int8"):
        edge.export_edge(TfliteFormat(), untrained, out, int8=True, calib_data=REC,
                         calib_count=16)
    assert out.is_file() and not edge.variant_path(out, "int8").exists()
    card = json.loads(card_paths(out)[0].read_text())
    assert card["variants"]["int8"]["verdict"]["accepted"] is False
    assert "REFUSED" in card_paths(out)[1].read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "s.tflite", "s.tflite.card.json", "s.tflite.card.md"]
    card = edge.export_edge(TfliteFormat(), untrained, out, int8=True, calib_data=REC,
                            calib_count=16, force=True)
    assert edge.variant_path(out, "int8").is_file()
    assert card["variants"]["int8"]["verdict"]["forced"] is True
    embedder = TfliteEmbedder(edge.variant_path(out, "int8"), normalize_inside=False)
    assert embedder(parity.to_model_input(parity.synthetic_aligned_faces(2))).shape == (2, 128)


@pytest.mark.parametrize(("name", "package"), [("ncnn", "pnnx"), ("tflite", "ai_edge_litert")])
def test_missing_extra_is_one_line(name, package, untrained, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, package, None)  # import raises ImportError
    code = main(["export", name, str(untrained), str(tmp_path / f"s{FORMATS[name].suffix}")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "pip install 'facekd[edge]'" in err and package in err
    assert len(err.splitlines()) == 1 and list(tmp_path.iterdir()) == []


def test_bad_options_are_one_line_errors(untrained, tmp_path):
    with pytest.raises(FacekdError, match=r"must end in \.tflite"):
        edge.export_edge(TfliteFormat(), untrained, tmp_path / "x.onnx")
    with pytest.raises(FacekdError, match="needs --calib-data"):
        edge.export_edge(NcnnFormat(), untrained, tmp_path / "x.param", int8=True)
    with pytest.raises(FacekdError, match="opset"):
        edge.export_edge(TfliteFormat(opset=13), untrained, tmp_path / "x.tflite")
    assert list(tmp_path.iterdir()) == []


def test_lowering_refuses_unsupported_ops_by_name():
    from onnx import TensorProto, helper

    from facekd.export.tflite_lower import onnx_to_tflite

    graph = helper.make_graph(
        [helper.make_node("Sigmoid", ["data"], ["s"], name="gate"),
         helper.make_node("Flatten", ["s"], ["embedding"], name="flat")], "g",
        [helper.make_tensor_value_info("data", TensorProto.FLOAT, [1, 3, 112, 112])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, [1, 37632])])
    with pytest.raises(FacekdError, match=r"Sigmoid.*gate.*not supported"):
        onnx_to_tflite(helper.make_model(graph))


def test_ncnn_weights_must_match_the_param(untrained, tmp_path):
    out = tmp_path / "s.param"
    edge.export_edge(NcnnFormat(), untrained, out)
    layers, _ = read_param(out)
    padded = tmp_path / "long.bin"
    padded.write_bytes(out.with_suffix(".bin").read_bytes() + b"\0" * 8)
    with pytest.raises(FacekdError, match="do not match"):
        read_weights(layers, padded)


def _tflite_ops(path: Path) -> list[str]:
    """Builtin operator names of a .tflite file, in graph order."""
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.tools import flatbuffer_utils

    names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    model = flatbuffer_utils.read_model(str(path))
    codes = [names[max(c.builtinCode, c.deprecatedBuiltinCode)] for c in model.operatorCodes]
    return [codes[op.opcodeIndex] for op in model.subgraphs[0].operators]


def test_litert_int8_prelu_is_one_depthwise_conv_and_add_all_in_xnnpack(untrained, tmp_path):
    """Slopes > 1 (a third of this student's) fold away, so every PReLU is x + relu((a-1)x)
    and XNNPACK takes the whole INT8 graph as one partition (a PRELU op would not be)."""
    from ai_edge_litert.interpreter import Interpreter

    out = tmp_path / "s.tflite"
    edge.export_edge(TfliteFormat(), untrained, out, int8=True, calib_data=REC, calib_count=16)
    fp32, int8 = _tflite_ops(out), _tflite_ops(edge.variant_path(out, "int8"))
    prelus = fp32.count("PRELU")
    assert prelus > 0 and "PRELU" not in int8
    assert int8.count("DEPTHWISE_CONV_2D") == fp32.count("DEPTHWISE_CONV_2D") + prelus
    assert int8.count("ADD") == fp32.count("ADD") + prelus
    interpreter = Interpreter(model_path=str(edge.variant_path(out, "int8")), num_threads=1)
    interpreter.allocate_tensors()
    kinds = [op["op_name"] for op in interpreter._get_ops_details()]
    assert kinds.count("DELEGATE") == 1, "INT8 graph split between XNNPACK and reference kernels"
