"""The GPU check: one script that proves the CUDA path the way users train on it.

``python -m bench.gpu_check`` (or ``make gpu-check``) on a machine with one CUDA GPU, no
network, under 8 minutes; writes ``bench/results/gpu_check.{md,json}``:

a. training images/s of the student alone vs SRD with the teacher cache vs SRD with a
   live teacher (r50, r100), AMP fp16 and bf16, batch 128 (goal: cache <= 1.10x alone);
b. a real ``facekd distill`` SIGKILLed after a checkpoint and rerun: final weights equal
   to an uninterrupted run (run.deterministic on);
c. ``torchrun`` (NCCL on CUDA): the teacher cache built under torchrun, then a distill run
   on it under torchrun, plus a one-rank NCCL collective smoke test;
d. embeddings through facekd's embedder on the device vs CPU (r50, mbf), fp32 (TF32 off):
   cosine >= 0.9999;
e. an ONNX export (with its CPU parity gate), then the file run by onnxruntime's CUDA
   execution provider through the same parity comparison;
f. ``.bin`` verification and IJB evaluation with the embedder on the device vs CPU:
   identical numbers;
g. JPEG batches decoded on the device (``data.decode: device``) vs the cv2 path: pixel
   difference and images/s;
h. ``run.compile``: the torch.compile'd student trains like the eager one, and how fast.

``--device cpu --quick`` runs the same code at small size in a couple of minutes (tests
run it, so the script cannot rot). Every sub-check runs in its own try/except, so one
failure is a row in the table, not a lost run, and a time guard skips what no longer
fits in ``--budget-s``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
FIXTURES = ROOT.parent / "shared" / "fixtures"


@dataclass(frozen=True)
class Sizes:
    """What each check runs at: the real sizes on a GPU, small ones for --quick."""

    student: str
    student_dim: int
    teachers: tuple[str, ...]
    embed_archs: tuple[str, ...]
    batch: int
    classes: int
    warmup: int
    steps: int
    train_images: int
    train_batch: int
    epochs: int
    save_every: int


FULL = Sizes("mbf", 512, ("r50", "r100"), ("r50", "mbf"), 128, 1000, 5, 25, 1280, 64, 10, 20)
QUICK = Sizes("mbf_tiny", 128, ("r_tiny",), ("r_tiny", "mbf_tiny"), 8, 50, 1, 2, 160, 16, 1, 3)


class Context:
    def __init__(self, device: str, sizes: Sizes, work: Path, deadline: float) -> None:
        import torch

        self.torch = torch
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.sizes = sizes
        self.work = work
        self.deadline = deadline

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize(self.device)

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).strip(
            os.pathsep)
        return env

    def run(self, argv: list[str], timeout: float | None = None) -> subprocess.CompletedProcess:
        """A subprocess within the time left; its stderr tail becomes the error."""
        limit = max(5.0, min(timeout or 1e9, self.left()))
        done = subprocess.run(argv, capture_output=True, text=True, env=self.env(),
                              timeout=limit, cwd=ROOT)
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
            raise RuntimeError(f"{' '.join(argv[:6])} ... exited {done.returncode}: "
                               + " | ".join(tail))
        return done


# ------------------------------------------------------------------ shared helpers
def calibrated_model(arch: str, seed: int = 0, **kwargs: Any) -> Any:
    """A random-init backbone whose BN statistics come from one batch (finite outputs)."""
    import torch

    from facekd.models import create_model

    torch.manual_seed(seed)
    model = create_model(arch, **kwargs)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.momentum = 1.0
        model.train()(torch.rand(16, 3, 112, 112) * 2 - 1)
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.momentum = 0.1
    return model.eval()


def save_model(ctx: Context, arch: str, name: str, **kwargs: Any) -> Path:
    from facekd.models.checkpoint import save_checkpoint

    path = ctx.work / f"{name}.pt"
    if not path.exists():
        save_checkpoint(path, calibrated_model(arch, **kwargs), arch, kwargs)
    return path


def dataset(ctx: Context) -> Path:
    from bench._prepdata import make_rec

    s = ctx.sizes
    return make_rec(ctx.work / "data", s.train_images, images_per_id=20)


def no_tf32(torch: Any) -> Callable[[], None]:
    """fp32 means fp32: TF32 off for the comparison, restored after."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False

    def restore() -> None:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
    return restore


