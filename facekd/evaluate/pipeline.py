"""End-to-end evaluation: model file + dataset -> numbers + report, one call per CLI command.

Every model goes through ``facekd.models.embedder.load_embedder`` (facekd checkpoint or run
folder, arcface_torch state dict or ONNX), every dataset through a fingerprinted image source,
so torch and ONNX models share one path and cached features are found again.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from facekd.errors import DataError
from facekd.evaluate.embed import (
    MODEL_BATCH,
    PREPROCESS,
    as_embedder,
    extract_features,
    split_flip,
)
from facekd.evaluate.ijb import IJBProtocol, config_name, read_protocol, score_ijb
from facekd.evaluate.stats import (
    BOOTSTRAP_SAMPLES,
    FLOOR_RULE,
    Interval,
    bin_image_ids,
    far_supported,
    ijb_estimates,
    interval_rule,
    not_supported,
    verification_estimates,
)
from facekd.evaluate.verification import FAR_GRID, verify_pairs

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------ image sources


class BinImageSource:
    """Images of a ``.bin`` verification set, decoded lazily block by block."""

    def __init__(self, path: str | Path):
        from facekd.data.binset import load_bin
        from facekd.fileio import sha256_file

        self.path = Path(path)
        self.bins, issame = load_bin(self.path)
        self.issame = np.asarray(issame, dtype=bool)
        if len(self.bins) != 2 * len(self.issame) or not len(self.issame):
            raise DataError(f"{self.path}: {len(self.bins)} images for {len(self.issame)} "
                            f"pairs (need exactly 2 per pair)")
        self.fingerprint = sha256_file(self.path)

    def __len__(self) -> int:
        return len(self.bins)

    def load(self, start: int, stop: int) -> np.ndarray:
        from facekd.data.binset import decode_bin_images

        try:
            return decode_bin_images(self.bins[start:stop], source=str(self.path))
        except DataError:
            for i in range(start, stop):  # name the image by its index in the whole file
                try:
                    decode_bin_images(self.bins[i:i + 1], source=str(self.path))
                except DataError:
                    raise DataError(f"{self.path}: image {i} cannot be decoded") from None
            raise


class IJBImageSource:
    """IJB loose crops, aligned to 112x112 RGB with their 5 landmarks (reference order)."""

    def __init__(self, protocol: IJBProtocol, workers: int = 4):
        self.protocol = protocol
        self.workers = max(1, workers)
        self.lmk_file = protocol.files["lmk"]
        self.fingerprint = self._fingerprint_and_check()

    def _fingerprint_and_check(self) -> str:
        """Hash of the meta files plus every image's name and size; missing images fail here,
        before hours of embedding, naming the meta line."""
        from facekd.fileio import sha256_file

        h = hashlib.sha256()
        for key in ("tid_mid", "lmk", "pairs"):
            h.update(sha256_file(self.protocol.files[key]).encode())
        from facekd.inputs import Folder

        image_dir = self.protocol.image_dir
        if not image_dir.is_dir():
            raise DataError(f"{image_dir}: missing loose_crop image folder")
        images = Folder(image_dir)
        for i, name in enumerate(self.protocol.names):
            path = images.inside(name, f"{self.lmk_file}:{i + 1}", "image")
            try:
                size = os.stat(path).st_size
            except OSError:
                raise DataError(f"{self.lmk_file}:{i + 1}: image {image_dir / name} "
                                f"does not exist") from None
            h.update(f"{name}\t{size}\n".encode())
        return h.hexdigest()

    def __len__(self) -> int:
        return len(self.protocol.names)

    def _one(self, i: int) -> np.ndarray:
        import cv2

        from facekd.data.align import norm_crop

        path = self.protocol.image_dir / self.protocol.names[i]
        img = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if img is None:
            raise DataError(f"{path}: cannot decode image ({self.lmk_file}:{i + 1})")
        h, w = img.shape[:2]
        lmk = self.protocol.landmarks[i]
        if (lmk < 0).any() or (lmk[:, 0] > w).any() or (lmk[:, 1] > h).any():
            raise DataError(f"{self.lmk_file}:{i + 1}: landmarks of {self.protocol.names[i]} "
                            f"lie outside its {w}x{h} image")
        aligned = norm_crop(img, lmk, 112)
        return np.ascontiguousarray(aligned[:, :, ::-1].transpose(2, 0, 1))

    def load(self, start: int, stop: int) -> np.ndarray:
        if self.workers == 1 or stop - start < 8:
            return np.stack([self._one(i) for i in range(start, stop)])
        with ThreadPoolExecutor(self.workers) as pool:
            return np.stack(list(pool.map(self._one, range(start, stop))))


# ----------------------------------------------------------------------- evaluations


def _add_bootstrap(result: dict[str, Any], summary: dict[str, Any]) -> None:
    """JSON-ready intervals under ``"bootstrap"``, the paired replicates (arrays, left
    out of JSON reports) under ``"replicates"``."""
    estimates = summary.pop("estimates")
    result["bootstrap"] = summary
    result["replicates"] = {k: e.replicates for k, e in estimates.items()}


def _provenance(embedder: Any) -> dict[str, str]:
    return {"model": getattr(embedder, "name", "") or type(embedder).__name__,
            "model_sha256": getattr(embedder, "sha256", "") or "unknown (in-memory model)"}


def evaluate_bin(embedder: Any, bin_path: str | Path, batch_size: int = 256, *,
                 flip: bool = True, nrof_folds: int = 10, cache_dir: str | Path | None = None,
                 use_cache: bool = True, progress: bool = True,
                 bootstrap: int = BOOTSTRAP_SAMPLES) -> dict[str, Any]:
    """Embed a ``.bin`` set (image + flip) and score it with :func:`verify_pairs`; with
    ``bootstrap`` resamples, intervals under ``"bootstrap"`` (replicates: ``"replicates"``).

    ``embedder``: any model form (:func:`facekd.evaluate.embed.as_embedder`)."""
    embedder = as_embedder(embedder)
    source = BinImageSource(bin_path)
    feats = extract_features(embedder, source, batch_size=batch_size, flip=flip,
                             cache_dir=cache_dir, use_cache=use_cache, progress=progress,
                             desc=Path(bin_path).stem)
    emb, emb_flip = split_flip(feats) if flip else (feats, None)
    try:
        result = verify_pairs(emb, emb_flip, source.issame, nrof_folds=nrof_folds)
    except DataError as exc:
        raise DataError(f"{bin_path}: {exc}") from None
    _add_bootstrap(result, verification_estimates(
        result, source.issame, bin_image_ids(source.bins), n_boot=bootstrap))
    result.update(_provenance(embedder))
    result.update({"dataset": Path(bin_path).stem, "dataset_file": str(bin_path),
                   "dataset_sha256": source.fingerprint,
                   "settings": {"flip": flip, "folds": nrof_folds, "model_batch": MODEL_BATCH,
                                "preprocess": PREPROCESS, "distance": "squared L2",
                                "thresholds": "arange(0, 4, 0.01)"}})
    return result


def evaluate_ijb(embedder: Any, ijb_dir: str | Path, dataset: str = "IJBC", *,
                 use_norm_score: bool = True, use_detector_score: bool = True,
                 use_flip_test: bool = True, batch_size: int = 256, workers: int = 4,
                 cache_dir: str | Path | None = None, use_cache: bool = True,
                 progress: bool = True, bootstrap: int = BOOTSTRAP_SAMPLES) -> dict[str, Any]:
    """Full IJB-B/C pipeline: meta, alignment, image + flip embedding, 1:1 and 1:N scores,
    and bootstrap intervals of TAR at every supported FAR."""
    from facekd.evaluate.identification import identify, read_one_to_n

    embedder = as_embedder(embedder)
    protocol = read_protocol(ijb_dir, dataset)
    lists = read_one_to_n(ijb_dir, dataset)
    source = IJBImageSource(protocol, workers=workers)
    feats = extract_features(embedder, source, batch_size=batch_size, flip=True,
                             cache_dir=cache_dir, use_cache=use_cache, progress=progress,
                             desc=protocol.dataset)
    flags = {"use_norm_score": use_norm_score, "use_detector_score": use_detector_score,
             "use_flip_test": use_flip_test}
    result = score_ijb(feats, protocol.faceness, protocol.templates, protocol.medias,
                       protocol.p1, protocol.p2, protocol.labels, **flags)
    _add_bootstrap(result, ijb_estimates(result, protocol.p1, protocol.p2, protocol.labels,
                                         FAR_GRID, n_boot=bootstrap))
    if lists is not None:
        result["identification"] = identify(result["template_feats"],
                                            result["unique_templates"], lists)
    result.update(_provenance(embedder))
    result.update({"dataset": protocol.dataset, "dataset_dir": str(ijb_dir),
                   "dataset_sha256": source.fingerprint,
                   "settings": {**flags, "config": config_name(**flags),
                                "model_batch": MODEL_BATCH, "preprocess": PREPROCESS,
                                "alignment": "facekd.data.align.norm_crop 112"}})
    return result


# ------------------------------------------------------------------- CLI entry points


def _load(model: str | Path, arch: str | None, device: str | None) -> Any:
    from facekd.models.embedder import load_embedder

    return load_embedder(model, arch=arch, device=device)


def _percent(fraction: float) -> float:
    return round(100 * float(fraction), 2)


def _interval(res: dict[str, Any], key: str) -> Interval | None:
    iv = res.get("bootstrap", {}).get("intervals", {}).get(key)
    return None if iv is None else Interval(iv["value"], iv["low"], iv["high"])


def _cell(res: dict[str, Any], key: str, value: float, percent: bool,
          far: float | None = None) -> str:
    """A figure as printed: value and interval, or "n/a (N impostor pairs)" below the
    resolution floor (:func:`facekd.evaluate.stats.far_supported`)."""
    n_imp = res.get("bootstrap", {}).get("impostor_pairs")
    if far is not None and n_imp is not None and not far_supported(far, n_imp):
        return not_supported(n_imp)
    factor, digits = (100.0, 2) if percent else (1.0, 4)
    iv = _interval(res, key)
    if iv is None:
        return f"{value * factor:.{digits}f}"
    return iv.scaled(factor).format(digits)


def verification_row(res: dict[str, Any]) -> dict[str, Any]:
    """One ``eval verify`` row: insightface's fractions, with intervals and floors."""
    n_imp = int(res["bootstrap"]["impostor_pairs"]) if "bootstrap" in res else None
    val = res["val"] if n_imp is None or far_supported(1e-3, n_imp) else not_supported(n_imp)
    row = {"model": res["model"], "model_sha256": res["model_sha256"][:16],
           "dataset": res["dataset"], "dataset_sha256": res["dataset_sha256"][:16],
           "pairs": res["num_pairs"], "acc": _cell(res, "acc", res["acc_mean"], False),
           "acc_std": res["acc_std"], "val@far1e-3": val,
           "val_std": res["val_std"] if not isinstance(val, str) else "",
           "far": res["far"], "xnorm": res["xnorm"], "auc": res["auc"], "eer": res["eer"]}
    for far in (1e-4, 1e-3):
        row[f"tar@far{far:.0e}"] = _cell(res, f"tar@{far:g}", res["tar_at_far"][far], False,
                                         far)
    return row


