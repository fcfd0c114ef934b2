"""Cost of each distillation method's losses next to one student training step, in one run.

What a method adds to a step is its loss module's forward + backward (connectors,
cross-network logits, self-teacher); the teacher itself is assumed cached (embeddings
looked up, see ``facekd teacher cache``), so it is not timed here. The student step is
the ``mbf`` backbone forward + backward plus its ArcFace head's CE over all classes,
the work every method shares. Each method is timed on the same batch (labelled rows
plus unlabelled rows with label -1) with the student's real embedding size and
MobileFaceNet's 56/28/14/7 px stage maps for FRSKD; "ratio" is
(student step + method) / student step. Times are medians of repeated runs on this
machine's CPU threads, so compare ratios, not absolute numbers, across machines.

Run: ``.venv/bin/python -m bench.distill_losses`` (writes bench/results/distill_losses.{md,json}).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from facekd.distill import StudentOutput, TeacherOutput, create_method
from facekd.fileio import write_json_atomic, write_text_atomic
from facekd.models import create_head, create_model, feature_channels, feature_layers
from facekd.models.hooks import FeatureHooks

RESULTS = Path(__file__).resolve().parent / "results"


def _median_seconds(fn: Callable[[], None], repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--unlabelled", type=int, default=16, help="rows with label -1")
    parser.add_argument("--classes", type=int, default=20_000)
    parser.add_argument("--negatives", type=int, default=2_000,
                        help="sampled negatives for the 'sampled' SRD/KD rows")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=RESULTS)
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    batch, dim, classes = args.batch, args.dim, args.classes

    student = create_model("mbf", num_features=dim)
    layers = feature_layers(student)
    channels = feature_channels(student, layers)
    head = create_head("arcface", dim, classes)
    images = torch.rand(batch, 3, 112, 112) * 2 - 1
    labels = torch.randint(0, classes, (batch,))
    labels[batch - args.unlabelled:] = -1
    labelled = labels >= 0

    def student_step() -> None:
        student.zero_grad(set_to_none=True)
        head.zero_grad(set_to_none=True)
        emb = student(images)
        loss = torch.nn.functional.cross_entropy(head(emb[labelled], labels[labelled]),
                                                 labels[labelled])
        loss.backward()

    step_s = _median_seconds(student_step, max(2, args.repeats // 2))

    with FeatureHooks(student, layers) as hooks, torch.no_grad():
        student(images[:2])
        map_shapes = [tuple(hooks.features[n].shape[1:]) for n in layers]
    emb = torch.randn(batch, dim, requires_grad=True)
    maps = [torch.randn(batch, *shape, requires_grad=True) for shape in map_shapes]
    # REFILLED's stage 1 needs identities with several images: give it 4 per identity.
    grouped = torch.arange(batch) // 4
    grouped[batch - args.unlabelled:] = -1
    teacher = TeacherOutput(torch.randn(batch, dim),
                            torch.nn.functional.normalize(torch.randn(classes, dim), dim=1),
                            64.0)
    cases = [
        ("srd (all classes)", "srd", {}, labels),
        (f"srd ({args.negatives} sampled negatives)", "srd",
         {"num_negatives": args.negatives}, labels),
        ("srd, feature-map connector, sampled", "srd",
         {"connector": "feature", "num_negatives": args.negatives}, labels),
        ("kd (all classes)", "kd", {}, labels),
        (f"kd ({args.negatives} sampled negatives)", "kd",
         {"num_negatives": args.negatives}, labels),
        ("feature (cosine)", "feature", {}, labels),
        ("rkd", "rkd", {}, labels),
        ("refilled stage 1 (semi-hard tuples, 4 img/id)", "refilled", {"stage": 1}, grouped),
        ("refilled stage 2 (local classifier)", "refilled", {"stage": 2}, labels),
        ("adadistill (adaptive centres, ArcFace)", "adadistill", {}, labels),
        ("ekd (rank loss, 4 img/id)", "ekd", {}, grouped),
        ("frskd (self-teacher 2x width per level, default)", "frskd", {}, labels),
        ("frskd (self-teacher 1x width per level)", "frskd", {"width_multiplier": 1},
         labels),
    ]
    rows = [{"case": "student step (mbf fwd+bwd, ArcFace CE)", "seconds": step_s,
             "ratio": 1.0}]
    for label, name, params, case_labels in cases:
        method = create_method(name, student_dim=dim, teacher_dim=dim, num_classes=classes,
                               params=params, student_feature_channels=channels)
        method.train()

        def run(method=method, case_labels=case_labels) -> None:
            method.zero_grad(set_to_none=True)
            emb.grad = None
            for m in maps:
                m.grad = None
            out = method(StudentOutput(emb, maps, head), teacher, case_labels)
            sum(out.values()).backward()

        seconds = _median_seconds(run, args.repeats)
        rows.append({"case": label, "seconds": seconds, "ratio": (step_s + seconds) / step_s})
        print(f"{label:45s} {seconds * 1e3:9.2f} ms  ratio {(step_s + seconds) / step_s:.3f}")

    result = {
        "benchmark": "distill_losses",
        "command": " ".join([".venv/bin/python -m bench.distill_losses", *argv]),
        "load_average_1min": os.getloadavg()[0],
        "batch": batch, "unlabelled_rows": args.unlabelled, "classes": classes,
        "embedding": dim, "negatives": args.negatives,
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out / "distill_losses.json", result)
    write_text_atomic(args.out / "distill_losses.md", _markdown(result))
    return result


def _markdown(r: dict) -> str:
    lines = [
        "# Distillation loss cost next to a student step",
        "",
        f"Batch {r['batch']} ({r['unlabelled_rows']} unlabelled rows), {r['classes']} "
        f"classes, {r['embedding']}-d embeddings, torch {r['torch']}, {r['threads']} CPU "
        f"threads (1-min load average {r['load_average_1min']:.1f} at the end: the machine "
        "was shared, so absolute times are inflated; the ratios come from one run). "
        "Teacher outputs are cached (not timed). Ratio = (student step + method loss "
        "fwd+bwd) / student step.",
        "",
        f"Command: `{r['command'].strip()}`",
        "",
        "| case | ms | ratio |",
        "|---|---:|---:|",
    ]
    lines += [f"| {row['case']} | {row['seconds'] * 1e3:.1f} | {row['ratio']:.3f} |"
              for row in r["rows"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
