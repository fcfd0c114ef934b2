"""``facekd eval``: reports with provenance, torch and ONNX alike, one-line errors."""

from __future__ import annotations

import csv
import json
import pickle

import pytest
from eval_support import VERIF, make_tiny_ijb, save_tiny_student

from facekd.cli import main

BIN = VERIF / "tiny_pairs.bin"

# Builds a model, exports ONNX and embeds real images: ~40 s on 2 busy cores.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny facekd checkpoint and its ONNX export."""
    from facekd.export.onnx_export import trace_to_onnx

    root = tmp_path_factory.mktemp("models")
    model, ckpt = save_tiny_student(root)
    onnx_path = root / "student.onnx"
    trace_to_onnx(model, onnx_path)
    return ckpt, onnx_path


def _run(*args):
    return main(["eval", *map(str, args), "--no-progress"])


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One feature cache for the module: later commands reuse earlier features."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def verify_reports(models, cache, tmp_path_factory):
    ckpt, onnx_path = models
    out = tmp_path_factory.mktemp("verify")
    for name, model in (("torch", ckpt), ("onnx", onnx_path)):
        assert _run("verify", model, BIN, "--out", out / name, "--cache-dir", cache) == 0
    return out


def test_verify_report_states_provenance(verify_reports, models):
    from facekd.fileio import sha256_file

    out = verify_reports / "torch"
    md = (out / "verify.md").read_text()
    assert sha256_file(models[0]) in md and sha256_file(BIN) in md
    assert "model_batch" in md and "flip" in md
    rows = (out / "verify.csv").read_text().splitlines()
    assert len(rows) == 2 and rows[0].startswith("model,model_sha256,dataset")
    assert (out / "roc_tiny_pairs.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "eval.log").is_file()


def test_torch_and_onnx_give_the_same_report(verify_reports):
    res = {name: json.loads((verify_reports / name / "verify.json").read_text())["results"][0]
           for name in ("torch", "onnx")}
    t, o = res["torch"], res["onnx"]
    assert t["model_sha256"] != o["model_sha256"]
    for key in ("accuracy_per_fold", "thresholds", "acc_mean", "val", "far", "auc", "eer",
                "tar_at_far"):
        assert t[key] == o[key], key
    assert o["xnorm"] == pytest.approx(t["xnorm"], rel=1e-4)


def test_ijb_and_compare(models, cache, verify_reports, tmp_path):
    ckpt, onnx_path = models
    root = make_tiny_ijb(tmp_path / "ijb", one_to_n=True)
    assert _run("ijb", ckpt, root, "--out", tmp_path / "ijb_out", "--cache-dir", cache,
                "--no-norm-score", "--workers", "1") == 0
    md = (tmp_path / "ijb_out" / "ijb.md").read_text()
    assert "N0D1F1" in md and "tar@far1e-04" in md and "rank1" in md
    assert (tmp_path / "ijb_out" / "roc_IJBC.png").is_file()
    out = tmp_path / "cmp"
    assert _run("compare", ckpt, onnx_path, "--bins", BIN, "--ijb", root, "--out", out,
                "--cache-dir", cache) == 0
    rows = list(csv.reader((out / "compare.csv").read_text().splitlines()))
    assert len(rows) == 3 and "tiny_pairs acc" in rows[0] and "IJBC tar@far1e-04" in rows[0]
    header, first = rows[0], rows[1]
    acc, interval = first[header.index("tiny_pairs acc")].split(" ", 1)
    assert 1.0 < float(acc) <= 100.0  # a percentage like the IJB columns, never a fraction
    low, high = (float(v) for v in interval.strip("[]").split(", "))
    assert low <= float(acc) <= high
    # the tiny protocols cannot resolve these FARs: the reason, not a number
    assert first[header.index("IJBC tar@far1e-04")].startswith("n/a (")
    md = (out / "compare.md").read_text()
    assert "at least 10/FAR impostor pairs" in md and "connected components" in md
    assert (out / "compare_replicates.npz").is_file()
    assert (out / "roc_tiny_pairs.png").is_file() and (out / "roc_IJBC.png").is_file()


def test_bad_inputs_are_one_line_errors(models, tmp_path, capsys):
    ckpt, _ = models
    from facekd.data.binset import load_bin

    bins, issame = load_bin(BIN)
    odd = tmp_path / "odd.bin"
    odd.write_bytes(pickle.dumps((bins[:3], issame[:2]), protocol=4))
    assert _run("verify", ckpt, odd, "--cache-dir", tmp_path) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "odd.bin" in err[0]

    root = make_tiny_ijb(tmp_path / "ijb")
    (root / "meta" / "ijbc_face_tid_mid.txt").unlink()
    assert _run("ijb", ckpt, root, "--cache-dir", tmp_path) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "ijbc_face_tid_mid.txt: missing IJB meta file" in err[0]

    assert _run("verify", tmp_path / "nope.pt", BIN) == 2
    assert "nope.pt" in capsys.readouterr().err


def test_onnx_metadata_decides_the_input_scaling(models, tmp_path):
    import numpy as np
    import onnx

    from facekd.evaluate.pipeline import _load
    from facekd.export.parity import onnx_session

    _, onnx_path = models
    proto = onnx.load(str(onnx_path))
    proto.metadata_props.add(key="facekd.input_normalization", value="inside")
    inside = tmp_path / "inside.onnx"
    onnx.save(proto, str(inside))
    wrapped = _load(inside, None, "cpu")
    assert wrapped.raw_pixels and not _load(onnx_path, None, "cpu").raw_pixels
    x = np.random.default_rng(0).uniform(-1, 1, (2, 3, 112, 112)).astype(np.float32)
    session = onnx_session(inside)  # the file itself, fed raw pixels once
    expected = session.run(None, {"data": x * np.float32(127.5) + np.float32(127.5)})[0]
    np.testing.assert_array_equal(wrapped(x), expected)