def ijb_row(res: dict[str, Any]) -> dict[str, Any]:
    row = {"model": res["model"], "model_sha256": res["model_sha256"][:16],
           "dataset": res["dataset"], "dataset_sha256": res["dataset_sha256"][:16],
           "config": res["settings"]["config"], "pairs": res["num_pairs"]}
    for far in FAR_GRID:
        row[f"tar@far{far:.0e}"] = _cell(res, f"tar@{far:g}", res["tar_at_far"][far], True,
                                         far)
    row["auc"] = res["auc"]
    ident = res.get("identification")
    if ident:
        for k in (1, 5, 10):
            row[f"rank{k}"] = round(100 * ident[f"rank{k}"], 2)
        for f, v in ident["tpir_at_fpir"].items():
            row[f"tpir@fpir{f:g}"] = round(100 * v, 2)
    return row


def _header(results: Sequence[dict[str, Any]]) -> list[str]:
    lines, seen = [FLOOR_RULE], set()
    boots = [r["bootstrap"] for r in results if "bootstrap" in r]
    if boots:
        lines.append(interval_rule(boots[0]["bootstrap_samples"], boots[0]["bootstrap_seed"]))
    for res in results:
        for key, label in (("model_sha256", f"model {res['model']}"),
                           ("dataset_sha256", f"dataset {res['dataset']}")):
            if (key, res[key]) not in seen:
                seen.add((key, res[key]))
                lines.append(f"{label}: sha256 {res[key]}")
    settings = {str(r["dataset"]): r["settings"] for r in results}
    lines += [f"settings {name}: {s}" for name, s in settings.items()]
    protocols = {str(r["dataset"]): r["bootstrap"] for r in results if "bootstrap" in r}
    lines += [f"protocol {name}: {b['genuine_pairs']:,} genuine / {b['impostor_pairs']:,} "
              f"impostor pairs; intervals over {b['clusters']}"
              for name, b in protocols.items()]
    return lines


