"""``python -m bench [NAME ...]``: list the benchmarks, or run the named ones in turn."""

from __future__ import annotations

import importlib
import subprocess
import sys

# name -> what it measures (the module's own docstring says how)
BENCHMARKS: dict[str, str] = {
    "p1_recordio_read": "P1 random-access RecordIO reads/s vs MXNet read_idx",
    "p2_rec2shards": "P2 rec2shards wall time vs copying the bytes",
    "p3_loader": "P3 loader images/s vs bare cv2.imdecode",
    "loader_groups": "identity-grouped (P x K) batches: pairs per batch, plan cost, speed",
    "loader_workers": "loader images/s per worker process; workers per GPU at arcface_torch rate",
    "p4_models": "P4 backbone cost and Partial FC sampling",
    "p4_step_time": "P4 SRD step time with the teacher cache vs student alone",
    "partial_fc_scale": "Partial FC at 2.06M classes: memory and step time per rank, "
                        "world 8/16/64, checked by a 2-process gloo run; resharding",
    "p5_ijb_scoring": "P5 IJB-C-size scoring vs the reference algorithm",
    "p6_latency": "P6 batch-1 latency: ONNX FP32/FP16/INT8 vs torch eager",
    "p7_conversion_rss": "P7 peak RSS of conversions vs dataset size",
    "scale": "rec2shards, info, loader start-up, teacher cache at 1M-10M records (~25 min)",
    "p8_edge": "P8 batch-1 latency: ONNX Runtime vs NCNN vs LiteRT, FP32/FP16/INT8",
    "frskd_clipping": "FRSKD with and without gradient clipping, validation identities",
    "timer_crosstalk": "round-robin vs block timing of three runtimes at 1 and 2 threads",
    "distill_losses": "cost of each distillation loss next to a student step",
    "synth_speed": "synthetic face generator throughput",
    "synth_difficulty": "held-out accuracy of pixels vs small networks on synthetic faces",
    "methods": "the method comparison on the embedded benchmark (hours; resumable)",
    "method_batches": "P x K vs random batches for the student alone and EKD, in the "
                      "method benchmark's setting (validation identities)",
    "cfp_pose": "CFP-FP-like set by profile yaw, teacher vs student alone "
                "(python -m bench.cfp_pose DEMO_OUT ...)",
}


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help", "list"):
        print("usage: python -m bench NAME [NAME ...]\n")
        for name, what in BENCHMARKS.items():
            print(f"  {name:<20} {what}")
        return 0
    unknown = [n for n in argv if n not in BENCHMARKS]
    if unknown:
        print(f"bench: unknown benchmark {unknown[0]!r} (python -m bench lists them)",
              file=sys.stderr)
        return 2
    for name in argv:
        importlib.import_module(f"bench.{name}")  # fail fast on a broken module
        code = subprocess.call([sys.executable, "-m", f"bench.{name}"])
        if code:
            return code
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
