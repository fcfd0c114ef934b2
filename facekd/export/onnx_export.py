"""Export a student backbone to ONNX that onnxruntime and insightface load, parity-gated.

Only the backbone goes out (heads, connectors and self-teachers stay behind). The file
takes ``data`` N x 3 x 112 x 112 float32 RGB and returns ``embedding``; by default the
scaling ``(x - 127.5) / 127.5`` stays outside the graph, as insightface's ArcFaceONNX
assumes. Nothing lands under the output name until the parity gate and the
recognition-challenge checks have passed.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from facekd.errors import CheckpointError, FacekdError
from facekd.export import parity as parity_mod
from facekd.export.checks import check_challenge, insightface_compat
from facekd.export.graph import (
    INPUT_NAME,
    OUTPUT_NAME,
    add_input_normalization,
    base_metadata,
    set_metadata,
    variant_path,
)
from facekd.fileio import atomic_path, sha256_file

log = logging.getLogger(__name__)

DEFAULT_OPSET = 17
RECIPE_NAMES = ("recipe.yaml", "recipe.resolved.yaml", "resolved_recipe.yaml", "config.yaml")


@dataclass
class SourceInfo:
    """Where the exported weights came from (recorded in the model card)."""

    checkpoint: Path
    checkpoint_sha256: str
    run_folder: Path | None = None
    recipe: Path | None = None
    recipe_sha256: str | None = None
    recipe_summary: dict[str, Any] = field(default_factory=dict)
    checkpoint_meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class ExportedStudent:
    """A loaded student ready for export: the module plus what the card needs."""

    model: Any
    arch: str
    arch_kwargs: dict[str, Any]
    embedding_size: int
    params: int
    macs: int
    source: SourceInfo


@dataclass
class BackboneExport:
    """The FP32 card section plus the parity batch and torch embeddings (for variants)."""

    section: dict[str, Any]
    x: np.ndarray
    reference: np.ndarray


def resolve_source(ckpt: str | Path) -> SourceInfo:
    """Find the checkpoint file (a run folder means its ``student.pt``) and its recipe."""
    from facekd.models.checkpoint import resolve_model_file

    path = resolve_model_file(ckpt)
    run_folder = None
    if Path(ckpt).is_dir():
        run_folder = Path(ckpt)
    elif path.parent.joinpath("student.pt").is_file() and any(
            (path.parent / name).is_file() for name in RECIPE_NAMES):
        run_folder = path.parent
    recipe = None
    if run_folder is not None:
        recipe = next((run_folder / n for n in RECIPE_NAMES if (run_folder / n).is_file()), None)
    info = SourceInfo(checkpoint=path, checkpoint_sha256=sha256_file(path),
                      run_folder=run_folder, recipe=recipe)
    if recipe is not None:
        info.recipe_sha256 = sha256_file(recipe)
        info.recipe_summary = _recipe_summary(recipe)
    return info


def _recipe_summary(recipe: Path) -> dict[str, Any]:
    """The few recipe fields a deployer wants to see (method, student, data, epochs)."""
    import yaml

    try:
        doc = yaml.safe_load(recipe.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        return {}
    if not isinstance(doc, dict):
        return {}
    summary: dict[str, Any] = {}
    for section, keys in (("method", ("name", "weights")), ("student", ("arch", "embedding_size")),
                          ("teacher", ("checkpoint", "arch")), ("data", ("train",)),
                          ("optim", ("epochs", "lr"))):
        part = doc.get(section)
        if isinstance(part, dict):
            for key in keys:
                if key in part:
                    summary[f"{section}.{key}"] = part[key]
    return summary


def load_student(ckpt: str | Path, arch: str | None = None) -> ExportedStudent:
    """Load the backbone of ``ckpt`` (facekd checkpoint/run folder, or state dict + arch)."""
    from facekd.models.checkpoint import load_backbone
    from facekd.models.flops import count_macs, count_params
    from facekd.models.registry import embedding_size

    if Path(ckpt).suffix.lower() == ".onnx":
        raise CheckpointError(f"{ckpt}: already an ONNX file; export takes the torch "
                              f"checkpoint, state dict or run folder it came from")
    source = resolve_source(ckpt)
    model, info = load_backbone(source.checkpoint, arch=arch)
    model = model.float().cpu().eval()
    info = dict(info or {})
    arch_name = info.get("arch") or arch
    if not arch_name:
        raise CheckpointError(f"{source.checkpoint}: architecture unknown; pass --arch")
    meta = info.get("meta") or {}
    if isinstance(meta, dict):
        source.checkpoint_meta = {k: v for k, v in meta.items()
                                  if isinstance(v, (str, int, float, bool))}
        recipe = meta.get("recipe")
        if source.recipe is None and isinstance(recipe, str) and Path(recipe).is_file():
            source.recipe = Path(recipe)
            source.recipe_sha256 = sha256_file(source.recipe)
            source.recipe_summary = _recipe_summary(source.recipe)
    return ExportedStudent(
        model=model, arch=str(arch_name), arch_kwargs=dict(info.get("arch_kwargs") or {}),
        embedding_size=embedding_size(model), params=count_params(model),
        macs=count_macs(model), source=source)


def trace_to_onnx(model: Any, path: Path, opset: int = DEFAULT_OPSET) -> None:
    """torch -> ONNX with the TorchScript exporter: input ``data``, output ``embedding``."""
    import torch

    sample = torch.from_numpy(parity_mod.to_model_input(
        parity_mod.synthetic_aligned_faces(2, seed=123)))
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (sample,), str(path), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            opset_version=opset, do_constant_folding=True, dynamo=False)


def simplify_model(model_proto: Any) -> Any:
    """onnxsim simplification with a dynamic batch; the caller's parity gate checks it."""
    try:
        import onnxsim
    except ImportError as exc:
        raise FacekdError("--simplify needs the onnxsim package (pip install onnxsim)") from exc
    # Keep the batch axis symbolic: simplifying at a fixed batch of 1 would fold the
    # Flatten/Reshape shape into constants and break batches > 1.
    simplified, ok = onnxsim.simplify(
        model_proto, test_input_shapes={INPUT_NAME: [2, 3, 112, 112]})
    if not ok:
        raise FacekdError("onnxsim could not validate the simplified model")
    return simplified


