"""FP16/INT8 variants: they run, report parity and accuracy, and bad ones are refused."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from facekd.errors import FacekdError
from facekd.export import parity
from facekd.export import variants as variants_mod
from facekd.export.calibration import load_calibration_images
from facekd.export.card import card_paths
from facekd.export.checks import check_challenge
from facekd.export.fp16 import convert_fp16
from facekd.export.graph import variant_path
from facekd.export.onnx_export import export_onnx
from facekd.models import create_model, save_checkpoint

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"
BIN = FIXTURES / "verification" / "tiny_pairs.bin"
REC = FIXTURES / "recordio" / "insightface_layout"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = create_model("mbf_tiny")
    for module in model.modules():
        if isinstance(module, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    path = tmp_path_factory.mktemp("q") / "s.pt"
    save_checkpoint(path, model.eval(), "mbf_tiny", {})
    return path


@pytest.fixture(scope="module")
def exported(ckpt, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("qo") / "student.onnx"
    card = export_onnx(ckpt, out, fp16=True, int8=True, calib_data=REC, calib_count=48,
                       eval_bin=BIN, max_drop=1.0)
    return out, card


def test_variants_run_and_report(exported):
    out, card = exported
    for variant in ("fp32", "fp16", "int8"):
        path = variant_path(out, variant)
        assert path.is_file(), variant
        info = card["variants"][variant]
        assert info["parity"]["passed"], variant
        assert info["verdict"]["accepted"] and not info["verdict"]["forced"]
        evaluation = info["evaluation"]
        assert 0.0 <= evaluation["accuracy"] <= 1.0
        assert evaluation["metrics"]["num_pairs"] == 40
        assert evaluation["drop_vs_fp32"] == pytest.approx(
            card["variants"]["fp32"]["evaluation"]["accuracy"] - evaluation["accuracy"])
        json_card = json.loads(card_paths(path)[0].read_text())
        assert json_card["file"]["variant"] == variant
        assert set(json_card["variants"]) == {"fp32", "fp16", "int8"}
        assert "| int8 |" in card_paths(path)[1].read_text()
    assert card["variants"]["int8"]["quantization"]["calibration_images"] == 48
    # Smaller files, float32 IO kept, and the parity numbers ordered as expected.
    sizes = {v: variant_path(out, v).stat().st_size for v in ("fp32", "fp16", "int8")}
    assert sizes["fp16"] < 0.7 * sizes["fp32"] and sizes["int8"] < 0.7 * sizes["fp32"]
    for variant in ("fp16", "int8"):
        model_proto = onnx.load(str(variant_path(out, variant)))
        assert model_proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
        assert model_proto.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    q = {v: card["variants"][v]["parity"]["max_one_minus_cos"] for v in ("fp32", "fp16", "int8")}
    assert q["fp32"] <= q["fp16"] <= q["int8"] < 0.05
    # INT8 really is quantised: integer weights and QDQ nodes.
    ops = {n.op_type for n in onnx.load(str(variant_path(out, "int8"))).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    # FP16 carries FP16 initialisers, so only the FP16-tolerant challenge check passes.
    assert not check_challenge(variant_path(out, "fp16"), raise_on_fail=False)["passed"]
    assert check_challenge(variant_path(out, "fp16"), allow_fp16=True)["passed"]


def test_variants_with_normalisation_inside_stay_insightface_compatible(ckpt, tmp_path):
    from insightface.model_zoo import get_model

    out = tmp_path / "inside.onnx"
    card = export_onnx(ckpt, out, fp16=True, int8=True, normalize_inside=True,
                       calib_data=BIN, calib_count=32)
    bgr = np.ascontiguousarray(parity.synthetic_aligned_faces(2, seed=8)[..., ::-1])
    fp32_feat = get_model(str(out), providers=["CPUExecutionProvider"]).get_feat(list(bgr))
    for variant in ("fp16", "int8"):
        info = card["variants"][variant]
        assert info["insightface"]["passed"] and info["insightface"]["input_mean"] == 0.0
        rec = get_model(str(variant_path(out, variant)), providers=["CPUExecutionProvider"])
        feat = rec.get_feat(list(bgr))
        cos = (feat * fp32_feat).sum(1) / np.linalg.norm(feat, axis=1) / np.linalg.norm(
            fp32_feat, axis=1)
        assert cos.min() > 0.95, variant


def test_refused_variant_is_removed_unless_forced(ckpt, tmp_path, monkeypatch, caplog):
    impossible = parity.ParityThresholds(max_abs=0.0, max_one_minus_cos=0.0)
    monkeypatch.setitem(variants_mod.VARIANT_THRESHOLDS, "fp16", impossible)
    out = tmp_path / "m.onnx"
    with pytest.raises(FacekdError, match=r"refused.*fp16"):
        export_onnx(ckpt, out, fp16=True)
    assert out.is_file() and not variant_path(out, "fp16").exists()
    card = json.loads(card_paths(out)[0].read_text())
    assert card["variants"]["fp16"]["verdict"]["accepted"] is False
    assert "REFUSED" in card_paths(out)[1].read_text()
    assert not card_paths(variant_path(out, "fp16"))[0].exists()

    with caplog.at_level(logging.WARNING):
        card = export_onnx(ckpt, out, fp16=True, force=True)
    assert variant_path(out, "fp16").is_file()
    assert card["variants"]["fp16"]["verdict"]["forced"] is True
    assert any("--force" in r.getMessage() for r in caplog.records)


def test_accuracy_drop_gate():
    def variants(drop: float) -> dict:
        ok = {"passed": True, "max_one_minus_cos": 1e-4, "thresholds": {}}
        return {"fp32": {"file": "a.onnx", "parity": ok, "challenge": {"passed": True},
                         "evaluation": {"accuracy": 0.9, "drop_vs_fp32": 0.0, "bin": "x.bin"}},
                "int8": {"file": "a.int8.onnx", "parity": ok, "challenge": {"passed": True},
                         "evaluation": {"accuracy": 0.9 - drop, "drop_vs_fp32": drop,
                                        "bin": "x.bin"}}}

    assert variants_mod.judge_variants(variants(0.005), max_drop=0.01, force=False) == []
    bad = variants(0.03)
    assert variants_mod.judge_variants(bad, max_drop=0.01, force=False) == ["int8"]
    assert "accuracy drop 0.0300" in bad["int8"]["verdict"]["reason"]
    forced = variants(0.03)
    assert variants_mod.judge_variants(forced, max_drop=0.01, force=True) == []
    assert forced["int8"]["verdict"] == {"accepted": True, "forced": True,
                                         "reason": forced["int8"]["verdict"]["reason"]}


def test_calibration_sources(tmp_path):
    rec = load_calibration_images(REC, count=20)
    assert rec.shape == (20, 3, 112, 112) and rec.dtype == np.float32
    assert -1.0 <= rec.min() < 0 < rec.max() <= 1.0
    from_bin = load_calibration_images(BIN, count=500)
    assert from_bin.shape == (80, 3, 112, 112)
    with pytest.raises(FacekdError):
        load_calibration_images(tmp_path / "missing", count=4)
    (tmp_path / "x.txt").write_text("no")
    with pytest.raises(FacekdError):
        load_calibration_images(tmp_path / "x.txt", count=4)


def test_own_fp16_conversion_when_onnxconverter_is_missing(exported, tmp_path, monkeypatch):
    out, _ = exported
    monkeypatch.setitem(__import__("sys").modules, "onnxconverter_common", None)
    model_proto, converter = convert_fp16(onnx.load(str(out)))
    assert converter == "facekd"
    onnx.checker.check_model(model_proto)
    half = tmp_path / "half.onnx"
    onnx.save(model_proto, str(half))
    assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in model_proto.graph.initializer)
    assert model_proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    x = parity.to_model_input(parity.synthetic_aligned_faces(4, seed=6))
    report = parity.compare_embeddings(parity.onnx_embeddings(out, x, False),
                                       parity.onnx_embeddings(half, x, False), "fp16",
                                       parity.FP16_THRESHOLDS)
    assert report.passed and report.max_one_minus_cos < 1e-4
    assert check_challenge(half, allow_fp16=True)["passed"]
