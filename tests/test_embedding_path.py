"""One embedding path: every model form through every command that embeds gives the same
embeddings, with real exports (plain and ``--normalize-inside`` ONNX) and the CLI.

The forms: an ``nn.Module``, a facekd checkpoint, an arcface_torch state dict (+ arch), a
run folder, a plain ONNX export and an ONNX export with the scaling in the graph. The
commands reach a model through ``facekd.evaluate``'s loader (``eval verify/ijb/compare``,
export's accuracy check of its variants), ``load_teacher`` (``teacher centres/cache``),
export's parity gate and the trainer's in-training check.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from eval_support import save_tiny_student

from facekd.cli import main

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"
BIN = FIXTURES / "verification" / "tiny_pairs.bin"
TORCH_FORMS = ("module", "checkpoint", "state_dict", "run_folder")
ONNX_FORMS = ("onnx", "onnx_inside")

# Exports twice and embeds through every loader: ~30 s on 2 busy cores.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def forms(tmp_path_factory):
    from facekd.export.onnx_export import export_onnx

    root = tmp_path_factory.mktemp("forms")
    run = root / "run"
    model, _ = save_tiny_student(run)
    state = root / "backbone.pth"
    torch.save(model.state_dict(), state)  # what arcface_torch writes
    plain, inside = root / "student.onnx", root / "inside.onnx"
    export_onnx(run, plain)
    export_onnx(run, inside, normalize_inside=True)
    return {"module": model, "checkpoint": run / "student.pt", "state_dict": state,
            "run_folder": run, "onnx": plain, "onnx_inside": inside}


@pytest.fixture(scope="module")
def images():
    from facekd.data.binset import decode_bin_images, load_bin

    bins, _ = load_bin(BIN)
    return decode_bin_images(bins[:32], source=str(BIN))  # one model batch of 32


def _arch(form):
    return "mbf_tiny" if form == "state_dict" else None


def _eval_loader(forms, form, images):
    """``facekd eval`` (verify, ijb, compare all load through ``_load``)."""
    from facekd.evaluate.embed import ArrayImageSource, extract_features
    from facekd.evaluate.pipeline import _load

    model = forms[form] if form == "module" else _load(forms[form], _arch(form), "cpu")
    return extract_features(model, ArrayImageSource(images), flip=False, use_cache=False,
                            progress=False)


def _teacher(forms, form, images):
    """``facekd teacher centres/cache``: the teacher's embed on normalised batches."""
    from facekd.data.loader import normalise_batch
    from facekd.models.teacher import Teacher, load_teacher

    teacher = (Teacher(forms[form], device="cpu") if form == "module"
               else load_teacher(forms[form], arch=_arch(form), device="cpu"))
    return teacher.embed(normalise_batch(torch.from_numpy(images), "cpu")).numpy()


def _export_check(forms, form, images):
    """``facekd export onnx --eval-bin``: the variant accuracy check's loader."""
    from facekd.data.pixels import normalise_pixels
    from facekd.models.embedder import as_embedder

    return as_embedder(forms[form], arch=_arch(form), device="cpu")(normalise_pixels(images))


PATHS = {"eval": _eval_loader, "teacher": _teacher, "export_check": _export_check}


def assert_close(got, reference):
    """Per-row relative L2 error under 1e-4: ONNX vs torch is ~3e-6 here; an input scaled
    twice is off by a factor of hundreds (absolute tolerances would not see it: this random
    student's embeddings are ~1e-5 in size)."""
    rel = np.linalg.norm(got - reference, axis=1) / np.linalg.norm(reference, axis=1)
    assert rel.max() < 1e-4, rel.max()


@pytest.fixture(scope="module")
def reference(forms, images):
    from facekd.data.pixels import normalise_pixels

    with torch.no_grad():
        return forms["module"](torch.from_numpy(normalise_pixels(images))).numpy()


@pytest.mark.parametrize("path", sorted(PATHS))
@pytest.mark.parametrize("form", TORCH_FORMS + ONNX_FORMS)
def test_every_form_through_every_loader_gives_the_same_embeddings(forms, images, reference,
                                                                   form, path):
    got = np.asarray(PATHS[path](forms, form, images))
    assert got.shape == reference.shape
    if form in TORCH_FORMS:  # the same module, batch and kernels: the same bits
        np.testing.assert_array_equal(got, reference)
    else:  # ONNX vs torch: float differences only; normalised exactly once
        assert_close(got, reference)


def test_parity_gate_and_trainer_check_use_the_same_path(forms, images, reference):
    from facekd.data.pixels import normalise_pixels
    from facekd.export.parity import onnx_embeddings
    from facekd.models.embedder import TorchEmbedder

    x = normalise_pixels(images)
    for form, inside in (("onnx", False), ("onnx_inside", True)):
        assert_close(onnx_embeddings(forms[form], x, inside), reference)
    with pytest.raises(Exception, match="input normalisation"):
        onnx_embeddings(forms["onnx_inside"], x, False)  # the file says otherwise
    np.testing.assert_array_equal(TorchEmbedder(forms["module"], name="student")(x), reference)


def test_insightface_files_follow_the_sub_mul_rule(forms, tmp_path):
    """A file from elsewhere (no facekd metadata) normalises inside when its first nodes
    are Sub and Mul, as insightface's ArcFaceONNX decides."""
    import onnx

    from facekd.models.embedder import input_is_raw_pixels

    for form, inside in (("onnx", False), ("onnx_inside", True)):
        proto = onnx.load(str(forms[form]))
        del proto.metadata_props[:]
        assert input_is_raw_pixels(proto) is inside
        bare = tmp_path / f"{form}.onnx"
        onnx.save(proto, str(bare))
        assert input_is_raw_pixels(bare) is inside


def _verify(model, out, *extra):
    assert main(["eval", "verify", str(model), str(BIN), "--out", str(out), "--no-progress",
                 "--no-cache", *extra]) == 0
    return json.loads((out / "verify.json").read_text())["results"][0]


def test_normalize_inside_export_then_eval_verify_scores_like_the_run(forms, tmp_path):
    """The reported defect: export with --normalize-inside, then eval verify on the file,
    normalised the input twice (accuracy 0.896, XNorm 889 against 0.973, 10.6)."""
    run = forms["run_folder"]
    exported = tmp_path / "student.onnx"
    assert main(["export", "onnx", str(run), str(exported), "--normalize-inside"]) == 0
    by_ckpt = _verify(forms["checkpoint"], tmp_path / "ckpt")
    by_file = _verify(exported, tmp_path / "file")
    assert by_file["xnorm"] == pytest.approx(by_ckpt["xnorm"], rel=1e-4)
    by_run = _verify(run, tmp_path / "run")  # `eval verify RUN_FOLDER`, as export takes it
    by_state = _verify(forms["state_dict"], tmp_path / "state", "--arch", "mbf_tiny")
    assert by_run["xnorm"] == by_state["xnorm"] == by_ckpt["xnorm"]
    for key in ("accuracy_per_fold", "acc_mean", "val", "far"):
        assert by_file[key] == by_ckpt[key] == by_run[key] == by_state[key], key


def test_a_run_folder_without_a_student_is_one_line(tmp_path, capsys):
    (tmp_path / "empty_run").mkdir()
    assert main(["eval", "verify", str(tmp_path / "empty_run"), str(BIN)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "empty_run: run folder has no student.pt" in err[0]