def export_backbone(student: ExportedStudent, out: str | Path, *, normalize_inside: bool = False,
                    simplify: bool = False, opset: int = DEFAULT_OPSET,
                    parity_faces: int = 16,
                    thresholds: parity_mod.ParityThresholds = parity_mod.FP32_THRESHOLDS,
                    ) -> BackboneExport:
    """Trace, post-process, check and parity-gate ``student``; write ``out`` only on success.

    Returns the FP32 section of the model card (parity, challenge checks, insightface)
    with the parity batch and its torch embeddings, which the variants reuse.
    Raises FacekdError (and leaves no file) when any gate fails.
    """
    import onnx

    if opset < 17:
        raise FacekdError(f"opset {opset} is too old; facekd exports opset >= 17")
    out = Path(out)
    faces = parity_mod.synthetic_aligned_faces(parity_faces, seed=0)
    x = parity_mod.to_model_input(faces)
    with atomic_path(out, suffix=".onnx") as tmp:
        trace_to_onnx(student.model, tmp, opset)
        model_proto = onnx.load(str(tmp))
        if simplify:
            model_proto = simplify_model(model_proto)
        if normalize_inside:
            add_input_normalization(model_proto)
        model_proto.producer_name = "facekd"
        model_proto.doc_string = (f"facekd {student.arch} face embedder: input 'data' Nx3x112x112 "
                                  f"RGB, output 'embedding' ({student.embedding_size}-d)")
        set_metadata(model_proto, base_metadata(student, normalize_inside, "fp32"))
        try:
            onnx.checker.check_model(model_proto, full_check=True)
        except onnx.checker.ValidationError as exc:
            raise FacekdError(f"{out}: onnx.checker rejects the export: "
                              f"{str(exc).splitlines()[0]}") from exc
        onnx.save(model_proto, str(tmp))
        # Reference computed now, from the module as it is after tracing: if the weights
        # changed since, the file no longer matches and the gate must say so.
        reference = parity_mod.torch_embeddings(student.model, x)
        got = parity_mod.onnx_embeddings(tmp, x, normalize_inside)
        report = parity_mod.compare_embeddings(reference, got, "fp32", thresholds)
        if not report.passed:
            raise FacekdError(parity_mod.describe_failure(report, out))
        batch_sizes = _check_dynamic_batch(tmp, x, got, normalize_inside, out)
        challenge = check_challenge(tmp)
        compat = insightface_compat(tmp, normalize_inside)
        if compat.get("checked") and not compat["passed"]:
            raise FacekdError(f"{out}: insightface loads it as {compat['loaded_as']} with mean "
                              f"{compat['input_mean']}/std {compat['input_std']}, not as "
                              f"intended")
    log.info("wrote %s (parity max|diff| %.2e, 1-cos %.2e)", out, report.max_abs_diff,
             report.max_one_minus_cos)
    section = {"file": out.name, "sha256": sha256_file(out), "bytes": out.stat().st_size,
               "opset": opset, "simplified": simplify, "parity": report.to_dict(),
               "dynamic_batch_checked": [*batch_sizes, len(x)], "challenge": challenge,
               "insightface": compat}
    return BackboneExport(section=section, x=x, reference=reference)


def _check_dynamic_batch(path: Path, x: np.ndarray, full: np.ndarray, normalize_inside: bool,
                         out: Path) -> list[int]:
    """Batch 1 and an odd batch must give the rows of the full batch (dynamic axis works)."""
    sizes = [1, min(3, len(x))]
    for n in sizes:
        part = parity_mod.onnx_embeddings(path, x[:n], normalize_inside, batch_size=n)
        if part.shape != full[:n].shape or not np.allclose(part, full[:n], rtol=1e-4, atol=1e-4):
            raise FacekdError(f"{out}: batch of {n} gives different embeddings than a batch "
                              f"of {len(x)}; the batch axis is not dynamic")
    return sizes