def _write(out: str | Path | None, stem: str, rows: list[dict[str, Any]],
           results: list[dict[str, Any]], title: str, rocs: dict[str, dict[str, Any]]) -> None:
    from facekd.evaluate.report import markdown_table, plot_roc, write_json, write_table

    header = _header(results)
    print("\n".join(header[:2]))
    print(markdown_table(rows, list(rows[0])))
    if out is None:
        return
    out = Path(out)
    write_table(out, stem, rows, header, title)
    write_json(out / f"{stem}.json", {"header": header, "results": results})
    for dataset, curves in rocs.items():
        plot_roc(out / f"roc_{dataset}.png", curves, f"ROC {dataset}")
    log.info("report written to %s", out)


def run_verify(model: str | Path, bins: Sequence[str | Path], *, arch: str | None = None,
               device: str | None = None, batch_size: int = 256, flip: bool = True,
               nrof_folds: int = 10, cache_dir: str | Path | None = None,
               use_cache: bool = True, out: str | Path | None = None,
               progress: bool = True, bootstrap: int = BOOTSTRAP_SAMPLES
               ) -> list[dict[str, Any]]:
    """``facekd eval verify``: every ``.bin`` for one model, one table."""
    embedder = _load(model, arch, device)
    results = [evaluate_bin(embedder, b, batch_size, flip=flip, nrof_folds=nrof_folds,
                            cache_dir=cache_dir, use_cache=use_cache, progress=progress,
                            bootstrap=bootstrap)
               for b in bins]
    rows = [verification_row(r) for r in results]
    rocs = {r["dataset"]: {r["model"]: (r["roc_fpr"], r["roc_tpr"])} for r in results}
    _write(out, "verify", rows, results, "facekd eval verify", rocs)
    return rows


