"""FP16/INT8 variants of an exported student: write, measure, judge.

A variant is only kept when its embeddings still point the same way as torch's on the
parity faces and, given a ``.bin`` set, its verification accuracy is within ``max_drop``
of the FP32 file's.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from facekd.errors import FacekdError
from facekd.export import parity as parity_mod
from facekd.export.checks import check_challenge, insightface_compat
from facekd.export.fp16 import convert_fp16
from facekd.export.graph import (
    NORM_MUL_NODE,
    NORM_SUB_NODE,
    base_metadata,
    move_normalization_first,
    set_metadata,
)
from facekd.export.int8 import quantize_int8
from facekd.fileio import atomic_path, sha256_file

log = logging.getLogger(__name__)

VARIANT_THRESHOLDS = {"fp16": parity_mod.FP16_THRESHOLDS, "int8": parity_mod.INT8_THRESHOLDS}
ACCURACY_KEYS = ("acc_mean", "accuracy", "acc", "accuracy_flip", "acc_flip", "acc2")


def make_variant(fp32_path: Path, target: Path, variant: str, *, student: Any,
                 normalize_inside: bool, calib: np.ndarray | None, calib_source: Any,
                 x: np.ndarray, reference: np.ndarray) -> dict[str, Any]:
    """Write the ``variant`` of ``fp32_path`` to ``target``, with parity/challenge numbers."""
    import onnx

    norm_nodes = [NORM_SUB_NODE, NORM_MUL_NODE] if normalize_inside else []
    with atomic_path(target, suffix=".onnx") as tmp:
        if variant == "fp16":
            model_proto, converter = convert_fp16(onnx.load(str(fp32_path)),
                                                  keep_fp32_nodes=norm_nodes)
            settings: dict[str, Any] = {"converter": converter, "io": "float32"}
        elif variant == "int8":
            if calib is None:
                raise FacekdError("--int8 needs calibration images (--calib-data)")
            settings = quantize_int8(fp32_path, tmp, calib, normalize_inside=normalize_inside,
                                     exclude_nodes=norm_nodes)
            settings["calibration_source"] = str(calib_source)
            model_proto = onnx.load(str(tmp))
        else:
            raise FacekdError(f"unknown variant '{variant}' (fp16 or int8)")
        move_normalization_first(model_proto)
        set_metadata(model_proto, {**base_metadata(student, normalize_inside, variant),
                                   "facekd.quantization": settings})
        model_proto.producer_name = "facekd"
        onnx.checker.check_model(model_proto)
        onnx.save(model_proto, str(tmp))
        report = parity_mod.check_parity(student.model, tmp, x, normalize_inside=normalize_inside,
                                         variant=variant, thresholds=VARIANT_THRESHOLDS[variant],
                                         reference=reference)
        challenge = check_challenge(tmp, allow_fp16=(variant == "fp16"), raise_on_fail=False)
        compat = insightface_compat(tmp, normalize_inside)
    log.info("wrote %s (%s: 1-cos %.2e vs torch)", target, variant, report.max_one_minus_cos)
    return {"file": target.name, "sha256": sha256_file(target), "bytes": target.stat().st_size,
            "quantization": settings, "parity": report.to_dict(), "challenge": challenge,
            "insightface": compat}


def accuracy_of(numbers: dict[str, Any]) -> float | None:
    """The verification accuracy (fraction) in an ``evaluate_bin`` result."""
    for key in ACCURACY_KEYS:
        value = numbers.get(key)
        if isinstance(value, (int, float)):
            return float(value) / 100.0 if value > 1.0 else float(value)
    return None


def evaluate_variants(paths: dict[str, Path], bin_path: str | Path,
                      normalize_inside: bool) -> dict[str, dict[str, Any]]:
    """Verification numbers of each variant on one ``.bin`` set (image + flip)."""
    from facekd.evaluate import evaluate_bin
    from facekd.models.embedder import load_embedder

    results: dict[str, dict[str, Any]] = {}
    for variant, path in paths.items():
        embedder = load_embedder(path, device="cpu")  # the one path every command uses
        if getattr(embedder, "raw_pixels", normalize_inside) != normalize_inside:
            raise FacekdError(f"{path}: its metadata disagrees with --normalize-inside")
        # No feature cache: export must not write into the user's evaluation cache. No
        # bootstrap: the gate and the card keep only the scalar metrics.
        numbers = evaluate_bin(embedder, str(bin_path), use_cache=False, bootstrap=0)
        numbers = {k: _plain(v) for k, v in dict(numbers).items()}
        accuracy = accuracy_of(numbers)
        results[variant] = {"bin": Path(bin_path).name, "accuracy": accuracy,
                            "metrics": {k: v for k, v in numbers.items()
                                        if isinstance(v, (int, float, str, bool))}}
        log.info("%s on %s: accuracy %s", variant, Path(bin_path).name, accuracy)
    base = results.get("fp32", {}).get("accuracy")
    for numbers in results.values():
        acc = numbers["accuracy"]
        numbers["drop_vs_fp32"] = (base - acc) if base is not None and acc is not None else None
    return results


def _plain(value: Any) -> Any:
    """numpy scalars -> Python numbers so the card serialises."""
    if isinstance(value, np.generic):
        return value.item()
    return value


def judge_variants(variants: dict[str, dict[str, Any]], *, max_drop: float,
                   force: bool) -> list[str]:
    """Attach a verdict to each variant; return the names to refuse (empty with ``force``).

    A quantised variant fails when its embeddings drift past its parity limits, when it
    fails a challenge check, or when its accuracy drop exceeds ``max_drop``.
    """
    refused = []
    for name, info in variants.items():
        if name == "fp32":
            info["verdict"] = {"accepted": True, "forced": False, "reason": None}
            continue
        reasons = []
        parity = info["parity"]
        if not parity["passed"]:
            reasons.append(f"1-cos vs torch {parity['max_one_minus_cos']:.3g} > "
                           f"{parity['thresholds']['max_one_minus_cos']:.3g}")
        challenge = info.get("challenge")  # ONNX files only
        if challenge is not None and not challenge.get("passed", False):
            failed = [k for k, v in challenge.items() if v is False]
            reasons.append(f"challenge checks failed: {', '.join(failed)}")
        evaluation = info.get("evaluation")
        if evaluation is None:
            log.warning("%s: accuracy not measured (no --eval-bin); only parity was checked",
                        info["file"])
        elif evaluation.get("drop_vs_fp32") is not None and evaluation["drop_vs_fp32"] > max_drop:
            reasons.append(f"accuracy drop {evaluation['drop_vs_fp32']:.4f} > max-drop "
                           f"{max_drop:.4f} on {evaluation['bin']}")
        reason = "; ".join(reasons) or None
        info["verdict"] = {"accepted": not reasons or force, "forced": bool(reasons) and force,
                           "reason": reason}
        if reasons and force:
            banner = "!" * 72
            log.warning("%s\nKEEPING %s DESPITE FAILED CHECKS (--force): %s\n%s",
                        banner, info["file"], reason, banner)
        elif reasons:
            refused.append(name)
    return refused
