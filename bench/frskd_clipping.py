"""FRSKD with and without gradient clipping, on the method benchmark's validation protocol.

The authors' code clips nothing; facekd's FRSKD recipe clips (``optim.clip_grad``, the
backbone as arcface_torch does, the self-teacher as its own group). This runs the
recipe's setting twice at ``bench.methods``' tuning seed, as its ``tune/frskd/w1`` run
does, once as shipped and once with ``optim.clip_grad=null``, side by side (one torch
thread each), and scores both on the validation identities only (the test sets stay
unseen): the measurement behind the kept deviation in :mod:`facekd.distill.frskd`.
FRSKD needs no teacher, so only the benchmark's data is built.

Run: ``.venv/bin/python -m bench.frskd_clipping`` (resumable; 4 minutes on 2 idle
cores; writes bench/results/frskd_clipping.{md,json}).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from bench.methods import (
    PRIMARY,
    RESULTS,
    ROOT,
    SIZES,
    TUNE_SEED,
    Layout,
    _init_worker,
    _train,
    evaluate_model,
    prepare_data,
    student_overrides,
)

VARIANTS = {"clipped (shipped)": [], "unclipped (authors')": ["optim.clip_grad=null"]}


def _run(layout: Layout, name: str) -> Path:
    return layout.work / "runs" / "frskd_clipping" / name.split()[0]


def _train_variant(work: str, name: str) -> str:
    from facekd.fileio import write_json_atomic

    layout = Layout(Path(work))
    out = _run(layout, name)
    overrides = [*student_overrides(layout, SIZES["full"], "frskd", TUNE_SEED, False, out),
                 *VARIANTS[name]]
    recorded = out / "bench_overrides.json"
    if recorded.exists() and json.loads(recorded.read_text()) != overrides:
        raise SystemExit(f"{out} was trained with other settings than this bench's: "
                         "remove the folder to retrain")
    if not (out / "summary.json").exists():
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(recorded, overrides)
        _train("frskd_synth.yaml", overrides)
    return name


def gradient_at_init(num_classes: int, batch: int = 64, seed: int = 0) -> dict:
    """Backbone gradient norms at initialisation (one backward on noise images, recipe
    settings): the self-teacher's CE, which reaches the backbone through the student's
    maps as in the authors' code, against the student's own CE; and which map it enters."""
    import torch
    import torch.nn.functional as F

    from facekd.distill import StudentOutput, create_method
    from facekd.models.heads import create_head
    from facekd.models.hooks import FeatureHooks
    from facekd.models.registry import create_model, feature_channels, feature_layers
    from facekd.train.recipe import load_recipe, shipped_recipe

    r = load_recipe(str(shipped_recipe("frskd_synth.yaml")), [])
    torch.manual_seed(seed)
    student = create_model(r.student.arch, num_features=r.student.embedding_size)
    layers = feature_layers(student)
    method = create_method("frskd", student_dim=r.student.embedding_size, teacher_dim=None,
                           num_classes=num_classes, params=r.method.params,
                           student_feature_channels=feature_channels(student, layers))
    h = r.student.head
    head = create_head(h.type, r.student.embedding_size, num_classes, scale=h.scale,
                       margin=h.margin)
    x = torch.rand(batch, 3, 112, 112) * 2 - 1
    labels = torch.randint(0, num_classes, (batch,))
    params = [q for q in student.parameters() if q.requires_grad]

    def norm(loss: torch.Tensor, inputs: list) -> list[float]:
        grads = torch.autograd.grad(loss, inputs, retain_graph=True, allow_unused=True)
        return [0.0 if g is None else float(g.norm()) for g in grads]

    with FeatureHooks(student, layers) as hooks:
        emb = student(x)
        maps = hooks.ordered()
    ce = F.cross_entropy(head(emb, labels), labels)
    self_ce = method(StudentOutput(emb, maps, head=head), None, labels)["self_ce"]
    g_ce = float(torch.tensor(norm(ce, params)).norm())
    g_self = float(torch.tensor(norm(self_ce, params)).norm())
    return {"student_ce": g_ce, "self_ce": g_self, "ratio": g_self / g_ce,
            "self_ce_by_map": dict(zip([f"{m.shape[-1]} px" for m in maps],
                                       norm(self_ce, maps), strict=True))}


def _last(run: Path, column: str) -> float:
    with open(run / "metrics.csv", newline="") as f:
        return float(list(csv.DictReader(f))[-1][column])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=ROOT / "bench" / "_work" / "methods")
    parser.add_argument("--out", type=Path, default=RESULTS / "frskd_clipping")
    args = parser.parse_args(argv)

    from facekd.fileio import write_json_atomic, write_text_atomic
    from facekd.logs import setup_logging

    setup_logging()
    layout = Layout(args.work)
    start = time.perf_counter()
    prepare_data(layout, SIZES["full"], progress=False)
    with ProcessPoolExecutor(2, initializer=_init_worker, initargs=(1,)) as pool:
        list(pool.map(_train_variant, [str(args.work)] * len(VARIANTS), VARIANTS))
    rows = {}
    for name in VARIANTS:
        run = _run(layout, name)
        scores = evaluate_model(run / "student.pt", layout, False, 1, split="validation")
        rows[name] = {"tar": scores[PRIMARY], "interval": scores.get(f"{PRIMARY}_interval"),
                      "impostor_pairs": scores["ijb_impostor_pairs"],
                      "final_ce": _last(run, "loss/ce"),
                      "final_self_ce": _last(run, "loss/self_ce")}
    result = {"benchmark": "frskd_clipping", "seed": TUNE_SEED, "rows": rows,
              "gradient_at_init": gradient_at_init(SIZES["full"].identities),
              "seconds": time.perf_counter() - start,
              "command": " ".join([".venv/bin/python -m bench.frskd_clipping",
                                   *(argv if argv is not None else sys.argv[1:])])}
    write_json_atomic(args.out.with_suffix(".json"), result)
    write_text_atomic(args.out.with_suffix(".md"), _markdown(result))
    print(_markdown(result))
    return result


def _markdown(r: dict) -> str:
    lines = ["# FRSKD with and without gradient clipping (validation identities)", "",
             f"`bench.methods`' tuning seed {r['seed']}, the recipe's setting, 88 steps; "
             "IJB-style validation protocol. TAR in %, 95 % cluster-bootstrap interval.", "",
             "| FRSKD | TAR@FAR=1e-3 | interval | impostor pairs | final student CE "
             "| final self-teacher CE |", "|---|---|---|---|---|---|"]
    for name, row in r["rows"].items():
        ci = row["interval"]
        interval = "–" if ci is None else f"[{ci['low']:.2f}, {ci['high']:.2f}]"
        lines.append(f"| {name} | {row['tar']:.2f} | {interval} | "
                     f"{row['impostor_pairs']:,} | {row['final_ce']:.2f} | "
                     f"{row['final_self_ce']:.2f} |")
    g = r["gradient_at_init"]
    maps = ", ".join(f"{k} {v:.3g}" for k, v in g["self_ce_by_map"].items())
    lines += ["", f"At initialisation (one backward, 64 noise images, recipe settings) the "
              f"self-teacher's CE puts a backbone gradient of norm {g['self_ce']:.3g} against "
              f"{g['student_ce']:.3g} for the student's own CE ({g['ratio']:.1f}x); its "
              f"gradient norm at each student map: {maps}."]
    lines += ["", f"Command: `{r['command']}` ({r['seconds'] / 60:.1f} min this time; "
              "finished runs are reused)", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