def run_ijb(model: str | Path, ijb_dir: str | Path, *, dataset: str = "IJBC",
            arch: str | None = None, device: str | None = None, use_norm_score: bool = True,
            use_detector_score: bool = True, use_flip_test: bool = True,
            batch_size: int = 256, workers: int = 4, cache_dir: str | Path | None = None,
            use_cache: bool = True, out: str | Path | None = None,
            progress: bool = True, bootstrap: int = BOOTSTRAP_SAMPLES) -> dict[str, Any]:
    """``facekd eval ijb``: 1:1 TAR@FAR (and 1:N when present) for one model."""
    embedder = _load(model, arch, device)
    res = evaluate_ijb(embedder, ijb_dir, dataset, use_norm_score=use_norm_score,
                       use_detector_score=use_detector_score, use_flip_test=use_flip_test,
                       batch_size=batch_size, workers=workers, cache_dir=cache_dir,
                       use_cache=use_cache, progress=progress, bootstrap=bootstrap)
    rows = [ijb_row(res)]
    _write(out, "ijb", rows, [res], "facekd eval ijb",
           {res["dataset"]: {res["model"]: (res["fpr"], res["tpr"])}})
    return rows[0]


COMPARE_FARS = (1e-5, 1e-4, 1e-3)


def compare_cell(res: dict[str, Any], key: str, value: float,
                 far: float | None = None) -> dict[str, Any]:
    """One ``eval compare`` figure in %: value and interval, or value None with the
    reason when the protocol cannot resolve that FAR; ``text`` is what the table shows."""
    n_imp = res.get("bootstrap", {}).get("impostor_pairs")
    if far is not None and n_imp is not None and not far_supported(far, n_imp):
        return {"value": None, "low": None, "high": None, "text": not_supported(n_imp)}
    iv = _interval(res, key)
    cell = {"value": _percent(value), "low": None, "high": None, "text": f"{100 * value:.2f}"}
    if iv is not None:
        pct = iv.scaled(100.0)
        cell.update(low=round(pct.low, 2), high=round(pct.high, 2), text=pct.format(2))
    return cell