# ------------------------------------------------------------------ a. step rate
def fixed_batch(ctx: Context) -> tuple[dict[str, Any], Callable[..., Any]]:
    """One uint8 batch (pinned on CUDA, as the loader yields it) and a loader factory."""
    import torch

    from bench.p4_step_time import FixedBatchLoader

    s = ctx.sizes
    g = torch.Generator().manual_seed(0)
    batch = {"image": torch.randint(0, 256, (s.batch, 3, 112, 112), generator=g,
                                    dtype=torch.uint8),
             "label": torch.randint(0, s.classes, (s.batch,), generator=g),
             "key": torch.arange(s.batch, dtype=torch.long) + 1,
             "flipped": torch.rand(s.batch, generator=g) < 0.5}
    if ctx.cuda:
        batch["image"] = batch["image"].pin_memory()
    unflipped = dict(batch, flipped=torch.zeros(s.batch, dtype=torch.bool))

    def factory(source: str, bs: int, **kw: Any) -> FixedBatchLoader:
        return FixedBatchLoader(unflipped if not kw.get("flip", True) else batch, s.classes)

    return batch, factory


def _step_recipe(ctx: Context, out: Path, extra: list[str]) -> Any:
    from facekd.train.recipe import load_recipe

    s = ctx.sizes
    return load_recipe(None, [
        "data.train=bench", f"data.batch_size={s.batch}", "data.num_workers=0",
        f"student.arch={s.student}", f"student.embedding_size={s.student_dim}",
        f"run.device={ctx.device}", "run.progress=false", "run.tensorboard=false",
        "optim.epochs=1000", "student.head.partial_fc=false", "run.save_every=0",
        f"run.output={out}", *extra])


def check_step_rate(ctx: Context) -> dict[str, Any]:
    """P4 on the device: the trainer's own train_step on one fixed batch, per config."""
    import torch
    import torch.nn.functional as F

    from facekd.models.teacher import Teacher
    from facekd.train.cache import build_teacher_cache
    from facekd.train.trainer import Trainer

    s = ctx.sizes
    g = torch.Generator().manual_seed(0)
    batch, factory = fixed_batch(ctx)
    teachers = {}
    for arch in s.teachers:
        model = calibrated_model(arch)
        centres = F.normalize(torch.randn(s.classes, model.num_features, generator=g), dim=1)
        teachers[arch] = Teacher(model, centres=centres, scale=64.0, device=ctx.device)
    cache = ctx.work / "step_cache"
    build_teacher_cache("", "bench", cache, batch_size=s.batch, dtype="float16",
                        teacher=teachers[s.teachers[0]], progress=False,
                        loader_factory=factory, device=str(ctx.device))
    amps = ("fp16", "bf16") if ctx.cuda else ("none",)
    configs = [("alone", ["method.name=none"], None),
               ("srd + cache", ["method.name=srd", f"teacher.cache={cache}"], None)]
    configs += [(f"srd + live {a}", ["method.name=srd"], t) for a, t in teachers.items()]
    rows = []
    for amp in amps:
        rates: dict[str, float] = {}
        for name, extra, live in configs:
            if ctx.left() < 30:
                rows.append({"amp": amp, "config": name, "error": "time guard"})
                continue
            out = ctx.work / f"rate_{amp}_{name.replace(' ', '_')}"
            recipe = _step_recipe(ctx, out, [*extra, f"run.amp={amp}"])
            trainer = Trainer(recipe, loader_factory=factory, teacher=live)
            try:
                trainer.setup()
                for _ in range(s.warmup):
                    trainer.train_step(dict(batch), None)
                ctx.sync()
                start = time.perf_counter()
                for _ in range(s.steps):
                    trainer.train_step(dict(batch), None)
                ctx.sync()
                rates[name] = s.steps * s.batch / (time.perf_counter() - start)
                skipped = int(trainer.skipped_steps.item())
            finally:
                trainer.close()
            rows.append({"amp": amp, "config": name, "images_per_s": rates[name],
                         "x_alone_time": rates["alone"] / rates[name] if "alone" in rates
                         else None, "skipped_steps": skipped})
    cache_ratios = [r["x_alone_time"] for r in rows if r.get("config") == "srd + cache"
                    and r.get("x_alone_time")]
    # The 1.10x goal is P4 on a GPU at batch 128; on CPU at quick sizes the ratio is noise
    # of a loaded machine, so there the check proves the code path and reports the ratio.
    judged = ctx.cuda and ctx.sizes is not QUICK
    met = bool(cache_ratios) and max(cache_ratios) <= 1.10
    goal = "goal <= 1.10x" if judged else "goal <= 1.10x judged on CUDA at full size only"
    return {"ok": bool(cache_ratios) and (met or not judged), "rows": rows,
            "summary": "srd + cache step time " + ", ".join(f"{x:.3f}x" for x in cache_ratios)
            + f" the student alone ({goal})"}


