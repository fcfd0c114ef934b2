"""Exports for on-device runtimes (NCNN, LiteRT), gated exactly like the ONNX export.

One flow for every runtime: load the student as ``export onnx`` does, write each variant
(FP32, then FP16/INT8) under a temporary name, run it in the runtime's own Python package
on the fixed batch of faces and compare with torch (the ONNX thresholds), measure every
variant on ``--eval-bin`` and refuse a quantised one that drops more than ``--max-drop``.
A file reaches its final name only after its parity gate; a refused variant is removed;
each kept file gets a model card. The runtime-specific parts live in
:mod:`facekd.export.ncnn_export` and :mod:`facekd.export.tflite_export`.
"""

from __future__ import annotations

import errno
import importlib
import logging
import os
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from facekd.errors import FacekdError, first_line
from facekd.export import parity as parity_mod
from facekd.fileio import disk_full, make_dirs, output_error, sha256_file

log = logging.getLogger(__name__)

EXTRA_HINT = "pip install 'facekd[edge]'"
THRESHOLDS = {"fp32": parity_mod.FP32_THRESHOLDS, "fp16": parity_mod.FP16_THRESHOLDS,
              "int8": parity_mod.INT8_THRESHOLDS}


class EdgeFormat(Protocol):
    """What a runtime backend provides to :func:`export_edge`."""

    name: str  # CLI name: "ncnn", "tflite"
    suffix: str  # the main file's extension
    packages: tuple[str, ...]  # importable modules the runtime needs

    def files(self, main: Path) -> list[Path]:
        """Every file of one variant, the main file first."""

    def write(self, student: Any, variant: str, files: list[Path], *, normalize_inside: bool,
              calib: np.ndarray | None, fp32_files: list[Path]) -> dict[str, Any]:
        """Write ``variant`` to ``files``; returns its settings for the card."""

    def embedder(self, files: list[Path], variant: str, *, normalize_inside: bool,
                 threads: int = 1) -> Any:
        """A callable [-1, 1] NCHW float batch -> embeddings, running ``files``."""

    def card_io(self, normalize_inside: bool, embedding_size: int) -> dict[str, Any]:
        """The card's ``input``/``output``/``runtime`` sections for this format."""


def require(packages: tuple[str, ...], command: str) -> None:
    """One-line error naming the extra when a runtime package is not installed."""
    for package in packages:
        try:
            importlib.import_module(package)
        except ImportError:
            raise FacekdError(f"facekd export {command} needs the on-device runtimes "
                              f"(missing Python package '{package}'): {EXTRA_HINT}") from None


def variant_path(out: Path, variant: str) -> Path:
    """``student.tflite`` -> ``student.int8.tflite`` (FP32 keeps the given name)."""
    return out if variant == "fp32" else out.with_name(f"{out.stem}.{variant}{out.suffix}")


def export_edge(fmt: EdgeFormat, ckpt: str | Path, out: str | Path, *, arch: str | None = None,
                fp16: bool = False, int8: bool = False, normalize_inside: bool = False,
                calib_data: str | Path | None = None, calib_count: int = 256,
                eval_bin: str | Path | None = None, max_drop: float = 0.01,
                force: bool = False) -> dict[str, Any]:
    """``facekd export ncnn|tflite``: FP32 (+ FP16/INT8) files, each gated, with cards."""
    from facekd.export import card as card_mod
    from facekd.export import variants as variants_mod
    from facekd.export.calibration import load_calibration_images
    from facekd.export.onnx_export import calibration_data, check_export_options, load_student

    out = check_export_options(out, fmt.suffix, max_drop=max_drop, calib_data=calib_data,
                               eval_bin=eval_bin)
    require(fmt.packages, fmt.name)
    student = load_student(ckpt, arch)
    if int8:
        calib_data = calibration_data(student, calib_data)
    x = parity_mod.to_model_input(parity_mod.synthetic_aligned_faces(16, seed=0))
    reference = parity_mod.torch_embeddings(student.model, x)
    calib = (load_calibration_images(calib_data, count=calib_count)
             if int8 else None)
    wanted = ["fp32"] + [v for v, on in (("fp16", fp16), ("int8", int8)) if on]
    variants: dict[str, dict[str, Any]] = {}
    paths = {v: fmt.files(variant_path(out, v)) for v in wanted}

    def write_cards(names: list[str]) -> None:
        card = card_mod.build_card(student, variants, normalize_inside=normalize_inside,
                                   eval_bin=eval_bin, max_drop=max_drop, force=force)
        card.update(fmt.card_io(normalize_inside, student.embedding_size))
        for name in names:
            card_mod.write_card(paths[name][0], card, name)

    pending = {v: [_pending_name(f) for f in paths[v]] for v in wanted}
    try:
        for variant in wanted:
            # The FP32 files are what INT8 starts from: they are final before the variants.
            variants[variant] = _write_checked(
                fmt, student, variant, pending[variant], paths[variant],
                normalize_inside=normalize_inside, calib=calib, calib_source=calib_data,
                fp32_files=paths["fp32"], x=x, reference=reference)
            if variant == "fp32":
                _publish(pending["fp32"], paths["fp32"])
                variants["fp32"]["verdict"] = {"accepted": True, "forced": False,
                                               "reason": None}
                write_cards(["fp32"])  # the FP32 file never sits without a card
        if eval_bin is not None:
            _evaluate(fmt, {v: (paths[v] if v == "fp32" else pending[v]) for v in wanted},
                      variants, eval_bin, normalize_inside)
        refused = variants_mod.judge_variants(variants, max_drop=max_drop, force=force)
        for variant in wanted[1:]:
            if variant not in refused:
                _publish(pending[variant], paths[variant])
    finally:
        for names in pending.values():
            for name in names:
                name.unlink(missing_ok=True)
    for variant in refused:
        for path in paths[variant]:
            path.unlink(missing_ok=True)  # an older export's file under that name
    write_cards([v for v in variants if v not in refused])
    if refused:
        reasons = "; ".join(f"{v}: {variants[v]['verdict']['reason']}" for v in refused)
        raise FacekdError(f"{out}: refused quantised variant(s) and removed them ({reasons}); "
                          f"use --force to keep them")
    return card_mod.build_card(student, variants, normalize_inside=normalize_inside,
                               eval_bin=eval_bin, max_drop=max_drop, force=force) | \
        fmt.card_io(normalize_inside, student.embedding_size)