def run_compare(models: Sequence[str | Path], bins: Sequence[str | Path], out: str | Path, *,
                ijb_dir: str | Path | None = None, dataset: str = "IJBC",
                arch: str | None = None, device: str | None = None, batch_size: int = 256,
                workers: int = 4, cache_dir: str | Path | None = None, use_cache: bool = True,
                progress: bool = True, bootstrap: int = BOOTSTRAP_SAMPLES
                ) -> list[dict[str, Any]]:
    """``facekd eval compare``: teacher and students side by side, one row per model.

    Every figure in a compare row is a percentage (accuracies and TARs alike), so a
    row's columns can share one axis; ``eval verify`` keeps insightface's fractions.
    Returned rows hold ``{"model", "model_sha256", "cells": {column: compare_cell}}``;
    the bootstrap replicates of every cell, paired across models (same clusters and
    seed), go to ``OUT/compare_replicates.npz`` as ``"<row>|<column>"``.
    """
    from facekd.fileio import atomic_path

    if not bins and ijb_dir is None:
        raise DataError("nothing to compare on: give --bins and/or --ijb")
    rows, results = [], []
    replicates: dict[str, np.ndarray] = {}
    rocs: dict[str, dict[str, Any]] = {}
    for index, model in enumerate(models):
        embedder = _load(model, arch, device)
        cells: dict[str, dict[str, Any]] = {}
        row: dict[str, Any] = {"model": getattr(embedder, "name", str(model)),
                               "model_sha256": embedder.sha256[:16], "cells": cells}
        label = f"{row['model']} {embedder.sha256[:8]}"

        def add(res: dict[str, Any], column: str, key: str, value: float,
                far: float | None = None, cells: dict = cells, index: int = index) -> None:
            cells[column] = compare_cell(res, key, value, far)
            if cells[column]["value"] is not None and key in res.get("replicates", {}):
                replicates[f"{index}|{column}"] = 100 * res["replicates"][key]

        for b in bins:
            res = evaluate_bin(embedder, b, batch_size, cache_dir=cache_dir,
                               use_cache=use_cache, progress=progress, bootstrap=bootstrap)
            results.append(res)
            add(res, f"{res['dataset']} acc", "acc", res["acc_mean"])
            add(res, f"{res['dataset']} tar@far1e-3", "tar@0.001", res["tar_at_far"][1e-3],
                1e-3)
            rocs.setdefault(res["dataset"], {})[label] = (res["roc_fpr"], res["roc_tpr"])
        if ijb_dir is not None:
            res = evaluate_ijb(embedder, ijb_dir, dataset, batch_size=batch_size,
                               workers=workers, cache_dir=cache_dir, use_cache=use_cache,
                               progress=progress, bootstrap=bootstrap)
            results.append(res)
            for far in COMPARE_FARS:
                add(res, f"{res['dataset']} tar@far{far:.0e}", f"tar@{far:g}",
                    res["tar_at_far"][far], far)
            rocs.setdefault(res["dataset"], {})[label] = (res["fpr"], res["tpr"])
        rows.append(row)
    table = [{"model": r["model"], "model_sha256": r["model_sha256"],
              **{k: c["text"] for k, c in r["cells"].items()}} for r in rows]
    _write(out, "compare", table, results, "facekd eval compare", rocs)
    with atomic_path(Path(out) / "compare_replicates.npz", suffix=".npz") as tmp:
        np.savez(tmp, **replicates)
    return rows