# ------------------------------------------------------------------ b. kill + resume
def _distill_argv(ctx: Context, out: Path, data: Path, extra: list[str] = ()) -> list[str]:
    s = ctx.sizes
    recipe = ctx.work / "check_recipe.yaml"
    recipe.write_text("method: {name: none}\n", encoding="utf-8")
    return [sys.executable, "-m", "facekd", "distill", str(recipe),
            f"data.train={data}", f"data.batch_size={s.train_batch}", "data.num_workers=2",
            f"student.arch={s.student}", f"student.embedding_size={s.student_dim}",
            f"optim.epochs={s.epochs}", f"run.save_every={s.save_every}",
            f"run.device={ctx.device}", "run.deterministic=true", "run.progress=false",
            "run.tensorboard=false", "run.log_every=5", f"run.output={out}",
            *([] if ctx.cuda else ["run.threads=1"]), *extra]


def check_kill_resume(ctx: Context) -> dict[str, Any]:
    import torch

    data = dataset(ctx)
    full, killed = ctx.work / "run_full", ctx.work / "run_killed"
    ctx.run(_distill_argv(ctx, full, data))
    proc = subprocess.Popen(_distill_argv(ctx, killed, data), env=ctx.env(), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    killed_at = None
    try:
        while proc.poll() is None and ctx.left() > 20:
            found = sorted((killed / "checkpoints").glob("step-*.pt"))
            if found:
                proc.send_signal(signal.SIGKILL)
                killed_at = found[-1].name
                break
            time.sleep(0.02)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    if killed_at is None:
        raise RuntimeError("the run ended before its first checkpoint could be killed")
    if (killed / "student.pt").exists():
        raise RuntimeError("the killed run had already finished (student.pt exists)")
    ctx.run(_distill_argv(ctx, killed, data))
    a = torch.load(full / "student.pt", weights_only=True)["state_dict"]
    b = torch.load(killed / "student.pt", weights_only=True)["state_dict"]
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    summary = json.loads((killed / "summary.json").read_text())
    return {"ok": not differ and a.keys() == b.keys(),
            "summary": f"SIGKILL after {killed_at}; resumed from "
                       f"{Path(summary.get('resumed_from') or '?').name} to step "
                       f"{summary['steps']}; {len(a) - len(differ)}/{len(a)} tensors "
                       "bitwise equal to the uninterrupted run",
            "differ": differ[:10]}


# ------------------------------------------------------------------ c. torchrun
def _torchrun(ctx: Context, nproc: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc-per-node={nproc}"]


def check_torchrun(ctx: Context) -> dict[str, Any]:
    import torch

    nproc = min(2, torch.cuda.device_count()) if ctx.cuda else 1
    data = dataset(ctx)
    teacher = save_model(ctx, ctx.sizes.teachers[0], "teacher")
    cache = ctx.work / "torchrun_cache"
    device = "cuda" if ctx.cuda else "cpu"   # torchrun: each rank its LOCAL_RANK's GPU
    ctx.run([*_torchrun(ctx, nproc), "-m", "facekd", "teacher", "cache", str(teacher),
             str(data), str(cache), "--device", device, "--batch-size", "32"])
    meta = json.loads((cache / "meta.json").read_text())
    out = ctx.work / "torchrun_run"
    argv = _distill_argv(ctx, out, data, ["method.name=feature", f"teacher.cache={cache}",
                                          f"run.device={device}"])
    ctx.run([*_torchrun(ctx, nproc), *argv[1:]])
    summary = json.loads((out / "summary.json").read_text())
    smoke = "skipped (CPU)"
    if ctx.cuda:
        ctx.run([*_torchrun(ctx, 1), "-m", "bench.gpu_check", "--nccl-smoke"], timeout=120)
        smoke = "one-rank NCCL all_reduce + all_gather_object ok"
    ok = meta.get("complete") and meta["num_samples"] == ctx.sizes.train_images and \
        summary["world_size"] == nproc
    return {"ok": bool(ok),
            "summary": f"torchrun x{nproc}: cache of {meta['num_samples']} samples "
                       f"(world size {meta['world_size']}), distill world size "
                       f"{summary['world_size']} to step {summary['steps']}; {smoke}"}


def nccl_smoke() -> int:
    """Under torchrun: the collectives facekd uses, on NCCL, one rank."""
    import torch
    import torch.distributed as dist

    local = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(local)
    dist.init_process_group("nccl")
    try:
        t = torch.ones(4, device=f"cuda:{local}")
        dist.all_reduce(t)
        box: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(box, {"rank": dist.get_rank()})
        assert float(t.sum()) == 4.0 * dist.get_world_size() and box[0] == {"rank": 0}
    finally:
        dist.destroy_process_group()
    return 0


# ------------------------------------------------------------------ d. embeddings
def _faces(n: int) -> np.ndarray:
    from facekd.export.parity import synthetic_aligned_faces, to_model_input

    return to_model_input(synthetic_aligned_faces(n))


def check_embeddings(ctx: Context) -> dict[str, Any]:
    import torch

    from facekd.models.embedder import load_embedder

    x = _faces(64 if ctx.cuda else 16)
    restore = no_tf32(torch)
    rows = []
    try:
        for arch in ctx.sizes.embed_archs:
            path = save_model(ctx, arch, f"embed_{arch}")
            cpu = load_embedder(path, device="cpu")(x)
            dev = load_embedder(path, device=str(ctx.device))(x)
            cos = np.sum(cpu * dev, 1) / (np.linalg.norm(cpu, axis=1) *
                                          np.linalg.norm(dev, axis=1))
            rows.append({"arch": arch, "min_cosine": float(cos.min()),
                         "max_abs_diff": float(np.abs(cpu - dev).max())})
    finally:
        restore()
    return {"ok": all(r["min_cosine"] >= 0.9999 for r in rows), "rows": rows,
            "summary": ", ".join(f"{r['arch']} min cos {r['min_cosine']:.7f}" for r in rows)
            + " (goal >= 0.9999, fp32, TF32 off)"}


# ------------------------------------------------------------------ e. ONNX on the device
def check_onnx(ctx: Context) -> dict[str, Any]:
    import onnxruntime as ort

    from facekd.export.onnx_export import export_onnx, load_student
    from facekd.export.parity import FP32_THRESHOLDS, compare_embeddings, torch_embeddings

    ckpt = save_model(ctx, ctx.sizes.student, "onnx_student",
                      num_features=ctx.sizes.student_dim)
    out = ctx.work / "student.onnx"
    export_onnx(ckpt, out)   # raises if the CPU parity gate refuses the file
    provider = "CUDAExecutionProvider" if ctx.cuda else "CPUExecutionProvider"
    if provider not in ort.get_available_providers():
        raise RuntimeError(f"onnxruntime {ort.__version__} has no {provider} (providers: "
                           f"{ort.get_available_providers()}); install onnxruntime-gpu")
    session = ort.InferenceSession(str(out), providers=[provider])
    if session.get_providers()[0] != provider:
        raise RuntimeError(f"session fell back to {session.get_providers()}")
    x = _faces(32)
    name = session.get_inputs()[0].name
    got = session.run(None, {name: x})[0].astype(np.float32)
    ref = torch_embeddings(load_student(ckpt).model, x)
    report = compare_embeddings(ref, got, "fp32", FP32_THRESHOLDS)
    return {"ok": bool(report.passed), "summary": f"{provider}: 1-cos "
            f"{report.max_one_minus_cos:.2e}, max|diff| scaled "
            f"{report.max_abs_diff_scaled:.2e} (fp32 gate)", "report": _plain(report)}


def _plain(obj: Any) -> Any:
    from dataclasses import asdict, is_dataclass

    return asdict(obj) if is_dataclass(obj) else obj


# ------------------------------------------------------------------ f. evaluation
def _numbers(obj: Any, prefix: str = "") -> dict[str, float]:
    """Every scalar number in an evaluation result, by dotted key (arrays left out)."""
    found: dict[str, float] = {}
    if isinstance(obj, dict):
        for key, value in obj.items():
            found.update(_numbers(value, f"{prefix}{key}."))
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        found[prefix.rstrip(".")] = float(obj)
    return found


def tiny_ijb(root: Path) -> Path:
    """An IJB-C-layout folder from the six fixture loose crops (templates, medias, pairs)."""
    import shutil

    (root / "meta").mkdir(parents=True, exist_ok=True)
    (root / "loose_crop").mkdir(exist_ok=True)
    ijb = FIXTURES / "ijb"
    lines = (ijb / "meta" / "ijbc_name_5pts_score.txt").read_text().splitlines()[:6]
    names = [line.split()[0] for line in lines]
    for name in names:
        shutil.copy(ijb / "loose_crop" / name, root / "loose_crop" / name)
    (root / "meta" / "ijbc_name_5pts_score.txt").write_text("\n".join(lines) + "\n")
    templates, medias = [10, 10, 20, 20, 30, 40], [100, 100, 200, 201, 300, 400]
    (root / "meta" / "ijbc_face_tid_mid.txt").write_text("".join(
        f"{n} {t} {m}\n" for n, t, m in zip(names, templates, medias, strict=True)))
    pairs = [(10, 20, 1), (10, 30, 0), (20, 40, 0), (30, 40, 1), (10, 40, 0), (20, 30, 0)]
    (root / "meta" / "ijbc_template_pair_label.txt").write_text(
        "".join(f"{a} {b} {label}\n" for a, b, label in pairs))
    return root


def check_evaluation(ctx: Context) -> dict[str, Any]:
    from facekd.evaluate.pipeline import evaluate_bin, evaluate_ijb
    from facekd.models.embedder import load_embedder

    path = save_model(ctx, ctx.sizes.embed_archs[-1], f"embed_{ctx.sizes.embed_archs[-1]}")
    ijb = tiny_ijb(ctx.work / "ijb")
    results = {}
    for where in ("cpu", str(ctx.device)):
        embedder = load_embedder(path, device=where)
        results[where] = {
            "bin": _numbers(evaluate_bin(embedder, FIXTURES / "verification" / "tiny_pairs.bin",
                                         use_cache=False, progress=False)),
            "ijb": _numbers(evaluate_ijb(embedder, ijb, "IJBC", use_cache=False,
                                         progress=False, workers=1)),
        }
    cpu, dev = results["cpu"], results[str(ctx.device)]
    differ = [f"{part}.{k}" for part in ("bin", "ijb") for k in cpu[part]
              if not (cpu[part][k] == dev[part].get(k) or
                      (math.isnan(cpu[part][k]) and math.isnan(dev[part].get(k, 0.0))))]
    compared = sum(len(cpu[p]) for p in ("bin", "ijb"))
    return {"ok": not differ, "differ": differ[:20],
            "summary": f"{compared - len(differ)}/{compared} reported numbers identical "
                       "(.bin verification + IJB-C-layout fixture); the IJB scoring itself "
                       "is host numpy at any size, so only the embeddings see the device"}


# ------------------------------------------------------------------ g. JPEG decoding
def check_jpeg_decode(ctx: Context) -> dict[str, Any]:
    import cv2
    import torch

    from bench._prepdata import jpeg_pool
    from facekd.data.device_decode import decode_on_device, pack_payloads

    payloads = jpeg_pool(256 if ctx.cuda else 32)
    buffer, lengths = pack_payloads(payloads)
    flips = torch.zeros(len(payloads), dtype=torch.bool)
    ref = np.stack([cv2.imdecode(np.frombuffer(p, np.uint8), cv2.IMREAD_COLOR)[:, :, ::-1]
                    .transpose(2, 0, 1) for p in payloads])
    got = decode_on_device(buffer, lengths, flips, ctx.device, 112).cpu().numpy()
    diff = np.abs(got.astype(np.int16) - ref.astype(np.int16))
    rounds = 10 if ctx.cuda else 2
    ctx.sync()
    start = time.perf_counter()
    for _ in range(rounds):
        decode_on_device(buffer, lengths, flips, ctx.device, 112)
    ctx.sync()
    rate = rounds * len(payloads) / (time.perf_counter() - start)
    return {"ok": float(diff.mean()) <= 1.0,
            "summary": f"vs cv2: max |diff| {int(diff.max())}, mean {diff.mean():.3f} levels "
                       f"(goal mean <= 1); {rate:,.0f} images/s decoded on {ctx.device}",
            "max_abs": int(diff.max()), "mean_abs": float(diff.mean()),
            "images_per_s": rate}


# ------------------------------------------------------------------ h. torch.compile
def check_compile(ctx: Context) -> dict[str, Any]:
    """run.compile: the compiled student trains like the eager one (same losses within
    1 %), and its steady step rate next to eager. CPU quick mode compiles with dynamo's
    eager backend (graph capture only): inductor's C++ build takes minutes on a CPU."""
    import functools

    import torch

    from facekd.train.trainer import Trainer

    batch, factory = fixed_batch(ctx)
    steps = 3 if ctx.cuda else 2
    backend = "inductor" if ctx.cuda else "eager"
    real_compile = torch.compile
    out: dict[str, Any] = {}
    for mode in ("eager", "compiled"):
        recipe = _step_recipe(ctx, ctx.work / f"compile_{mode}",
                              ["method.name=none", f"run.compile={mode == 'compiled'}"])
        torch.compile = functools.partial(real_compile, backend=backend)  # type: ignore
        trainer = Trainer(recipe, loader_factory=factory)
        try:
            trainer.setup()
            start = time.perf_counter()
            losses = [float(trainer.train_step(dict(batch), None)["loss"])
                      for _ in range(steps)]
            ctx.sync()
            first = time.perf_counter() - start
            start = time.perf_counter()
            for _ in range(steps):
                trainer.train_step(dict(batch), None)
            ctx.sync()
            rate = steps * ctx.sizes.batch / (time.perf_counter() - start)
        finally:
            torch.compile = real_compile  # type: ignore
            trainer.close()
        out[mode] = {"losses": losses, "first_steps_s": first, "images_per_s": rate}
    rel = max(abs(a - b) / max(abs(a), 1e-6) for a, b in
              zip(out["eager"]["losses"], out["compiled"]["losses"], strict=True))
    ok = rel <= 0.01 and all(math.isfinite(x) for x in out["compiled"]["losses"])
    return {"ok": ok, **out, "backend": backend,
            "summary": f"backend {backend}: losses within {rel:.2e} of eager; "
                       f"{out['compiled']['images_per_s']:,.0f} vs eager "
                       f"{out['eager']['images_per_s']:,.0f} images/s; first {steps} steps "
                       f"{out['compiled']['first_steps_s']:.0f} s (compiling)"}


CHECKS: list[tuple[str, str, Callable[[Context], dict[str, Any]], float]] = [
    # (key, what, function, seconds it needs at least to be worth starting)
    ("d", "embeddings device vs CPU", check_embeddings, 20),
    ("f", ".bin + IJB evaluation device vs CPU", check_evaluation, 20),
    ("g", "JPEG decode on the device vs cv2", check_jpeg_decode, 10),
    ("e", "ONNX export + onnxruntime device EP", check_onnx, 30),
    ("a", "step rate: alone / srd+cache / srd+live (AMP)", check_step_rate, 60),
    ("b", "SIGKILL after a checkpoint + resume", check_kill_resume, 60),
    ("c", "torchrun: teacher cache + distill", check_torchrun, 60),
    ("h", "run.compile: torch.compile of the student", check_compile, 90),
]


def run_checks(ctx: Context, only: set[str] | None = None) -> list[dict[str, Any]]:
    results = []
    for key, what, fn, needs in CHECKS:
        if only and key not in only:
            continue
        row: dict[str, Any] = {"check": key, "what": what}
        if ctx.left() < needs:
            row.update(status="SKIPPED", summary=f"time guard: {ctx.left():.0f} s left")
            results.append(row)
            continue
        start = time.perf_counter()
        try:
            out = fn(ctx)
            row.update(out)
            row["status"] = "PASS" if out.get("ok") else "FAIL"
        except Exception as exc:  # one failing check must not lose the others
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            row.update(status="ERROR", summary=f"{type(exc).__name__}: {first}"[:400],
                       traceback=traceback.format_exc(limit=6))
        row["seconds"] = round(time.perf_counter() - start, 1)
        results.append(row)
        print(f"[{key}] {row['status']} {row['seconds']} s: {row.get('summary', '')}",
              flush=True)
    return results


def write_report(out_dir: Path, ctx: Context, results: list[dict[str, Any]],
                 args: argparse.Namespace, total: float) -> Path:
    from facekd.fileio import write_json_atomic, write_text_atomic

    torch = ctx.torch
    name = (torch.cuda.get_device_name(ctx.device) if ctx.cuda
            else platform.processor() or platform.machine())
    command = "python -m bench.gpu_check" + (f" --device {args.device}" if args.device
                                             != "cuda" else "") + (" --quick" if args.quick
                                                                   else "")
    lines = ["# GPU check", "",
             f"Device {ctx.device} ({name}), torch {torch.__version__}, "
             f"{'quick sizes' if args.quick else 'full sizes'}; {total:.0f} s in all.", "",
             "| check | what | status | seconds | result |", "|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['check']} | {r['what']} | {r['status']} | {r.get('seconds', '')} "
                     f"| {str(r.get('summary', '')).replace('|', '/')} |")
    step = next((r for r in results if r["check"] == "a" and r.get("rows")), None)
    if step:
        lines += ["", "Step rate (trainer.train_step on one fixed batch, synchronised):", "",
                  "| amp | config | images/s | x alone (time) |", "|---|---|---|---|"]
        for row in step["rows"]:
            ratio = row.get("x_alone_time")
            lines.append(f"| {row['amp']} | {row['config']} | "
                         f"{row.get('images_per_s', 0):,.0f} | "
                         f"{'' if ratio is None else f'{ratio:.3f}'} "
                         f"{row.get('error', '')} |")
    lines += ["", f"Command: `{command}`", ""]
    out_dir.mkdir(parents=True, exist_ok=True)
    md = out_dir / "gpu_check.md"
    write_text_atomic(md, "\n".join(lines))
    write_json_atomic(out_dir / "gpu_check.json", {
        "device": str(ctx.device), "device_name": name, "quick": args.quick,
        "torch": torch.__version__, "python": platform.python_version(),
        "cuda": torch.version.cuda, "total_seconds": total, "command": command,
        "results": results})
    return md


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    parser.add_argument("--quick", action="store_true", help="small sizes (CPU: minutes)")
    parser.add_argument("--budget-s", type=float, default=450.0,
                        help="total time guard; checks that no longer fit are skipped")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the report")
    parser.add_argument("--only", default="", help="comma-separated check letters (a-h)")
    parser.add_argument("--nccl-smoke", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.nccl_smoke:
        return nccl_smoke()
    from facekd.devices import pick_device
    from facekd.errors import FacekdError

    try:
        device = pick_device(args.device, option="--device")
    except FacekdError as exc:
        print(f"gpu_check: error: {exc}", file=sys.stderr)
        return 2
    if device.type == "cpu":
        import torch

        torch.set_num_threads(1)  # CPU mode is a smoke run: one core, steady on shared hosts
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        ctx = Context(str(device), QUICK if args.quick else FULL, Path(tmp),
                      start + args.budget_s)
        only = {c.strip() for c in args.only.split(",") if c.strip()} or None
        results = run_checks(ctx, only)
        md = write_report(args.out, ctx, results, args, time.perf_counter() - start)
    print(md.read_text())
    return 0 if all(r["status"] == "PASS" for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
