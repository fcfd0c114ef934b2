"""Model cards: what a deployer needs to trust an exported file, next to the file.

One card per exported file (``student.onnx`` -> ``student.card.json`` and
``student.card.md``), each listing every variant of the export so the FP32/FP16/INT8
trade-off is visible from any of them.
"""

from __future__ import annotations

import datetime as dt
import platform
from pathlib import Path
from typing import Any

from facekd.fileio import write_json_atomic, write_text_atomic


def card_paths(model_path: str | Path) -> tuple[Path, Path]:
    """``x.onnx`` -> (``x.card.json``, ``x.card.md``); other formats keep their extension
    (``x.tflite.card.json``) so an ONNX and a LiteRT file of one stem never share a card."""
    model_path = Path(model_path)
    stem = model_path.with_suffix("") if model_path.suffix == ".onnx" else model_path
    return stem.with_name(stem.name + ".card.json"), stem.with_name(stem.name + ".card.md")


def _versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import torch

    from facekd import __version__

    return {"facekd": __version__, "torch": torch.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__, "python": platform.python_version()}


def build_card(student: Any, variants: dict[str, dict[str, Any]], *, normalize_inside: bool,
               eval_bin: str | Path | None, max_drop: float, force: bool) -> dict[str, Any]:
    """The card as a dict (JSON-serialisable)."""
    source = student.source
    return {
        "format": "facekd-model-card",
        "version": 1,
        "created_utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "model": {
            "arch": student.arch,
            "arch_kwargs": student.arch_kwargs,
            "params": student.params,
            "macs": student.macs,
            "embedding_size": student.embedding_size,
        },
        "input": {
            "name": "data", "shape": ["batch", 3, 112, 112], "dtype": "float32",
            "channels": "RGB",
            "normalization": "inside" if normalize_inside else "outside",
            "expects": ("raw pixels 0..255; (x - 127.5) / 127.5 is in the graph"
                        if normalize_inside else
                        "(x - 127.5) / 127.5 applied by the caller (insightface default)"),
            "alignment": "5-point ArcFace similarity transform to 112x112",
        },
        "output": {"name": "embedding", "shape": ["batch", student.embedding_size],
                   "note": "not L2-normalised; compare with cosine similarity"},
        "source": {
            "checkpoint": str(source.checkpoint),
            "checkpoint_sha256": source.checkpoint_sha256,
            "run_folder": str(source.run_folder) if source.run_folder else None,
            "recipe": str(source.recipe) if source.recipe else None,
            "recipe_sha256": source.recipe_sha256,
            "recipe_summary": source.recipe_summary,
            "checkpoint_meta": source.checkpoint_meta,
        },
        "gate": {"eval_bin": str(eval_bin) if eval_bin else None, "max_drop": max_drop,
                 "force": force},
        "variants": variants,
        "versions": _versions(),
    }


def write_card(model_path: str | Path, card: dict[str, Any], variant: str) -> tuple[Path, Path]:
    """Write the JSON and Markdown card of one exported file (atomically)."""
    json_path, md_path = card_paths(model_path)
    own = {**card, "file": {"variant": variant, **_file_entry(card, variant)}}
    write_json_atomic(json_path, own)
    write_text_atomic(md_path, render_markdown(own))
    return json_path, md_path


def _file_entry(card: dict[str, Any], variant: str) -> dict[str, Any]:
    info = card["variants"].get(variant, {})
    return {k: info.get(k) for k in ("file", "sha256", "bytes")}


def _challenge(result: dict[str, Any] | None) -> str:
    """The insightface challenge checks are ONNX-only: other formats show n/a."""
    if result is None:
        return "n/a"
    return "pass" if result.get("passed") else "fail"


def _insightface(variant: dict[str, Any]) -> str:
    """How insightface loads the file (ONNX only; other formats show n/a)."""
    if "insightface" not in variant:
        return "n/a"
    ins = variant["insightface"]
    return ins.get("loaded_as", "–") if ins.get("checked") else "not checked"


def _fmt(value: Any, spec: str = ".4f") -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return format(value, spec)
    return str(value)


def render_markdown(card: dict[str, Any]) -> str:
    """Human-readable card: identity, input contract, provenance, per-variant numbers."""
    m, i, s = card["model"], card["input"], card["source"]
    file = card.get("file", {})
    lines = [
        f"# {file.get('file') or m['arch']} — facekd model card",
        "",
        f"- **Architecture**: `{m['arch']}` {m['arch_kwargs'] or ''}".rstrip(),
        f"- **Parameters**: {m['params']:,} ({m['params'] / 1e6:.2f} M)",
        f"- **MACs** (112x112): {m['macs']:,} ({m['macs'] / 1e9:.3f} G)",
        f"- **Embedding size**: {m['embedding_size']}",
        f"- **Input**: `{i['name']}` {i['shape']} {i['dtype']} {i['channels']}; "
        f"normalisation **{i['normalization']}** — {i['expects']}",
        f"- **Output**: `{card['output']['name']}` {card['output']['shape']} "
        f"({card['output']['note']})",
        *([f"- **Runtime**: {card['runtime'].get('package')} "
            f"{card['runtime'].get('version', '')} — {card['runtime'].get('checked_with', '')}"]
          if card.get("runtime") else []),
        f"- **Variant of this file**: {file.get('variant', '–')}, sha256 `{file.get('sha256')}`",
        "",
        "## Source",
        "",
        f"- Checkpoint: `{s['checkpoint']}` (sha256 `{s['checkpoint_sha256']}`)",
        f"- Run folder: `{s['run_folder']}`" if s["run_folder"] else "- Run folder: –",
        (f"- Recipe: `{s['recipe']}` (sha256 `{s['recipe_sha256']}`)" if s["recipe"]
         else "- Recipe: –"),
    ]
    for key, value in (s.get("recipe_summary") or {}).items():
        lines.append(f"  - {key}: {value}")
    training = {k: v for k, v in (s.get("checkpoint_meta") or {}).items() if k != "recipe"}
    if training:
        lines.append("- Checkpoint meta: " + ", ".join(f"{k}={v}" for k, v in training.items()))
    gate = card["gate"]
    lines += [
        "",
        "## Variants",
        "",
        f"Parity on 16 synthetic aligned faces vs the torch student; accuracy on "
        f"{gate['eval_bin'] or '(no .bin given)'} (10-fold, image + flip). Max accepted "
        f"drop {gate['max_drop']}{' (--force)' if gate['force'] else ''}.",
        "",
        "| variant | file | MB | max abs diff | max 1-cos | accuracy | drop vs fp32 "
        "| challenge | insightface | verdict |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, v in card["variants"].items():
        p = v.get("parity", {})
        e = v.get("evaluation") or {}
        verdict = v.get("verdict", {})
        status = ("accepted" if verdict.get("accepted") and not verdict.get("forced")
                  else "FORCED" if verdict.get("forced") else "REFUSED")
        lines.append(
            f"| {name} | {v.get('file')} | {_fmt((v.get('bytes') or 0) / 1e6, '.2f')} "
            f"| {_fmt(p.get('max_abs_diff'), '.2e')} | {_fmt(p.get('max_one_minus_cos'), '.2e')} "
            f"| {_fmt(e.get('accuracy'))} | {_fmt(e.get('drop_vs_fp32'))} "
            f"| {_challenge(v.get('challenge'))} "
            f"| {_insightface(v)} "
            f"| {status}{': ' + verdict['reason'] if verdict.get('reason') else ''} |")
    lines += ["", "## Versions", ""]
    lines += [f"- {k} {v}" for k, v in card["versions"].items()]
    lines.append("")
    return "\n".join(lines)