def _pending_name(path: Path) -> Path:
    """Where a file waits for its gates: atomic_path's temp name, so a killed export's
    leftovers look like any other (``fileio.remove_stale_temps`` knows them)."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}{path.suffix}")


def _publish(pending: list[Path], final: list[Path]) -> None:
    for src, dst in zip(pending, final, strict=True):
        os.replace(src, dst)


def _write_checked(fmt: EdgeFormat, student: Any, variant: str, files: list[Path],
                   final: list[Path], *, normalize_inside: bool, calib: np.ndarray | None,
                   calib_source: Any, fp32_files: list[Path], x: np.ndarray,
                   reference: np.ndarray) -> dict[str, Any]:
    """Write one variant to ``files`` (pending names), run it in its runtime and compare
    with torch; FP32 must pass here, quantised variants are judged with their accuracy."""
    make_dirs(final[0].parent)
    try:
        settings = fmt.write(student, variant, files, normalize_inside=normalize_inside,
                             calib=calib, fp32_files=fp32_files)
    except OSError as exc:
        raise output_error(final[0], exc) from exc
    if disk_full(final[0].parent):  # converters that write in C do not report a short write
        raise output_error(final[0], OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
    if calib_source is not None and variant == "int8":
        settings["calibration_source"] = str(calib_source)
    try:
        got = fmt.embedder(files, variant, normalize_inside=normalize_inside)(x)
    except FacekdError:
        raise
    except Exception as exc:  # the runtimes raise their own types
        raise FacekdError(f"{final[0]}: {fmt.name} cannot run the exported file: "
                          f"{first_line(exc)}") from exc
    report = parity_mod.compare_embeddings(reference, got, variant, THRESHOLDS[variant])
    if variant == "fp32" and not report.passed:
        raise FacekdError(parity_mod.describe_failure(report, final[0]))
    log.info("checked %s (%s: 1-cos %.2e vs torch)", final[0], variant,
             report.max_one_minus_cos)
    section: dict[str, Any] = {
        "file": final[0].name, "sha256": sha256_file(files[0]),
        "bytes": sum(f.stat().st_size for f in files), "parity": report.to_dict()}
    if len(files) > 1:
        section["companions"] = {dst.name: sha256_file(src)
                                 for src, dst in zip(files[1:], final[1:], strict=True)}
    section["quantization" if variant != "fp32" else "conversion"] = settings
    return section


def _evaluate(fmt: EdgeFormat, paths: dict[str, list[Path]], variants: dict[str, Any],
              eval_bin: str | Path, normalize_inside: bool) -> None:
    """Verification accuracy of each variant in its runtime; drop vs the FP32 file."""
    from facekd.evaluate import evaluate_bin
    from facekd.export.variants import accuracy_of

    for variant in variants:
        embedder = fmt.embedder(paths[variant], variant, normalize_inside=normalize_inside)
        numbers = dict(evaluate_bin(embedder, str(eval_bin), use_cache=False, progress=False,
                                    bootstrap=0))  # the card keeps scalar metrics only
        numbers = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in numbers.items()}
        variants[variant]["evaluation"] = {
            "bin": Path(eval_bin).name, "accuracy": accuracy_of(numbers),
            "metrics": {k: v for k, v in numbers.items()
                        if isinstance(v, (int, float, str, bool))}}
        log.info("%s on %s: accuracy %s", variant, Path(eval_bin).name,
                 variants[variant]["evaluation"]["accuracy"])
    base = variants["fp32"]["evaluation"]["accuracy"]
    for info in variants.values():
        acc = info["evaluation"]["accuracy"]
        info["evaluation"]["drop_vs_fp32"] = (base - acc if base is not None and acc is not None
                                              else None)
