"""Partial FC at WebFace42M size (2.06M classes, 512-d): memory and step time per rank.

The table for world sizes 8, 16 and 64 at sample_rate 0.1 and 1.0 is *computed*, from a
model of facekd's own Partial FC step (``facekd.models.partial_fc.PartialFC`` + SGD with
momentum, what the recipes train with), and the model is *checked* against the largest
2-process gloo run that fits this machine (real peak RSS and step time of each rank).

Memory per rank (fp32; C_l = classes of the largest shard, C_s = sampled classes,
B = global batch = per-rank batch x world, D = 512):

- persistent, exact: weight C_l x D, its gradient C_l x D (dense, even when sampling:
  ``weight[index]`` back-propagates into a full-shard tensor), SGD momentum C_l x D;
- transient at the peak, counted in units of the weight shard (``k_w``: F.normalize's copy
  of the centres and its gradient, SGD's weight-decay temporary, the sampled copies) and of
  one B x C_s logits tensor (``k_l``: cos, clamp, margin, scaled logits, exp, softmax and
  their gradients). Both counts are measured once per sample rate from peak RSS of
  single-process steps at small sizes (``calibration`` in the JSON), then applied to any
  size: peak = (k_w x C_l x D + k_l x B x C_s) x 4 bytes.

Step time per rank (forward + backward + optimiser step of the head alone, embeddings
given), in CPU seconds of the rank's process (``time.process_time``: wall time on a shared
2-core machine measures the other jobs; a rank owns its GPU): t = a x MACs + b x (B x C_s)
+ c x (C_l x D) + d, with MACs = 3 x B x C_s x D (the forward matmul and its two
gradients); a, b, c, d are least-squares fits to measured single-process steps on this
CPU (1 thread, dims 32-512 so the matmul and per-logit terms separate). Network time is
not modelled (gloo on one host says nothing about NCCL); the bytes a rank sends per step
are given instead: the embedding all-gather and its gradient all-reduce (B x D x 4 each)
and three B-float all-reduces. B x C_s = per-rank batch x sample_rate x C does not
depend on the world size: only the C_l x D terms shrink as ranks are added.

Checkpoints at that size: a 2-process run saves the full 2.06M x 512 head the way the
trainer does (rows streamed to rank 0), and it is loaded back memory-mapped at world 1
and as 4 shards, every row compared with what the saving ranks held.

Run: ``python -m bench.partial_fc_scale`` (writes bench/results/partial_fc_scale.{md,json});
``--quick`` runs every part at toy sizes (the test suite's check of the script).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench._prepdata import RESULTS, WORK, load_note, machine

GB = 1e9
WEBFACE_CLASSES = 2_059_906   # WebFace42M identities
DIM = 512
PER_RANK_BATCH = 128          # arcface_torch's WebFace42M configs: 128 per GPU
WORLDS = (8, 16, 64)
RATES = (0.1, 1.0)


# --------------------------------------------------------------------------- the model
def shard_size(classes: int, world: int) -> int:
    """Classes of the largest shard (rank 0), as ``partial_fc.shard_range`` deals them."""
    return -(-classes // world)


def sampled_classes(classes_local: int, rate: float, global_batch: int, world: int) -> float:
    """Expected classes a rank keeps: ``rate`` of its shard plus the positives the draw
    missed (about B / world distinct labels fall in a shard)."""
    if rate >= 1.0:
        return float(classes_local)
    positives = min(classes_local, global_batch / world)
    return rate * classes_local + (1.0 - rate) * positives


def rank_model(classes: int, world: int, rate: float, per_rank_batch: int, dim: int,
               calib: dict[str, dict[str, float]], fit: dict[str, float] | None) -> dict:
    """Per-rank tensors, peak memory and step time of one Partial FC step."""
    c_l = shard_size(classes, world)
    batch = per_rank_batch * world
    c_s = sampled_classes(c_l, rate, batch, world)
    shard = c_l * dim * 4
    logits = batch * c_s * 4
    k = calib[_rate_key(rate)]
    macs = 3.0 * batch * c_s * dim
    row = {"world": world, "sample_rate": rate, "classes_per_rank": c_l,
           "sampled_per_rank": round(c_s), "global_batch": batch,
           "weight_gb": shard / GB, "momentum_gb": shard / GB, "grad_gb": shard / GB,
           "logits_gb": logits / GB,
           "peak_gb": (k["k_w"] * shard + k["k_l"] * logits + k.get("base", 0.0)) / GB,
           "gmacs": macs / 1e9,
           "comm_mb": (2 * batch * dim * 4 + 3 * batch * 4) / 1e6}
    if fit is not None:
        row["step_s"] = predict_time(fit, batch, c_s, c_l, dim)
    return row


def _rate_key(rate: float) -> str:
    return "full" if rate >= 1.0 else "sampled"


def predict_time(fit: dict[str, float], batch: float, c_s: float, c_l: float,
                 dim: int) -> float:
    return (fit["a"] * 3.0 * batch * c_s * dim + fit["b"] * batch * c_s
            + fit["c"] * c_l * dim + fit["d"])


def fit_time(samples: list[dict]) -> dict[str, float]:
    """Non-negative least squares of step seconds on (MACs, logits, shard, 1)."""
    import numpy as np
    from scipy.optimize import nnls

    x = np.array([[3.0 * s["batch"] * s["c_s"] * s["dim"], s["batch"] * s["c_s"],
                   s["c_l"] * s["dim"], 1.0] for s in samples])
    y = np.array([s["step_s"] for s in samples])
    scale = x.max(axis=0)
    scale[scale == 0] = 1.0
    coef, _ = nnls(x / scale, y)
    coef = coef / scale
    pred = x @ coef
    return {"a": float(coef[0]), "b": float(coef[1]), "c": float(coef[2]),
            "d": float(coef[3]),
            "worst_rel_error": float(np.max(np.abs(pred - y) / y)) if len(y) else 0.0}


def solve_counts(weight_heavy: dict, logits_heavy: dict, base: float) -> dict[str, float]:
    """k_w and k_l from two runs: peak extra - base = k_w x shard + k_l x logits (bytes);
    ``base`` is the extra of a toy-size step (allocator and optimiser set-up)."""
    a1, b1, y1 = weight_heavy["shard"], weight_heavy["logits"], weight_heavy["extra"] - base
    a2, b2, y2 = logits_heavy["shard"], logits_heavy["logits"], logits_heavy["extra"] - base
    det = a1 * b2 - a2 * b1
    k_w = (y1 * b2 - y2 * b1) / det
    k_l = (a1 * y2 - a2 * y1) / det
    return {"k_w": k_w, "k_l": k_l, "base": base}


# --------------------------------------------------------------------------- children
def _rss_mb() -> dict[str, float]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            for key in ("VmRSS", "RssAnon", "RssFile"):
                if line.startswith(key + ":"):
                    out[key] = int(line.split()[1]) / 1024
    return out


def _peak_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child_step(cfg: dict) -> dict:
    """Steps of one rank (or one process): PartialFC + SGD on random embeddings."""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    from facekd.models.partial_fc import PartialFC

    world, rank = cfg["world"], cfg["rank"]
    if world > 1:
        dist.init_process_group("gloo", rank=rank, world_size=world)
    g = torch.Generator().manual_seed(rank)
    emb = torch.randn(cfg["batch"], cfg["dim"], generator=g)
    labels = torch.randint(0, cfg["classes"], (cfg["steps"] + 1, cfg["batch"]), generator=g)
    base = _rss_mb()["VmRSS"]
    pfc = PartialFC(cfg["dim"], cfg["classes"], sample_rate=cfg["rate"], seed=0,
                    rank=rank, world_size=world)
    pfc.train()
    opt = torch.optim.SGD(pfc.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    times, cpu, sampled = [], [], []
    for i in range(cfg["steps"] + 1):
        if world > 1:
            dist.barrier()
        start, start_cpu = time.perf_counter(), time.process_time()
        opt.zero_grad(set_to_none=True)
        x = emb.clone().requires_grad_(True)
        pfc(x, labels[i]).backward()
        opt.step()
        if i:  # the first step allocates the momentum: not timed
            times.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
        index = pfc.sample_local(torch.full((1,), -1))
        sampled.append(pfc.num_local if index is None else int(index.numel()))
    out = {"rank": rank, "base_mb": base, "peak_mb": _peak_mb(), "extra_mb": _peak_mb() - base,
           "step_s": statistics.median(cpu), "wall_s": statistics.median(times),
           "cpu_times": cpu, "times": times, "c_l": pfc.num_local,
           "c_s_mean": statistics.mean(sampled)}
    if world > 1:
        dist.destroy_process_group()
    return out


def _row_sums(weight: Any) -> Any:
    """float64 row sums, 64k rows at a time (a whole-shard float64 copy would be twice
    the shard and show up in the peak RSS being measured)."""
    import numpy as np
    import torch

    w = weight.detach()
    return np.concatenate([w[i:i + 65536].to(torch.float64).sum(dim=1).numpy()
                           for i in range(0, w.shape[0], 65536)])


def child_save(cfg: dict) -> dict:
    """One rank of a run that saves its head as the trainer does (rows streamed to 0)."""
    import numpy as np
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    from facekd.models.partial_fc import PartialFC

    world, rank = cfg["world"], cfg["rank"]
    if world > 1:
        dist.init_process_group("gloo", rank=rank, world_size=world)
    pfc = PartialFC(cfg["dim"], cfg["classes"], rank=rank, world_size=world)
    pfc.step = 1234
    np.save(Path(cfg["work"]) / f"rowsum-r{rank}.npy", _row_sums(pfc.weight))
    start = time.perf_counter()
    state = pfc.export_state(main_only=True)
    gathered = time.perf_counter() - start
    saved = None
    if state is not None:
        start = time.perf_counter()
        torch.save({"head": state}, Path(cfg["work"]) / "head.pt")
        saved = time.perf_counter() - start
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return {"rank": rank, "peak_mb": _peak_mb(), "gather_s": gathered, "save_s": saved}


def child_load(cfg: dict) -> dict:
    """Load the saved head at another world size, shard by shard, memory-mapped."""
    import numpy as np
    import torch

    from facekd.models.partial_fc import PartialFC
    from facekd.train.checkpointing import _load_mapped

    work = Path(cfg["work"])
    expected = np.concatenate([np.load(work / f"rowsum-r{r}.npy")
                               for r in range(cfg["saved_world"])])
    start = time.perf_counter()
    state = _load_mapped(work / "head.pt")["head"]
    shards = []
    for rank in cfg["ranks"]:
        pfc = PartialFC(cfg["dim"], cfg["classes"], rank=rank, world_size=cfg["world"])
        t0 = time.perf_counter()
        pfc.load_export_state(state)
        load_s = time.perf_counter() - t0
        got = _row_sums(pfc.weight)
        want = expected[pfc.class_start:pfc.class_start + pfc.num_local]
        shards.append({"rank": rank, "rows": pfc.num_local, "load_s": load_s,
                       "rows_equal": bool(np.array_equal(got, want)),
                       "step": pfc.step, **_rss_mb()})
        del pfc
    return {"world": cfg["world"], "total_s": time.perf_counter() - start, "shards": shards,
            "peak_mb": _peak_mb(), "torch": torch.__version__}


CHILDREN = {"step": child_step, "save": child_save, "load": child_load}


def run_children(job: str, cfgs: list[dict], timeout: float = 1800.0) -> list[dict]:
    """Each cfg in its own fresh process (its own peak RSS); several = one gloo group."""
    from socket import socket

    with socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
           "OMP_NUM_THREADS": "1"}
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    procs = [subprocess.Popen([sys.executable, "-m", "bench.partial_fc_scale", "--child",
                               job, json.dumps(cfg)], env=env, stdout=subprocess.PIPE,
                              text=True, cwd=root) for cfg in cfgs]
    outs = []
    for p in procs:
        stdout, _ = p.communicate(timeout=timeout)
        if p.returncode:
            raise RuntimeError(f"{job} child exited with {p.returncode}")
        outs.append(json.loads(stdout.strip().splitlines()[-1]))
    return outs


# --------------------------------------------------------------------------- the bench
def calibrate(dim: int, quick: bool) -> tuple[dict, dict, list[dict]]:
    """Tensor counts (peak RSS) and the time fit from single-process steps."""
    steps = 2 if quick else 3
    if quick:
        mem_cfgs = {"full": ((8, 40_000, 16), (256, 2_000, 4)),
                    "sampled": ((8, 100_000, 16), (1024, 10_000, 4))}
        time_cfgs = [(16, 4_000, 1.0, dim), (32, 2_000, 1.0, dim), (16, 4_000, 1.0, 4 * dim),
                     (16, 20_000, 0.1, dim), (32, 10_000, 0.1, dim)]
    else:
        # (batch, classes, dim): one run dominated by the shard, one by the logits
        mem_cfgs = {"full": ((8, 2_000_000, 64), (4096, 40_000, 16)),
                    "sampled": ((8, 2_000_000, 64), (4096, 400_000, 16))}
        # (batch, classes, rate, dim): other dims separate the matmul from the per-logit
        # work (at one dim the two terms are proportional)
        time_cfgs = [(128, 50_000, 1.0, dim), (256, 50_000, 1.0, dim),
                     (128, 100_000, 1.0, dim), (256, 100_000, 1.0, dim // 4),
                     (256, 200_000, 1.0, dim // 16), (128, 200_000, 0.1, dim),
                     (256, 200_000, 0.1, dim), (128, 400_000, 0.1, dim)]
    calib: dict[str, dict[str, float]] = {}
    raw: dict[str, Any] = {}
    toy = run_children("step", [{"world": 1, "rank": 0, "batch": 8, "classes": 1000,
                                 "dim": 16, "rate": 1.0, "steps": steps}])[0]
    base = toy["extra_mb"] * 2**20
    raw["base_mb"] = toy["extra_mb"]
    for key, (heavy_w, heavy_l) in mem_cfgs.items():
        rate = 1.0 if key == "full" else 0.1
        runs = []
        for batch, classes, d in (heavy_w, heavy_l):
            out = run_children("step", [{"world": 1, "rank": 0, "batch": batch,
                                         "classes": classes, "dim": d, "rate": rate,
                                         "steps": steps}])[0]
            runs.append({"shard": classes * d * 4, "extra": out["extra_mb"] * 2**20,
                         "logits": batch * out["c_s_mean"] * 4, "batch": batch,
                         "classes": classes, "dim": d, "peak_mb": out["peak_mb"],
                         "extra_mb": out["extra_mb"]})
        calib[key] = solve_counts(*runs, base=base)
        raw[key] = runs
    samples = []
    for batch, classes, rate, d in time_cfgs:
        out = run_children("step", [{"world": 1, "rank": 0, "batch": batch,
                                     "classes": classes, "dim": d, "rate": rate,
                                     "steps": steps}])[0]
        samples.append({"batch": batch, "c_s": out["c_s_mean"], "c_l": classes, "dim": d,
                        "rate": rate, "step_s": out["step_s"]})
    return calib, {"memory_runs": raw}, samples


def mem_available_gb() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024 / GB
    return 0.0


def two_process_check(calib: dict, fit: dict, dim: int, per_rank_batch: int, quick: bool,
                      mem_fraction: float) -> list[dict]:
    """The largest 2-process gloo run per sample rate whose predicted peak fits."""
    budget = mem_fraction * mem_available_gb()
    rows = []
    for rate in RATES:
        candidates = ([20_000, 10_000] if quick else
                      [WEBFACE_CLASSES, WEBFACE_CLASSES // 2, WEBFACE_CLASSES // 4,
                       WEBFACE_CLASSES // 8])
        chosen = None
        for classes in candidates:
            model = rank_model(classes, 2, rate, per_rank_batch, dim, calib, fit)
            if 2 * model["peak_gb"] <= budget:
                chosen = (classes, model)
                break
        if chosen is None:
            rows.append({"sample_rate": rate, "skipped": f"no size fits {budget:.1f} GB"})
            continue
        classes, model = chosen
        outs = run_children("step", [{"world": 2, "rank": r, "batch": per_rank_batch,
                                      "classes": classes, "dim": dim, "rate": rate,
                                      "steps": 2 if quick else 4} for r in range(2)])
        peak = max(o["extra_mb"] for o in outs) * 2**20 / GB
        step = max(o["step_s"] for o in outs)      # CPU seconds of the slower rank
        wall = max(o["wall_s"] for o in outs)
        rows.append({"classes": classes, "sample_rate": rate, "world": 2,
                     "per_rank_batch": per_rank_batch,
                     "classes_per_rank": model["classes_per_rank"],
                     "predicted_peak_gb": model["peak_gb"], "measured_peak_gb": peak,
                     "peak_ratio": peak / model["peak_gb"],
                     "predicted_step_s": model["step_s"], "measured_step_s": step,
                     "step_ratio": step / model["step_s"], "measured_wall_s": wall,
                     "ranks": outs,
                     "budget_gb": budget})
    return rows


def reshard_check(classes: int, dim: int, work: Path) -> dict:
    """Save at world 2 (streamed to rank 0), load at world 1 and as 4 shards."""
    work.mkdir(parents=True, exist_ok=True)
    try:
        saved = run_children("save", [{"world": 2, "rank": r, "classes": classes, "dim": dim,
                                       "work": str(work)} for r in range(2)])
        size = (work / "head.pt").stat().st_size
        loads = [run_children("load", [{"world": w, "ranks": list(range(w)),
                                        "saved_world": 2, "classes": classes, "dim": dim,
                                        "work": str(work)}])[0] for w in (1, 4)]
    finally:
        for name in work.glob("*"):
            name.unlink()
        work.rmdir()
    ok = all(s["rows_equal"] and s["step"] == 1234 for load in loads for s in load["shards"])
    return {"classes": classes, "dim": dim, "file_gb": size / GB, "saved": saved,
            "loads": loads, "all_rows_equal": ok}


def render(result: dict) -> str:
    c = result["classes"]
    lines = [f"# Partial FC at {c:,} classes x {result['dim']} (WebFace42M): per rank", "",
             f"Per-rank batch {result['per_rank_batch']}, SGD momentum, fp32. Computed "
             "with the model in the module docstring; step time is CPU seconds of one core "
             "of this machine per rank (head only, network excluded): divide the GMACs by a "
             "GPU's rate for its time.", "",
             "| world | sample_rate | classes/rank | sampled/rank | global batch | weight GB "
             "| momentum GB | grad GB | logits GB (one B x C_s) | peak GB | GMACs/step "
             "| step CPU-s | sent MB/step |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["table"]:
        lines.append(f"| {r['world']} | {r['sample_rate']} | {r['classes_per_rank']:,} | "
                     f"{r['sampled_per_rank']:,} | {r['global_batch']:,} | "
                     f"{r['weight_gb']:.2f} | {r['momentum_gb']:.2f} | {r['grad_gb']:.2f} | "
                     f"{r['logits_gb']:.2f} | {r['peak_gb']:.2f} | {r['gmacs']:,.0f} | "
                     f"{r['step_s']:.1f} | {r['comm_mb']:.1f} |")
    cal = result["calibration"]["counts"]
    fit = result["calibration"]["time_fit"]
    runs = len(result["calibration"]["time_samples"])
    lines += ["", "## Model constants (measured here)", "",
              f"- tensors alive at the peak, sample_rate 1.0: {cal['full']['k_w']:.2f} x "
              f"weight shard + {cal['full']['k_l']:.2f} x logits; sample_rate 0.1: "
              f"{cal['sampled']['k_w']:.2f} x weight shard + {cal['sampled']['k_l']:.2f} x "
              "logits (3 of the shard-sized ones are weight, gradient, momentum).",
              f"- step CPU seconds = {fit['a'] * 1e9:.3f} s/GMAC x MACs + "
              f"{fit['b'] * 1e9:.3f} s per 1e9 logits + {fit['c'] * 1e9:.3f} s per 1e9 shard "
              f"floats + {fit['d']:.3f} s (worst fit error "
              f"{100 * fit['worst_rel_error']:.0f}% over {runs} single-process runs).", "",
              "## Check: the largest 2-process gloo run that fits this machine", "",
              "| classes | sample_rate | classes/rank | per-rank batch | peak GB predicted | "
              "measured (RSS) | ratio | step CPU-s predicted | measured | ratio | wall s |",
              "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["check"]:
        if "skipped" in r:
            lines.append(f"| – | {r['sample_rate']} | {r['skipped']} | | | | | | | | |")
            continue
        lines.append(f"| {r['classes']:,} | {r['sample_rate']} | {r['classes_per_rank']:,} | "
                     f"{r['per_rank_batch']} | {r['predicted_peak_gb']:.2f} | "
                     f"{r['measured_peak_gb']:.2f} | {r['peak_ratio']:.2f} | "
                     f"{r['predicted_step_s']:.2f} | {r['measured_step_s']:.2f} | "
                     f"{r['step_ratio']:.2f} | {r['measured_wall_s']:.2f} |")
    rs = result.get("reshard")
    if rs:
        lines += ["", f"## Checkpoint resharding at {rs['classes']:,} x {rs['dim']}", "",
                  f"Saved by 2 gloo ranks as the trainer does (rows streamed to rank 0; "
                  f"file {rs['file_gb']:.2f} GB; rank 0 peak "
                  f"{rs['saved'][0]['peak_mb'] / 1024:.2f} GiB, rank 1 "
                  f"{rs['saved'][1]['peak_mb'] / 1024:.2f} GiB), loaded memory-mapped:", "",
                  "| load at world | shard | rows | load s | RssAnon GiB | RssFile GiB "
                  "| rows equal |", "|---:|---:|---:|---:|---:|---:|---|"]
        for load in rs["loads"]:
            for s in load["shards"]:
                lines.append(f"| {load['world']} | {s['rank']} | {s['rows']:,} | "
                             f"{s['load_s']:.2f} | {s['RssAnon'] / 1024:.2f} | "
                             f"{s['RssFile'] / 1024:.2f} | {s['rows_equal']} |")
    lines += ["", f"- {result['load_note']}"]
    if result.get("reshard_note"):
        lines.append(f"- Resharding rerun (python -m bench.partial_fc_scale --reshard-only): "
                     f"{result['reshard_note']}")
    lines += [f"- Command: {result['command']}", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="toy sizes (the suite's test)")
    parser.add_argument("--classes", type=int, default=WEBFACE_CLASSES)
    parser.add_argument("--dim", type=int, default=DIM)
    parser.add_argument("--per-rank-batch", type=int, default=PER_RANK_BATCH)
    parser.add_argument("--check-batch", type=int, default=64,
                        help="per-rank batch of the 2-process check run")
    parser.add_argument("--mem-fraction", type=float, default=0.45,
                        help="share of MemAvailable the 2-process check may use")
    parser.add_argument("--no-reshard", action="store_true")
    parser.add_argument("--reshard-only", action="store_true",
                        help="rerun the resharding part into an existing OUT json")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(CHILDREN[args.child[0]](json.loads(args.child[1]))))
        return {}
    if args.quick:
        args.classes, args.dim, args.per_rank_batch, args.check_batch = 20_000, 16, 8, 8
    name = "partial_fc_scale" + ("_quick" if args.quick else "")
    if args.reshard_only:
        result = json.loads((args.out / f"{name}.json").read_text())
        result["reshard"] = reshard_check(args.classes, args.dim, WORK / "partial_fc_scale")
        result["reshard_note"] = load_note()
        _write(args.out, name, result)
        return result
    calib, raw, samples = calibrate(args.dim, args.quick)
    fit = fit_time(samples)
    table = [rank_model(args.classes, w, rate, args.per_rank_batch, args.dim, calib, fit)
             for w in WORLDS for rate in RATES]
    check = two_process_check(calib, fit, args.dim, args.check_batch, args.quick,
                              args.mem_fraction)
    reshard = None
    if not args.no_reshard:
        # rank 0: its shard + the merged matrix; rank 1: its shard; two interpreters
        need = 2 * args.classes * args.dim * 4 / GB + 1.5
        if need <= 0.7 * mem_available_gb():
            reshard = reshard_check(args.classes, args.dim, WORK / "partial_fc_scale")
        else:
            reshard = {"skipped": f"needs {need:.1f} GB, {mem_available_gb():.1f} available"}
    cmd = "python -m bench.partial_fc_scale" + (" --quick" if args.quick else "")
    result = {"classes": args.classes, "dim": args.dim, "per_rank_batch": args.per_rank_batch,
              "table": table, "check": check,
              "reshard": reshard if reshard and "skipped" not in reshard else None,
              "reshard_skipped": reshard.get("skipped") if reshard else None,
              "calibration": {"counts": calib, "time_fit": fit, "time_samples": samples, **raw},
              "load_note": load_note(), "command": cmd, "machine": machine()}
    _write(args.out, name, result)
    return result


def _write(out: Path, name: str, result: dict) -> None:
    from facekd.fileio import write_json_atomic, write_text_atomic

    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / f"{name}.json", result)
    write_text_atomic(out / f"{name}.md", render(result))
    print(render(result))


if __name__ == "__main__":
    main()
    sys.exit(0)