def check_export_options(out: str | Path, suffix: str, *, max_drop: float,
                         calib_data: str | Path | None,
                         eval_bin: str | Path | None) -> Path:
    """The checks every ``facekd export`` format makes before loading anything."""
    out = Path(out)
    if out.suffix != suffix:
        raise FacekdError(f"{out}: output name must end in {suffix}")
    if math.isnan(max_drop) or max_drop < 0:
        raise FacekdError(f"--max-drop must be >= 0, got {max_drop}")
    for path, what in ((calib_data, "--calib-data"), (eval_bin, "--eval-bin")):
        if path is not None and not Path(path).exists():
            raise FacekdError(f"{path}: {what} does not exist")
    return out


def calibration_data(student: Any, calib_data: str | Path | None) -> str | Path:
    """INT8 calibration images: ``--calib-data``, else the run folder's training data."""
    if calib_data is not None:
        return calib_data
    train = student.source.recipe_summary.get("data.train")
    if isinstance(train, str) and train and Path(train).exists():
        log.info("INT8 calibration on the recipe's training data %s", train)
        return train
    raise FacekdError("--int8 needs --calib-data (a shards folder, RecordIO folder or "
                      ".bin with a few hundred training faces)")


def export_onnx(ckpt: str | Path, out: str | Path, *, arch: str | None = None,
                fp16: bool = False, int8: bool = False, normalize_inside: bool = False,
                simplify: bool = False, calib_data: str | Path | None = None,
                calib_count: int = 256, eval_bin: str | Path | None = None,
                max_drop: float = 0.01, force: bool = False,
                opset: int = DEFAULT_OPSET) -> dict[str, Any]:
    """``facekd export onnx``: FP32 file (+ optional FP16/INT8 variants) and model cards.

    The FP32 file is parity-gated. Each quantised variant is compared with torch and, with
    ``eval_bin``, evaluated; a variant whose accuracy drops by more than ``max_drop``
    (a fraction: 0.01 = one point) is removed and the call raises FacekdError after
    writing the cards, unless ``force``, which keeps it with a loud warning.
    Returns the card dict.
    """
    from facekd.export import card as card_mod
    from facekd.export import variants as variants_mod
    from facekd.export.calibration import load_calibration_images

    out = check_export_options(out, ".onnx", max_drop=max_drop, calib_data=calib_data,
                               eval_bin=eval_bin)
    student = load_student(ckpt, arch)
    if int8:
        calib_data = calibration_data(student, calib_data)
    fp32 = export_backbone(student, out, normalize_inside=normalize_inside, simplify=simplify,
                           opset=opset)
    variants: dict[str, dict[str, Any]] = {"fp32": fp32.section}
    x, reference = fp32.x, fp32.reference
    # Card for the FP32 file right away, so it never sits without one if a variant fails;
    # rewritten below with every variant's numbers.
    variants["fp32"]["verdict"] = {"accepted": True, "forced": False, "reason": None}
    card_mod.write_card(out, card_mod.build_card(
        student, variants, normalize_inside=normalize_inside, eval_bin=eval_bin,
        max_drop=max_drop, force=force), "fp32")
    wanted = [v for v, on in (("fp16", fp16), ("int8", int8)) if on]
    calib = None
    if int8:
        calib = load_calibration_images(calib_data, count=calib_count)
    for variant in wanted:
        target = variant_path(out, variant)
        variants[variant] = variants_mod.make_variant(
            out, target, variant, student=student, normalize_inside=normalize_inside,
            calib=calib, calib_source=calib_data, x=x, reference=reference)
    evaluation = None
    if eval_bin is not None:
        evaluation = variants_mod.evaluate_variants(
            {v: (out if v == "fp32" else variant_path(out, v)) for v in variants},
            eval_bin, normalize_inside)
        for v, numbers in evaluation.items():
            variants[v]["evaluation"] = numbers
    refused = variants_mod.judge_variants(variants, max_drop=max_drop, force=force)
    for variant in refused:
        variant_path(out, variant).unlink(missing_ok=True)
    card = card_mod.build_card(student, variants, normalize_inside=normalize_inside,
                               eval_bin=eval_bin, max_drop=max_drop, force=force)
    for variant in variants:
        if variant not in refused:
            card_mod.write_card(out if variant == "fp32" else variant_path(out, variant), card,
                                variant)
    if refused:
        reasons = "; ".join(f"{v}: {variants[v]['verdict']['reason']}" for v in refused)
        raise FacekdError(f"{out}: refused quantised variant(s) and removed them ({reasons}); "
                          f"use --force to keep them")
    return card
